"""Rollout state: phases, control methods, compare-and-set, audit records, the injected clock."""

from __future__ import annotations

import math
import threading

import pytest

from canary_router import (
    AuditRecord,
    ConflictError,
    MemoryStore,
    Phase,
    RolloutState,
    Router,
    Store,
    TransitionError,
    UnknownRolloutError,
)


class FakeClock:
    """A settable clock."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(start: str = "running", store: MemoryStore | None = None, clock: FakeClock | None = None) -> Router:
    """A router with rollout "r" at steps 5, 10, 25, 50, 100."""
    return Router.from_config(
        {"rollouts": {"r": {"steps": [5, 10, 25, 50, 100], "start": start}}}, store=store, clock=clock
    )


def test_first_seen_rollout_starts_running_at_first_step() -> None:
    """A new rollout starts running at its first step, with a 'start' audit record."""
    status = make().status("r")
    assert (status.phase, status.step_index, status.percent, status.step) == (Phase.RUNNING, 0, 5.0, 5.0)
    assert [h.action for h in status.history] == ["start"]


def test_start_paused_from_config() -> None:
    """Start = "paused" makes a new rollout start paused."""
    assert make("paused").status("r").phase == Phase.PAUSED


def test_existing_state_in_store_is_kept() -> None:
    """A second router on the same store picks up the stored state instead of restarting."""
    store = MemoryStore()
    first = make(store=store)
    first.promote("r")
    second = make(store=store)
    assert second.status("r").percent == 10.0
    assert len(second.status("r").history) == 2


def test_promote_walks_the_steps_then_completes() -> None:
    """Promote goes 5 → 10 → 25 → 50 → 100 and then completes."""
    router = make()
    percents = [router.promote("r").percent for _ in range(4)]
    assert percents == [10.0, 25.0, 50.0, 100.0]
    final = router.promote("r")
    assert final.phase == Phase.COMPLETED
    with pytest.raises(TransitionError, match="already completed"):
        router.promote("r")


def test_set_percent_validates() -> None:
    """set_percent rejects NaN, infinities, bools, out-of-range and too-fine values with a clear error."""
    router = make()
    for bad in (math.nan, math.inf, -1, 100.5, True, "10", 10.001):
        with pytest.raises(ValueError, match="percent"):
            router.set_percent("r", bad)  # type: ignore[arg-type]
    assert router.status("r").percent == 5.0


def test_set_percent_between_steps_then_promote() -> None:
    """After set_percent(15), promote moves to the next configured step above it (25)."""
    router = make()
    status = router.set_percent("r", 15)
    assert (status.percent, status.step_index) == (15.0, 1)
    assert router.promote("r").percent == 25.0


def test_set_percent_keeps_paused() -> None:
    """set_percent on a paused rollout changes the percentage and stays paused."""
    router = make("paused")
    status = router.set_percent("r", 50)
    assert (status.phase, status.percent) == (Phase.PAUSED, 50.0)


def test_pause_resume_are_idempotent() -> None:
    """Pausing a paused rollout or resuming a running one records nothing."""
    router = make()
    router.pause("r")
    router.pause("r")
    router.resume("r")
    router.resume("r")
    assert [h.action for h in router.status("r").history] == ["start", "pause", "resume"]


def test_rollback_then_restart() -> None:
    """A rolled-back rollout cannot be promoted or resumed, only restarted at the first step."""
    router = make()
    router.promote("r")
    status = router.rollback("r", reason="error rate +2 pp")
    assert (status.phase, status.percent, status.reason) == (Phase.ROLLED_BACK, 0.0, "error rate +2 pp")
    with pytest.raises(TransitionError, match="restart"):
        router.promote("r")
    with pytest.raises(TransitionError, match="restart"):
        router.resume("r")
    with pytest.raises(TransitionError):
        router.pause("r")
    router.rollback("r")  # idempotent
    restarted = router.restart("r")
    assert (restarted.phase, restarted.percent, restarted.step_index) == (Phase.RUNNING, 5.0, 0)


def test_audit_records_carry_time_actor_and_change() -> None:
    """Each transition records the clock's time, the actor, from → to and the reason."""
    clock = FakeClock(5_000.0)
    router = make(clock=clock)
    clock.now = 6_000.0
    router.promote("r", actor="alice")
    clock.now = 7_000.0
    router.rollback("r", reason="p95 ratio 1.4", actor="controller", details={"p95_ratio": 1.4})
    history = router.status("r").history
    promote, rollback = history[1], history[2]
    assert (promote.time, promote.actor, promote.from_percent, promote.to_percent) == (6_000.0, "alice", 5.0, 10.0)
    assert (rollback.time, rollback.from_phase, rollback.to_phase) == (7_000.0, "running", "rolled_back")
    assert rollback.details == {"p95_ratio": 1.4}
    assert [h.version for h in history] == [1, 2, 3]
    assert router.status("r").updated_at == 7_000.0


