"""Observation aggregates: per rollout × step × variant counts, latency histograms, units, and history.

Memory is bounded whatever the traffic: fixed histogram buckets, a sampled set of unit ids, and a ring
of time slots. Recording one observation is a few dictionary and list updates under a lock.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mmh3

__all__ = [
    "BOUNDS",
    "Aggregator",
    "HistorySlot",
    "StepSnapshot",
    "VariantSnapshot",
    "bucket_index",
    "quantile",
]

# Latency histogram: bucket i holds durations in [BOUNDS[i-1], BOUNDS[i]); bucket 0 is below 10 µs and the
# last bucket is at or above BOUNDS[-1]. Bounds grow by 2 ** (1 / 16) (4.4 %), from 10 µs to about 1,000 s.
_MIN = 1e-5
_PER_OCTAVE = 16
_OCTAVES = 27
BOUNDS: tuple[float, ...] = tuple(_MIN * 2 ** (i / _PER_OCTAVE) for i in range(_OCTAVES * _PER_OCTAVE + 1))
"""Upper bounds (seconds) of the latency histogram buckets; one more bucket holds everything above."""
_NBUCKETS = len(BOUNDS) + 1
_LAST = _NBUCKETS - 1
_SCALE = _PER_OCTAVE / math.log(2)
_LOG_MIN = math.log(_MIN)
_COARSE = 4  # history slots keep buckets of 2 ** (4 / 16) = 19 % width
_UNIT_SEED = 0x5EED1E55
_Pending = tuple[str, int, str, bool, float, "str | None", "bool | str", float]
_BOUNDS = BOUNDS
_TOP = BOUNDS[-1]
_log = math.log
_hash = mmh3.hash
_UNIT_CAP = 20_000


def bucket_index(duration: float) -> int:
    """Return the histogram bucket of ``duration`` seconds."""
    if duration < _MIN:
        return 0
    index = int((math.log(duration) - _LOG_MIN) * _SCALE) + 1
    if index > _LAST:
        return _LAST
    # float rounding at a boundary: keep the invariant BOUNDS[index-1] <= duration < BOUNDS[index]
    if index < _LAST and duration >= BOUNDS[index]:
        index += 1
    elif duration < BOUNDS[index - 1]:
        index -= 1
    return index


def quantile(histogram: Sequence[int], q: float) -> float | None:
    """Estimate the ``q`` quantile (0..1) of a histogram as the upper bound of the bucket that holds it."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for index, count in enumerate(histogram):
        running += count
        if running >= rank and count:
            return BOUNDS[index] if index < len(BOUNDS) else math.inf
    return math.inf  # pragma: no cover - rank <= total always stops the loop


class _Variant:
    """Mutable counters of one variant within one step (guarded by the step's lock)."""

    __slots__ = ("errors", "histogram", "requests", "units", "units_seen")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.histogram = [0] * _NBUCKETS
        self.units: dict[int, bool] = {}
        self.units_seen = 0


@dataclass(frozen=True, slots=True)
class VariantSnapshot:
    """Counts of one variant in one step, copied out of the aggregator."""

    requests: int
    errors: int
    histogram: tuple[int, ...]
    units: int
    """Distinct units of split decisions (estimated from a hash sample once there are many)."""
    units_with_errors: int
    """Distinct units that saw at least one error (same estimate)."""

    @property
    def error_rate(self) -> float | None:
        """Errors / requests, or ``None`` without requests."""
        return self.errors / self.requests if self.requests else None

    def percentile(self, q: float) -> float | None:
        """Latency at percentile ``q`` (0..100), as a histogram bucket's upper bound, in seconds."""
        return quantile(self.histogram, q / 100)

    @property
    def timed(self) -> int:
        """Requests with a recorded latency (pre-aggregated counts may come without a histogram)."""
        return sum(self.histogram)

    def count_above(self, threshold_index: int) -> int:
        """Requests in buckets above ``threshold_index`` (i.e. slower than ``BOUNDS[threshold_index]``)."""
        return sum(self.histogram[threshold_index + 1 :])

    @classmethod
    def empty(cls) -> VariantSnapshot:
        """A snapshot with no data."""
        return cls(0, 0, (0,) * _NBUCKETS, 0, 0)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (the histogram as sparse ``{index: count}``)."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "histogram": {str(i): c for i, c in enumerate(self.histogram) if c},
            "units": self.units,
            "units_with_errors": self.units_with_errors,
        }


