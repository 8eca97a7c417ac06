"""Helpers for your own tests: force a variant, record observations, check a store against the contract."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .model import Observation, Variant

if TYPE_CHECKING:
    from .router import Router

__all__ = ["RecordingObserver", "force"]


@contextmanager
def force(router: Router, rollout: str, variant: Variant) -> Iterator[None]:
    """Serve ``variant`` of ``rollout`` to everyone (every thread and task) inside the ``with`` block.

    Decisions made meanwhile carry the reason ``"override"``. Nesting and restoring work as expected.
    """
    if variant not in ("old", "new"):
        raise ValueError(f"variant must be 'old' or 'new', got {variant!r}")
    router._require(rollout)
    with router._lock:
        previous = router._forced.get(rollout)
        router._forced[rollout] = variant
    try:
        yield
    finally:
        with router._lock:
            if previous is None:
                router._forced.pop(rollout, None)
            else:
                router._forced[rollout] = previous


class RecordingObserver:
    """An observer that keeps every :class:`~canary_router.Observation` it receives (thread-safe).

    ``router.add_observer(recorder := RecordingObserver())``; then ``recorder.count("checkout", "new", ok=False)``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.observations: list[Observation] = []

    def __call__(self, observation: Observation) -> None:
        """Record ``observation``."""
        with self._lock:
            self.observations.append(observation)

    def count(self, rollout: str | None = None, variant: Variant | None = None, *, ok: bool | None = None) -> int:
        """Count the observations matching every given filter."""
        with self._lock:
            return sum(
                1
                for o in self.observations
                if (rollout is None or o.rollout == rollout)
                and (variant is None or o.variant == variant)
                and (ok is None or o.ok == ok)
            )

    def clear(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self.observations.clear()
