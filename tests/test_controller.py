"""Controller.tick: bake time and verdicts drive promotion, pause and rollback, with CAS and an audit trail."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from canary_router import (
    AuditRecord,
    ConfigError,
    Controller,
    GuardConfig,
    MemoryStore,
    Phase,
    Reason,
    Rollout,
    RolloutState,
    Router,
)

HOUR = 3600.0


class Clock:
    """A fake clock: POSIX seconds that only move when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    """A fresh fake clock."""
    return Clock()


@pytest.fixture
def routers() -> Iterator[list[Router]]:
    """Collects routers built by a test and closes them afterwards."""
    made: list[Router] = []
    yield made
    for router in made:
        router.close()


def make_router(routers: list[Router], clock: Clock, *, store: MemoryStore | None = None, **rollout: Any) -> Router:
    """A router with one rollout "r" (steps 5/10/25/50/100, bake 1 h) and the given overrides."""
    config = {"rollouts": {"r": {"steps": [5, 10, 25, 50, 100], "bake_time": "1h", **rollout}}}
    router = Router.from_config(config, clock=clock, store=store)
    routers.append(router)
    return router


def drive(
    router: Router,
    *,
    new: int = 1_500,
    old: int = 1_500,
    fail_every: int = 0,
    prefix: str = "u",
    limit: int = 200_000,
) -> dict[str, int]:
    """Send real decisions of distinct users through router._observe until each variant has its count.

    Every decided user is observed (so the unit split stays natural); every ``fail_every``-th new call fails.
    Shadow decisions run "new" alongside, as the decorator does.
    """
    counts = {"old": 0, "new": 0}
    for i in range(limit):
        if counts["new"] >= new and counts["old"] >= old:
            break
        decision = router.decide("r", {"user_id": f"{prefix}{i}"})
        if decision.reason == Reason.SHADOW:
            router._observe("r", decision, True, 1e-6)
            router._observe("r", decision, not _fails(counts["new"], fail_every), 1e-6, variant="new")
            counts["new"] += 1
            counts["old"] += 1
            continue
        variant = decision.variant
        ok = variant == "old" or not _fails(counts["new"], fail_every)
        router._observe("r", decision, ok, 1e-6)
        counts[variant] += 1
    return counts


def _fails(index: int, every: int) -> bool:
    return bool(every) and index % every == 0


def actions(router: Router) -> list[tuple[str, str, float]]:
    """The audit log as (action, actor, to_percent)."""
    return [(r.action, r.actor, r.to_percent) for r in router.status("r").history]


# ---------------------------------------------------------------------------------------------- the schedule


def test_promotes_through_every_step_then_completes(routers: list[Router], clock: Clock) -> None:
    """Healthy traffic and elapsed bake time promote 5 -> 10 -> 25 -> 50 -> 100, then complete."""
    router = make_router(routers, clock)
    controller = Controller(router)
    for nxt in (10, 25, 50, 100):
        status = router.status("r")
        drive(router, prefix=f"s{nxt}-")
        [action] = controller.tick()
        assert action.action == "wait"
        assert "waiting for bake time" in action.reason
        clock.advance(HOUR)
        [action] = controller.tick()
        assert action.action == "promote", action.reason
        assert action.verdict is not None
        assert action.verdict.outcome == "pass"
        after = router.status("r")
        assert (after.phase, after.percent, after.step_index) == (Phase.RUNNING, nxt, status.step_index + 1)
        assert after.epoch == status.epoch + 1
        assert after.step_started_at == clock.now
    drive(router, old=0, new=100, prefix="last-")
    clock.advance(HOUR)
    [action] = controller.tick()
    assert action.action == "promote"
    assert action.reason.startswith("completed after 1 h at 100 %")
    assert router.status("r").phase is Phase.COMPLETED
    assert router.decide("r", {"user_id": "anyone"}).reason == Reason.COMPLETED
    assert controller.tick() == []
    assert actions(router) == [
        ("start", "router", 5),
        ("promote", "controller", 10),
        ("promote", "controller", 25),
        ("promote", "controller", 50),
        ("promote", "controller", 100),
        ("promote", "controller", 100),
    ]
    assert router.status("r").history[-1].to_phase == "completed"


