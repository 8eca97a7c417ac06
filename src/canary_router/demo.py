"""``canary-router demo``: an automated rollout on simulated traffic (needs the ``cli`` extra for rich).

Real parts: the Router built from :data:`DEMO_CONFIG`, two decorated implementations, the guard and the
Controller, an in-memory store. Simulated: the users, their requests, the failures of the new version in
the faulty scenario, and the clock (compressed: the controller's bake times pass in seconds).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .model import Phase
from .router import Router

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG: dict[str, Any] = {
    "rollouts": {
        "recommender": {
            "description": "Recommendation engine v2",
            "stickiness": "user_id",
            "steps": [5, 10, 25, 50, 100],
            "bake_time": "5m",
            "max_bake_time": "30m",
            "guard": {"max_error_rate_increase": 0.01, "min_requests": 500, "alpha": 0.01},
            "rules": [
                {
                    "name": "internal-testers",
                    "when": [{"attribute": "email", "operator": "STR_ENDS_WITH", "values": ["@example.com"]}],
                    "serve": "new",
                },
                {
                    "name": "eu-fast-lane",
                    "when": [{"attribute": "region", "operator": "IN", "values": ["eu-west-1"]}],
                    "percent": 50,
                },
            ],
        }
    }
}
"""The embedded configuration: the DESIGN example, with a 5-minute bake time per step."""

REGIONS = ("eu-west-1", "us-east-1", "ap-south-1")
BASE_ERROR_RATE = 0.005
FAULTY_EXTRA = 0.03


class _Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class DemoError(Exception):
    """A simulated application error."""


@dataclass
class _Step:
    label: str
    started: float
    ended: float = 0.0
    new_requests: int = 0
    new_errors: int = 0
    old_requests: int = 0
    old_errors: int = 0
    outcome: str = ""
    users_new: set[str] = field(default_factory=set)


def run_demo(*, scenario: str, users: int, seed: int, rps: int, console: Console) -> int:
    """Run the demo; returns the exit code (0 when the rollout ended as the scenario expects)."""
    rng = random.Random(seed)  # noqa: S311  # simulated traffic, not secrets
    population = [
        (f"user-{rng.getrandbits(48):012x}", REGIONS[i % 3], i < 20) for i in range(users)
    ]  # (id, region, internal tester)
    clock = _Clock(1_767_225_600.0)
    router = Router.from_config(DEMO_CONFIG, clock=clock)
    controller = router.controller()
    faulty = scenario == "faulty"

    def recommend_v1(user_id: str, region: str) -> list[str]:
        if rng.random() < BASE_ERROR_RATE:
            raise DemoError("v1 failed")
        return ["bestsellers"]

    @router.canary("recommender", old=recommend_v1, context_from=("user_id", "region"))
    def recommend_v2(user_id: str, region: str) -> list[str]:
        rate = BASE_ERROR_RATE + (FAULTY_EXTRA if faulty and region == "eu-west-1" else 0.0)
        if rng.random() < rate:
            raise DemoError("v2 failed")
        return ["personalised"]

    console.print(
        f"[bold]canary-router demo[/] — scenario [cyan]{scenario}[/]: {users:,} users in {len(REGIONS)} regions, "
        f"{rps} requests/s (simulated), rollout [cyan]recommender[/] 5 → 10 → 25 → 50 → 100 %, "
        "bake time 5 min per step"
    )
    if faulty:
        console.print("  the new version fails 3 % of requests in eu-west-1 (which expands faster: 50 %)")
    steps: list[_Step] = [_Step("5 %", clock.now)]
    ever_new: set[str] = set()
    moved_back = 0
    horizon = 4 * 3600.0
    start = clock.now
    version = router.status("recommender").version
    interval = 1.0 / rps
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("simulated time", total=horizon, detail="")
        while clock.now - start < horizon:
            for _ in range(rps):  # one simulated second
                clock.now += interval
                user, region, tester = population[rng.randrange(users)]
                email = f"{user}@example.com" if tester else f"{user}@mail.test"
                decision = router.decide("recommender", {"user_id": user, "region": region, "email": email})
                step = steps[-1]
                try:
                    with router.context(email=email):
                        recommend_v2(user, region)
                    failed = False
                except DemoError:
                    failed = True
                if decision.variant == "new":
                    step.new_requests += 1
                    step.new_errors += failed
                    step.users_new.add(user)
                    ever_new.add(user)
                else:
                    step.old_requests += 1
                    step.old_errors += failed
                    if user in ever_new and router.status("recommender", history=0).phase is not Phase.ROLLED_BACK:
                        moved_back += 1
            controller.tick()
            status = router.status("recommender", history=1)
            if status.version != version:
                version = status.version
                record = status.history[-1]
                steps[-1].ended = clock.now
                steps[-1].outcome = record.action
                minutes = (clock.now - start) / 60
                console.print(f"  [dim]{minutes:5.1f} min[/] [bold]{record.action}[/]: {record.reason}", markup=True)
                if status.phase in (Phase.COMPLETED, Phase.ROLLED_BACK):
                    break
                steps.append(_Step(f"{status.percent:g} %", clock.now))
            progress.update(
                task,
                completed=clock.now - start,
                detail=f"{status.phase.value} at {status.percent:g} %",
            )
    final = router.status("recommender")
    table = Table(title=f"recommender — {scenario}")
    for column in ("step", "minutes", "new requests", "new error rate", "old error rate", "users on new", "ended by"):
        table.add_column(column, justify="right")
    for step in steps:
        end = step.ended or clock.now
        table.add_row(
            step.label,
            f"{(end - step.started) / 60:.1f}",
            f"{step.new_requests:,}",
            f"{100 * step.new_errors / step.new_requests:.2f} %" if step.new_requests else "—",
            f"{100 * step.old_errors / step.old_requests:.2f} %" if step.old_requests else "—",
            f"{len(step.users_new):,}",
            step.outcome or "—",
        )
    console.print(table)
    console.print(f"final phase: [bold]{final.phase.value}[/] ({final.reason})", markup=True)
    if moved_back:
        console.print(f"[bold red]✗[/] {moved_back} requests of users who had had the new version were served old")
        return 1
    console.print("[bold green]✓[/] stickiness held: nobody who got the new version went back to the old one")
    expected = Phase.ROLLED_BACK if faulty else Phase.COMPLETED
    if final.phase is not expected:
        console.print(f"[bold red]✗[/] expected the rollout to end {expected.value}, it is {final.phase.value}")
        return 1
    return 0
