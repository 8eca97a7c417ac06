"""Propagation of a rollback through Redis: from rollback() returning in one process to all others serving "old".

Four processes share one Redis (a fresh key prefix, deleted afterwards): this one is the operator, the
three others each run a Router on a RedisStore and call ``decide`` every half millisecond, as a serving
process would between requests. A trial restarts the rollout (everyone serves "new" at 100 %), waits
until every watcher serves "new", waits a random 1–10 ms, calls ``rollback()`` and takes the time it
returns; each watcher takes the time of its first decision that serves "old". A trial's latency is the
slowest watcher's time minus the return time (all times are ``time.monotonic()``, one clock for every
process of the host). Target: p99 ≤ 100 ms.

    python bench/bench_propagation.py                               # print the table (Redis on 127.0.0.1:6379)
    python bench/bench_propagation.py --write docs/benchmarks.md    # also rewrite the marked section
    python bench/bench_propagation.py --redis redis://host:6379/2 --trials 500
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

import benchlib

SECTION = "propagation"
"""The name in the markers of this script's section of docs/benchmarks.md."""
HEADING = "## Propagation through Redis"
"""The heading put above the markers when the file has none."""
ROLLOUT = "propagation"
TARGET_P99_MS = 100.0
POLL = 0.0005
"""Seconds between two decisions of a watcher."""


def _router(url: str, prefix: str) -> Any:
    from canary_router import Rollout, Router
    from canary_router.stores.redis import RedisStore

    store = RedisStore(url, prefix=prefix)
    return Router([Rollout(ROLLOUT, steps=(100.0,))], store=store, telemetry=None, record=False)


def watch(url: str, prefix: str, index: int, events: Queue[tuple[str, int, float]], stop: Event) -> None:
    """A watcher process: report when it first serves "new" (ready) and then first serves "old" (seen)."""
    router = _router(url, prefix)
    context = {"user_id": f"watcher-{index}"}
    expecting = "new"
    events.put(("started", index, time.monotonic()))
    try:
        while not stop.is_set():
            variant = router.decide(ROLLOUT, context).variant
            if variant == expecting:
                now = time.monotonic()
                events.put(("ready" if expecting == "new" else "seen", index, now))
                expecting = "old" if expecting == "new" else "new"
            time.sleep(POLL)
    finally:
        router.close()


@dataclass
class Result:
    """Latencies of one run, in milliseconds."""

    trials: list[float] = field(default_factory=list)
    """Per trial: the slowest watcher's latency, from rollback() returning (negative: before it returned)."""
    from_call: list[float] = field(default_factory=list)
    """Per trial: the slowest watcher's latency, from rollback() being called."""
    each: list[float] = field(default_factory=list)
    """Per trial and watcher."""
    rollback_call: list[float] = field(default_factory=list)
    """How long rollback() itself took."""