def test_statistics_restart_at_each_step(routers: list[Router], clock: Clock) -> None:
    """After a promotion the guard starts from zero: the old step's counts no longer count."""
    router = make_router(routers, clock)
    controller = Controller(router)
    drive(router)
    clock.advance(HOUR)
    [action] = controller.tick()
    assert action.action == "promote"
    epoch = router.status("r").epoch
    assert router.aggregator is not None
    assert router.aggregator.snapshot("r", epoch) is None
    verdict = controller.verdict("r")
    assert verdict.outcome == "inconclusive"
    assert verdict.new.requests == 0
    assert verdict.old.requests == 0
    drive(router, new=10, old=10, prefix="next-")
    snapshot = router.aggregator.snapshot("r", epoch)
    assert snapshot is not None
    assert snapshot.new.requests >= 10
    assert snapshot.started_at == clock.now


def test_waits_for_bake_time_even_when_passing(routers: list[Router], clock: Clock) -> None:
    """A passing verdict is not enough: the step must also have baked for bake_time."""
    router = make_router(routers, clock)
    controller = Controller(router)
    drive(router)
    assert controller.verdict("r").outcome == "pass"
    clock.advance(HOUR - 1)
    [action] = controller.tick()
    assert action.action == "wait"
    assert action.reason.startswith("waiting for bake time at 5 % (")
    assert router.status("r").percent == 5
    clock.advance(1)
    [action] = controller.tick()
    assert action.action == "promote"


def test_waits_for_a_pass_even_after_bake_time(routers: list[Router], clock: Clock) -> None:
    """Bake time without a passing verdict is not enough: it waits until the evidence arrives."""
    router = make_router(routers, clock)
    controller = Controller(router)
    drive(router, new=50, old=50)
    clock.advance(5 * HOUR)
    [action] = controller.tick()
    assert action.action == "wait"
    assert "waiting for a passing verdict" in action.reason
    assert router.status("r").percent == 5
    drive(router, prefix="more-")
    [action] = controller.tick()
    assert action.action == "promote"
    assert router.status("r").percent == 10


def test_rolls_back_at_once_on_failure_with_the_numbers(routers: list[Router], clock: Clock) -> None:
    """A failing verdict rolls back immediately (no bake), as "controller", with the verdict in the audit details."""
    router = make_router(routers, clock)
    controller = Controller(router)
    drive(router, new=600, old=600, fail_every=3)
    [action] = controller.tick()
    assert action.action == "rollback"
    assert action.reason.startswith("guard failed at 5 %: error rate new")
    status = router.status("r")
    assert (status.phase, status.percent) == (Phase.ROLLED_BACK, 0.0)
    record = status.history[-1]
    assert (record.action, record.actor, record.from_percent, record.to_percent) == ("rollback", "controller", 5, 0)
    assert record.to_phase == "rolled_back"
    details = record.details
    assert details["elapsed"] == 0.0
    verdict = details["verdict"]
    assert verdict["outcome"] == "fail"
    assert verdict["new"]["errors"] == 200
    error = next(c for c in verdict["checks"] if c["name"] == "error_rate")
    assert error["outcome"] == "fail"
    assert error["numbers"]["new_errors"] == 200
    assert error["numbers"]["new_requests"] == 600
    assert error["numbers"]["alpha"] > 0
    assert router.decide("r", {"user_id": "u1"}).reason == Reason.ROLLED_BACK
    assert controller.tick() == []


