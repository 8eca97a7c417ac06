"""The ambient context: immutability, layering, and isolation across threads and asyncio tasks."""

from __future__ import annotations

import asyncio
import threading

import pytest

from canary_router import Context, Router, bucket, current_context, use_context


def test_context_is_immutable() -> None:
    """A Context cannot be changed after creation; merge() derives a new one."""
    ctx = Context(user_id="u")
    with pytest.raises(AttributeError):
        ctx.user_id = "x"  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        ctx["user_id"] = "x"  # type: ignore[index]
    merged = ctx.merge(region="eu")
    assert dict(ctx) == {"user_id": "u"}
    assert dict(merged) == {"user_id": "u", "region": "eu"}


def test_context_copies_its_input() -> None:
    """Changing the dict a Context was built from does not change the Context."""
    source = {"user_id": "u"}
    ctx = Context(source)
    source["user_id"] = "changed"
    assert ctx["user_id"] == "u"


def test_use_context_layers_and_restores() -> None:
    """Nested use_context blocks lay attributes over the outer ones and restore on exit."""
    assert dict(current_context()) == {}
    with use_context(user_id="u", region="eu"):
        with use_context(region="us") as inner:
            assert dict(inner) == {"user_id": "u", "region": "us"}
        with use_context({"tier": "gold"}, replace=True):
            assert dict(current_context()) == {"tier": "gold"}
        assert dict(current_context()) == {"user_id": "u", "region": "eu"}
    assert dict(current_context()) == {}


def test_overrides_survive_layering() -> None:
    """Overrides set by an outer block stay in force in inner blocks."""
    with use_context(overrides={"r": "new"}), use_context(user_id="u"):
        assert current_context().overrides == {"r": "new"}


def test_threads_see_their_own_context() -> None:
    """A context set in one thread is invisible to another."""
    seen: dict[str, object] = {}
    ready = threading.Event()
    done = threading.Event()

    def other() -> None:
        ready.wait()
        seen["other"] = current_context().get("user_id")
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with use_context(user_id="main-user"):
        ready.set()
        done.wait()
        seen["main"] = current_context().get("user_id")
    thread.join()
    assert seen == {"other": None, "main": "main-user"}


def test_thousand_asyncio_tasks_each_see_their_own_user() -> None:
    """1,000 concurrent tasks with different users each decide by their own context."""
    router = Router.from_config({"rollouts": {"r": {"steps": [50, 100]}}})

    async def one(i: int) -> tuple[int | None, int]:
        with router.context(user_id=f"user-{i}"):
            await asyncio.sleep(0)
            await asyncio.sleep(0.001 * (i % 3))
            return router.decide("r").bucket, i

    async def main() -> list[tuple[int | None, int]]:
        return await asyncio.gather(*(one(i) for i in range(1000)))

    for got, i in asyncio.run(main()):
        assert got == bucket("r", f"user-{i}")
