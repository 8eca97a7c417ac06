"""Load through Redis: processes × threads making routed calls; nothing lost, and the hot path no slower.

Each of ``--processes`` processes runs a Router with ``--threads`` threads that call a canary-decorated
function (a decision, the chosen implementation, and the recording of the observation) as fast as they
can for ``--seconds``, with the routers on one ``RedisStore`` (each router's sync thread flushes the
observation deltas every second). Afterwards the totals in Redis must equal the sum of the calls the
processes made, exactly. Then shorter runs with and without Redis (on a ``MemoryStore``), alternated,
compare the calls per second per process.

    python bench/load_redis.py                               # 4 processes × 2 threads × 30 s, then 8 × 5 s
    python bench/load_redis.py --write docs/benchmarks.md    # also rewrite the marked section
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import benchlib

SECTION = "load"
"""The name in the markers of this script's section of docs/benchmarks.md."""
HEADING = "## Load through Redis"
"""The heading put above the markers when the file has none."""
ROLLOUT = "load"
SLOWDOWN_TARGET = 0.10
"""The hot path must not be measurably slower with Redis attached: at most 10 % fewer calls per second."""


def _router(url: str | None, prefix: str) -> Any:
    from canary_router import MemoryStore, Rollout, Router
    from canary_router.stores.redis import RedisStore

    store = RedisStore(url, prefix=prefix) if url else MemoryStore()
    return Router([Rollout(ROLLOUT, steps=(50.0, 100.0))], store=store, telemetry=None)


def work(url: str | None, prefix: str, threads: int, seconds: float, results: Queue[dict[str, Any]]) -> None:
    """One process: ``threads`` threads calling the decorated function for ``seconds``; report the counts."""
    router = _router(url, prefix)
    counts = [0] * threads
    errors: list[str] = []

    def old(user: str) -> int:
        return 0

    @router.canary(ROLLOUT, old=old, context_from={"user_id": "user"})
    def new(user: str) -> int:
        return 1

    users = [f"user-{i}" for i in range(10_000)]
    start = threading.Barrier(threads + 1)
    stop = threading.Event()

    def run(index: int) -> None:
        n = 0
        mine = users[index::threads][:500]
        start.wait()
        try:
            while not stop.is_set():
                for user in mine:
                    new(user)
                n += len(mine)
        except Exception as exc:  # pragma: no cover - reported
            errors.append(repr(exc))
        counts[index] = n

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    began = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - began
    epoch = router.status(ROLLOUT).epoch
    health = router.health()
    router.close()  # sends the last counts
    results.put(
        {
            "pid": os.getpid(),
            "calls": sum(counts),
            "seconds": elapsed,
            "errors": errors,
            "epoch": epoch,
            "dropped": health.dropped_observations,
            "store_errors": health.store_errors,
        }
    )


@dataclass
class Run:
    """One load run: per process, calls made and their rate."""

    redis: bool
    calls: list[int]
    rates: list[float]
    errors: list[str]
    epoch: int
    dropped: int
    store_errors: int


def run_load(url: str | None, prefix: str, processes: int, threads: int, seconds: float) -> Run:
    """Start ``processes`` worker processes (``url=None``: without Redis) and collect what they report."""
    context = multiprocessing.get_context("spawn")
    results: Queue[dict[str, Any]] = context.Queue()
    procs = [context.Process(target=work, args=(url, prefix, threads, seconds, results)) for _ in range(processes)]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    return Run(
        redis=url is not None,
        calls=[r["calls"] for r in reports],
        rates=[r["calls"] / r["seconds"] for r in reports],
        errors=[e for r in reports for e in r["errors"]],
        epoch=reports[0]["epoch"],
        dropped=sum(r["dropped"] for r in reports),
        store_errors=sum(r["store_errors"] for r in reports),
    )


def redis_totals(url: str, prefix: str, epoch: int) -> int:
    """Requests of both variants that Redis holds for the rollout's step."""
    from canary_router.stores.redis import RedisStore

    store = RedisStore(url, prefix=prefix)
    try:
        snapshot = store.observations(ROLLOUT, epoch)
    finally:
        store.close()
    return 0 if snapshot is None else snapshot.old.requests + snapshot.new.requests


def prepare(url: str, prefix: str) -> None:
    """Create the rollout's state once, so that no worker races to create it."""
    _router(url, prefix).close()