def test_circuit_breaker_rolls_back_within_a_few_requests(routers: list[Router], clock: Clock) -> None:
    """A new path failing every call is rolled back within ~10 of its requests, far below min_requests."""
    router = make_router(routers, clock)
    controller = Controller(router)
    assert router.aggregator is not None
    router.aggregator.add_counts(  # thousands of old requests (5 % errors) already seen this step
        "r", 1, "old", requests=3_000, errors=150, histogram={0: 3_000}, unit_hashes=range(3_000), now=clock()
    )
    users = (f"n{i}" for i in range(10**6))
    sent = 0
    while sent < 50:
        decision = router.decide("r", {"user_id": next(users)})
        if decision.variant != "new":
            continue
        router._observe("r", decision, False, 1e-6)
        sent += 1
        if any(a.action == "rollback" for a in controller.tick()):
            break
    assert router.status("r").phase is Phase.ROLLED_BACK
    assert sent <= 10
    assert "circuit_breaker" in str(router.status("r").history[-1].details["verdict"]["checks"])


def test_custom_check_failure_rolls_back(routers: list[Router], clock: Clock) -> None:
    """A custom check added with router.add_check takes part in the controller's verdict."""
    from canary_router import CheckResult, Outcome

    router = make_router(routers, clock)
    controller = Controller(router)
    remove = router.add_check("r", lambda snap, pct: CheckResult("revenue", Outcome.FAIL, "revenue down"))
    remove()
    drive(router)
    assert controller.verdict("r").outcome == "pass"
    router.add_check("r", lambda snap, pct: CheckResult("revenue", Outcome.FAIL, "revenue down"))
    [action] = controller.tick()
    assert action.action == "rollback"
    assert "revenue down" in action.reason


def test_pauses_on_sample_ratio_mismatch(routers: list[Router], clock: Clock) -> None:
    """Units split 50/50 at a 5 % step pause the rollout with a reason (it is not rolled back)."""
    router = make_router(routers, clock)
    controller = Controller(router)
    epoch = router.status("r").epoch
    assert router.aggregator is not None
    now = clock()
    router.aggregator.add_counts(
        "r", epoch, "new", requests=3_000, errors=0, histogram={0: 3_000}, unit_hashes=range(3_000), now=now
    )
    router.aggregator.add_counts(
        "r", epoch, "old", requests=3_000, errors=0, histogram={0: 3_000}, unit_hashes=range(3_000, 6_000), now=now
    )
    [action] = controller.tick()
    assert action.action == "pause"
    assert action.reason.startswith("paused at 5 %: units on new 50.00 % of 6000 vs configured 5 %")
    assert "sample-ratio mismatch" in action.reason
    status = router.status("r")
    assert (status.phase, status.percent) == (Phase.PAUSED, 5)
    record = status.history[-1]
    assert (record.action, record.actor) == ("pause", "controller")
    assert record.details["verdict"]["outcome"] == "sample_ratio_mismatch"
    clock.advance(10 * HOUR)
    [action] = controller.tick()
    assert action.action == "wait"
    assert action.reason.startswith("paused")


def test_pauses_when_still_inconclusive_after_max_bake_time(routers: list[Router], clock: Clock) -> None:
    """Without enough evidence by max_bake_time the controller pauses instead of waiting forever."""
    router = make_router(routers, clock, max_bake_time="3h")
    controller = Controller(router)
    drive(router, new=40, old=40)
    clock.advance(2 * HOUR)
    [action] = controller.tick()
    assert action.action == "wait"
    clock.advance(HOUR)
    [action] = controller.tick()
    assert action.action == "pause"
    assert action.reason.startswith("paused at 5 %: still inconclusive after 3 h (max_bake_time)")
    status = router.status("r")
    assert (status.phase, status.percent) == (Phase.PAUSED, 5)
    assert status.history[-1].actor == "controller"


