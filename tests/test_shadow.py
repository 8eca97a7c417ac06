"""Shadow runs: the old result is served while the new version runs alongside, compared and recorded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from canary_router import Router
from canary_router.observe import StepSnapshot

DEADLINE = 5.0


@pytest.fixture
def routers() -> Iterator[list[Router]]:
    """Routers built by a test, closed afterwards (stops their shadow pools)."""
    made: list[Router] = []
    yield made
    for router in made:
        router.close()


def make_router(routers: list[Router], steps: list[float] | None = None, **rollout: Any) -> Router:
    """A router whose rollout "r" serves "new" to everyone (steps [100]) unless told otherwise."""
    router = Router.from_config({"rollouts": {"r": {"steps": steps or [100], **rollout}}})
    routers.append(router)
    return router


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` until it holds (bounded), then assert it."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert predicate()


async def async_wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` from async code (yielding to the loop) until it holds, then assert it."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    assert predicate()


def idle(router: Router) -> None:
    """Wait until the sync shadow pool has finished every run."""
    wait_until(lambda: router.shadow_pool.pending == 0)


def snapshot(router: Router) -> StepSnapshot:
    """The aggregator's current step of rollout "r"."""
    assert router.aggregator is not None
    snap = router.aggregator.snapshot("r")
    assert snap is not None
    return snap


# ---------------------------------------------------------------------------------------------- sync


def test_sync_shadow_serves_old_and_runs_new(routers: list[Router]) -> None:
    """The caller gets old's result (even when new finishes first); new really runs; a mismatch is sampled."""
    router = make_router(routers)
    ran = threading.Event()
    seen: list[tuple[Any, ...]] = []

    def old(user_id: str, *, limit: int = 3) -> list[str]:
        ran.wait(DEADLINE)  # new finishes first: the caller must still get old's result
        return ["a", "b", "c"][:limit]

    @router.canary("r", old=old, mode="shadow", context_from="user_id")
    def new(user_id: str, *, limit: int = 3) -> list[str]:
        seen.append((user_id, limit))
        ran.set()
        return ["a", "x", "c"][:limit]

    assert new("alice", limit=3) == ["a", "b", "c"]
    assert ran.wait(DEADLINE)
    idle(router)
    assert seen == [("alice", 3)]
    stats = router.shadow_stats("r").to_dict()
    assert (stats["compared"], stats["mismatched"], stats["errors"], stats["skipped"]) == (1, 1, 0, 0)
    [sample] = stats["samples"]
    assert sample["arguments"] == "'alice', limit=3"
    assert sample["old"] == "['a', 'b', 'c']"
    assert sample["new"] == "['a', 'x', 'c']"
    snap = snapshot(router)
    assert (snap.old.requests, snap.new.requests, snap.new.errors) == (1, 1, 0)
    # a shadowed unit belongs to the new cohort (for the sample-ratio check), though "old" was served
    assert (snap.old.units, snap.new.units) == (0, 1)


def test_sync_shadow_counts_matches(routers: list[Router]) -> None:
    """Equal results count as compared without a mismatch or a sample."""
    router = make_router(routers)

    def old(x: int) -> int:
        return x * 2

    @router.canary("r", old=old, mode="shadow")
    def new(x: int) -> int:
        return x + x

    with router.context(user_id="u1"):
        assert [new(i) for i in range(5)] == [0, 2, 4, 6, 8]
    idle(router)
    stats = router.shadow_stats("r").to_dict()
    assert (stats["compared"], stats["mismatched"], stats["samples"]) == (5, 0, [])


def test_custom_compare_is_used(routers: list[Router]) -> None:
    """compare(old, new) decides what counts as a match."""
    router = make_router(routers)
    calls: list[tuple[str, str]] = []

    def same_ignoring_case(a: str, b: str) -> bool:
        calls.append((a, b))
        return a.lower() == b.lower()

    def old(word: str) -> str:
        return word.upper()

    @router.canary("r", old=old, mode="shadow", compare=same_ignoring_case, context_from={"user_id": "word"})
    def new(word: str) -> str:
        return word if word != "bad" else "different"

    assert new("hello") == "HELLO"
    assert new("bad") == "BAD"
    idle(router)
    stats = router.shadow_stats("r").to_dict()
    assert (stats["compared"], stats["mismatched"]) == (2, 1)
    assert sorted(calls) == [("BAD", "different"), ("HELLO", "hello")]
    assert stats["samples"][0]["new"] == "'different'"