def delete_prefix(url: str, prefix: str) -> None:
    """Remove the run's keys."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


def measure(url: str, *, processes: int = 4, threads: int = 2, seconds: float = 30.0) -> tuple[Run, int]:
    """Run on Redis for ``seconds``; return the run and the total Redis holds afterwards."""
    prefix = f"canary-bench-load-{uuid.uuid4().hex[:10]}"
    try:
        prepare(url, prefix)
        run = run_load(url, prefix, processes, threads, seconds)
        total = redis_totals(url, prefix, run.epoch)
    finally:
        delete_prefix(url, prefix)
    return run, total


def compare(url: str, *, processes: int, threads: int, rounds: int, seconds: float) -> dict[str, list[float]]:
    """Alternate runs with and without Redis (ABBA order, so a drift in the machine's load hits both alike).

    Returns, per mode (``"redis"``, ``"memory"``), the median calls per second per process of each run.
    """
    prefix = f"canary-bench-load-{uuid.uuid4().hex[:10]}"
    rates: dict[str, list[float]] = {"redis": [], "memory": []}
    try:
        prepare(url, prefix)
        for index in range(rounds):
            order = ("redis", "memory") if index % 2 == 0 else ("memory", "redis")
            for mode in order:
                run = run_load(url if mode == "redis" else None, prefix, processes, threads, seconds)
                rates[mode].append(statistics.median(run.rates))
    finally:
        delete_prefix(url, prefix)
    return rates


def hot_path(url: str, *, rounds: int = 41, calls: int = 20_000) -> dict[str, float]:
    """Median ns per decorated call on a router with Redis attached and on one without, in one process.

    Both routers live side by side, and their calls are timed in alternating batches (the order shuffled
    each round), so machine noise and the Redis router's sync thread weigh on both alike: what differs is
    only what the hot path does.
    """
    import random

    prefix = f"canary-bench-load-{uuid.uuid4().hex[:10]}"
    routers = {"redis": _router(url, prefix), "memory": _router(None, prefix)}
    functions = {}
    for mode, router in routers.items():

        def old(user: str) -> int:
            return 0

        @router.canary(ROLLOUT, old=old, context_from={"user_id": "user"})
        def new(user: str) -> int:
            return 1

        functions[mode] = new
    users = [f"user-{i}" for i in range(calls)]
    samples: dict[str, list[float]] = {"redis": [], "memory": []}
    order = list(functions)
    rng = random.Random(7)
    try:
        for round_no in range(rounds + 3):
            rng.shuffle(order)
            for mode in order:
                call = functions[mode]
                began = time.perf_counter_ns()
                for user in users:
                    call(user)
                if round_no >= 3:  # three warm-up rounds
                    samples[mode].append((time.perf_counter_ns() - began) / calls)
    finally:
        for router in routers.values():
            router.close()
        delete_prefix(url, prefix)
    return {mode: statistics.median(values) for mode, values in samples.items()}


def markdown(
    run: Run,
    total: int,
    rates: dict[str, list[float]],
    per_call: dict[str, float],
    env: dict[str, Any],
    threads: int,
    seconds: float,
    round_seconds: float,
    redis_version: str,
) -> str:
    """The section of docs/benchmarks.md."""
    processes = len(run.calls)
    with_redis, without = statistics.median(rates["redis"]), statistics.median(rates["memory"])
    slowdown = 1 - with_redis / without
    hot_ratio = per_call["redis"] / per_call["memory"]
    equal = "equal" if total == sum(run.calls) else "**different**"
    how = f"{abs(slowdown):.1%} {'slower' if slowdown > 0 else 'faster'}"
    lines = [
        f"`bench/load_redis.py`: {processes} processes × {threads} threads call a canary-decorated function (decision, "
        f"the chosen implementation, recording of the observation) as fast as they can for {seconds:g} s, on one "
        "Redis; each router flushes its counts every second. Run `python bench/load_redis.py --write "
        "docs/benchmarks.md` to refresh this section.",
        "",
        benchlib.markdown_row(
            [
                "Calls/s per process (median)",
                "Range over processes",
                "Calls made",
                "Requests in Redis",
                "Totals",
                "Exceptions",
                "Dropped",
            ]
        ),
        "|---:|---:|---:|---:|---|---:|---:|",
        benchlib.markdown_row(
            [
                f"{statistics.median(run.rates):,.0f}",
                f"{min(run.rates):,.0f}–{max(run.rates):,.0f}",
                f"{sum(run.calls):,}",
                f"{total:,}",
                equal,
                str(len(run.errors)),
                str(run.dropped),
            ]
        ),
        "",
        f"**Throughput with and without Redis.** The same load in {len(rates['redis'])} runs of each kind, "
        f"{round_seconds:g} s each, alternated (Redis, memory, memory, Redis, …) so that the other work on this "
        "shared machine weighs on both alike:",
        "",
        benchlib.markdown_row(["Store", "Calls/s per process, median of the runs", "Each run"]),
        "|---|---:|---|",
        benchlib.markdown_row(["`RedisStore`", f"{with_redis:,.0f}", ", ".join(f"{r:,.0f}" for r in rates["redis"])]),
        benchlib.markdown_row(
            ["`MemoryStore` (no Redis)", f"{without:,.0f}", ", ".join(f"{r:,.0f}" for r in rates["memory"])]
        ),
        "",
        f"Per process, with Redis attached: {how} than without. This includes the sync thread's work (computing "
        "and sending the deltas once a second) and the noise of a shared 2-CPU machine running 4 busy "
        "processes, which the spread of the runs shows.",
        "",
        "**The hot path alone.** One process with two routers side by side, one on Redis and one on a "
        "`MemoryStore`, their decorated calls timed in alternating batches of 20,000 (median of 41 rounds):",
        "",
        benchlib.markdown_row(["Router", "ns per decorated call", "Target", "Result"]),
        "|---|---:|---|---|",
        benchlib.markdown_row(
            [
                "on `RedisStore`",
                f"{per_call['redis']:,.0f}",
                f"≤ {1 + SLOWDOWN_TARGET:.2f} × memory",
                benchlib.markdown_status(benchlib.verdict(hot_ratio, 1 + SLOWDOWN_TARGET)),
            ]
        ),
        benchlib.markdown_row(["on `MemoryStore`", f"{per_call['memory']:,.0f}", "—", "—"]),
        "",
        f"Ratio: {hot_ratio:.3f}. A decision never touches the network: it reads the in-memory state, and the "
        "observation is appended to an in-memory queue, whatever the store.",
        "",
        *benchlib.environment_lines(
            env, f"canary_router {env['canary_router']}, redis-py {env['redis-py']}, Redis server {redis_version}"
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    """Run the load test; exit 1 when totals differ or an exception reached a caller."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=os.environ.get("CANARY_BENCH_REDIS", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0, help="the run on Redis (default 30)")
    parser.add_argument("--rounds", type=int, default=4, help="comparison runs of each kind (default 4)")
    parser.add_argument("--round-seconds", type=float, default=5.0, help="length of a comparison run (default 5)")
    benchlib.add_write_option(parser)
    args = parser.parse_args()
    import redis

    import canary_router

    redis_version = str(redis.Redis.from_url(args.redis).info("server")["redis_version"])
    run, total = measure(args.redis, processes=args.processes, threads=args.threads, seconds=args.seconds)
    env = benchlib.environment({"canary_router": canary_router.__version__, "redis-py": benchlib.version_of("redis")})
    print(f"{benchlib.platform_summary(env)} · Redis {redis_version}")
    print(
        f"redis, {args.seconds:g} s: {statistics.median(run.rates):,.0f} calls/s per process (median of "
        f"{len(run.rates)}), {sum(run.calls):,} calls, {len(run.errors)} exceptions; Redis holds {total:,}"
    )
    rates = compare(
        args.redis, processes=args.processes, threads=args.threads, rounds=args.rounds, seconds=args.round_seconds
    )
    for mode, values in rates.items():
        print(f"{mode:>6}: {statistics.median(values):,.0f} calls/s per process (runs: {[round(v) for v in values]})")
    per_call = hot_path(args.redis)
    print(f"hot path: {per_call['redis']:.0f} ns per call on Redis, {per_call['memory']:.0f} ns on memory")
    if args.write:
        body = markdown(run, total, rates, per_call, env, args.threads, args.seconds, args.round_seconds, redis_version)
        benchlib.write_section(args.write, SECTION, body, heading=HEADING)
        print(f"wrote the {SECTION!r} section of {args.write}", file=sys.stderr)
    return 0 if total == sum(run.calls) and not run.errors else 1


if __name__ == "__main__":
    sys.exit(main())