def test_resume_after_max_bake_time_pause_is_not_undone_at_once(routers: list[Router], clock: Clock) -> None:
    """An operator's resume after a max_bake_time pause is not reverted by the next tick a second later."""
    router = make_router(routers, clock, max_bake_time="3h")
    controller = Controller(router)
    drive(router, new=40, old=40)
    clock.advance(3 * HOUR)
    assert [a.action for a in controller.tick()] == ["pause"]
    router.resume("r", actor="alice", reason="give it more time")
    clock.advance(1)
    assert [a.action for a in controller.tick()] == ["wait"]
    assert router.status("r").phase is Phase.RUNNING


def test_require_approval_pauses_before_the_gated_step(routers: list[Router], clock: Clock) -> None:
    """The controller does not enter a gated step by itself; a manual promote enters it and the schedule goes on."""
    router = make_router(routers, clock, require_approval=[25])
    controller = Controller(router)
    drive(router, prefix="a-")
    clock.advance(HOUR)
    assert [a.action for a in controller.tick()] == ["promote"]
    drive(router, prefix="b-")
    clock.advance(HOUR)
    [action] = controller.tick()
    assert action.action == "pause"
    assert "the next step (25 %) requires approval" in action.reason
    status = router.status("r")
    assert (status.phase, status.percent) == (Phase.PAUSED, 10)
    clock.advance(HOUR)
    assert [a.action for a in controller.tick()] == ["wait"]
    assert router.status("r").percent == 10
    router.promote("r", actor="alice")
    status = router.status("r")
    assert (status.phase, status.percent) == (Phase.RUNNING, 25)
    drive(router, prefix="c-")
    clock.advance(HOUR)
    assert [a.action for a in controller.tick()] == ["promote"]
    assert router.status("r").percent == 50
    assert actions(router)[-3:] == [
        ("pause", "controller", 10),
        ("promote", "alice", 25),
        ("promote", "controller", 50),
    ]


def test_paused_rollout_is_rolled_back_on_failure_but_never_promoted(routers: list[Router], clock: Clock) -> None:
    """While paused the guard still watches: healthy data does not promote, a failure still rolls back."""
    router = make_router(routers, clock)
    controller = Controller(router)
    router.pause("r", actor="bob")
    drive(router)
    clock.advance(10 * HOUR)
    [action] = controller.tick()
    assert action.action == "wait"
    assert action.verdict is not None
    assert action.verdict.outcome == "pass"
    assert router.status("r").phase is Phase.PAUSED
    assert router.status("r").percent == 5
    drive(router, new=2_000, old=0, fail_every=2, prefix="bad-")
    [action] = controller.tick()
    assert action.action == "rollback"
    assert router.status("r").phase is Phase.ROLLED_BACK
    assert actions(router) == [("start", "router", 5), ("pause", "bob", 5), ("rollback", "controller", 0)]


def test_manual_pause_resume_rollback_restart_interplay(routers: list[Router], clock: Clock) -> None:
    """Manual control and the controller compose: pause holds, resume lets it promote, rollback and restart reset."""
    router = make_router(routers, clock)
    controller = Controller(router)
    drive(router, prefix="a-")
    clock.advance(HOUR)
    router.pause("r")
    assert [a.action for a in controller.tick()] == ["wait"]
    router.resume("r")
    assert [a.action for a in controller.tick()] == ["promote"]
    assert router.status("r").percent == 10
    router.rollback("r", reason="manual stop")
    assert controller.tick() == []
    assert router.decide("r", {"user_id": "a-1"}).variant == "old"
    before = router.status("r").epoch
    clock.advance(HOUR)
    router.restart("r")
    status = router.status("r")
    assert (status.phase, status.percent, status.step_index) == (Phase.RUNNING, 5, 0)
    assert status.epoch == before + 1
    assert status.step_started_at == clock.now
    drive(router, prefix="b-")
    [action] = controller.tick()
    assert action.action == "wait"  # the bake clock restarted with the step
    clock.advance(HOUR)
    assert [a.action for a in controller.tick()] == ["promote"]
    assert [a for a, _, _ in actions(router)] == [
        "start",
        "pause",
        "resume",
        "promote",
        "rollback",
        "restart",
        "promote",
    ]


