"""The Store protocol: versioned rollout state with compare-and-set, an audit log, change notifications."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

from ..model import AuditRecord, RolloutState

__all__ = ["Store", "Versioned"]


class Versioned(NamedTuple):
    """A rollout state and its version. Versions start at 1 and grow by one with each change."""

    state: RolloutState
    version: int


@runtime_checkable
class Store(Protocol):
    """Shared rollout state. Every change is a compare-and-set that appends an audit record atomically.

    Implementations must be thread-safe. ``canary_router.testing.StoreConformance`` checks a store
    against this contract.
    """

    def get(self, name: str) -> Versioned | None:
        """Return the state of rollout ``name`` and its version, or ``None`` when the store has none."""
        ...

    def get_all(self) -> dict[str, Versioned]:
        """Return every rollout's state and version."""
        ...

    def compare_and_set(self, name: str, expected_version: int | None, state: RolloutState, record: AuditRecord) -> int:
        """Write ``state`` and append ``record`` if the stored version is ``expected_version``.

        ``expected_version=None`` means "only if the store has no state for ``name``". Returns the new
        version; raises :class:`~canary_router.ConflictError` (and changes nothing) otherwise.
        """
        ...

    def history(self, name: str, limit: int | None = None) -> list[AuditRecord]:
        """Return the audit records of ``name``, oldest first; the newest ``limit`` when given."""
        ...

    def subscribe(self, callback: Callable[[str, Versioned], None]) -> Callable[[], None]:
        """Call ``callback(name, versioned)`` after every change; returns a function that unsubscribes."""
        ...

    def close(self) -> None:
        """Release connections and background work. Idempotent."""
        ...