def percentile(values: list[float], q: float) -> float:
    """The ``q`` percentile (0..100) of ``values``, nearest rank."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _collect(events: Queue[tuple[str, int, float]], kind: str, count: int, timeout: float) -> dict[int, float]:
    got: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"only {len(got)} of {count} watchers reported {kind!r} within {timeout} s")
        event, index, at = events.get(timeout=remaining)
        if event != kind:
            raise RuntimeError(f"watcher {index} reported {event!r} while {kind!r} was expected")
        got[index] = at
    return got


def measure(url: str, trials: int, *, watchers: int = 3, seed: int = 20240601, quiet: bool = True) -> Result:
    """Run ``trials`` rollbacks with ``watchers`` watcher processes (plus this one) and return the latencies."""
    prefix = f"canary-bench-propagation-{uuid.uuid4().hex[:10]}"
    context = multiprocessing.get_context("spawn")
    events: Queue[tuple[str, int, float]] = context.Queue()
    stop = context.Event()
    procs = [context.Process(target=watch, args=(url, prefix, i, events, stop), daemon=True) for i in range(watchers)]
    operator = _router(url, prefix)
    rng = random.Random(seed)
    result = Result()
    try:
        operator.rollback(ROLLOUT, reason="before the first trial", actor="bench")  # watchers start on "old"
        for proc in procs:
            proc.start()
        _collect(events, "started", watchers, 60)
        for trial in range(trials):
            operator.restart(ROLLOUT, actor="bench")
            _collect(events, "ready", watchers, 10)
            time.sleep(rng.uniform(0.001, 0.010))
            called = time.monotonic()
            operator.rollback(ROLLOUT, reason="propagation trial", actor="bench")
            returned = time.monotonic()
            seen = _collect(events, "seen", watchers, 10)
            latencies = [(at - returned) * 1000 for at in seen.values()]
            result.each.extend(latencies)
            result.trials.append(max(latencies))
            result.from_call.append(max((at - called) * 1000 for at in seen.values()))
            result.rollback_call.append((returned - called) * 1000)
            if not quiet:
                benchlib.progress(trial + 1, trials, "propagation")  # on stderr
        if not quiet:
            benchlib.end_progress()
    finally:
        stop.set()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        operator.close()
        _delete_prefix(url, prefix)
    return result


def _delete_prefix(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def summary(result: Result) -> dict[str, float]:
    """p50, p90, p99 and max of the trials (ms) from the return and from the call, and the median call."""
    return {
        "p50": statistics.median(result.trials),
        "p90": percentile(result.trials, 90),
        "p99": percentile(result.trials, 99),
        "max": max(result.trials),
        "call_p50": statistics.median(result.from_call),
        "call_p90": percentile(result.from_call, 90),
        "call_p99": percentile(result.from_call, 99),
        "call_max": max(result.from_call),
        "each_p50": statistics.median(result.each),
        "rollback_call_p50": statistics.median(result.rollback_call),
    }


def markdown(result: Result, env: dict[str, Any], watchers: int, redis_version: str) -> str:
    """The section of docs/benchmarks.md."""
    s = summary(result)
    rows = []
    for label, key in (("from `rollback()` returning", ""), ("from `rollback()` being called", "call_")):
        status = benchlib.verdict(s[f"{key}p99"], TARGET_P99_MS)
        rows.append(
            benchlib.markdown_row(
                [
                    label,
                    str(len(result.trials)),
                    *(f"{s[key + q]:.2f}" for q in ("p50", "p90", "p99", "max")),
                    benchlib.fmt_target(TARGET_P99_MS, " ms"),
                    benchlib.markdown_status(status),
                ]
            )
        )
    lines = [
        f"`bench/bench_propagation.py`: {watchers + 1} processes share one Redis; one calls `rollback()`, the "
        f"other {watchers} call `decide()` every {POLL * 1000:g} ms. Latency of a trial: from `rollback()` returning "
        'to the last of them serving "old" (one host, `time.monotonic()` in every process). Run '
        "`python bench/bench_propagation.py --write docs/benchmarks.md` to refresh this section.",
        "",
        benchlib.markdown_row(
            ["Latency", "Trials", "p50 (ms)", "p90 (ms)", "p99 (ms)", "max (ms)", "Target p99", "Result"]
        ),
        "|---|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        'A negative latency means every watcher served "old" before `rollback()` returned: after its write '
        "the call reads the status and audit log back, while the change is already being published.",
        "",
        f"Per watcher (every trial × watcher): median {s['each_p50']:.2f} ms. The `rollback()` call itself "
        f"(read, compare-and-set script, audit append and publish): median {s['rollback_call_p50']:.2f} ms. "
        f"A watcher polls every {POLL * 1000:g} ms, so up to that much of each latency is the polling.",
        "",
        *benchlib.environment_lines(
            env, f"canary_router {env['canary_router']}, redis-py {env['redis-py']}, Redis server {redis_version}"
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=os.environ.get("CANARY_BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--trials", type=int, default=300, help="rollbacks to time (default 300)")
    parser.add_argument("--watchers", type=int, default=3, help="processes besides this one (default 3)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--quiet", action="store_true")
    benchlib.add_write_option(parser)
    args = parser.parse_args()
    import redis

    import canary_router

    redis_version = str(redis.Redis.from_url(args.redis).info("server")["redis_version"])
    result = measure(args.redis, args.trials, watchers=args.watchers, seed=args.seed, quiet=args.quiet)
    env = benchlib.environment({"canary_router": canary_router.__version__, "redis-py": benchlib.version_of("redis")})
    s = summary(result)
    print(f"{benchlib.platform_summary(env)} · Redis {redis_version}")
    print(
        f"{len(result.trials)} trials, {args.watchers + 1} processes: p50 {s['p50']:.2f} ms, p90 {s['p90']:.2f} ms, "
        f"p99 {s['p99']:.2f} ms, max {s['max']:.2f} ms from the return; p99 {s['call_p99']:.2f} ms, "
        f"max {s['call_max']:.2f} ms from the call (target p99 ≤ {TARGET_P99_MS:g} ms)"
        + benchlib.over_flag(benchlib.verdict(s["call_p99"], TARGET_P99_MS))
    )
    if args.write:
        benchlib.write_section(
            args.write, SECTION, markdown(result, env, args.watchers, redis_version), heading=HEADING
        )
        print(f"wrote the {SECTION!r} section of {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