def test_manual_promote_restarts_the_bake_clock(routers: list[Router], clock: Clock) -> None:
    """A manual promote starts a new step: the controller waits a full bake time there."""
    router = make_router(routers, clock)
    controller = Controller(router)
    clock.advance(5 * HOUR)
    router.promote("r")
    drive(router)
    [action] = controller.tick()
    assert action.action == "wait"
    assert "bake time" in action.reason


class RacyStore(MemoryStore):
    """A MemoryStore whose compare-and-set first waits for the other writer, so both race on the same version."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier: threading.Barrier | None = None

    def compare_and_set(self, name: str, expected_version: int | None, state: RolloutState, record: AuditRecord) -> int:
        barrier = self.barrier
        if barrier is not None and expected_version is not None:
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=2)
        return super().compare_and_set(name, expected_version, state, record)


def race(controllers: list[Controller], store: RacyStore) -> list[str]:
    """Tick the controllers at the same time from their own threads; return the actions they report."""
    store.barrier = threading.Barrier(len(controllers))
    start = threading.Barrier(len(controllers))
    results: list[str] = []
    lock = threading.Lock()

    def run(controller: Controller) -> None:
        start.wait()
        done = controller.tick()
        with lock:
            results.extend(a.action for a in done)

    threads = [threading.Thread(target=run, args=(c,)) for c in controllers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    store.barrier = None
    return sorted(results)


@pytest.mark.parametrize("failing", [False, True], ids=["promote", "rollback"])
def test_two_controllers_racing_apply_one_transition(routers: list[Router], clock: Clock, failing: bool) -> None:
    """Two instances' controllers on one store, ticking at once, apply one transition: the other sees a conflict."""
    store = RacyStore()
    first = make_router(routers, clock, store=store)
    second = make_router(routers, clock, store=store)
    for router in (first, second):
        drive(router, fail_every=2 if failing else 0)
    clock.advance(HOUR)
    results = race([Controller(first, actor="c1"), Controller(second, actor="c2")], store)
    expected = "rollback" if failing else "promote"
    assert results == sorted([expected, "wait"])
    log = store.history("r")
    assert [r.action for r in log] == ["start", expected]
    assert log[-1].actor in ("c1", "c2")
    assert store.get("r") is not None
    assert store.get("r").version == 2  # type: ignore[union-attr]
    assert second.status("r").percent == first.status("r").percent


class GatedStore(MemoryStore):
    """A MemoryStore that holds one thread between its first and second read of the state."""

    def __init__(self) -> None:
        super().__init__()
        self.gated: threading.Thread | None = None
        self.first_read = threading.Event()
        self.proceed = threading.Event()
        self.reads = 0

    def get(self, name: str) -> Any:
        if threading.current_thread() is self.gated:
            self.reads += 1
            if self.reads == 1:
                try:
                    return super().get(name)
                finally:
                    self.first_read.set()
            if self.reads == 2:
                self.proceed.wait(5)
        return super().get(name)


@pytest.mark.parametrize("failing", [False, True], ids=["promote", "rollback"])
def test_controller_acting_on_a_stale_read_applies_nothing(routers: list[Router], clock: Clock, failing: bool) -> None:
    """A controller whose verdict was computed before another one's transition does not apply a second transition."""
    store = GatedStore()
    first = make_router(routers, clock, store=store)
    second = make_router(routers, clock, store=store)
    for router in (first, second):
        drive(router, fail_every=2 if failing else 0)
    clock.advance(HOUR)
    late: list[str] = []

    def slow_tick() -> None:
        late.extend(a.action for a in Controller(second, actor="late").tick())

    thread = threading.Thread(target=slow_tick)
    store.gated = thread
    thread.start()
    assert store.first_read.wait(5)  # "late" has read version 1 and is evaluating
    [action] = Controller(first, actor="early").tick()
    store.proceed.set()
    thread.join(5)
    expected = "rollback" if failing else "promote"
    assert action.action == expected
    assert late == ["wait"]
    log = store.history("r")
    assert [(r.action, r.actor) for r in log] == [("start", "router"), (expected, "early")]