@dataclass(frozen=True, slots=True)
class StepSnapshot:
    """Everything observed for one rollout during one step (``epoch``), per variant."""

    rollout: str
    epoch: int
    started_at: float
    old: VariantSnapshot
    new: VariantSnapshot
    unit_sample_level: int = 0
    """Units are counted for hashes in a 1 / 2**level sample (0: every unit)."""
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class HistorySlot:
    """Counts of one time slot (e.g. 10 s) of one rollout, per variant, for charts."""

    start: float
    requests: dict[str, int] = field(default_factory=lambda: {"old": 0, "new": 0})
    errors: dict[str, int] = field(default_factory=lambda: {"old": 0, "new": 0})
    latency: dict[str, dict[int, int]] = field(default_factory=lambda: {"old": {}, "new": {}})

    def percentile(self, variant: str, q: float) -> float | None:
        """Approximate latency percentile ``q`` (0..100) of ``variant`` in this slot, in seconds."""
        coarse = self.latency.get(variant) or {}
        total = sum(coarse.values())
        if not total:
            return None
        rank, running = q / 100 * total, 0
        for key in sorted(coarse):
            running += coarse[key]
            if running >= rank:
                top = min((key + 1) * _COARSE, len(BOUNDS)) - 1
                return BOUNDS[top]
        return None  # pragma: no cover

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with p95 per variant."""
        return {
            "start": self.start,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "p95": {v: self.percentile(v, 95) for v in ("old", "new")},
        }


class _Step:
    """Live aggregates of one rollout's current step (guarded by its rollout's lock)."""

    __slots__ = ("epoch", "level", "mask", "new", "old", "started_at", "variants")

    def __init__(self, epoch: int, started_at: float) -> None:
        self.epoch = epoch
        self.started_at = started_at
        self.old = _Variant()
        self.new = _Variant()
        self.variants = {"old": self.old, "new": self.new}
        self.level = 0
        self.mask = 0

    def snapshot(self, rollout: str) -> StepSnapshot:
        scale = 1 << self.level
        old, new = (
            VariantSnapshot(
                v.requests, v.errors, tuple(v.histogram), len(v.units) * scale, sum(v.units.values()) * scale
            )
            for v in (self.old, self.new)
        )
        return StepSnapshot(rollout, self.epoch, self.started_at, old, new, self.level)

    def add_unit(self, counts: _Variant, unit_hash: int, ok: bool) -> None:
        if unit_hash & self.mask:
            return
        units = counts.units
        if unit_hash in units:
            if not ok:
                units[unit_hash] = True
            return
        units[unit_hash] = not ok
        if len(units) > _UNIT_CAP:
            self.level += 1
            self.mask = (1 << self.level) - 1
            for v in (self.old, self.new):
                v.units = {h: e for h, e in v.units.items() if not h & self.mask}


class _Rollout:
    """One rollout's current step and history, behind one lock."""

    __slots__ = ("history", "lock", "previous", "step")

    def __init__(self, history_slots: int) -> None:
        self.lock = threading.Lock()
        self.step: _Step | None = None
        self.previous: _Step | None = None
        """The step before ``step``, kept so that its last counts can still be sent to a shared store."""
        self.history: deque[HistorySlot] = deque(maxlen=history_slots)

    def current(self, epoch: int, now: float) -> _Step | None:
        """The step for ``epoch`` (starting it when newer); ``None`` for a late observation of an older step."""
        step = self.step
        if step is None or step.epoch < epoch:
            self.previous = step
            step = self.step = _Step(epoch, now)
        elif step.epoch > epoch:
            return None
        return step

    def slot(self, now: float, seconds: float) -> HistorySlot | None:
        start = now - now % seconds
        history = self.history
        if history:
            last = history[-1]
            if last.start == start:
                return last
            if last.start > start:  # a clock that went back: find the slot, or drop the point
                for slot in reversed(history):
                    if slot.start == start:
                        return slot
                return None
        slot = HistorySlot(start)
        history.append(slot)
        return slot


