"""Redis failing under running routers: down at start, down mid-rollout, restarted empty, stale, racing controllers.

Each test starts its own redis-server on a free port (no persistence unless the test saves explicitly) so it
can kill and restart it; the shared server on 6379 is never touched here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from canary_router import ConflictError, Rollout, Router, StoreError
from canary_router.stores.redis import RedisStore
from redisserver import RedisServer, new_prefix, redis_server

FAST = {"refresh_interval": 0.2, "flush_interval": 0.1}
"""Router sync settings that make a test's waits short."""


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server on a free port that the test may kill and restart."""
    with redis_server() as started:
        yield started


def _router(url: str, prefix: str, **options: object) -> Router:
    store = RedisStore(url, prefix=prefix, refresh_interval=0.2)
    return Router(
        [Rollout("checkout", steps=(10.0, 50.0, 100.0))],
        store=store,
        telemetry=None,
        **{**FAST, **options},  # type: ignore[arg-type]
    )


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def _new_share(router: Router, n: int = 2000) -> float:
    return sum(router.decide("checkout", {"user_id": f"u{i}"}).variant == "new" for i in range(n)) / n


class Traffic:
    """Decorated calls on a background thread, counting what ran and any exception that reached the app."""

    def __init__(self, router: Router) -> None:
        self.calls = 0
        self.errors: list[BaseException] = []
        self.paused = threading.Event()
        self._idle = threading.Event()
        self._stop = threading.Event()

        def old(user: str) -> str:
            return "old"

        @router.canary("checkout", old=old, context_from={"user_id": "user"})
        def new(user: str) -> str:
            return "new"

        def run() -> None:
            i = 0
            while not self._stop.is_set():
                if self.paused.is_set():
                    self._idle.set()
                    time.sleep(0.005)
                    continue
                self._idle.clear()
                try:
                    new(f"user-{i % 5000}")
                    self.calls += 1
                except BaseException as exc:  # pragma: no cover - reported by the test
                    self.errors.append(exc)
                i += 1
                if i % 50 == 0:
                    time.sleep(0.001)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Stop calling, and wait until the last call has finished."""
        self._idle.clear()
        self.paused.set()
        assert self._idle.wait(5)

    def resume(self) -> None:
        """Call again."""
        self.paused.clear()

    def stop(self) -> None:
        """End the thread."""
        self._stop.set()
        self._thread.join(5)