def test_mismatch_samples_are_bounded(routers: list[Router]) -> None:
    """Only the latest mismatches are kept as samples, while all are counted."""
    router = make_router(routers)

    def old(i: int) -> int:
        return i

    @router.canary("r", old=old, mode="shadow", context_from={"user_id": "i"})
    def new(i: int) -> int:
        return -i - 1

    for i in range(30):
        new(i)
    idle(router)
    stats = router.shadow_stats("r").to_dict()
    assert stats["mismatched"] == 30
    assert len(stats["samples"]) == 20


def test_sync_new_version_errors_are_recorded_as_new_failures(routers: list[Router]) -> None:
    """A raising new version never reaches the caller; it counts as an error and a "new" failure for the guard."""
    router = make_router(routers)

    def old(x: int) -> str:
        return "fine"

    @router.canary("r", old=old, mode="shadow", context_from={"user_id": "x"})
    def new(x: int) -> str:
        raise KeyError("boom")

    assert new(1) == "fine"
    assert new(2) == "fine"
    idle(router)
    stats = router.shadow_stats("r").to_dict()
    assert (stats["errors"], stats["compared"], stats["timeouts"]) == (2, 0, 0)
    snap = snapshot(router)
    assert (snap.new.requests, snap.new.errors) == (2, 2)
    assert (snap.old.requests, snap.old.errors) == (2, 0)


def test_old_version_errors_still_reach_the_caller(routers: list[Router]) -> None:
    """The served (old) version's exception propagates unchanged; nothing is compared."""
    router = make_router(routers)

    def old(x: int) -> int:
        raise ValueError("old broke")

    @router.canary("r", old=old, mode="shadow", context_from={"user_id": "x"})
    def new(x: int) -> int:
        return x

    with pytest.raises(ValueError, match="old broke"):
        new(1)
    idle(router)
    assert router.shadow_stats("r").to_dict()["compared"] == 0
    snap = snapshot(router)
    assert (snap.old.errors, snap.new.requests, snap.new.errors) == (1, 1, 0)


def test_sync_shadow_timeout_is_recorded_as_a_new_failure(routers: list[Router]) -> None:
    """A sync shadow run slower than shadow_timeout counts as a timeout and a "new" failure."""
    router = make_router(routers)

    def old(x: int) -> int:
        return x

    @router.canary("r", old=old, mode="shadow", shadow_timeout=0.02, context_from={"user_id": "x"})
    def new(x: int) -> int:
        time.sleep(0.05)
        return x

    assert new(1) == 1
    idle(router)
    stats = router.shadow_stats("r").to_dict()
    assert (stats["errors"], stats["timeouts"], stats["compared"]) == (1, 1, 0)
    snap = snapshot(router)
    assert (snap.new.requests, snap.new.errors) == (1, 1)


def test_sync_caller_is_not_slowed_by_a_slow_new_version(routers: list[Router]) -> None:
    """Old returns at once while new sleeps 0.5 s in the pool: the caller does not wait for it."""
    router = make_router(routers)
    finished = threading.Event()

    def old(x: int) -> int:
        return x

    @router.canary("r", old=old, mode="shadow", context_from={"user_id": "x"})
    def new(x: int) -> int:
        time.sleep(0.5)
        finished.set()
        return x

    start = time.perf_counter()
    assert new(7) == 7
    elapsed = time.perf_counter() - start
    assert elapsed < 0.2
    assert not finished.is_set()
    assert finished.wait(DEADLINE)
    idle(router)
    snap = snapshot(router)
    assert snap.new.requests == 1
    assert snap.new.percentile(50) >= 0.5  # type: ignore[operator]
    assert router.shadow_stats("r").to_dict()["compared"] == 1


def test_full_pool_skips_and_counts(routers: list[Router]) -> None:
    """With shadow_max_pending runs in flight, further shadow runs are skipped (and counted), not queued."""
    router = make_router(routers)
    router.shadow_max_pending = 1
    gate = threading.Event()
    started = threading.Event()
    runs: list[int] = []

    def old(x: int) -> int:
        return x

    @router.canary("r", old=old, mode="shadow", context_from={"user_id": "x"})
    def new(x: int) -> int:
        started.set()
        gate.wait(DEADLINE)
        runs.append(x)
        return x

    assert new(1) == 1
    assert started.wait(DEADLINE)
    start = time.perf_counter()
    assert new(2) == 2
    assert new(3) == 3
    assert time.perf_counter() - start < 0.2
    assert router.shadow_stats("r").to_dict()["skipped"] == 2
    gate.set()
    idle(router)
    assert runs == [1]
    stats = router.shadow_stats("r").to_dict()
    assert (stats["compared"], stats["skipped"]) == (1, 2)
    snap = snapshot(router)
    assert (snap.old.requests, snap.new.requests) == (3, 1)


