"""Routers sharing a store: observation totals, the controller lease, lost state, the stale fail-safe.

Several routers over one ``MemoryStore`` (``share_observations=True``) behave like separate instances over
a shared store; ``FlakyStore`` wraps a ``MemoryStore`` so a test can take the store down, or swap in an
empty one as a restarted Redis without persistence would be. The same behaviours run against a real Redis
and a real SQLite file in their own test modules.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from canary_router import ConflictError, MemoryStore, Phase, Router, StoreError
from canary_router.analysis import Outcome, evaluate
from canary_router.controller import Controller
from canary_router.model import AuditRecord, RolloutState
from canary_router.observe import HistorySlot, StepSnapshot
from canary_router.stores import Lease, ObservationBatch, Versioned

CONFIG: dict[str, Any] = {
    "rollouts": {
        "r": {
            "steps": [10, 50, 100],
            "bake_time": "10m",
            "guard": {"min_requests": 50, "max_error_rate_increase": 0.01},
        }
    }
}


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakyStore:
    """A MemoryStore behind a switch: ``down`` makes every call fail; ``wipe()`` swaps in an empty store."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.inner = MemoryStore(clock=clock)
        self.down = False
        self._subscribers: list[Callable[[str, Versioned], None]] = []
        self._unsubscribe = self.inner.subscribe(self._relay)

    def _relay(self, name: str, versioned: Versioned) -> None:
        for callback in list(self._subscribers):
            callback(name, versioned)

    def _check(self) -> None:
        if self.down:
            raise StoreError("connection refused")

    def wipe(self) -> None:
        self._unsubscribe()
        self.inner = MemoryStore(clock=self._clock)
        self._unsubscribe = self.inner.subscribe(self._relay)

    def get(self, name: str) -> Versioned | None:
        self._check()
        return self.inner.get(name)

    def get_all(self) -> dict[str, Versioned]:
        self._check()
        return self.inner.get_all()

    def compare_and_set(
        self,
        name: str,
        expected_version: int | None,
        state: RolloutState,
        record: AuditRecord,
        *,
        fence: Lease | None = None,
    ) -> int:
        self._check()
        return self.inner.compare_and_set(name, expected_version, state, record, fence=fence)

    def history(self, name: str, limit: int | None = None) -> list[AuditRecord]:
        self._check()
        return self.inner.history(name, limit)

    def subscribe(self, callback: Callable[[str, Versioned], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def add_observations(self, batch: ObservationBatch) -> None:
        self._check()
        self.inner.add_observations(batch)

    def observations(self, rollout: str, epoch: int) -> StepSnapshot | None:
        self._check()
        return self.inner.observations(rollout, epoch)

    def observation_history(self, rollout: str, since: float = 0.0) -> list[HistorySlot]:
        self._check()
        return self.inner.observation_history(rollout, since)

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        self._check()
        return self.inner.acquire_lease(name, owner, ttl)

    def release_lease(self, lease: Lease) -> None:
        self._check()
        self.inner.release_lease(lease)

    def ping(self) -> None:
        self._check()

    def close(self) -> None:
        pass


def _router(store: Any, clock: Clock, **options: Any) -> Router:
    options.setdefault("share_observations", True)
    return Router.from_config(CONFIG, store=store, clock=clock, telemetry=None, **options)


def _traffic(router: Router, users: range, fail_new_every: int = 0) -> dict[str, int]:
    """Route one call per user and record it; returns requests per variant."""
    counts = {"old": 0, "new": 0}
    for i in users:
        decision = router.decide("r", {"user_id": f"u{i}"})
        counts[decision.variant] += 1
        ok = not (decision.variant == "new" and fail_new_every and counts["new"] % fail_new_every == 0)
        router._observe("r", decision, ok, 0.001 * (1 + i % 7))
    return counts


def test_observations_from_every_instance_add_up() -> None:
    """Three instances flush their counts; every instance reads the same sum (totals, units, history)."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    routers = [_router(store, clock) for _ in range(3)]
    try:
        totals = {"old": 0, "new": 0}
        for index, router in enumerate(routers):
            for variant, n in _traffic(router, range(index * 1_000, (index + 1) * 1_000)).items():
                totals[variant] += n
            router.flush()
        snapshot = routers[0].observations("r")
        assert snapshot is not None
        assert (snapshot.old.requests, snapshot.new.requests) == (totals["old"], totals["new"])
        assert snapshot.old.units + snapshot.new.units == 3_000
        assert sum(snapshot.old.histogram) == totals["old"]
        # every instance reads the same totals, and the history adds up too
        assert routers[2].observations("r") == snapshot
        history = routers[1].observation_history("r")
        assert sum(slot.requests["old"] + slot.requests["new"] for slot in history) == 3_000
    finally:
        for router in routers:
            router.close()


def test_flushes_send_each_observation_exactly_once_through_failures() -> None:
    """Random traffic, random store outages between flushes: the store ends with exactly the local totals."""
    clock = Clock()
    store = FlakyStore(clock)
    router = _router(store, clock)
    rng = random.Random(7)
    sent = {"old": 0, "new": 0}
    try:
        for round_ in range(60):
            for variant, n in _traffic(router, range(round_ * 97, round_ * 97 + rng.randrange(1, 97))).items():
                sent[variant] += n
            store.down = rng.random() < 0.4
            try:
                router.flush()
            except StoreError:
                assert store.down
            clock.now += rng.choice([0.5, 3.0, 11.0])  # crosses history slots now and then
        store.down = False
        router.flush()
        epoch = router.status("r").epoch
        snapshot = store.inner.observations("r", epoch)
        local = router.aggregator.snapshot("r", epoch) if router.aggregator else None
        assert snapshot is not None
        assert local is not None
        assert (snapshot.old.requests, snapshot.new.requests) == (sent["old"], sent["new"])
        assert snapshot.old.histogram == local.old.histogram
        assert snapshot.new.histogram == local.new.histogram
        assert (snapshot.old.units, snapshot.new.units) == (local.old.units, local.new.units)
        slots = store.inner.observation_history("r")
        assert [(s.start, s.requests) for s in slots] == [(s.start, s.requests) for s in router.aggregator.history("r")]
        assert router.health().dropped_observations == 0
        assert router.health().store_errors > 0
    finally:
        router.close()


def test_the_guard_judges_the_sum_of_all_instances() -> None:
    """Each instance alone has too few requests for a verdict; their sum rolls the bad version back."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    routers = [_router(store, clock) for _ in range(4)]
    try:
        for index, router in enumerate(routers):
            _traffic(router, range(index * 400, (index + 1) * 400), fail_new_every=6)
            local = router.aggregator.snapshot("r") if router.aggregator else None
            assert local is not None
            alone = evaluate(router.rollouts["r"].guard, local, 10.0)
            assert alone.outcome is not Outcome.FAIL, "one instance alone cannot tell yet"
            router.flush()  # what each instance's sync thread does every second
        actions = routers[0].controller().tick()
        assert [a.action for a in actions] == ["rollback"], actions
        assert all(router.decide("r", {"user_id": "u1"}).reason == "rolled_back" for router in routers)
    finally:
        for router in routers:
            router.close()


def test_one_controller_acts_and_a_standby_takes_over_when_the_lease_expires() -> None:
    """The lease: one acting controller, renewals keep it, a standby takes over after the ttl; fencing."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    a, b = _router(store, clock), _router(store, clock)
    try:
        first, second = Controller(a, lease_ttl=5.0), Controller(b, lease_ttl=5.0)
        assert first.tick()[0].action == "wait"
        assert first.lease is not None
        standby = second.tick()
        assert [x.reason for x in standby] == ["standby: another controller holds the lease"]
        clock.now += 3
        first.tick()  # renews: same token
        clock.now += 3
        assert second.tick()[0].reason.startswith("standby")
        # the first controller's process dies (no more renewals): the standby takes over after the ttl
        clock.now += 5.1
        second.tick()
        assert second.lease is not None
        assert second.lease.token > first.lease.token
        # a late write by the old holder is fenced off, even though the version still matches
        with pytest.raises(ConflictError, match="no longer held"):
            a.transition("r", "pause", lambda s, r: a._state(s, phase=Phase.PAUSED), actor="late", fence=first.lease)
    finally:
        a.close()
        b.close()


def test_fenced_transition_is_refused_after_the_lease_changed_hands() -> None:
    """A write fenced by a lease that changed hands is a conflict and changes nothing."""
    clock = Clock()
    store = MemoryStore(clock=clock)
    router = _router(store, clock)
    try:
        lease = store.acquire_lease("controller", "old-holder", 1.0)
        assert lease is not None
        clock.now += 2
        assert store.acquire_lease("controller", "new-holder", 5.0) is not None
        before = router.status("r")
        with pytest.raises(ConflictError):
            router.transition("r", "pause", lambda s, r: router._state(s, phase=Phase.PAUSED), actor="x", fence=lease)
        assert router.status("r").version == before.version
    finally:
        router.close()


def test_store_restarted_empty_restores_the_last_state_paused() -> None:
    """A store that lost its data gets the last known state back, paused, with a "state lost" reason."""
    clock = Clock()
    store = FlakyStore(clock)
    a, b = _router(store, clock), _router(store, clock)
    try:
        a.promote("r")  # 50 %
        assert b.status("r").percent == 50.0
        store.wipe()  # the store restarted without its data
        a.sync()
        restored = store.get("r")
        assert restored is not None
        assert restored.state.phase is Phase.PAUSED
        assert restored.state.percent == 50.0
        assert restored.state.reason.startswith("state lost")
        assert [r.action for r in store.history("r")] == ["restore"]
        b.sync()  # the other instance accepts the restored state although its version is lower
        assert b.status("r").phase is Phase.PAUSED
        assert b.decide("r", {"user_id": "u3"}).reason == "split"
        assert a.health().restored == 1
        assert b.health().restored == 0
    finally:
        a.close()
        b.close()


def test_a_fresh_instance_cannot_silently_restart_a_lost_rollout() -> None:
    """A new instance re-creating a wiped rollout at its first step is overruled by one that knew better.

    The instance that knew the last state restores it over the restart (paused), and the new one follows.
    """
    clock = Clock()
    store = FlakyStore(clock)
    old = _router(store, clock)
    try:
        old.promote("r")
        old.promote("r")  # 100 %
        store.wipe()
        fresh = _router(store, clock)  # sees nothing, starts the rollout at 10 %
        assert fresh.status("r").percent == 10.0
        clock.now += 1
        old.sync()
        current = store.get("r")
        assert current is not None
        assert current.state.percent == 100.0
        assert current.state.phase is Phase.PAUSED
        assert fresh.status("r").percent == 100.0
        fresh.close()
    finally:
        old.close()


def test_stale_state_fail_safe_serves_old_until_the_store_answers() -> None:
    """stale_after: last known state while the outage is short, then "old", then back when the store answers."""
    clock = Clock()
    store = FlakyStore(clock)
    router = _router(store, clock, stale_after=30.0)
    try:
        router.promote("r")
        router.promote("r")  # 100 %: everyone with a unit gets "new"
        assert router.decide("r", {"user_id": "u1"}).variant == "new"
        store.down = True
        clock.now += 20
        router.sync()
        assert router.decide("r", {"user_id": "u1"}).variant == "new", "within stale_after: last known state"
        clock.now += 11
        router.sync()
        assert router.decide("r", {"user_id": "u1"})[:2] == ("old", "stale_state")
        assert router.health().stale
        store.down = False
        router.sync()
        assert router.decide("r", {"user_id": "u1"}).variant == "new"
        assert not router.health().stale
    finally:
        router.close()


def test_store_down_at_start_serves_configured_state_then_catches_up(caplog: pytest.LogCaptureFixture) -> None:
    """The app starts with the store down (warning, configured state) and creates the state once it answers."""
    clock = Clock()
    store = FlakyStore(clock)
    store.down = True
    router = _router(store, clock)
    try:
        assert "cannot read the state" in caplog.text
        assert router.decide("r", {"user_id": "u1"}).reason == "split"
        with pytest.raises(StoreError):
            router.status("r")
        store.down = False
        router.sync()
        assert router.status("r").version == 1
        assert router.status("r").history[0].action == "start"
    finally:
        router.close()


def test_the_sync_thread_runs_after_fork() -> None:
    """A forked child (a pre-fork worker) runs its own sync thread."""
    clock = Clock()
    router = _router(MemoryStore(clock=clock), clock, flush_interval=0.05)
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            thread = router._sync_thread
            alive = thread is not None and thread.is_alive() and thread is not threading.main_thread()
            os.write(write, b"alive" if alive else b"dead")
            os._exit(0)
        os.close(write)
        _, _status = os.waitpid(pid, 0)
        assert os.read(read, 16) == b"alive"
        os.close(read)
    finally:
        router.close()


def test_store_url_from_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """[store] in the config, and CANARY_ROUTER_STORE, choose the store; bad values name their path."""
    from canary_router import ConfigError
    from canary_router.config import load_config

    config = load_config({**CONFIG, "store": {"url": "memory://", "stale_after": "45s", "flush_interval": 0.5}})
    assert (config.store_url, config.stale_after, config.flush_interval) == ("memory://", 45.0, 0.5)
    assert load_config({**CONFIG, "store": "memory://"}).store_url == "memory://"
    with pytest.raises(ConfigError, match=r"store\.url: expected a memory://"):
        load_config({**CONFIG, "store": {"url": "ftp://x"}})
    with pytest.raises(ConfigError, match=r"store\.stale_after"):
        load_config({**CONFIG, "store": {"stale_after": "soon"}})
    with pytest.raises(ConfigError, match=r"store\.urll.*unknown key"):
        load_config({**CONFIG, "store": {"urll": "memory://"}})
    router = Router.from_config({**CONFIG, "store": {"url": "memory://", "stale_after": "45s"}}, telemetry=None)
    assert router.health().stale_after == 45.0
    assert router.health().store == "MemoryStore"
    router.close()
    monkeypatch.setenv("CANARY_ROUTER_STORE", "bogus://nowhere")
    with pytest.raises(ConfigError, match="store: expected"):
        Router.from_config(CONFIG, telemetry=None)