def test_background_controller_ticks(routers: list[Router], clock: Clock) -> None:
    """start_controller() runs ticks on a daemon thread (it rolls back a failing canary); stop() ends it."""
    router = make_router(routers, clock)
    controller = router.start_controller(interval=0.01)
    try:
        assert controller.running
        assert router.start_controller(interval=0.01) is controller  # idempotent
        drive(router, new=300, old=300, fail_every=2)
        deadline = time.monotonic() + 5
        while router.status("r").phase is not Phase.ROLLED_BACK and time.monotonic() < deadline:
            time.sleep(0.01)
        assert router.status("r").phase is Phase.ROLLED_BACK
        assert router.status("r").history[-1].actor == "controller"
        assert "r" in controller.last_verdicts
    finally:
        router.stop_controller()
    assert not controller.running


def test_background_controller_rejects_bad_interval(routers: list[Router], clock: Clock) -> None:
    """A non-positive interval is refused."""
    controller = Controller(make_router(routers, clock))
    with pytest.raises(ValueError):
        controller.start(0)
    assert not controller.running


def test_shadow_step_serves_old_then_promotes_to_the_first_percentage(routers: list[Router], clock: Clock) -> None:
    """In the shadow step the cohort gets "old" (reason "shadow") while "new" runs; then it promotes to 5 %."""
    router = make_router(routers, clock, shadow=True, guard={"max_latency_ratio": None, "max_tail_increase": None})
    status = router.status("r")
    assert (status.shadow, status.step_index, status.percent, status.phase) == (True, -1, 5, Phase.RUNNING)
    cohort = [f"u{i}" for i in range(2_000) if router.decide("r", {"user_id": f"u{i}"}).bucket < 500]  # type: ignore[operator]
    assert cohort
    for user in cohort:
        decision = router.decide("r", {"user_id": user})
        assert (decision.variant, decision.reason) == ("old", "shadow")
    ran: list[str] = []

    def old(user_id: str) -> str:
        return "old"

    @router.canary("r", old=old, context_from="user_id")
    def new(user_id: str) -> str:
        ran.append(user_id)
        return "new"

    assert new(cohort[0]) == "old"
    deadline = time.monotonic() + 5
    while not ran and time.monotonic() < deadline:
        time.sleep(0.001)
    assert ran == [cohort[0]]
    controller = Controller(router)
    drive(router)
    verdict = controller.verdict("r")
    assert verdict.check("sample_ratio") is None  # nobody is split in the shadow step
    clock.advance(HOUR)
    [action] = controller.tick()
    assert action.action == "promote"
    assert action.reason.startswith("promoted to 5 % after 1 h at shadow step")
    status = router.status("r")
    assert (status.shadow, status.step_index, status.percent) == (False, 0, 5)
    decision = router.decide("r", {"user_id": cohort[0]})
    assert (decision.variant, decision.reason) == ("new", "split")
    assert new(cohort[0]) == "new"


def test_shadow_step_failure_rolls_back(routers: list[Router], clock: Clock) -> None:
    """A new version failing in the shadow step is rolled back before any user is served it."""
    router = make_router(routers, clock, shadow=True)
    drive(router, new=600, old=600, fail_every=2)
    [action] = Controller(router).tick()
    assert action.action == "rollback"
    assert action.reason.startswith("guard failed at shadow step")
    assert router.status("r").shadow is False


# ---------------------------------------------------------------------------------------------- configuration


def config_error_paths(**rollout: Any) -> list[str]:
    """The issue paths of the ConfigError raised by loading rollout "r" with these fields."""
    with pytest.raises(ConfigError) as caught:
        Router.from_config({"rollouts": {"r": {"steps": [5, 10, 25, 50, 100], **rollout}}})
    return [issue.path for issue in caught.value.issues]