def test_expected_version_detects_a_stale_view() -> None:
    """An action with an outdated expected_version is refused and changes nothing."""
    router = make()
    seen = router.status("r").version
    router.promote("r")
    with pytest.raises(ConflictError, match="changed since you looked"):
        router.rollback("r", expected_version=seen)
    assert router.status("r").phase == Phase.RUNNING


def test_racing_promotes_apply_once() -> None:
    """Many threads promoting from the same version: exactly one applies, the rest conflict."""
    router = make()
    version = router.status("r").version
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            router.promote("r", expected_version=version)
            result = "applied"
        except ConflictError:
            result = "conflict"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["applied"] + ["conflict"] * 7
    assert router.status("r").percent == 10.0


def test_memory_store_compare_and_set_contract() -> None:
    """MemoryStore creates only when absent, bumps versions, and refuses a stale version."""
    store = MemoryStore()
    assert isinstance(store, Store)
    state = RolloutState(Phase.RUNNING, 0, 5.0, 1.0)
    record = AuditRecord(1.0, "x", "t", "start", None, "running", None, 5.0)
    assert store.compare_and_set("x", None, state, record) == 1
    with pytest.raises(ConflictError):
        store.compare_and_set("x", None, state, record)
    assert store.compare_and_set("x", 1, state, record) == 2
    with pytest.raises(ConflictError):
        store.compare_and_set("x", 1, state, record)
    assert store.get("x") == (state, 2)
    assert [r.version for r in store.history("x")] == [1, 2]


def test_memory_store_history_is_bounded() -> None:
    """The audit log keeps the newest max_history records."""
    store = MemoryStore(max_history=3)
    router = make(store=store)
    for _ in range(5):
        router.pause("r")
        router.resume("r")
    assert len(store.history("r")) == 3
    assert store.history("r")[-1].action == "resume"


def test_changes_reach_other_routers_on_the_store() -> None:
    """A rollback through one router is served at once by another router sharing the store."""
    store = MemoryStore()
    a, b = make(store=store), make(store=store)
    b.set_percent("r", 100)
    assert a.decide("r", {"user_id": "u"}).variant == "new"
    a.rollback("r")
    assert b.decide("r", {"user_id": "u"}).reason == "rolled_back"


def test_state_round_trips_through_dicts() -> None:
    """RolloutState and AuditRecord serialise to JSON-ready dicts and back unchanged."""
    router = make()
    router.promote("r", actor="bob")
    record = router.status("r").history[-1]
    assert AuditRecord.from_dict(record.to_dict()) == record
    state = RolloutState(Phase.PAUSED, 2, 25.0, 9.5, "why", "who")
    assert RolloutState.from_dict(state.to_dict()) == state


def test_unknown_rollout_in_control_methods() -> None:
    """Control methods name an unknown rollout and suggest the closest known one."""
    router = make()
    with pytest.raises(UnknownRolloutError, match="did you mean 'r'"):
        router.promote("rr")


class BrokenStore(MemoryStore):
    """A store whose reads and writes fail, like an unreachable server."""

    def get(self, name: str):  # type: ignore[no-untyped-def]
        raise OSError("connection refused")

    def compare_and_set(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("connection refused")


def test_unreachable_store_at_start_serves_configured_state() -> None:
    """With the store down at start, the router serves the configured start state and decide works."""
    router = make(store=BrokenStore())
    decisions = [router.decide("r", {"user_id": f"u{i}"}) for i in range(2000)]
    share = sum(d.variant == "new" for d in decisions) / len(decisions)
    assert 0.03 < share < 0.07
    from canary_router import StoreError

    with pytest.raises(StoreError, match="connection refused"):
        router.promote("r")
