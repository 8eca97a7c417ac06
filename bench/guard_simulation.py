"""Monte-Carlo proof of the guard: false rollbacks, detection power, time to rollback, the controller.

Every scenario drives the library's real code: the per-look scenarios call ``canary_router.analysis.evaluate``
on real ``StepSnapshot`` aggregates after every ``look`` requests; the schedule scenarios run a real
``Router`` and ``Controller`` on a fake clock, feeding the router's real ``Aggregator``. Only the traffic is
simulated (numpy draws, seeded).

    python bench/guard_simulation.py                      # 1,000 rollouts per scenario, print a table
    python bench/guard_simulation.py --write docs/guard-simulation.md
    python bench/guard_simulation.py --runs 50 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from canary_router import GuardConfig, Outcome, Router
from canary_router.analysis import evaluate
from canary_router.observe import BOUNDS, StepSnapshot, VariantSnapshot

EDGES = np.asarray(BOUNDS)
NBUCKETS = len(BOUNDS) + 1
BASE_LATENCY = 0.050  # seconds, median of the old version
SIGMA = 0.5  # log-normal spread of latency
OLD_P99 = BASE_LATENCY * math.exp(SIGMA * 2.3263)


@dataclass(frozen=True)
class Scenario:
    """One per-look scenario: traffic shape of the new version against the old one."""

    name: str
    title: str
    p_old: float = 0.005
    p_new: float = 0.005
    latency_factor: float = 1.0
    tail_share: float = 0.0  # extra share of new requests pushed above the old p99
    share: float = 0.05
    total: int = 200_000
    look: int = 100


SCENARIOS: dict[str, Scenario] = {
    "aa": Scenario("aa", "A/A: both versions at 0.5 % errors"),
    "regression": Scenario("regression", "Regression: 0.5 % → 2.5 % errors", p_new=0.025),
    "catastrophe": Scenario("catastrophe", "Catastrophe: the new path always fails", p_new=1.0, total=20_000, look=1),
    "latency": Scenario("latency", "Slowdown: every new request 1.5× slower", latency_factor=1.5),
    "tail": Scenario("tail", "Tail: 2 % extra new requests slower than the old p99", tail_share=0.02),
}


def histogram(rng: np.random.Generator, n: int, factor: float, tail_share: float) -> np.ndarray:
    """Draw ``n`` latencies and count them into the library's histogram buckets."""
    if n == 0:
        return np.zeros(NBUCKETS, dtype=np.int64)
    values = rng.lognormal(math.log(BASE_LATENCY * factor), SIGMA, n)
    if tail_share:
        slow = rng.random(n) < tail_share
        values[slow] = OLD_P99 * rng.uniform(1.5, 4.0, int(slow.sum()))
    index = np.searchsorted(EDGES, values, side="right")
    return np.bincount(index, minlength=NBUCKETS)


@dataclass
class RunResult:
    """The outcome of one simulated rollout."""

    rolled_back: bool = False
    requests: int | None = None  # total requests when rolled back
    new_requests: int | None = None
    check: str | None = None
    naive_rolled_back: bool = False
    naive_sparse_rolled_back: bool = False  # the naive rule checked only every ~100 new-version requests
    first_pass: int | None = None  # total requests at the first PASS verdict (when the step could be promoted)