def test_bake_time_longer_than_max_bake_time_is_rejected() -> None:
    """max_bake_time below bake_time is a ConfigError on max_bake_time."""
    assert config_error_paths(bake_time="2h", max_bake_time="1h") == ["rollouts.r.max_bake_time"]
    with pytest.raises(ConfigError) as caught:
        Rollout("r", bake_time=7200, max_bake_time=3600)
    assert [i.path for i in caught.value.issues] == ["rollouts.r.max_bake_time"]


def test_require_approval_must_name_steps() -> None:
    """require_approval entries that are not steps are ConfigErrors naming their index."""
    assert config_error_paths(require_approval=[30]) == ["rollouts.r.require_approval[0]"]
    assert config_error_paths(require_approval=[10, 30]) == ["rollouts.r.require_approval[1]"]
    assert config_error_paths(require_approval=["25"]) == ["rollouts.r.require_approval[0]"]
    with pytest.raises(ConfigError) as caught:
        Rollout("r", require_approval=(30.0,))
    assert [i.path for i in caught.value.issues] == ["rollouts.r.require_approval[0]"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("alpha", 0),
        ("alpha", 0.5),
        ("alpha", 0.7),
        ("alpha", -0.01),
        ("alpha", "0.01"),
        ("srm_alpha", 0.5),
        ("srm_alpha", 0),
        ("max_error_rate_increase", -0.01),
        ("max_tail_increase", -0.1),
        ("max_error_rate_ratio", 0.5),
        ("max_latency_ratio", 0.9),
        ("min_requests", -1),
        ("min_requests", 2.5),
        ("latency_percentile", 100),
        ("tail_percentile", 0),
    ],
)
def test_bad_guard_values_name_their_path(key: str, value: Any) -> None:
    """Every out-of-range guard value is a ConfigError at rollouts.<name>.guard.<key>."""
    assert config_error_paths(guard={key: value}) == [f"rollouts.r.guard.{key}"]


def test_bad_guard_values_in_python_objects_name_their_path() -> None:
    """A GuardConfig built in Python is validated when the Rollout is constructed."""
    with pytest.raises(ConfigError) as caught:
        Rollout("r", guard=GuardConfig(alpha=0.9, max_error_rate_increase=-1))
    assert sorted(i.path for i in caught.value.issues) == [
        "rollouts.r.guard.alpha",
        "rollouts.r.guard.max_error_rate_increase",
    ]


def test_misspelled_guard_key_is_reported_with_a_hint() -> None:
    """An unknown guard key names its path and suggests the close match."""
    with pytest.raises(ConfigError) as caught:
        Router.from_config({"rollouts": {"r": {"guard": {"max_eror_rate_increase": 0.01}}}})
    [issue] = caught.value.issues
    assert issue.path == "rollouts.r.guard.max_eror_rate_increase"
    assert issue.hint is not None
    assert "max_error_rate_increase" in issue.hint


def test_valid_guard_settings_are_loaded() -> None:
    """Valid guard, approval and shadow settings load into the Rollout."""
    router = Router.from_config(
        {
            "rollouts": {
                "r": {
                    "bake_time": "30m",
                    "max_bake_time": "2h",
                    "require_approval": [50, 100],
                    "shadow": True,
                    "guard": {"alpha": 0.05, "max_error_rate_ratio": 2, "latency_slo": "250ms", "min_requests": 100},
                }
            }
        }
    )
    rollout = router.rollouts["r"]
    router.close()
    assert (rollout.bake_time, rollout.max_bake_time) == (1800.0, 7200.0)
    assert rollout.require_approval == (50.0, 100.0)
    assert rollout.shadow is True
    assert rollout.guard.alpha == 0.05
    assert rollout.guard.max_error_rate_ratio == 2.0
    assert rollout.guard.latency_slo == pytest.approx(0.25)
    assert rollout.guard.min_requests == 100
