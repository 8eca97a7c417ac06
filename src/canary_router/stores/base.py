"""The Store protocol: versioned rollout state with compare-and-set, an audit log, change notifications.

A :class:`SharedStore` adds what several processes need to act as one: observation counts added from
every process and summed, and a lease so that one controller acts at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from ..model import AuditRecord, RolloutState
from ..observe import BOUNDS, HistorySlot, StepSnapshot, VariantSnapshot

__all__ = [
    "Lease",
    "ObservationBatch",
    "SharedStore",
    "SlotCounts",
    "Store",
    "VariantCounts",
    "Versioned",
    "history_from_slots",
    "merge_counts",
    "snapshot_from_counts",
]


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


@dataclass(frozen=True, slots=True)
class VariantCounts:
    """Additive counts of one variant in one step: a delta to add, or a sum read back."""

    requests: int = 0
    errors: int = 0
    histogram: Mapping[int, int] = field(default_factory=dict)
    """Sparse latency histogram: bucket index (see :data:`canary_router.observe.BOUNDS`) → count."""
    units: frozenset[int] = frozenset()
    """Hashes of the units seen in split decisions (a sample: see :attr:`ObservationBatch.unit_sample_level`)."""
    error_units: frozenset[int] = frozenset()
    """Hashes of the units that saw at least one error (a subset of ``units``)."""


@dataclass(frozen=True, slots=True)
class SlotCounts:
    """Additive counts of one variant in one history time slot (for charts)."""

    start: float
    """Start of the slot (POSIX seconds, a multiple of the slot width)."""
    variant: str
    requests: int = 0
    errors: int = 0
    latency: Mapping[int, int] = field(default_factory=dict)
    """Coarse latency histogram: coarse bucket index → count (see :class:`canary_router.observe.HistorySlot`)."""


@dataclass(frozen=True, slots=True)
class ObservationBatch:
    """What one process observed of one rollout's step since its last flush, to be added to the totals."""

    rollout: str
    epoch: int
    """The step the counts belong to; totals of different epochs are kept apart."""
    started_at: float
    """When this process saw the step begin (the store keeps the earliest)."""
    unit_sample_level: int
    """Unit hashes are a 1 / 2**level sample: only hashes with ``h & (2**level - 1) == 0`` are sent.

    The store keeps the highest level it was sent and counts only hashes in that sample when reading.
    """
    variants: Mapping[str, VariantCounts]
    """Keyed by variant, ``"old"`` and ``"new"``; a variant without counts may be missing."""
    slots: tuple[SlotCounts, ...] = ()
    """History slot deltas (any slot width the router uses; the store adds them by ``start``)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A named lease held by ``owner`` until ``expires_at`` (the store's clock, POSIX seconds).

    ``token`` is a fencing token: it grows every time the lease changes hands, and a store that accepts
    ``fence=`` refuses writes made under an older token.
    """

    name: str
    owner: str
    token: int
    expires_at: float


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store that several processes (and hosts) share: observations summed across them, and leases.

    ``canary_router.testing.SharedStoreConformance`` checks a store against this contract.
    """

    def add_observations(self, batch: ObservationBatch) -> None:
        """Add ``batch`` to the totals of its rollout and epoch (atomically: all of it or none of it).

        Raises :class:`~canary_router.StoreError` when the store cannot be reached; the caller keeps
        the counts and sends them again.
        """
        ...

    def observations(self, rollout: str, epoch: int) -> StepSnapshot | None:
        """Return the totals of step ``epoch`` of ``rollout`` across every process, or ``None`` without any."""
        ...

    def observation_history(self, rollout: str, since: float = 0.0) -> list[HistorySlot]:
        """Return the history slots of ``rollout`` starting at or after ``since``, oldest first, summed."""
        ...

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take lease ``name`` for ``ttl`` seconds, or renew it when ``owner`` holds it already.

        Returns the lease (renewal keeps the token; a new holder gets a higher token), or ``None`` while
        another owner holds an unexpired lease.
        """
        ...

    def release_lease(self, lease: Lease) -> None:
        """Give the lease up early, if ``lease`` still holds it (otherwise do nothing)."""
        ...

    def compare_and_set(
        self,
        name: str,
        expected_version: int | None,
        state: RolloutState,
        record: AuditRecord,
        *,
        fence: Lease | None = None,
    ) -> int:
        """As :meth:`Store.compare_and_set`; with ``fence``, also refuse (ConflictError) unless that lease is current.

        "Current" means the store's lease ``fence.name`` has the same owner and token and has not expired.
        """
        ...

    def ping(self) -> None:
        """Check that the store answers; raise :class:`~canary_router.StoreError` when it does not."""
        ...


def merge_counts(a: VariantCounts, b: VariantCounts) -> VariantCounts:
    """Return the sum of two :class:`VariantCounts` (histograms added, unit sets united)."""
    histogram = dict(a.histogram)
    for index, count in b.histogram.items():
        histogram[index] = histogram.get(index, 0) + count
    return VariantCounts(
        a.requests + b.requests, a.errors + b.errors, histogram, a.units | b.units, a.error_units | b.error_units
    )


def snapshot_from_counts(
    rollout: str, epoch: int, started_at: float, unit_sample_level: int, variants: Mapping[str, VariantCounts]
) -> StepSnapshot:
    """Build the :class:`~canary_router.StepSnapshot` the guard reads from summed counts.

    Unit hashes outside the ``unit_sample_level`` sample are ignored and the sample is scaled up, so
    processes that sampled at different levels add up consistently.
    """
    mask = (1 << unit_sample_level) - 1
    scale = 1 << unit_sample_level
    nbuckets = len(BOUNDS) + 1

    def one(counts: VariantCounts | None) -> VariantSnapshot:
        if counts is None:
            return VariantSnapshot.empty()
        histogram = [0] * nbuckets
        for index, count in counts.histogram.items():
            if 0 <= int(index) < nbuckets:
                histogram[int(index)] += int(count)
        units = sum(1 for h in counts.units if not h & mask)
        error_units = sum(1 for h in counts.error_units if not h & mask)
        return VariantSnapshot(counts.requests, counts.errors, tuple(histogram), units * scale, error_units * scale)

    old, new = one(variants.get("old")), one(variants.get("new"))
    return StepSnapshot(rollout, epoch, started_at, old, new, unit_sample_level)


def history_from_slots(slots: list[SlotCounts] | tuple[SlotCounts, ...]) -> list[HistorySlot]:
    """Sum slot deltas by start time into :class:`~canary_router.observe.HistorySlot` objects, oldest first."""
    by_start: dict[float, HistorySlot] = {}
    for item in slots:
        slot = by_start.get(item.start)
        if slot is None:
            slot = by_start[item.start] = HistorySlot(item.start)
        if item.variant not in slot.requests:
            continue
        slot.requests[item.variant] += item.requests
        slot.errors[item.variant] += item.errors
        latency = slot.latency[item.variant]
        for key, count in item.latency.items():
            latency[int(key)] = latency.get(int(key), 0) + int(count)
    return [by_start[start] for start in sorted(by_start)]
