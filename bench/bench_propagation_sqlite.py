"""Propagation of a rollback through the single-host SQLite store, across processes.

Four serving processes (``--processes``) each run a :class:`~canary_router.Router` on one SQLite file
and call ``router.decide()`` for the same user about once a millisecond, as request traffic would. A
controlling process restarts the rollout at 100 % (every process serves "new"), waits a random moment,
calls ``router.rollback()`` and notes when it returned. A trial's propagation time is from that moment
to the last serving process serving "old"; the script reports the median, the 90th and 99th
percentiles and the maximum over the trials. Times are wall-clock (``time.time()``), which every
process of one host shares.

    python bench/bench_propagation_sqlite.py                              # print the results
    python bench/bench_propagation_sqlite.py --write docs/benchmarks.md   # also rewrite the marked section
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import queue
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import canary_router
from canary_router import Rollout, Router
from canary_router.model import AuditRecord, Phase, RolloutState
from canary_router.stores import ObservationBatch, SlotCounts, VariantCounts
from canary_router.stores.sqlite import SQLiteStore

SECTION = "propagation-sqlite"
"""The name in the markers of this script's section of docs/benchmarks.md."""
HEADING = """## Rollback propagation: the SQLite store

From `router.rollback()` returning in one process to every other process of the host serving "old",
through a shared `sqlite:///` store (see [the single-host store](guides/single-host-store.md)). Target:
p99 ≤ 250 ms with the default `poll_interval` of 50 ms. Run it with
`python bench/bench_propagation_sqlite.py --write docs/benchmarks.md`."""
ROLLOUT = "propagation"
USER = {"user_id": "user-1"}
TARGET_P99 = 0.250
"""Seconds: the 99th percentile the single-host store promises."""


def _router(path: str, poll_interval: float) -> Router:
    rollout = Rollout(ROLLOUT, steps=(100.0,))
    return Router([rollout], store=SQLiteStore(path, poll_interval=poll_interval), telemetry=None, record=False)


def serve(path: str, index: int, poll_interval: float, reports: Any, stop: Any) -> None:
    """A serving process: decide about once a millisecond and report every change of variant with its time."""
    router = _router(path, poll_interval)
    last = None
    try:
        while not stop.is_set():
            variant = router.decide(ROLLOUT, USER).variant
            if variant != last:
                reports.put((index, variant, time.time()))
                last = variant
            time.sleep(0.001)
    finally:
        router.close()


def _wait_for(reports: Any, seen: dict[int, str], variant: str, timeout: float) -> dict[int, float]:
    """Collect reports until every serving process serves ``variant``; return when each switched to it."""
    at: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while any(v != variant for v in seen.values()):
        try:
            index, got, when = reports.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"not every process served {variant!r} within {timeout} s: {seen}") from None
        seen[index] = got
        if got == variant:
            at[index] = when
        else:
            at.pop(index, None)
    return at


def run(
    trials: int, *, processes: int = 4, seed: int = 20261126, poll_interval: float = 0.05, quiet: bool = True
) -> list[float]:
    """Run ``trials`` rollbacks with ``processes`` serving processes; return each trial's propagation time (s)."""
    rng = random.Random(seed)
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="canary-propagation-") as directory:
        path = str(Path(directory) / "state.db")
        router = _router(path, poll_interval)
        reports, stop = context.Queue(), context.Event()
        workers = [
            context.Process(target=serve, args=(path, i, poll_interval, reports, stop), daemon=True)
            for i in range(processes)
        ]
        for worker in workers:
            worker.start()
        seen = dict.fromkeys(range(processes), "")
        delays: list[float] = []
        try:
            _wait_for(reports, seen, "new", 60)
            for trial in range(trials):
                router.restart(ROLLOUT, actor="bench")
                _wait_for(reports, seen, "new", 10)
                time.sleep(rng.uniform(0.0, 2 * poll_interval))  # any phase of the processes' polling
                router.rollback(ROLLOUT, reason="propagation benchmark", actor="bench")
                returned = time.time()
                switched = _wait_for(reports, seen, "old", 10)
                delays.append(max(0.0, max(switched.values()) - returned))
                if not quiet:
                    benchlib.progress(trial + 1, trials, "rollbacks")
            if not quiet:
                benchlib.end_progress()
        finally:
            stop.set()
            for worker in workers:
                worker.join(10)
                if worker.is_alive():  # pragma: no cover
                    worker.terminate()
            router.close()
    return delays