def one_run(scenario: Scenario, seed: int, guard: GuardConfig) -> RunResult:
    """Simulate one rollout at a fixed canary share, consulting the guard after every ``look`` requests."""
    rng = np.random.default_rng(seed)
    counts = {"old": [0, 0, np.zeros(NBUCKETS, dtype=np.int64)], "new": [0, 0, np.zeros(NBUCKETS, dtype=np.int64)]}
    result = RunResult()
    seen = 0
    while seen < scenario.total:
        n_new = int(rng.binomial(scenario.look, scenario.share))
        n_old = scenario.look - n_new
        for variant, n, p, factor, tail in (
            ("new", n_new, scenario.p_new, scenario.latency_factor, scenario.tail_share),
            ("old", n_old, scenario.p_old, 1.0, 0.0),
        ):
            arm = counts[variant]
            arm[0] += n
            arm[1] += int(rng.binomial(n, p)) if n else 0
            arm[2] += histogram(rng, n, factor, tail)
        seen += scenario.look
        new_req, new_err = counts["new"][0], counts["new"][1]
        old_req, old_err = counts["old"][0], counts["old"][1]
        # the naive rule, on the same traffic and looks: new rate − old rate > 1 pp, from 100 new requests on
        naive = new_req >= 100 and old_req > 0 and new_err / new_req - old_err / old_req > 0.01
        result.naive_rolled_back = result.naive_rolled_back or naive
        result.naive_sparse_rolled_back = result.naive_sparse_rolled_back or (naive and seen % 2000 == 0)
        if not result.rolled_back:
            snapshot = StepSnapshot(
                "sim",
                1,
                0.0,
                VariantSnapshot(old_req, old_err, tuple(counts["old"][2].tolist()), 0, 0),
                VariantSnapshot(new_req, new_err, tuple(counts["new"][2].tolist()), 0, 0),
            )
            verdict = evaluate(guard, snapshot, scenario.share * 100)
            if verdict.outcome is Outcome.PASS and result.first_pass is None:
                result.first_pass = seen
            if verdict.outcome is Outcome.FAIL:
                result.rolled_back = True
                result.requests = seen
                result.new_requests = new_req
                result.check = next(c.name for c in verdict.checks if c.outcome is Outcome.FAIL)
        if result.rolled_back and (
            (result.naive_rolled_back and result.naive_sparse_rolled_back) or scenario.name != "aa"
        ):
            break
    return result


def _batch(args: tuple[str, int, int, int]) -> list[RunResult]:
    name, start, count, base_seed = args
    scenario = SCENARIOS[name]
    guard = GuardConfig()
    return [one_run(scenario, base_seed + i, guard) for i in range(start, start + count)]


