"""The in-process reference store: the default, for one process."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ..errors import ConflictError
from ..model import AuditRecord, RolloutState
from ..observe import HistorySlot, StepSnapshot
from .base import (
    Lease,
    ObservationBatch,
    SlotCounts,
    VariantCounts,
    Versioned,
    history_from_slots,
    merge_counts,
    snapshot_from_counts,
)

__all__ = ["MemoryStore"]

_log = logging.getLogger("canary_router")


class _StepTotals:
    __slots__ = ("level", "started_at", "variants")

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at
        self.level = 0
        self.variants: dict[str, VariantCounts] = {}


class MemoryStore:
    """Keeps rollout state in this process's memory. Thread-safe; the audit log is bounded per rollout.

    It implements :class:`~canary_router.stores.SharedStore` too (observation totals and leases), so
    several routers in one process can share it as if they were separate instances, and so it serves
    as the reference implementation of that contract.
    """

    def __init__(
        self,
        *,
        max_history: int = 1000,
        max_slots: int = 8640,
        keep_epochs: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be at least 1, got {max_history!r}")
        if max_slots < 1 or keep_epochs < 1:
            raise ValueError("max_slots and keep_epochs must be at least 1")
        self._lock = threading.Lock()
        self._states: dict[str, Versioned] = {}
        self._history: dict[str, deque[AuditRecord]] = {}
        self._max_history = max_history
        self._subscribers: tuple[Callable[[str, Versioned], None], ...] = ()
        self._totals: dict[str, dict[int, _StepTotals]] = {}
        self._slots: dict[str, dict[tuple[float, str], SlotCounts]] = {}
        self._max_slots = max_slots
        self._keep_epochs = keep_epochs
        self._leases: dict[str, Lease] = {}
        self._tokens: dict[str, int] = {}
        self._clock = clock

    def get(self, name: str) -> Versioned | None:
        """Return the state of ``name`` and its version, or ``None``."""
        return self._states.get(name)

    def get_all(self) -> dict[str, Versioned]:
        """Return every rollout's state and version."""
        with self._lock:
            return dict(self._states)

    def compare_and_set(
        self,
        name: str,
        expected_version: int | None,
        state: RolloutState,
        record: AuditRecord,
        *,
        fence: Lease | None = None,
    ) -> int:
        """Write ``state`` and append ``record`` if the version still is ``expected_version`` (and ``fence`` holds)."""
        with self._lock:
            if fence is not None and not self._holds(fence):
                raise ConflictError(
                    f"lease {fence.name!r} (token {fence.token}) is no longer held by {fence.owner!r}; "
                    f"rollout {name!r} was not changed"
                )
            current = self._states.get(name)
            found = None if current is None else current.version
            if found != expected_version:
                raise ConflictError(
                    f"rollout {name!r} changed concurrently: expected version {expected_version}, "
                    f"found {found}; nothing was applied"
                )
            version = 1 if current is None else current.version + 1
            versioned = Versioned(state, version)
            self._states[name] = versioned
            log = self._history.get(name)
            if log is None:
                log = self._history[name] = deque(maxlen=self._max_history)
            log.append(replace(record, version=version))
            subscribers = self._subscribers
        for callback in subscribers:
            try:
                callback(name, versioned)
            except Exception:
                _log.exception("canary_router: a store subscriber failed")
        return version

    def history(self, name: str, limit: int | None = None) -> list[AuditRecord]:
        """Return the audit records of ``name``, oldest first (the newest ``limit`` when given)."""
        with self._lock:
            records = list(self._history.get(name, ()))
        if limit is not None:
            records = records[-limit:] if limit > 0 else []
        return records

    def subscribe(self, callback: Callable[[str, Versioned], None]) -> Callable[[], None]:
        """Call ``callback(name, versioned)`` after every change."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    # ------------------------------------------------------------------ observations

    def add_observations(self, batch: ObservationBatch) -> None:
        """Add ``batch`` to the totals of its rollout and epoch."""
        with self._lock:
            epochs = self._totals.setdefault(batch.rollout, {})
            totals = epochs.get(batch.epoch)
            if totals is None:
                totals = epochs[batch.epoch] = _StepTotals(batch.started_at)
                for old in sorted(epochs)[: -self._keep_epochs]:
                    del epochs[old]
            totals.started_at = min(totals.started_at, batch.started_at)
            totals.level = max(totals.level, batch.unit_sample_level)
            for variant, counts in batch.variants.items():
                before = totals.variants.get(variant)
                totals.variants[variant] = counts if before is None else merge_counts(before, counts)
            slots = self._slots.setdefault(batch.rollout, {})
            for item in batch.slots:
                key = (item.start, item.variant)
                before_slot = slots.get(key)
                if before_slot is None:
                    slots[key] = item
                else:
                    latency = dict(before_slot.latency)
                    for index, count in item.latency.items():
                        latency[index] = latency.get(index, 0) + count
                    slots[key] = SlotCounts(
                        item.start,
                        item.variant,
                        before_slot.requests + item.requests,
                        before_slot.errors + item.errors,
                        latency,
                    )
            if len(slots) > 2 * self._max_slots:
                starts = sorted({start for start, _ in slots})[-self._max_slots :]
                keep = set(starts)
                for key in [k for k in slots if k[0] not in keep]:
                    del slots[key]

    def observations(self, rollout: str, epoch: int) -> StepSnapshot | None:
        """Return the totals of step ``epoch`` of ``rollout``, or ``None``."""
        with self._lock:
            totals = self._totals.get(rollout, {}).get(epoch)
            if totals is None:
                return None
            variants = dict(totals.variants)
            started_at, level = totals.started_at, totals.level
        return snapshot_from_counts(rollout, epoch, started_at, level, variants)

    def observation_history(self, rollout: str, since: float = 0.0) -> list[HistorySlot]:
        """Return the history slots of ``rollout`` from ``since`` on, oldest first."""
        with self._lock:
            items = [item for (start, _), item in self._slots.get(rollout, {}).items() if start >= since]
        return history_from_slots(items)

    # ------------------------------------------------------------------ leases

    def _holds(self, lease: Lease) -> bool:
        current = self._leases.get(lease.name)
        return (
            current is not None
            and current.owner == lease.owner
            and current.token == lease.token
            and current.expires_at > self._clock()
        )

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take or renew lease ``name`` for ``ttl`` seconds; ``None`` while another owner holds it."""
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        with self._lock:
            now = self._clock()
            current = self._leases.get(name)
            if current is not None and current.owner != owner and current.expires_at > now:
                return None
            if current is not None and current.owner == owner and current.expires_at > now:
                token = current.token
            else:
                token = self._tokens.get(name, 0) + 1
                self._tokens[name] = token
            lease = self._leases[name] = Lease(name, owner, token, now + ttl)
            return lease

    def release_lease(self, lease: Lease) -> None:
        """Give ``lease`` up if it is still the current one."""
        with self._lock:
            current = self._leases.get(lease.name)
            if current is not None and current.owner == lease.owner and current.token == lease.token:
                del self._leases[lease.name]

    def ping(self) -> None:
        """Always answers: the memory store is in this process."""

    def close(self) -> None:
        """Drop the subscribers. The state stays readable."""
        with self._lock:
            self._subscribers = ()