def write_costs(rounds: int, seed: int) -> list[tuple[str, float]]:
    """Median times (s) of the store's writes and reads, on a file that already holds a busy step.

    The observation batch is what one process sends in one flush of a busy second: two variants, 60
    latency buckets and 300 new units each, and two history slots. The file holds 100 such flushes first.
    """
    rng = random.Random(seed)

    def batch(second: int) -> ObservationBatch:
        variants = {
            variant: VariantCounts(
                1_000,
                5,
                {rng.randrange(400): rng.randrange(1, 50) for _ in range(60)},
                frozenset(rng.getrandbits(32) for _ in range(300)),
                frozenset(rng.getrandbits(32) for _ in range(3)),
            )
            for variant in ("old", "new")
        }
        start = float(second // 10 * 10)
        return ObservationBatch(
            "bench", 1, 0.0, 0, variants, (SlotCounts(start, "old", 950), SlotCounts(start, "new", 50))
        )

    with tempfile.TemporaryDirectory(prefix="canary-costs-") as directory:
        store = SQLiteStore(Path(directory) / "state.db")
        try:
            for second in range(100):
                store.add_observations(batch(second))
            state = RolloutState(Phase.RUNNING, 0, 5.0, 0.0)
            record = AuditRecord(0.0, "bench", "bench", "set", "running", "running", 5.0, 5.0)
            store.compare_and_set("bench", None, state, record)
            timings: dict[str, list[float]] = {"cas": [], "add": [], "read": []}
            for i in range(rounds):
                pending = batch(100 + i)
                t0 = time.perf_counter()
                store.compare_and_set("bench", i + 1, state, record)
                t1 = time.perf_counter()
                store.add_observations(pending)
                t2 = time.perf_counter()
                store.observations("bench", 1)
                t3 = time.perf_counter()
                timings["cas"].append(t1 - t0)
                timings["add"].append(t2 - t1)
                timings["read"].append(t3 - t2)
        finally:
            store.close()
    return [
        ("compare_and_set + audit record (one transaction)", statistics.median(timings["cas"])),
        ("add_observations: one process's flush of a busy second", statistics.median(timings["add"])),
        ("observations(): the totals the guard reads", statistics.median(timings["read"])),
    ]


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200, help="rollbacks to time (default 200)")
    parser.add_argument("--processes", type=int, default=4, help="serving processes (default 4)")
    parser.add_argument("--poll-interval", type=float, default=0.05, help="the store's poll_interval (default 0.05)")
    parser.add_argument("--rounds", type=int, default=51, help="timed rounds of the write and read costs (default 51)")
    benchlib.add_write_option(parser)
    benchlib.add_common_options(parser, gc_option=False)
    args = parser.parse_args()
    delays = run(
        args.trials, processes=args.processes, seed=args.seed, poll_interval=args.poll_interval, quiet=args.quiet
    )
    rows = [
        ("median (p50)", percentile(delays, 50), None),
        ("p90", percentile(delays, 90), None),
        ("p99", percentile(delays, 99), TARGET_P99),
        ("max", max(delays), None),
        ("mean", statistics.fmean(delays), None),
    ]
    costs = write_costs(args.rounds, args.seed)
    env = benchlib.environment({"canary_router": canary_router.__version__})
    print(f"{benchlib.platform_summary(env)} — {args.trials} rollbacks, {args.processes} serving processes")
    for label, value, target in rows:
        mark = "" if target is None else ("  within target" if value <= target else "  OVER TARGET")
        print(f"{label:14s} {value * 1000:8.1f} ms{mark}")
    for label, value in costs:
        print(f"{label:58s} {value * 1000:8.2f} ms")
    if args.write:
        lines = [
            f"{args.trials} rollbacks; {args.processes} serving processes each deciding about once a millisecond; "
            f"`poll_interval` {args.poll_interval * 1000:g} ms; a random wait of "
            f"0–{2 * args.poll_interval * 1000:g} ms before each rollback.",
            "",
            '| rollback → every process serves "old" | time | target |',
            "|---|---|---|",
        ]
        for label, value, target in rows:
            goal = "—" if target is None else f"≤ {target * 1000:g} ms ({'met' if value <= target else 'missed'})"
            lines.append(f"| {label} | {value * 1000:.1f} ms | {goal} |")
        lines += ["", f"What each process pays, median of {args.rounds} rounds in one process:", ""]
        lines += ["| store call | time |", "|---|---|"]
        lines += [f"| {label} | {value * 1000:.2f} ms |" for label, value in costs]
        lines += [
            "",
            *benchlib.environment_lines(
                env, f"canary_router {canary_router.__version__}, SQLite {sqlite3.sqlite_version}"
            ),
        ]
        benchlib.write_section(args.write, SECTION, "\n".join(lines), heading=HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
