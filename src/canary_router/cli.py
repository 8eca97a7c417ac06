"""The ``canary-router`` command line (extra ``cli``: click for parsing, rich for tables and progress).

Exit codes: 0 success; 1 the check failed (invalid config, a demo invariant broken); 2 usage error;
3 a needed extra is not installed.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .bucketing import bucket
from .config import load_file
from .errors import CanaryError, ConfigError
from .router import Router
from .testing import RecordingObserver

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="canary-router")
def cli() -> None:
    """Canary deployments inside your application: bucket users, route code paths, roll out safely."""


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def validate(files: Sequence[str], as_json: bool) -> None:
    """Validate config FILES (TOML, YAML or JSON); print every problem, exit 1 if any."""
    console = Console(highlight=False, soft_wrap=True)
    results: list[dict[str, Any]] = []
    failed = False
    for file in files:
        try:
            config = load_file(file)
        except ConfigError as exc:
            failed = True
            results.append(
                {
                    "file": file,
                    "ok": False,
                    "errors": [{"path": i.path, "message": i.message, "hint": i.hint} for i in exc.issues],
                }
            )
            if not as_json:
                noun = "problem" if len(exc.issues) == 1 else "problems"
                console.print(f"[bold red]✗ {file}[/]: {len(exc.issues)} {noun}")
                for issue in exc.issues:
                    console.print(f"  {issue}", markup=False)
            continue
        names = list(config.rollouts)
        results.append({"file": file, "ok": True, "rollouts": names, "segments": list(config.segments)})
        if not as_json:
            listing = ", ".join(names) or "none"
            console.print(f"[bold green]✓ {file}[/]: {len(names)} rollout(s): {listing}")
    if as_json:
        click.echo(json.dumps(results, indent=2))
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


@cli.command("bucket")
@click.argument("salt")
@click.argument("unit_ids", nargs=-1, required=True)
def bucket_command(salt: str, unit_ids: Sequence[str]) -> None:
    """Print the v1 bucket (0..9999) of each UNIT_ID under SALT (the rollout name by default)."""
    for unit in unit_ids:
        click.echo(f"{unit}\t{bucket(salt, unit)}")


DEMO_CONFIG: dict[str, Any] = {
    "rollouts": {
        "recommender": {
            "description": "Recommendation engine v2",
            "stickiness": "user_id",
            "steps": [5, 10, 25, 50, 100],
            "bake_time": "1h",
            "rules": [
                {
                    "name": "internal-testers",
                    "when": [{"attribute": "email", "operator": "STR_ENDS_WITH", "values": ["@example.com"]}],
                    "serve": "new",
                }
            ],
        }
    }
}


@cli.command()
@click.option(
    "--users",
    default=20_000,
    show_default=True,
    type=click.IntRange(100, 10_000_000),
    help="Number of simulated users.",
)
@click.option("--seed", default=7, show_default=True, type=int, help="Seed of the simulated user ids.")
@click.option(
    "--testers",
    default=20,
    show_default=True,
    type=click.IntRange(0, 10_000),
    help="Internal testers (@example.com) who always get the new version.",
)
def demo(users: int, seed: int, testers: int) -> None:
    """Walk a rollout through 5 → 10 → 25 → 50 → 100 % with simulated users and check stickiness."""
    console = Console(highlight=False)
    rng = random.Random(seed)  # noqa: S311  # simulated user ids, not secrets
    ids = [f"user-{rng.getrandbits(64):016x}" for _ in range(users)]
    tester_ids = set(ids[:testers])
    router = Router.from_config(DEMO_CONFIG)
    recorder = RecordingObserver()
    router.add_observer(recorder)

    def recommend_v1(user_id: str) -> str:
        return "v1"

    @router.canary("recommender", old=recommend_v1)
    def recommend_v2(user_id: str) -> str:
        return "v2"

    console.print(
        f"[bold]canary-router demo[/]: {users:,} simulated users ({testers} internal testers), rollout "
        "[cyan]recommender[/], steps 5 → 10 → 25 → 50 → 100 %"
    )
    table = Table(title="Observed split per step")
    for column in ("step", "target %", "users on new", "observed %", "moved back to old", "testers on new"):
        table.add_column(column, justify="right")
    on_new: set[str] = set()
    moved_back_total = 0
    broken: list[str] = []
    steps = router.rollouts["recommender"].steps
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        for index, target in enumerate(steps):
            task = progress.add_task(f"step {index + 1}: {target:g} %", total=users)
            now_new: set[str] = set()
            testers_new = 0
            for number, user in enumerate(ids):
                email = f"{user}@example.com" if user in tester_ids else f"{user}@mail.test"
                with router.context(user_id=user, email=email):
                    if recommend_v2(user) == "v2":
                        now_new.add(user)
                        testers_new += user in tester_ids
                if number % 2000 == 1999:
                    progress.advance(task, 2000)
            progress.update(task, completed=users)
            moved_back = len(on_new - now_new)
            moved_back_total += moved_back
            regular = len(now_new - tester_ids)
            observed = 100.0 * regular / max(1, users - len(tester_ids))
            table.add_row(
                f"{index + 1}",
                f"{target:g}",
                f"{len(now_new):,}",
                f"{observed:.2f}",
                f"{moved_back:,}",
                f"{testers_new}/{len(tester_ids)}",
            )
            if abs(observed - target) > max(1.0, 4 * 100 * (target / 100 * (1 - target / 100) / users) ** 0.5):
                broken.append(f"step {index + 1}: observed {observed:.2f} % for a target of {target:g} %")
            if testers_new != len(tester_ids):
                broken.append(f"step {index + 1}: only {testers_new} of {len(tester_ids)} testers got the new version")
            on_new = now_new
            if index + 1 < len(steps):
                router.promote("recommender", actor="demo")
    router.promote("recommender", actor="demo")
    console.print(table)
    status = router.status("recommender")
    console.print(
        f"calls observed: {recorder.count('recommender', 'new'):,} new, {recorder.count('recommender', 'old'):,} old; "
        f"final phase: [bold]{status.phase.value}[/] after {len(status.history)} audited transitions"
    )
    if moved_back_total:
        broken.append(f"{moved_back_total} users who had the new version were moved back to the old one")
    if broken:
        for line in broken:
            console.print(f"[bold red]✗[/] {line}")
        sys.exit(EXIT_FAILED)
    console.print("[bold green]✓[/] nobody who got the new version went back to the old one")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; library errors become one clear line on stderr (exit 1), never a traceback."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="canary-router", standalone_mode=True)
    except CanaryError as exc:
        click.echo(f"canary-router: {exc}", err=True)
        sys.exit(EXIT_FAILED)
