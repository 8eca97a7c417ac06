"""router.canary(): routing sync/async functions and methods, observations, fallback, metadata."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from canary_router import Observation, Router
from canary_router.testing import RecordingObserver, force


@pytest.fixture
def router() -> Router:
    """A router whose rollout "r" serves "new" to exactly the users whose bucket is below 5000."""
    r = Router.from_config({"rollouts": {"r": {"steps": [50, 100]}}})
    return r


def users_by_variant(router: Router) -> tuple[str, str]:
    """Return one user id served "new" and one served "old"."""
    new = next(f"u{i}" for i in range(1000) if router.decide("r", {"user_id": f"u{i}"}).variant == "new")
    old = next(f"u{i}" for i in range(1000) if router.decide("r", {"user_id": f"u{i}"}).variant == "old")
    return new, old


def test_sync_function_routes_per_decision(router: Router) -> None:
    """The decorated function runs new for the canary cohort and old for everyone else."""

    def v1(user_id: str) -> str:
        return f"v1:{user_id}"

    @router.canary("r", old=v1)
    def v2(user_id: str) -> str:
        return f"v2:{user_id}"

    new_user, old_user = users_by_variant(router)
    with router.context(user_id=new_user):
        assert v2(new_user) == f"v2:{new_user}"
    with router.context(user_id=old_user):
        assert v2(old_user) == f"v1:{old_user}"


def test_async_function_routes_per_decision(router: Router) -> None:
    """Async functions are routed too, and the wrapper stays a coroutine function."""

    async def v1(x: int) -> str:
        return "v1"

    @router.canary("r", old=v1)
    async def v2(x: int) -> str:
        await asyncio.sleep(0)
        return "v2"

    assert inspect.iscoroutinefunction(v2)
    new_user, old_user = users_by_variant(router)

    async def main() -> tuple[str, str]:
        with router.context(user_id=new_user):
            a = await v2(1)
        with router.context(user_id=old_user):
            b = await v2(1)
        return a, b

    assert asyncio.run(main()) == ("v2", "v1")


def test_methods_are_routed_with_self(router: Router) -> None:
    """Decorating a method passes self to both implementations."""

    class Recommender:
        def __init__(self) -> None:
            self.prefix = "rec"

        def v1(self, user_id: str) -> str:
            return f"{self.prefix}-v1"

        @router.canary("r", old=v1, context_from="user_id")
        def v2(self, user_id: str) -> str:
            return f"{self.prefix}-v2"

    new_user, old_user = users_by_variant(router)
    rec = Recommender()
    assert rec.v2(new_user) == "rec-v2"
    assert rec.v2(user_id=old_user) == "rec-v1"


def test_async_methods_are_routed(router: Router) -> None:
    """Async methods get self and the context from their arguments."""

    class Service:
        async def v1(self, user_id: str) -> str:
            return "v1"

        @router.canary("r", old=v1, context_from="user_id")
        async def v2(self, user_id: str) -> str:
            return "v2"

    new_user, old_user = users_by_variant(router)
    service = Service()
    assert asyncio.run(service.v2(new_user)) == "v2"
    assert asyncio.run(service.v2(old_user)) == "v1"


def test_signature_and_metadata_are_kept(router: Router) -> None:
    """functools.wraps keeps name, docstring and signature of the new implementation."""

    def v1(user_id: str, limit: int = 10) -> list[str]:
        return []

    @router.canary("r", old=v1)
    def recommend(user_id: str, limit: int = 10) -> list[str]:
        """Recommend things."""
        return []

    assert recommend.__name__ == "recommend"
    assert recommend.__doc__ == "Recommend things."
    assert str(inspect.signature(recommend)) == "(user_id: 'str', limit: 'int' = 10) -> 'list[str]'"


def test_context_from_forms(router: Router) -> None:
    """context_from takes a name, a list, a mapping attribute→parameter, or a callable."""
    seen: list[Any] = []

    def spy(name: str, context: Any = None) -> Any:
        seen.append(dict(context) if context is not None else None)
        return Router.decide(router, name, context)

    router.decide = spy  # type: ignore[method-assign]

    def v1(user: str, region: str = "eu") -> None:
        return None

    router.canary("r", old=v1, context_from="user")(v1)("a")
    router.canary("r", old=v1, context_from=["user", "region"])(v1)("b", region="us")
    router.canary("r", old=v1, context_from={"user_id": "user"})(v1)(user="c")
    router.canary("r", old=v1, context_from=lambda user, region="eu": {"user_id": user.upper()})(v1)("d")
    with router.context(tier="gold"):
        router.canary("r", old=v1, context_from={"user_id": "user"})(v1)("e")
    assert seen == [
        {"user": "a"},
        {"user": "b", "region": "us"},
        {"user_id": "c"},
        {"user_id": "D"},
        {"tier": "gold", "user_id": "e"},
    ]


def test_context_from_unknown_parameter_fails_at_decoration(router: Router) -> None:
    """Naming a parameter the function lacks is a TypeError when decorating, not at call time."""

    def v1(user_id: str) -> None:
        return None

    with pytest.raises(TypeError, match="no such parameter"):
        router.canary("r", old=v1, context_from="account")(v1)


def test_sync_and_async_must_match(router: Router) -> None:
    """Mixing an async new with a sync old (or the reverse) is refused at decoration."""

    def v1() -> None:
        return None

    async def v2() -> None:
        return None

    with pytest.raises(TypeError, match="async"):
        router.canary("r", old=v1)(v2)  # type: ignore[arg-type]


def test_every_call_produces_an_observation(router: Router) -> None:
    """Each routed call delivers one observation with rollout, variant, outcome and duration."""
    recorder = RecordingObserver()
    router.add_observer(recorder)

    def v1(user_id: str) -> int:
        return 1

    @router.canary("r", old=v1, context_from="user_id")
    def v2(user_id: str) -> int:
        return 2

    new_user, old_user = users_by_variant(router)
    v2(new_user)
    v2(old_user)
    v2(old_user)
    assert recorder.count("r", "new", ok=True) == 1
    assert recorder.count("r", "old", ok=True) == 2
    first = recorder.observations[0]
    assert isinstance(first, Observation)
    assert first.unit == new_user
    assert first.duration >= 0
    assert first.reason == "split"


def test_application_exception_passes_through_and_counts(router: Router) -> None:
    """An exception of the new path is re-raised unchanged and recorded against "new"."""
    recorder = RecordingObserver()
    router.add_observer(recorder)
    boom = ValueError("boom")

    def v1(user_id: str) -> int:
        return 1

    @router.canary("r", old=v1, context_from="user_id")
    def v2(user_id: str) -> int:
        raise boom

    new_user, _ = users_by_variant(router)
    with pytest.raises(ValueError, match="boom") as caught:
        v2(new_user)
    assert caught.value is boom
    (obs,) = recorder.observations
    assert (obs.variant, obs.ok, obs.error, obs.fell_back) == ("new", False, boom, False)


def test_fallback_on_error_runs_old_and_still_counts(router: Router) -> None:
    """With fallback_on_error the old path answers, and the failure still counts against "new"."""
    recorder = RecordingObserver()
    router.add_observer(recorder)

    def v1(user_id: str) -> str:
        return "v1"

    @router.canary("r", old=v1, context_from="user_id", fallback_on_error=True)
    def v2(user_id: str) -> str:
        raise RuntimeError("new path broke")

    new_user, _ = users_by_variant(router)
    assert v2(new_user) == "v1"
    (obs,) = recorder.observations
    assert (obs.variant, obs.ok, obs.fell_back) == ("new", False, True)
    assert isinstance(obs.error, RuntimeError)


def test_async_fallback_on_error(router: Router) -> None:
    """Async fallback runs the old coroutine when the new one raises."""

    async def v1() -> str:
        return "v1"

    @router.canary("r", old=v1, fallback_on_error=True)
    async def v2() -> str:
        raise RuntimeError("x")

    with force(router, "r", "new"):
        assert asyncio.run(v2()) == "v1"


def test_failing_observer_never_reaches_the_application(router: Router) -> None:
    """An observer that raises is logged and skipped; the call returns normally."""

    def broken(_: Observation) -> None:
        raise RuntimeError("observer down")

    recorder = RecordingObserver()
    router.add_observer(broken)
    router.add_observer(recorder)

    def v1() -> int:
        return 1

    wrapped = router.canary("r", old=v1)(lambda: 2)
    assert wrapped() == 1
    assert recorder.count("r") == 1


def test_remove_observer(router: Router) -> None:
    """The function returned by add_observer stops delivery."""
    recorder = RecordingObserver()
    remove = router.add_observer(recorder)

    def v1() -> int:
        return 1

    wrapped = router.canary("r", old=v1)(lambda: 2)
    wrapped()
    remove()
    wrapped()
    assert recorder.count() == 1


def test_force_variant_in_tests(router: Router) -> None:
    """testing.force serves the forced variant to everyone and restores afterwards."""

    def v1() -> str:
        return "v1"

    @router.canary("r", old=v1)
    def v2() -> str:
        return "v2"

    with force(router, "r", "new"):
        assert v2() == "v2"
        assert router.decide("r", {}).reason == "override"
        with force(router, "r", "old"):
            assert v2() == "v1"
        assert v2() == "v2"
    assert router.decide("r", {}).reason == "no_unit"


def test_force_rejects_unknown_rollouts_and_variants(router: Router) -> None:
    """force() refuses a rollout the router does not know and a variant that is not old/new."""
    from canary_router import UnknownRolloutError

    with pytest.raises(UnknownRolloutError), force(router, "nope", "new"):
        pass
    with pytest.raises(ValueError, match="variant"), force(router, "r", "beta"):  # type: ignore[arg-type]
        pass


def test_cancellation_is_not_an_error(router: Router) -> None:
    """Asyncio cancellation propagates and is not recorded as a failure of the version."""
    recorder = RecordingObserver()
    router.add_observer(recorder)

    async def v1() -> None:
        await asyncio.sleep(10)

    @router.canary("r", old=v1)
    async def v2() -> None:
        await asyncio.sleep(10)

    async def main() -> None:
        task = asyncio.create_task(v2())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert recorder.count(ok=False) == 0