class Aggregator:
    """Aggregates observations per rollout × step × variant, with a bounded history of time slots.

    ``record`` is called on the request path; snapshots and history are read by the controller, the
    CLI and the dashboard. Statistics restart whenever the rollout's step (``epoch``) changes.
    """

    def __init__(
        self,
        *,
        slot_seconds: float = 10.0,
        history_slots: int = 360,
        max_pending: int = 65_536,
        fold_interval: float | None = 0.05,
    ) -> None:
        if slot_seconds <= 0 or history_slots < 1 or max_pending < 1:
            raise ValueError("slot_seconds must be > 0, history_slots >= 1 and max_pending >= 1")
        self._fold_interval = fold_interval
        self._fold_errors = 0
        self._drain_lock = threading.Lock()
        self._folder: threading.Thread | None = None
        self._closed = threading.Event()
        _AGGREGATORS.add(self)
        self._pending: deque[_Pending] = deque()
        self._max_pending = max_pending
        self._rollouts: dict[str, _Rollout] = {}
        self._slot_seconds = slot_seconds
        self._history_slots = history_slots
        self._lock = threading.Lock()

    @property
    def slot_seconds(self) -> float:
        """Width of one history slot, in seconds."""
        return self._slot_seconds

    def _rollout(self, rollout: str) -> _Rollout:
        agg = self._rollouts.get(rollout)
        if agg is None:
            with self._lock:
                agg = self._rollouts.setdefault(rollout, _Rollout(self._history_slots))
        return agg

    def record(
        self,
        rollout: str,
        epoch: int,
        variant: str,
        ok: bool,
        duration: float,
        unit: str | None,
        split: bool | str,
        now: float,
    ) -> None:
        """Count one call of ``variant`` in step ``epoch``: outcome, latency, and (for split units) the unit.

        ``split`` is ``True`` to count ``unit`` in ``variant``'s cohort, a variant name to count it in that
        cohort instead (a shadowed unit is in the new cohort although "old" was served), or ``False``.

        On the request path this only appends to a queue (thread-safe, no lock). A background thread folds
        the queue into the aggregates every ``fold_interval`` seconds, and so does anything that reads them;
        should the queue still reach ``max_pending`` observations, the recording thread folds it itself, so
        memory stays bounded.
        """
        pending = self._pending
        pending.append((rollout, epoch, variant, ok, duration, unit, split, now))
        if self._folder is None and self._fold_interval is not None:
            self._start_folder()
        if len(pending) >= self._max_pending:
            self.drain()

    def _start_folder(self) -> None:
        with self._lock:
            if self._folder is not None or self._fold_interval is None or self._closed.is_set():
                return
            interval = self._fold_interval
            ref = weakref.ref(self)
            closed = self._closed

            def fold() -> None:  # holds only a weak reference: a dropped aggregator ends its thread
                while not closed.wait(interval):
                    aggregator = ref()
                    if aggregator is None:
                        return
                    aggregator.drain()
                    del aggregator

            thread = threading.Thread(target=fold, name="canary-router-fold", daemon=True)
            self._folder = thread
            thread.start()

    def _after_fork(self) -> None:
        """In a forked child the parent's folding thread does not exist: start a new one on the next record."""
        self._folder = None
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        for agg in self._rollouts.values():
            agg.lock = threading.Lock()

    def close(self) -> None:
        """Fold what is queued and stop the background thread."""
        self._closed.set()
        self.drain()
        folder = self._folder
        if folder is not None and folder is not threading.current_thread():
            folder.join(timeout=1)

    def drain(self) -> int:
        """Fold queued observations into the aggregates; returns how many were folded."""
        pending = self._pending
        if not pending:
            return 0
        with self._drain_lock:
            popleft = pending.popleft
            groups: dict[str, list[_Pending]] = {}
            folded = 0
            for _ in range(len(pending)):
                try:
                    item = popleft()
                except IndexError:  # pragma: no cover - another drain emptied it
                    break
                group = groups.get(item[0])
                if group is None:
                    group = groups[item[0]] = []
                group.append(item)
                folded += 1
            for rollout, items in groups.items():
                try:
                    self._fold(rollout, items)
                except Exception:  # pragma: no cover - a malformed observation must not stop the others
                    self._fold_errors += 1
            return folded

    def _fold(self, rollout: str, items: list[_Pending]) -> None:
        agg = self._rollouts.get(rollout) or self._rollout(rollout)
        seconds = self._slot_seconds
        log, log_min, scale, last, top, bounds = _log, _LOG_MIN, _SCALE, _LAST, _TOP, _BOUNDS
        with agg.lock:
            step = agg.step
            slot: HistorySlot | None = agg.history[-1] if agg.history else None
            for _, epoch, variant, ok, duration, unit, split, now in items:
                if step is None or step.epoch != epoch:
                    step = agg.current(epoch, now)
                    if step is None:  # a late observation of a previous step
                        step = agg.step
                        continue
                # bucket_index, inlined
                if duration < _MIN:
                    index = 0
                else:
                    index = int((log(duration) - log_min) * scale) + 1
                    if index >= last:
                        index = last if duration >= top else last - 1
                    elif duration >= bounds[index]:
                        index += 1
                    elif duration < bounds[index - 1]:
                        index -= 1
                counts = step.variants[variant]
                counts.requests += 1
                counts.histogram[index] += 1
                if not ok:
                    counts.errors += 1
                if split and unit is not None:
                    try:
                        unit_hash = _hash(unit.encode(), _UNIT_SEED, False)
                    except UnicodeEncodeError:
                        unit_hash = _hash(unit.encode("utf-8", "surrogatepass"), _UNIT_SEED, False)
                    step.add_unit(counts if split is True else step.variants[split], unit_hash, ok)
                if slot is None or slot.start != now - now % seconds:
                    slot = agg.slot(now, seconds)
                    if slot is None:
                        continue
                slot.requests[variant] += 1
                if not ok:
                    slot.errors[variant] += 1
                coarse = slot.latency[variant]
                key = index // _COARSE
                coarse[key] = coarse.get(key, 0) + 1

    def add_counts(
        self,
        rollout: str,
        epoch: int,
        variant: str,
        *,
        requests: int,
        errors: int,
        histogram: Iterable[int] | Mapping[int, int] = (),
        unit_hashes: Iterable[int] = (),
        now: float,
    ) -> None:
        """Add pre-aggregated counts (from another process, or a simulation) to step ``epoch``."""
        self.drain()
        items = histogram.items() if isinstance(histogram, Mapping) else enumerate(histogram)
        agg = self._rollout(rollout)
        with agg.lock:
            step = agg.current(epoch, now)
            if step is None:
                return
            counts = step.variants[variant]
            counts.requests += requests
            counts.errors += errors
            added = [(int(index), int(count)) for index, count in items if count]
            for index, count in added:
                counts.histogram[index] += count
            for unit_hash in unit_hashes:
                step.add_unit(counts, unit_hash, True)
            slot = agg.slot(now, self._slot_seconds)
            if slot is not None:
                slot.requests[variant] += requests
                slot.errors[variant] += errors
                coarse = slot.latency[variant]
                for index, count in added:
                    key = index // _COARSE
                    coarse[key] = coarse.get(key, 0) + count

    def snapshot(self, rollout: str, epoch: int | None = None) -> StepSnapshot | None:
        """Copy out the current step's counts of ``rollout`` (``None`` when nothing was recorded for ``epoch``)."""
        self.drain()
        agg = self._rollouts.get(rollout)
        if agg is None:
            return None
        with agg.lock:
            step = agg.step
            if step is None or (epoch is not None and step.epoch != epoch):
                return None
            return step.snapshot(rollout)

    def history(self, rollout: str) -> list[HistorySlot]:
        """Return the time slots of ``rollout``, oldest first."""
        self.drain()
        agg = self._rollouts.get(rollout)
        if agg is None:
            return []
        with agg.lock:
            return list(agg.history)

    def reset(self, rollout: str | None = None) -> None:
        """Forget the aggregates of ``rollout`` (or of every rollout)."""
        self.drain()
        with self._lock:
            if rollout is None:
                self._rollouts.clear()
            else:
                self._rollouts.pop(rollout, None)


_AGGREGATORS: weakref.WeakSet[Aggregator] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for aggregator in list(_AGGREGATORS):
        aggregator._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_reinit_after_fork)