def run_scenario(name: str, runs: int, seed: int, workers: int) -> list[RunResult]:
    """Run ``runs`` seeded rollouts of scenario ``name`` (in ``workers`` processes)."""
    base = seed * 1_000_003 + sum(map(ord, name)) * 10_007
    if workers <= 1:
        return _batch((name, 0, runs, base))
    chunk = math.ceil(runs / workers)
    jobs = [(name, i, min(chunk, runs - i), base) for i in range(0, runs, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        return [r for part in pool.map(_batch, jobs) for r in part]


def summarise(name: str, results: list[RunResult]) -> dict[str, Any]:
    """Rates, medians and percentiles of one scenario's runs."""
    rolled = [r for r in results if r.rolled_back]
    requests = sorted(r.requests for r in rolled if r.requests is not None)
    new_requests = sorted(r.new_requests for r in rolled if r.new_requests is not None)

    def pct(values: list[int], q: float) -> int | None:
        return int(np.percentile(values, q, method="higher")) if values else None

    passes = sorted(r.first_pass for r in results if r.first_pass is not None)
    checks: dict[str, int] = {}
    for r in rolled:
        checks[r.check or "?"] = checks.get(r.check or "?", 0) + 1
    return {
        "scenario": name,
        "title": SCENARIOS[name].title,
        "runs": len(results),
        "rolled_back": len(rolled),
        "rollback_rate": len(rolled) / len(results),
        "naive_rollback_rate": sum(r.naive_rolled_back for r in results) / len(results),
        "naive_sparse_rollback_rate": sum(r.naive_sparse_rolled_back for r in results) / len(results),
        "median_requests": pct(requests, 50),
        "p90_requests": pct(requests, 90),
        "median_new_requests": pct(new_requests, 50),
        "max_new_requests": max(new_requests) if new_requests else None,
        "checks": checks,
        "ever_passed": len(passes),
        "median_requests_to_pass": pct(passes, 50),
    }


# ---------------------------------------------------------------------------------------- schedule scenarios


class FakeClock:
    """A clock the simulation moves forward."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        """Return the simulated time."""
        return self.now


@dataclass
class ScheduleResult:
    """What the controller did over one simulated rollout."""

    transitions: list[tuple[float, str, str]] = field(default_factory=list)
    final_phase: str = ""
    final_percent: float = 0.0
    elapsed: float = 0.0


def schedule_run(
    seed: int, rps: float, horizon: float, bake: str, max_bake: str | None, tick: float = 10.0
) -> ScheduleResult:
    """Run a healthy rollout through a real Router + Controller on a fake clock for ``horizon`` seconds."""
    rng = np.random.default_rng(seed)
    clock = FakeClock()
    rollout: dict[str, Any] = {"steps": [5, 10, 25, 50, 100], "bake_time": bake}
    if max_bake is not None:
        rollout["max_bake_time"] = max_bake
    router = Router.from_config({"rollouts": {"sim": rollout}}, clock=clock)
    controller = router.controller()
    aggregator = router.aggregator
    assert aggregator is not None
    start = clock.now
    result = ScheduleResult()
    seen_version = router.status("sim").version
    while clock.now - start < horizon:
        state = router.status("sim", history=0)
        if state.phase.value in ("completed", "rolled_back"):
            break
        share = 0.0 if state.phase.value == "rolled_back" else state.percent / 100
        n = int(rng.poisson(rps * tick))
        n_new = int(rng.binomial(n, share))
        for variant, count in (("new", n_new), ("old", n - n_new)):
            errors = int(rng.binomial(count, 0.005)) if count else 0
            aggregator.add_counts(
                "sim",
                state.epoch,
                variant,
                requests=count,
                errors=errors,
                histogram=histogram(rng, count, 1.0, 0.0).tolist(),
                now=clock.now,
            )
        clock.now += tick
        controller.tick()
        status = router.status("sim")
        if status.version != seen_version:
            seen_version = status.version
            record = status.history[-1]
            result.transitions.append((clock.now - start, record.action, record.reason))
    final = router.status("sim", history=0)
    result.final_phase = final.phase.value
    result.final_percent = final.percent
    result.elapsed = clock.now - start
    router.close()
    return result


def schedule_summary(runs: int, seed: int) -> dict[str, Any]:
    """Healthy rollouts at 200 rps (bake 10 min) and low-traffic ones at 10 rps (bake 10 min, max 20 min)."""
    healthy = [schedule_run(seed + i, 200.0, 4 * 3600, "10m", "1h") for i in range(runs)]
    low = [schedule_run(seed + 10_000 + i, 10.0, 2 * 3600, "10m", "20m") for i in range(runs)]
    completed = [r for r in healthy if r.final_phase == "completed"]
    low_paused = [r for r in low if r.final_phase == "paused"]
    low_flaps = sum(any(a in ("promote", "rollback") for _, a, _ in r.transitions) for r in low)
    return {
        "healthy_runs": runs,
        "healthy_completed": len(completed),
        "healthy_median_minutes": float(np.median([r.elapsed for r in completed]) / 60) if completed else None,
        "healthy_promotions": sorted({sum(a == "promote" for _, a, _ in r.transitions) for r in healthy}),
        "low_runs": runs,
        "low_paused": len(low_paused),
        "low_flapping_runs": low_flaps,
        "low_pause_minutes": sorted({round(r.transitions[-1][0] / 60) for r in low_paused}),
        "low_pause_reason": low_paused[0].transitions[-1][2] if low_paused else None,
    }


# ---------------------------------------------------------------------------------------- report


def naive(summary: dict[str, Any], key: str) -> str:
    """The naive rule's rate, shown only where it judges error rates against the same question."""
    if summary["scenario"] not in ("aa", "regression"):
        return "—"
    return f"{100 * summary[key]:.1f} %"


def passed(summary: dict[str, Any]) -> str:
    """How many runs ever reached a PASS verdict (and, for A/A, after how many requests)."""
    text = f"{summary['ever_passed']}/{summary['runs']}"
    if summary["scenario"] == "aa" and summary["median_requests_to_pass"] is not None:
        text += f", median after {summary['median_requests_to_pass']:,} requests"
    return text


def markdown(summaries: list[dict[str, Any]], schedule: dict[str, Any], meta: dict[str, Any]) -> str:
    """The results as the Markdown section between the docs markers."""
    lines = [
        f"Command: `{meta['command']}` — {meta['runs']} rollouts per scenario, seed {meta['seed']}, "
        f"Python {meta['python']}, {meta['date']}, {meta['seconds']:.0f} s.",
        "",
        "| scenario | rolled back (ours) | naive rule, same looks | naive rule, every ~100 new requests | "
        "median requests to rollback | 90th percentile | new-version requests (median / max) | deciding checks | "
        "ever passed (could be promoted) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:

        def fmt(value: Any) -> str:
            return "—" if value is None else f"{value:,}"

        checks = ", ".join(f"{k} {v}" for k, v in sorted(s["checks"].items())) or "—"
        lines.append(
            f"| {s['title']} | {100 * s['rollback_rate']:.1f} % ({s['rolled_back']}/{s['runs']}) | "
            f"{naive(s, 'naive_rollback_rate')} | {naive(s, 'naive_sparse_rollback_rate')} | "
            f"{fmt(s['median_requests'])} | {fmt(s['p90_requests'])} | "
            f"{fmt(s['median_new_requests'])} / {fmt(s['max_new_requests'])} | {checks} | "
            f"{passed(s)} |"
        )
    lines += [
        "",
        f"Schedule (real `Router` + `Controller`, fake clock, {schedule['healthy_runs']} runs each):",
        "",
        f"- healthy at 200 requests/s, bake time 10 min: {schedule['healthy_completed']}/{schedule['healthy_runs']} "
        f"completed 5 → 10 → 25 → 50 → 100 %, median {schedule['healthy_median_minutes']:.0f} min, "
        f"promotions per run {schedule['healthy_promotions']};",
        f"- low traffic at 10 requests/s, bake time 10 min, max_bake_time 20 min: "
        f"{schedule['low_paused']}/{schedule['low_runs']} paused, after {schedule['low_pause_minutes']} min, "
        f"{schedule['low_flapping_runs']} promoted or rolled back first. Reason given:",
        f"  > {schedule['low_pause_reason']}",
    ]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace the text between the simulation markers of ``path``."""
    text = path.read_text(encoding="utf-8")
    start, end = "<!-- sim:start -->", "<!-- sim:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path}: markers {start} / {end} not found")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: f"{start}\n{body}\n{end}", text), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run every scenario and print (and optionally write) the results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="rollouts per scenario (default 1000)")
    parser.add_argument("--schedule-runs", type=int, default=20, help="controller runs per schedule scenario")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="limit to these scenarios")
    parser.add_argument("--write", type=Path, help="rewrite the results section of this Markdown file")
    parser.add_argument("--json", type=Path, help="also dump the results as JSON")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    summaries = []
    for name in args.scenario or list(SCENARIOS):
        t0 = time.perf_counter()
        summary = summarise(name, run_scenario(name, args.runs, args.seed, args.workers))
        summaries.append(summary)
        print(f"{name:12s} {json.dumps(summary)}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    schedule = schedule_summary(args.schedule_runs, args.seed)
    print(f"schedule     {json.dumps(schedule)}", flush=True)
    command = "python bench/guard_simulation.py" + (" " + " ".join(argv) if argv else " " + " ".join(sys.argv[1:]))
    meta = {
        "command": command.strip(),
        "runs": args.runs,
        "seed": args.seed,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "seconds": time.perf_counter() - began,
    }
    if args.write:
        write_section(args.write, markdown(summaries, schedule, meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "scenarios": summaries, "schedule": schedule}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