def test_shadow_max_pending_applies_after_the_pool_exists(routers: list[Router]) -> None:
    """Lowering router.shadow_max_pending later still bounds sync shadow runs."""
    router = make_router(routers)
    gate = threading.Event()

    def old(x: int) -> int:
        return x

    @router.canary("r", old=old, mode="shadow", context_from={"user_id": "x"})
    def new(x: int) -> int:
        gate.wait(DEADLINE)
        return x

    try:
        new(0)  # creates the pool with the default limit
        router.shadow_max_pending = 1
        new(1)
        new(2)
        assert router.shadow_stats("r").to_dict()["skipped"] >= 1
    finally:
        gate.set()
        idle(router)


def test_route_mode_only_shadows_the_new_cohort(routers: list[Router]) -> None:
    """mode="shadow" runs the new version only for units the rollout would send to "new"."""
    router = make_router(routers, steps=[50, 100])
    router.shadow_max_pending = 1_000  # no run may be skipped here
    ran: list[str] = []

    def old(user_id: str) -> str:
        return "old"

    @router.canary("r", old=old, mode="shadow", context_from="user_id")
    def new(user_id: str) -> str:
        ran.append(user_id)
        return "new"

    users = [f"u{i}" for i in range(200)]
    assert {new(u) for u in users} == {"old"}
    idle(router)
    cohort = {u for u in users if router.decide("r", {"user_id": u}).variant == "new"}
    assert 0 < len(cohort) < len(users)
    assert router.shadow_stats("r").skipped == 0
    assert sorted(ran) == sorted(cohort)


# ---------------------------------------------------------------------------------------------- async


def test_async_shadow_serves_old_and_runs_new(routers: list[Router]) -> None:
    """Async: the caller gets old's result, the new coroutine runs as a background task and is compared."""
    router = make_router(routers)

    async def main() -> None:
        ran = asyncio.Event()

        async def old(user_id: str) -> dict[str, int]:
            await asyncio.wait_for(ran.wait(), DEADLINE)  # new finishes first: old's result is still served
            return {"score": 1}

        @router.canary("r", old=old, mode="shadow", context_from="user_id")
        async def new(user_id: str) -> dict[str, int]:
            ran.set()
            return {"score": 2}

        assert await new("alice") == {"score": 1}
        await asyncio.wait_for(ran.wait(), DEADLINE)
        stats = router.shadow_stats("r")
        await async_wait_until(lambda: stats.compared == 1)
        assert stats.mismatched == 1
        assert stats.to_dict()["samples"][0]["new"] == "{'score': 2}"

    asyncio.run(main())
    snap = snapshot(router)
    assert (snap.old.requests, snap.new.requests) == (1, 1)


def test_async_match_and_custom_compare(routers: list[Router]) -> None:
    """Async comparisons count matches and use compare=."""
    router = make_router(routers)

    async def main() -> None:
        async def old(x: float) -> float:
            return x

        @router.canary(
            "r", old=old, mode="shadow", compare=lambda a, b: abs(a - b) < 0.01, context_from={"user_id": "x"}
        )
        async def new(x: float) -> float:
            return x + 0.001

        for i in range(3):
            await new(float(i))
        stats = router.shadow_stats("r")
        await async_wait_until(lambda: stats.compared == 3)
        assert stats.mismatched == 0

    asyncio.run(main())


def test_async_new_version_errors_and_timeouts_are_new_failures(routers: list[Router]) -> None:
    """Async: a raising new version and one cut off at shadow_timeout are recorded as "new" failures."""
    router = make_router(routers)

    async def main() -> None:
        async def old(x: int) -> int:
            return x

        @router.canary("r", old=old, mode="shadow", shadow_timeout=0.05, context_from={"user_id": "x"})
        async def new(x: int) -> int:
            if x == 1:
                raise RuntimeError("new broke")
            await asyncio.sleep(10)
            return x

        assert await new(1) == 1
        assert await new(2) == 2
        stats = router.shadow_stats("r")
        await async_wait_until(lambda: stats.errors == 2)
        assert stats.timeouts == 1
        assert stats.compared == 0

    start = time.perf_counter()
    asyncio.run(main())
    assert time.perf_counter() - start < 2  # the timed-out run was cancelled, not awaited for 10 s
    snap = snapshot(router)
    assert (snap.new.requests, snap.new.errors) == (2, 2)
    assert (snap.old.requests, snap.old.errors) == (2, 0)


