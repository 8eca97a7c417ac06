"""Routers on Redis: propagation between processes, pre-fork servers, asyncio, and Redis failing under them."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from canary_router import Rollout, Router, StoreError
from canary_router.stores.redis import RedisStore
from redisserver import RedisServer, delete_prefix, new_prefix, redis_server, shared_url
from webserver import free_port, python_module, serve

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server on a free port that the test may kill and restart."""
    with redis_server() as started:
        yield started


def _router(url: str, prefix: str, **options: object) -> Router:
    return Router([Rollout("checkout", steps=(10.0, 50.0, 100.0))], store=RedisStore(url, prefix=prefix), **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- propagation


def test_rollback_reaches_every_process_quickly() -> None:
    """20 rollbacks with 4 processes: every other process serves "old" within 500 ms (p99), nothing missed."""
    import bench_propagation

    result = bench_propagation.measure(shared_url(), 20, watchers=3, seed=7)
    assert len(result.trials) == 20
    assert len(result.each) == 60
    assert bench_propagation.percentile(result.from_call, 99) < 500


def test_load_totals_in_redis_equal_what_every_process_observed() -> None:
    """4 processes × 2 threads × 3 s of routed calls: no exception, and Redis holds exactly the calls made."""
    import load_redis

    with_redis, total = load_redis.measure(shared_url(), processes=4, threads=2, seconds=3.0)
    assert with_redis.errors == []
    assert sum(with_redis.calls) > 10_000
    assert total == sum(with_redis.calls)
    assert with_redis.dropped == 0


# ------------------------------------------------------------------------------------------------ pre-fork


def _poll_workers(base: str) -> dict[int, str]:
    """Six concurrent requests (each holding its worker 0.2 s, on its own connection): pid → variant served."""

    def one(_: int) -> tuple[int, str]:
        answer = httpx.get(f"{base}/?hold=0.2", headers={"Connection": "close"}, timeout=10).json()
        return int(answer["pid"]), str(answer["variant"])

    with ThreadPoolExecutor(6) as pool:
        return dict(pool.map(one, range(6)))


def test_gunicorn_preload_workers_all_receive_a_rollback() -> None:
    """Gunicorn --preload with 3 workers: after the fork every worker still hears changes, at once.

    A rollback, then a restart: each reaches every worker within 10 s although every periodic re-read is set
    to an hour, so it came through the change listener that each worker restarted after the fork.
    """
    url, prefix = shared_url(), new_prefix("gunicorn")
    port = free_port()
    store_url = f"{url}?prefix={prefix}&refresh_interval=3600"  # only the change channel can be in time
    command = python_module(
        "gunicorn", "--preload", "-w", "3", "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2", "redis_wsgi:app"
    )
    operator = Router([Rollout("checkout", steps=(100.0,))], store=RedisStore(url, prefix=prefix), telemetry=None)
    try:
        with serve(command, port, cwd=ROOT / "tests" / "apps", env={"CANARY_ROUTER_STORE": store_url}) as base:
            latest: dict[int, str] = {}
            deadline = time.monotonic() + 60
            while len(latest) < 3:
                assert time.monotonic() < deadline, f"saw only workers {sorted(latest)}"
                latest.update(_poll_workers(base))
            assert set(latest.values()) == {"new"}
            workers = set(latest)
            for change, expected in ((operator.rollback, "old"), (operator.restart, "new")):
                change("checkout", reason=f"test: every worker must serve {expected!r}")
                deadline = time.monotonic() + 10
                while any(v != expected for v in latest.values()):
                    assert time.monotonic() < deadline, f"workers not serving {expected!r}: {latest}"
                    latest.update(_poll_workers(base))
            assert set(latest) == workers, "no worker was replaced during the test"
    finally:
        operator.close()
        delete_prefix(url, prefix)


# ------------------------------------------------------------------------------------------------- asyncio


async def _max_loop_lag(seconds: float, work: object) -> float:
    """Run ``work`` (a coroutine) while measuring how late a 10 ms timer fires; return the worst lateness (s)."""
    worst = 0.0
    task = asyncio.ensure_future(work)  # type: ignore[arg-type]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        worst = max(worst, time.monotonic() - before - 0.01)
    await task
    return worst


def test_asyncio_loop_is_not_blocked_while_redis_is_down_or_hung(server: RedisServer) -> None:
    """An asyncio app deciding and routing while Redis hangs (CLIENT PAUSE) and then is gone: the loop never stalls.

    The store's read timeout is 2 s here, so one blocking call on the loop would stall it for about 2 s
    while Redis hangs; the worst timer lateness must stay under 1 s. It is about 10 ms on an idle machine;
    the margin is for a loaded one, where a full garbage collection of the test session's heap alone can
    take a few hundred ms. Control methods run in a thread (``asyncio.to_thread``) and fail there with
    StoreError.
    """
    prefix = new_prefix("asyncio")
    router = _router(f"{server.url}?socket_timeout=2", prefix)
    router.set_percent("checkout", 50)
    served = {"old": 0, "new": 0}
    errors: list[BaseException] = []

    async def old(user: str) -> str:
        return "old"

    @router.canary("checkout", old=old, context_from={"user_id": "user"})
    async def new(user: str) -> str:
        return "new"

    async def traffic(seconds: float) -> None:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            try:
                served[await new(f"user-{i}")] += 1
                router.decide("checkout", {"user_id": f"user-{i}"})
            except BaseException as exc:  # pragma: no cover - the assertion below reports it
                errors.append(exc)
            i += 1
            await asyncio.sleep(0)

    async def scenario() -> tuple[float, float, BaseException | None]:
        import redis

        redis.Redis.from_url(server.url).client_pause(2500)  # hung: connections open, nothing answers
        hung = await _max_loop_lag(2.0, traffic(2.0))
        server.kill()
        failure: BaseException | None = None
        try:
            await asyncio.to_thread(router.rollback, "checkout", reason="operator, while Redis is down")
        except StoreError as exc:
            failure = exc
        down = await _max_loop_lag(2.0, traffic(2.0))
        return hung, down, failure

    try:
        hung, down, failure = asyncio.run(scenario())
    finally:
        router.close()
    assert errors == []
    assert served["old"] > 100, served
    assert served["new"] > 100, served
    assert hung < 1.0, f"the loop stalled for {hung * 1000:.0f} ms while Redis hung"
    assert down < 1.0, f"the loop stalled for {down * 1000:.0f} ms while Redis was down"
    assert isinstance(failure, StoreError)
