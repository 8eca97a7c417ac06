"""Turning this process's observation aggregates into deltas for a shared store.

The aggregator keeps running totals of the current step (and the step before it) and a ring of history
slots. The outbox remembers what it has already sent and, on each flush, sends only the difference. A
failed send changes nothing, so the next flush sends everything since the last success: buffering costs
no memory beyond the aggregator's own bounded totals. What can no longer be sent (a step two changes old,
a history slot pushed out of the ring before the store took it) is counted in :attr:`Outbox.dropped`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from .observe import Aggregator, HistorySlot, _Step
from .stores.base import ObservationBatch, SlotCounts, VariantCounts

__all__ = ["Outbox"]

_VARIANTS = ("old", "new")


@dataclass(slots=True)
class _Totals:
    """Copied totals of one variant of one step."""

    requests: int = 0
    errors: int = 0
    histogram: tuple[int, ...] = ()
    units: frozenset[int] = frozenset()
    error_units: frozenset[int] = frozenset()


@dataclass(slots=True)
class _StepCopy:
    epoch: int
    started_at: float
    level: int
    variants: dict[str, _Totals] = field(default_factory=dict)


@dataclass(slots=True)
class _SlotCopy:
    requests: dict[str, int]
    errors: dict[str, int]
    latency: dict[str, dict[int, int]]


def _copy_step(step: _Step) -> _StepCopy:
    return _StepCopy(
        step.epoch,
        step.started_at,
        step.level,
        {
            name: _Totals(
                counts.requests,
                counts.errors,
                tuple(counts.histogram),
                frozenset(counts.units),
                frozenset(h for h, failed in counts.units.items() if failed),
            )
            for name, counts in step.variants.items()
        },
    )


def _copy_slot(slot: HistorySlot) -> _SlotCopy:
    return _SlotCopy(
        dict(slot.requests), dict(slot.errors), {variant: dict(latency) for variant, latency in slot.latency.items()}
    )


def _variant_delta(now: _Totals, before: _Totals | None) -> VariantCounts | None:
    if before is None:
        before = _Totals()
    old_histogram = before.histogram
    if old_histogram:
        histogram = {i: c - old_histogram[i] for i, c in enumerate(now.histogram) if c != old_histogram[i]}
    else:
        histogram = {i: c for i, c in enumerate(now.histogram) if c}
    delta = VariantCounts(
        now.requests - before.requests,
        now.errors - before.errors,
        histogram,
        now.units - before.units,
        now.error_units - before.error_units,
    )
    if delta.requests or delta.errors or delta.histogram or delta.units or delta.error_units:
        return delta
    return None


def _slot_deltas(start: float, now: _SlotCopy, before: _SlotCopy | None) -> list[SlotCounts]:
    out: list[SlotCounts] = []
    for variant in _VARIANTS:
        requests = now.requests.get(variant, 0) - (before.requests.get(variant, 0) if before else 0)
        errors = now.errors.get(variant, 0) - (before.errors.get(variant, 0) if before else 0)
        latency_before = before.latency.get(variant, {}) if before else {}
        latency = {
            key: count - latency_before.get(key, 0)
            for key, count in now.latency.get(variant, {}).items()
            if count != latency_before.get(key, 0)
        }
        if requests or errors or latency:
            out.append(SlotCounts(start, variant, requests, errors, latency))
    return out


class Outbox:
    """Computes the observation deltas of an :class:`~canary_router.observe.Aggregator` since the last send.

    :meth:`collect` returns ``(batch, commit)`` pairs in the order they must be sent; call ``commit()``
    once the store has taken ``batch``, and stop at the first failure (the rest goes out next time).
    """

    def __init__(self, aggregator: Aggregator) -> None:
        self._aggregator = aggregator
        self._steps: dict[tuple[str, int], _StepCopy] = {}
        """What the store has taken of each step (as totals)."""
        self._slots: dict[tuple[str, float], _SlotCopy] = {}
        """What the store has taken of each history slot (as totals)."""
        self._seen_steps: dict[tuple[str, int], _StepCopy] = {}
        self._seen_slots: dict[tuple[str, float], _SlotCopy] = {}
        self.dropped = 0
        """Requests observed in this process whose step totals can no longer reach the store."""
        self.dropped_history = 0
        """Requests whose history slot (chart data) left the ring before the store took it."""

    def collect(self) -> list[tuple[ObservationBatch, Callable[[], None]]]:
        """Return the batches to send now, each with the function that records it as sent."""
        aggregator = self._aggregator
        aggregator.drain()
        out: list[tuple[ObservationBatch, Callable[[], None]]] = []
        seen_steps: dict[tuple[str, int], _StepCopy] = {}
        seen_slots: dict[tuple[str, float], _SlotCopy] = {}
        for rollout, agg in list(aggregator._rollouts.items()):
            with agg.lock:
                steps = [_copy_step(step) for step in (agg.previous, agg.step) if step is not None]
                slots = [(slot.start, _copy_slot(slot)) for slot in agg.history]
            for step in steps:
                key = (rollout, step.epoch)
                seen_steps[key] = step
                before = self._steps.get(key)
                variants: dict[str, VariantCounts] = {}
                for name, totals in step.variants.items():
                    delta = _variant_delta(totals, before.variants.get(name) if before else None)
                    if delta is not None:
                        variants[name] = delta
                if variants:
                    batch = ObservationBatch(rollout, step.epoch, step.started_at, step.level, variants)
                    out.append((batch, partial(self._steps.__setitem__, key, step)))
            slot_deltas: list[SlotCounts] = []
            for start, copy in slots:
                seen_slots[(rollout, start)] = copy
                slot_deltas.extend(_slot_deltas(start, copy, self._slots.get((rollout, start))))
            if slot_deltas and steps:
                step = steps[-1]
                batch = ObservationBatch(rollout, step.epoch, step.started_at, step.level, {}, tuple(slot_deltas))
                taken = {(rollout, start): copy for start, copy in slots}
                out.append((batch, partial(self._slots.update, taken)))
        self._forget(seen_steps, seen_slots)
        return out

    def _forget(
        self, seen_steps: dict[tuple[str, int], _StepCopy], seen_slots: dict[tuple[str, float], _SlotCopy]
    ) -> None:
        """Drop bookkeeping of steps and slots the aggregator no longer has, counting what never got out."""
        for key, last_seen in self._seen_steps.items():
            if key not in seen_steps:
                sent = self._steps.pop(key, None)
                self.dropped += sum(t.requests for t in last_seen.variants.values()) - (
                    sum(t.requests for t in sent.variants.values()) if sent else 0
                )
        for slot_key, last_slot in self._seen_slots.items():
            if slot_key not in seen_slots:
                sent_slot = self._slots.pop(slot_key, None)
                self.dropped_history += sum(last_slot.requests.values()) - (
                    sum(sent_slot.requests.values()) if sent_slot else 0
                )
        self._seen_steps = seen_steps
        self._seen_slots = seen_slots