def test_async_caller_is_not_slowed_by_a_slow_new_version(routers: list[Router]) -> None:
    """Async: old returns at once while new awaits 0.5 s; the caller's await does not include it."""
    router = make_router(routers)

    async def main() -> None:
        done = asyncio.Event()

        async def old(x: int) -> int:
            return x

        @router.canary("r", old=old, mode="shadow", context_from={"user_id": "x"})
        async def new(x: int) -> int:
            await asyncio.sleep(0.5)
            done.set()
            return x

        start = time.perf_counter()
        assert await new(3) == 3
        assert time.perf_counter() - start < 0.2
        assert not done.is_set()
        await asyncio.wait_for(done.wait(), DEADLINE)
        stats = router.shadow_stats("r")
        await async_wait_until(lambda: stats.compared == 1)

    asyncio.run(main())
    snap = snapshot(router)
    assert snap.new.requests == 1
    assert snap.new.percentile(50) >= 0.5  # type: ignore[operator]


def test_async_full_budget_skips_and_counts(routers: list[Router]) -> None:
    """Async: beyond shadow_max_pending running tasks, shadow runs are skipped and counted."""
    router = make_router(routers)
    router.shadow_max_pending = 1

    async def main() -> None:
        gate = asyncio.Event()
        runs: list[int] = []

        async def old(x: int) -> int:
            return x

        @router.canary("r", old=old, mode="shadow", context_from={"user_id": "x"})
        async def new(x: int) -> int:
            await gate.wait()
            runs.append(x)
            return x

        assert await new(1) == 1
        assert await new(2) == 2
        assert router.shadow_stats("r").skipped == 1
        gate.set()
        stats = router.shadow_stats("r")
        await async_wait_until(lambda: stats.compared == 1)
        assert runs == [1]

    asyncio.run(main())


# -------------------------------------------------------------------------------- the rollout's shadow step


def test_shadow_step_makes_a_route_mode_decorator_shadow(routers: list[Router]) -> None:
    """In the rollout's shadow step a plain (route-mode) decorator serves old and runs new for the cohort only."""
    router = make_router(routers, steps=[50, 100], shadow=True)
    ran: list[str] = []

    def old(user_id: str) -> str:
        return "old"

    @router.canary("r", old=old, context_from="user_id")
    def new(user_id: str) -> str:
        ran.append(user_id)
        return "new"

    decisions = {f"u{i}": router.decide("r", {"user_id": f"u{i}"}) for i in range(100)}
    cohort = {u for u, d in decisions.items() if d.reason == "shadow"}
    assert all(d.variant == "old" for d in decisions.values())
    assert 0 < len(cohort) < 100
    assert {new(u) for u in decisions} == {"old"}
    idle(router)
    assert sorted(ran) == sorted(cohort)
    stats = router.shadow_stats("r").to_dict()
    assert (stats["compared"], stats["mismatched"]) == (len(cohort), len(cohort))
    snap = snapshot(router)
    assert snap.new.requests == len(cohort)
    assert snap.old.requests == 100
    router.promote("r")  # out of the shadow step: the cohort is now served "new"
    member = sorted(cohort)[0]
    assert new(member) == "new"


def test_invalid_shadow_options_are_rejected(routers: list[Router]) -> None:
    """An unknown mode or a non-positive shadow_timeout is refused when decorating."""
    router = make_router(routers)

    def old() -> None:
        return None

    with pytest.raises(ValueError, match="mode"):
        router.canary("r", old=old, mode="mirror")
    with pytest.raises(ValueError, match="shadow_timeout"):
        router.canary("r", old=old, mode="shadow", shadow_timeout=0)


def test_shadow_mode_keeps_the_sample_ratio_check_balanced() -> None:
    """With mode="shadow" at a 50 % step, shadowed units count in the new cohort, so no sample-ratio mismatch."""
    router = Router.from_config({"rollouts": {"r": {"steps": [50, 100]}}})

    def old(user_id: str) -> int:
        return 1

    @router.canary("r", old=old, mode="shadow", context_from="user_id")
    def new(user_id: str) -> int:
        return 1

    for i in range(2000):
        new(f"user-{i}")
    router.shadow_pool.shutdown(wait=True)
    verdict = router.controller().verdict("r")
    check = verdict.check("sample_ratio")
    assert check is not None
    assert check.outcome.value == "pass", check.message
