"""Benchmark of the guard's costs: recording an observation, and evaluating a verdict.

Recording runs on the request path, so it is measured per call (median of single calls timed with
``perf_counter_ns``, timer overhead included) and amortised (mean over batches, including the folding of
the queue into the aggregates). Evaluating a verdict runs on the controller's thread; it is measured on
realistic aggregates (a 5 % step with 200,000 requests and log-normal latencies). Every time is also
given as a ratio to the raw ``mmh3.hash`` call measured in the same run.

    python bench/bench_guard.py                               # print the table
    python bench/bench_guard.py --write docs/benchmarks.md    # also rewrite the marked section
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import mmh3

import benchlib
from canary_router import GuardConfig, Router
from canary_router.analysis import evaluate
from canary_router.observe import Aggregator, StepSnapshot, VariantSnapshot, bucket_index

SECTION = "guard"
"""The name in the markers of this script's section of docs/benchmarks.md."""
HEADING = "## The guard"
"""The heading put above the markers when the file has none."""


def per_call_ns(call: Callable[..., object], args_list: Sequence[tuple[object, ...]], rounds: int) -> float:
    """Median of single-call timings (ns), timer overhead included."""
    samples = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for args in args_list:
            t0 = clock()
            call(*args)
            samples.append(clock() - t0)
    return statistics.median(samples)


def timer_overhead_ns(rounds: int) -> float:
    """Median of an empty timed section (ns)."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(rounds * 1000):
        t0 = clock()
        samples.append(clock() - t0)
    return statistics.median(samples)


def batch_ns(call: Callable[..., object], args_list: Sequence[tuple[object, ...]], rounds: int) -> float:
    """Median over rounds of the mean time per call of a whole batch (ns)."""
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for args in args_list:
            call(*args)
        results.append((time.perf_counter_ns() - t0) / len(args_list))
    return statistics.median(results)


def snapshot(rng: random.Random, new: int, old: int) -> StepSnapshot:
    """Realistic step aggregates: 0.5 % errors, log-normal latencies around 50 ms."""

    def arm(n: int) -> VariantSnapshot:
        hist = [0] * (len(__import__("canary_router.observe", fromlist=["BOUNDS"]).BOUNDS) + 1)
        for _ in range(n):
            hist[bucket_index(rng.lognormvariate(math.log(0.05), 0.5))] += 1
        return VariantSnapshot(n, round(n * 0.005), tuple(hist), 0, 0)

    return StepSnapshot("bench", 1, 0.0, arm(old), arm(new))


def main() -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    benchlib.add_write_option(parser)
    args = parser.parse_args()
    rng = random.Random(5)
    ids = [f"user-{rng.getrandbits(40):010x}" for _ in range(10_000)]
    keys = [(f"bench:{u}".encode(), 0, False) for u in ids]
    record_args = [
        ("bench", 1, "new" if i % 20 == 0 else "old", i % 200 != 0, rng.lognormvariate(-3, 0.5), u, True, 1e9 + i)
        for i, u in enumerate(ids)
    ]
    mmh3_ns = batch_ns(mmh3.hash, keys, args.rounds)
    overhead = timer_overhead_ns(args.rounds)
    # a fresh aggregator per round: the timestamps of record_args then never go back in time
    record_single = statistics.median(per_call_ns(Aggregator().record, record_args, 1) for _ in range(args.rounds))
    # total cost per observation: no background folding, the recording thread folds every 4,096
    record_batch = statistics.median(
        batch_ns(Aggregator(max_pending=4096, fold_interval=None).record, record_args, 1) for _ in range(args.rounds)
    )
    fold = Aggregator(max_pending=10**9, fold_interval=None)
    for a in record_args:
        fold.record(*a)
    t0 = time.perf_counter_ns()
    fold.drain()
    fold_ns = (time.perf_counter_ns() - t0) / len(record_args)

    snap = snapshot(rng, 10_000, 190_000)
    guard = GuardConfig()
    evals = []
    for _ in range(args.rounds):
        t0 = time.perf_counter_ns()
        verdict = evaluate(guard, snap, 5.0)
        evals.append(time.perf_counter_ns() - t0)
    evaluate_ns = statistics.median(evals)

    router = Router.from_config({"rollouts": {"bench": {"steps": [5, 100]}}})
    assert router.aggregator is not None
    epoch = router.status("bench").epoch
    for variant, arm in (("old", snap.old), ("new", snap.new)):
        router.aggregator.add_counts(
            "bench", epoch, variant, requests=arm.requests, errors=arm.errors, histogram=arm.histogram, now=time.time()
        )
    controller = router.controller()
    ticks = []
    for _ in range(args.rounds):
        t0 = time.perf_counter_ns()
        controller.tick()
        ticks.append(time.perf_counter_ns() - t0)
    tick_ns = statistics.median(ticks)

    rows = [
        ("record: one call, median (timer overhead included)", record_single, 1000.0),
        ("record + fold: total CPU per observation", record_batch, None),
        ("fold one queued observation into the aggregates", fold_ns, None),
        ("evaluate a verdict (10,000 new + 190,000 old requests)", evaluate_ns, 1_000_000.0),
        ("Controller.tick() for one rollout (verdict + store read)", tick_ns, None),
        ("timer overhead (empty timed section)", overhead, None),
        ("raw mmh3.hash call (reference)", mmh3_ns, None),
    ]
    print(f"verdict on the benchmark data: {verdict.outcome.value}")
    for label, ns, target in rows:
        mark = "" if target is None else ("  within target" if ns <= target else "  OVER TARGET")
        print(f"{label:60s} {ns / 1000:10.3f} µs  {ns / mmh3_ns:10.1f} × mmh3{mark}")
    if args.write:
        lines = [
            f"Command: `python bench/bench_guard.py --write {args.write}` — Python {platform.python_version()}, "
            f"{datetime.now(UTC).date().isoformat()}, {args.rounds} rounds.",
            "",
            "| what | time | × mmh3 | target |",
            "|---|---|---|---|",
        ]
        for label, ns, target in rows:
            goal = "—" if target is None else f"≤ {target / 1000:g} µs ({'met' if ns <= target else 'missed'})"
            lines.append(f"| {label} | {ns / 1000:.3f} µs | {ns / mmh3_ns:.1f} | {goal} |")
        benchlib.write_section(args.write, SECTION, "\n".join(lines), heading=HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