def test_redis_down_at_start_serves_the_configured_state_then_catches_up(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens at start: the configured first step is served with a warning, then Redis takes over.

    Once Redis is up the router writes the rollout's state there and reports contact, without a restart of the app.
    """
    server = RedisServer()  # chosen port, not started yet
    prefix = new_prefix("down-at-start")
    with caplog.at_level(logging.WARNING, logger="canary_router"):
        router = _router(server.url, prefix)
    try:
        assert 0.07 < _new_share(router) < 0.13, "the configured first step (10 %) is served"
        assert any("cannot read the state" in r.getMessage() for r in caplog.records)
        server.start()
        probe = RedisStore(server.url, prefix=prefix)
        _wait(lambda: probe.get("checkout") is not None, 10, "the router writes its state once Redis is up")
        current = probe.get("checkout")
        assert current is not None
        assert (current.state.percent, current.state.phase.value) == (10.0, "running")
        _wait(lambda: router.health().seconds_since_contact < 1, 5, "the router reports contact")
        probe.close()
    finally:
        router.close()
        server.stop()


def test_redis_down_mid_rollout_decisions_continue_and_observations_arrive_later(server: RedisServer) -> None:
    """Redis dies mid-rollout: the last state is served, no exception reaches the app, no count is lost.

    Calls keep the last known 50 % step; what was observed during the outage is kept and reaches Redis once it
    is back (totals exact), nothing dropped.
    """
    prefix = new_prefix("mid")
    router = _router(server.url, prefix)
    router.promote("checkout")
    epoch = router.status("checkout").epoch
    traffic = Traffic(router)  # every call counted is in this step
    try:
        time.sleep(0.5)
        traffic.pause()
        before = traffic.calls
        router.flush()
        redis.Redis.from_url(server.url).save()  # the restarted server loads this: only the outage is missing
        server.kill()
        traffic.resume()
        time.sleep(1.5)
        assert 0.45 < _new_share(router) < 0.55, "the last known step is served while Redis is down"
        with pytest.raises(StoreError):
            router.rollback("checkout")
        with pytest.raises(StoreError):
            router.flush()
        health = router.health()
        assert health.store_errors > 0
        assert "Connection" in health.last_error or "connect" in health.last_error
        assert traffic.calls > before, "calls continued during the outage"
        server.start()
        time.sleep(0.5)
        traffic.pause()
        total = traffic.calls
        _wait(lambda: _flushed(router), 10, "a flush succeeds after the restart")
        probe = RedisStore(server.url, prefix=prefix)
        snapshot = probe.observations("checkout", epoch)
        probe.close()
        assert snapshot is not None
        assert snapshot.old.requests + snapshot.new.requests == total, "every call of the step is counted once"
        assert router.health().dropped_observations == 0
        current = router.status("checkout")
        assert (current.phase.value, current.percent) == ("running", 50.0), "the saved state came back as it was"
    finally:
        traffic.stop()
        router.close()
    assert traffic.errors == []


def _flushed(router: Router) -> bool:
    try:
        router.flush()
    except StoreError:
        return False
    return True


def test_redis_restarted_empty_restores_the_last_state_paused(server: RedisServer) -> None:
    """Redis restarts without its data: the rollout is written back as it was, paused, reason "state lost".

    The loss is detected and the rollout written back at the same 50 %, paused, with the reason "state lost" and
    one restore record, although two instances noticed it. It is
    never restarted at the first step nor moved forward.
    """
    prefix = new_prefix("lost")
    one, two = _router(server.url, prefix), _router(server.url, prefix)
    try:
        one.promote("checkout")
        _wait(lambda: two.status("checkout").percent == 50.0, 5, "the second instance sees the promotion")
        server.restart()  # empty: nothing was saved
        probe = RedisStore(server.url, prefix=prefix)
        _wait(lambda: _restored(probe), 10, "the state is restored")
        current = probe.get("checkout")
        assert current is not None
        state = current.state
        assert (state.phase.value, state.percent, state.step_index) == ("paused", 50.0, 1)
        assert state.reason.startswith("state lost")
        assert [r.action for r in probe.history("checkout")] == ["restore"]
        _wait(lambda: one.health().restored + two.health().restored == 1, 5, "one instance restored it")
        for router in (one, two):
            _wait(lambda r=router: r.status("checkout").phase.value == "paused", 5, "both serve the restored state")
            assert 0.45 < _new_share(router) < 0.55
        probe.close()
    finally:
        one.close()
        two.close()


def _restored(probe: RedisStore) -> bool:
    try:
        current = probe.get("checkout")
    except StoreError:
        return False
    return current is not None and current.state.reason.startswith("state lost")


def test_stale_state_fail_safe_serves_old_until_redis_answers(server: RedisServer) -> None:
    """The stale_after fail-safe serves "old" while Redis is unreachable, and the shared state once it is back.

    With stale_after=1 s, a router that cannot reach Redis serves "old" (reason stale_state) after about a
    second, and the shared state again once Redis answers.
    """
    router = _router(server.url, new_prefix("stale"), stale_after=1.0)
    try:
        router.promote("checkout")
        assert 0.45 < _new_share(router) < 0.55
        server.kill()
        started = time.monotonic()
        _wait(lambda: router.decide("checkout", {"user_id": "u1"}).reason == "stale_state", 5, "fail-safe on")
        assert time.monotonic() - started >= 0.9
        assert _new_share(router) == 0.0
        assert router.health().stale
        server.start()
        _wait(lambda: not router.health().stale, 10, "fail-safe off once Redis answers")
        assert 0.45 < _new_share(router) < 0.55
    finally:
        router.close()


_OPERATOR = textwrap.dedent(
    """
    import json, sys
    import redis
    from canary_router import ConflictError, Rollout, Router
    from canary_router.stores.redis import RedisStore

    url, prefix, me = sys.argv[1], sys.argv[2], sys.argv[3]
    router = Router([Rollout("checkout", steps=(10.0, 50.0, 100.0))], store=RedisStore(url, prefix=prefix),
                    telemetry=None)
    version = router.status("checkout").version
    print("ready", flush=True)
    redis.Redis.from_url(url).blpop([prefix + ":test-go"], timeout=30)
    try:
        if me.startswith("rollback"):
            router.rollback("checkout", reason="operator " + me, actor=me, expected_version=version)
        else:
            router.promote("checkout", actor=me, expected_version=version)
        print(json.dumps({"outcome": "ok"}))
    except ConflictError as exc:
        print(json.dumps({"outcome": "conflict", "message": str(exc)}))
    router.close()
    """
)


def test_operators_in_separate_processes_apply_exactly_one_change(server: RedisServer) -> None:
    """Four operator processes change one rollout at once: exactly one change applies.

    They all start from the same version; one change applies, the three others get a ConflictError that says the
    rollout changed and nothing was applied.
    """
    prefix = new_prefix("operators")
    router = _router(server.url, prefix)
    names = ["promote-a", "promote-b", "rollback-c", "rollback-d"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPERATOR, server.url, prefix, name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    try:
        for proc in procs:  # every operator has read the version it will write from
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        redis.Redis.from_url(server.url).rpush(f"{prefix}:test-go", *["go"] * len(names))
        outputs = [p.communicate(timeout=60) for p in procs]
        assert all(out.strip() for out, _ in outputs), [err for _, err in outputs]
        results = [json.loads(out) for out, _ in outputs]
        assert sorted(r["outcome"] for r in results) == ["conflict"] * 3 + ["ok"]
        for result in results:
            if result["outcome"] == "conflict":
                assert "nothing was applied" in result["message"]
        history = router.status("checkout").history
        assert [r.action for r in history][1:] in (["promote"], ["rollback"])
        assert router.status("checkout").version == 2
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        router.close()


_CONTROLLER = textwrap.dedent(
    """
    import sys, time
    from canary_router import Rollout, Router
    from canary_router.stores.redis import RedisStore

    url, prefix = sys.argv[1], sys.argv[2]
    router = Router([Rollout("checkout", steps=(10.0, 50.0, 100.0), bake_time=3600)],
                    store=RedisStore(url, prefix=prefix), telemetry=None)
    controller = router.controller()
    controller.lease_ttl = 2.0
    controller.start(0.2)
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_one_controller_acts_and_another_takes_over_when_its_process_dies(server: RedisServer) -> None:
    """Two controller processes: one holds the lease; when its process dies the other takes over.

    Exactly one holds the lease; kill -9 it and the other holds it within a few seconds, with a higher fencing token.
    """
    prefix = new_prefix("controllers")
    client = redis.Redis.from_url(server.url)
    procs = [
        subprocess.Popen([sys.executable, "-c", _CONTROLLER, server.url, prefix], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        lease_key = f"{prefix}:lease:controller"
        _wait(lambda: client.get(lease_key) is not None, 10, "a controller takes the lease")
        time.sleep(1.0)
        token, _, owner = client.get(lease_key).decode().partition(":")  # type: ignore[union-attr]
        holder = next(p for p in procs if p.pid == int(owner.split(":")[1]))
        other = next(p for p in procs if p is not holder)
        for _ in range(5):  # the holder keeps it while alive
            time.sleep(0.3)
            assert client.get(lease_key).decode() == f"{token}:{owner}"  # type: ignore[union-attr]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        _wait(lambda: f":{other.pid}:" in (client.get(lease_key) or b"").decode(), 10, "the standby takes over")
        assert time.monotonic() - killed < 5.0
        new_token = int(client.get(lease_key).decode().partition(":")[0])  # type: ignore[union-attr]
        assert new_token > int(token)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        client.close()


def test_conflict_error_is_clear_for_a_fenced_write_after_the_lease_moved(server: RedisServer) -> None:
    """A controller whose lease was taken over cannot write: its fenced transition raises ConflictError."""
    router = _router(server.url, new_prefix("fence"))
    try:
        store = router.store
        assert isinstance(store, RedisStore)
        lease = store.acquire_lease("controller", "paused-controller", 0.3)
        assert lease is not None
        time.sleep(0.5)
        assert store.acquire_lease("controller", "new-controller", 30) is not None
        with pytest.raises(ConflictError, match="no longer held"):
            router.transition("checkout", "promote", lambda s, r: s, actor="paused-controller", fence=lease)
    finally:
        router.close()


def test_a_long_outage_keeps_step_totals_and_reports_the_chart_points_it_dropped(server: RedisServer) -> None:
    """A long outage: the step totals still arrive whole; chart points that could not be kept are reported.

    The outage outlasts the chart ring (an hour of 10 s slots); the points that left the ring before Redis
    came back are counted in health(), not hidden.
    """
    now = [1_800_000_000.0]
    prefix = new_prefix("long-outage")
    router = Router(
        [Rollout("checkout", steps=(50.0, 100.0))],
        store=RedisStore(server.url, prefix=prefix, refresh_interval=0.2),
        telemetry=None,
        clock=lambda: now[0],
        **FAST,  # type: ignore[arg-type]
    )

    def old(user: str) -> str:
        return "old"

    @router.canary("checkout", old=old, context_from={"user_id": "user"})
    def new(user: str) -> str:
        return "new"

    try:
        epoch = router.status("checkout").epoch
        for i in range(10):
            new(f"u{i}")
        router.flush()
        redis.Redis.from_url(server.url).save()
        server.kill()
        for slot in range(400):  # 400 slots of 10 s: more than the 360 the ring keeps
            now[0] += 10
            new(f"v{slot}")
            router.sync()  # what the sync thread does every second: the flush fails, the counts stay
        assert router.health().store_errors >= 400
        server.start()
        _wait(lambda: _flushed(router), 10, "a flush succeeds after the restart")
        probe = RedisStore(server.url, prefix=prefix)
        snapshot = probe.observations("checkout", epoch)
        slots = probe.observation_history("checkout")
        probe.close()
        assert snapshot is not None
        assert snapshot.old.requests + snapshot.new.requests == 410, "the step totals are whole"
        health = router.health()
        assert health.dropped_observations == 0
        assert health.dropped_history >= 30, health
        assert sum(sum(s.requests.values()) for s in slots) == 410 - health.dropped_history
    finally:
        router.close()


def test_a_hung_redis_costs_one_short_timeout_per_call(server: RedisServer) -> None:
    """A hung Redis: a store call gives up with StoreError after its 0.5 s timeout, not later.

    Redis accepts connections but answers nothing (CLIENT PAUSE).
    """
    store = RedisStore(server.url, prefix=new_prefix("hung"))
    try:
        store.ping()
        redis.Redis.from_url(server.url).client_pause(3000)
        started = time.monotonic()
        with pytest.raises(StoreError, match="Timeout"):
            store.get("checkout")
        assert time.monotonic() - started < 0.9
    finally:
        store.close()
