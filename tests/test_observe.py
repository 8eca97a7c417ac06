"""Observation aggregates: histogram buckets, quantiles, epochs, sampled units, history and concurrency."""

from __future__ import annotations

import itertools
import json
import math
import threading

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary_router.observe import (
    BOUNDS,
    Aggregator,
    HistorySlot,
    VariantSnapshot,
    bucket_index,
    quantile,
)

NBUCKETS = len(BOUNDS) + 1
LAST = NBUCKETS - 1
UNIT_SEED = 0x5EED1E55  # observe._UNIT_SEED: the unit sample is a hash sample with this seed


def inlined_index(duration: float) -> int:
    """Return the histogram bucket that ``Aggregator._apply`` (the inlined bucket_index) puts ``duration`` in."""
    agg = Aggregator()
    agg.record("r", 1, "old", True, duration, None, False, 0.0)
    snap = agg.snapshot("r")
    assert snap is not None
    filled = [i for i, count in enumerate(snap.old.histogram) if count]
    assert len(filled) == 1, filled
    assert snap.old.histogram[filled[0]] == 1
    return filled[0]


def assert_in_bucket(duration: float, index: int) -> None:
    """Assert the documented invariant: bucket i holds [BOUNDS[i-1], BOUNDS[i]), 0 below and LAST above."""
    if index == 0:
        assert duration < BOUNDS[0]
    elif index == LAST:
        assert duration >= BOUNDS[-1]
    else:
        assert BOUNDS[index - 1] <= duration < BOUNDS[index]


def near_bounds() -> st.SearchStrategy[float]:
    """Durations exactly on a bucket bound or one float away from it."""
    return st.builds(
        lambda b, side: b if side == 0 else math.nextafter(b, math.inf if side > 0 else 0.0),
        st.sampled_from(BOUNDS),
        st.sampled_from((-1, 0, 1)),
    )


DURATIONS = st.one_of(
    st.floats(min_value=0.0, max_value=1e-4),  # tiny, around and below the 10 µs first bound
    st.floats(min_value=1e-4, max_value=10.0),  # the usual range
    st.floats(min_value=10.0, max_value=1e300),  # huge, beyond the last bound
    st.floats(min_value=-1e6, max_value=0.0),  # a clock that went backwards
    near_bounds(),
)


@settings(max_examples=600, derandomize=True, deadline=None)
@given(DURATIONS)
def test_inlined_bucket_index_equals_bucket_index(duration: float) -> None:
    """The hot path's inlined bucket computation agrees with bucket_index() and its interval invariant."""
    index = bucket_index(duration)
    assert inlined_index(duration) == index
    assert_in_bucket(duration, index)


def test_every_bound_and_its_neighbours_bucket_identically() -> None:
    """Exactly on every bound, and one float either side, both computations agree (float rounding at edges)."""
    for bound in BOUNDS:
        for duration in (math.nextafter(bound, 0.0), bound, math.nextafter(bound, math.inf)):
            index = bucket_index(duration)
            assert inlined_index(duration) == index, duration
            assert_in_bucket(duration, index)


def test_extreme_durations_land_in_the_end_buckets() -> None:
    """Zero, negative and sub-10 µs durations go to bucket 0; anything past the last bound to the overflow bucket."""
    for duration in (0.0, -5.0, 5e-324, 9.99e-6):
        assert bucket_index(duration) == 0
        assert inlined_index(duration) == 0
    for duration in (BOUNDS[-1], 1e4, 1e300):
        assert bucket_index(duration) == LAST
        assert inlined_index(duration) == LAST


def test_bounds_are_strictly_increasing_with_the_documented_growth() -> None:
    """BOUNDS start at 10 µs, grow by 2 ** (1/16) per bucket and reach at least 1,000 s."""
    assert BOUNDS[0] == pytest.approx(1e-5)
    assert all(a < b for a, b in itertools.pairwise(BOUNDS))
    ratios = {round(b / a, 9) for a, b in itertools.pairwise(BOUNDS)}
    assert ratios == {round(2 ** (1 / 16), 9)}
    assert BOUNDS[-1] >= 1000.0


def test_quantile_returns_the_upper_bound_of_the_bucket_holding_the_rank() -> None:
    """quantile() walks the cumulative counts and answers the bucket's upper bound (inf for the overflow bucket)."""
    histogram = [0] * NBUCKETS
    histogram[10] = 50
    histogram[20] = 45
    histogram[LAST] = 5
    assert quantile(histogram, 0.0) == BOUNDS[10]
    assert quantile(histogram, 0.5) == BOUNDS[10]
    assert quantile(histogram, 0.51) == BOUNDS[20]
    assert quantile(histogram, 0.95) == BOUNDS[20]
    assert quantile(histogram, 0.96) == math.inf
    assert quantile(histogram, 1.0) == math.inf
    assert quantile([0] * NBUCKETS, 0.5) is None


def test_variant_snapshot_helpers() -> None:
    """VariantSnapshot computes error rate, percentiles and tail counts from its histogram, and serialises sparsely."""
    histogram = [0] * NBUCKETS
    histogram[0] = 90
    histogram[100] = 10
    snap = VariantSnapshot(100, 4, tuple(histogram), 7, 2)
    assert snap.error_rate == pytest.approx(0.04)
    assert snap.percentile(50) == BOUNDS[0]
    assert snap.percentile(95) == BOUNDS[100]
    assert snap.count_above(0) == 10
    assert snap.count_above(100) == 0
    data = snap.to_dict()
    assert data == {"requests": 100, "errors": 4, "histogram": {"0": 90, "100": 10}, "units": 7, "units_with_errors": 2}
    json.dumps(data)
    empty = VariantSnapshot.empty()
    assert empty.error_rate is None
    assert empty.percentile(95) is None
    assert len(empty.histogram) == NBUCKETS


def test_record_counts_requests_errors_latency_and_units() -> None:
    """record() counts each call per variant, its error, its latency bucket and its distinct split unit."""
    agg = Aggregator()
    agg.record("r", 1, "new", True, 0.010, "alice", True, 100.0)
    agg.record("r", 1, "new", False, 0.020, "alice", True, 101.0)
    agg.record("r", 1, "new", True, 0.030, "bob", True, 102.0)
    agg.record("r", 1, "old", False, 0.040, "carol", False, 103.0)  # not a split decision: unit not counted
    snap = agg.snapshot("r")
    assert snap is not None
    assert (snap.rollout, snap.epoch, snap.started_at) == ("r", 1, 100.0)
    assert (snap.new.requests, snap.new.errors, snap.new.units, snap.new.units_with_errors) == (3, 1, 2, 1)
    assert (snap.old.requests, snap.old.errors, snap.old.units) == (1, 1, 0)
    assert snap.new.histogram[bucket_index(0.020)] == 1
    assert sum(snap.new.histogram) == 3
    assert snap.unit_sample_level == 0
    assert agg.snapshot("unknown") is None


def test_counts_restart_when_the_epoch_changes() -> None:
    """A newer epoch starts a fresh step: counts, units and the bake start all restart."""
    agg = Aggregator()
    for i in range(5):
        agg.record("r", 1, "new", False, 0.01, f"u{i}", True, 10.0)
    agg.record("r", 2, "new", True, 0.01, "x", True, 20.0)
    snap = agg.snapshot("r")
    assert snap is not None
    assert (snap.epoch, snap.started_at) == (2, 20.0)
    assert (snap.new.requests, snap.new.errors, snap.new.units) == (1, 0, 1)
    assert agg.snapshot("r", 1) is None
    assert agg.snapshot("r", 2) == snap


def test_late_observations_of_an_older_epoch_are_dropped() -> None:
    """Observations still arriving for a previous step neither count in the current step nor in the history."""
    agg = Aggregator(slot_seconds=10)
    agg.record("r", 3, "old", True, 0.01, "a", True, 0.0)
    agg.record("r", 2, "old", False, 0.01, "b", True, 1.0)
    agg.add_counts("r", 1, "new", requests=100, errors=100, now=2.0)
    snap = agg.snapshot("r")
    assert snap is not None
    assert snap.epoch == 3
    assert (snap.old.requests, snap.old.errors, snap.old.units) == (1, 0, 1)
    assert snap.new.requests == 0
    [slot] = agg.history("r")
    assert slot.requests == {"old": 1, "new": 0}
    assert slot.errors == {"old": 0, "new": 0}


def test_units_are_sampled_so_memory_stays_bounded_and_estimates_stay_close() -> None:
    """Past 20,000 distinct units per variant the sample level rises, memory is capped and estimates stay near truth."""
    agg = Aggregator()
    n_old, n_new = 100_000, 3_000
    for i in range(n_old):
        agg.record("r", 1, "old", i % 10 != 0, 1e-3, f"old-{i}", True, 0.0)
    for i in range(n_new):
        agg.record("r", 1, "new", True, 1e-3, f"new-{i}", True, 0.0)
    snap = agg.snapshot("r")
    assert snap is not None
    assert snap.unit_sample_level >= 2
    assert snap.old.requests == n_old
    assert abs(snap.old.units - n_old) / n_old < 0.03
    assert abs(snap.old.units_with_errors - n_old / 10) / (n_old / 10) < 0.06
    assert abs(snap.new.units - n_new) / n_new < 0.15
    # the estimate is exactly the kept sample scaled up: units whose hash has `level` low zero bits
    mask = (1 << snap.unit_sample_level) - 1
    kept = sum(1 for i in range(n_old) if not mmh3.hash(f"old-{i}".encode(), UNIT_SEED, False) & mask)
    assert snap.old.units == kept << snap.unit_sample_level
    # bounded: the live sets never hold more than the cap (+1 before they are thinned)
    step = agg._rollouts["r"].step
    assert step is not None
    assert len(step.old.units) <= 20_001
    assert len(step.new.units) <= 20_001


def test_repeated_units_are_counted_once() -> None:
    """A unit seen many times counts once; one error among its calls marks it as a unit with errors."""
    agg = Aggregator()
    for _ in range(50):
        agg.record("r", 1, "new", True, 1e-3, "same", True, 0.0)
    agg.record("r", 1, "new", False, 1e-3, "same", True, 0.0)
    agg.record("r", 1, "new", True, 1e-3, "same", True, 0.0)
    snap = agg.snapshot("r")
    assert snap is not None
    assert (snap.new.requests, snap.new.units, snap.new.units_with_errors) == (52, 1, 1)


def test_non_utf8_unit_ids_are_hashed() -> None:
    """A unit id with a lone surrogate is still counted (no silently dropped observation)."""
    agg = Aggregator()
    agg.record("r", 1, "new", True, 1e-3, "bad\ud800", True, 0.0)
    snap = agg.snapshot("r")
    assert snap is not None
    assert (snap.new.requests, snap.new.units) == (1, 1)


def test_history_ring_keeps_at_most_history_slots() -> None:
    """The history is a ring of time slots: old slots fall off, so memory stays bounded."""
    agg = Aggregator(slot_seconds=10, history_slots=5)
    for t in range(0, 200, 5):
        agg.record("r", 1, "new", t % 20 != 0, 0.01, None, False, float(t))
    slots = agg.history("r")
    assert len(slots) == 5
    assert [s.start for s in slots] == [150.0, 160.0, 170.0, 180.0, 190.0]
    assert all(s.requests == {"old": 0, "new": 2} for s in slots)
    assert [s.errors["new"] for s in slots] == [0, 1, 0, 1, 0]
    assert agg.history("unknown") == []


def test_history_tolerates_a_clock_going_back() -> None:
    """An observation timed in an earlier, still-kept slot goes there; one older than the ring is not counted there."""
    agg = Aggregator(slot_seconds=10, history_slots=3)
    agg.record("r", 1, "old", True, 0.01, None, False, 100.0)
    agg.record("r", 1, "old", True, 0.01, None, False, 110.0)
    agg.record("r", 1, "old", True, 0.01, None, False, 105.0)  # back into slot 100
    agg.record("r", 1, "old", True, 0.01, None, False, 50.0)  # a slot that is not in the ring
    slots = agg.history("r")
    assert [(s.start, s.requests["old"]) for s in slots] == [(100.0, 2), (110.0, 1)]
    snap = agg.snapshot("r")
    assert snap is not None
    assert snap.old.requests == 4  # the step still counts it


def test_record_from_eight_threads_loses_nothing() -> None:
    """Concurrent record() calls (with frequent drains on the recording threads) lose no observation."""
    agg = Aggregator(max_pending=64, slot_seconds=1e9)
    per_thread = 10_000
    start = threading.Barrier(8)

    def work(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            unit = i % 1000
            variant = "new" if unit % 4 == 0 else "old"
            agg.record("r", 1, variant, i % 7 != 0, 1e-3 * (1 + i % 50), f"t{k}-{unit}", True, 0.0)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = agg.snapshot("r")
    assert snap is not None
    total = snap.old.requests + snap.new.requests
    assert total == 8 * per_thread
    assert snap.new.requests == 8 * per_thread // 4
    assert sum(snap.old.histogram) + sum(snap.new.histogram) == total
    assert snap.old.errors + snap.new.errors == 8 * sum(1 for i in range(per_thread) if i % 7 == 0)
    assert (snap.new.units, snap.old.units) == (8 * 250, 8 * 750)
    [slot] = agg.history("r")
    assert slot.requests["old"] + slot.requests["new"] == total


def test_max_pending_forces_a_drain_on_the_recording_thread() -> None:
    """The lock-free queue never holds max_pending observations: the recording thread folds it in itself."""
    agg = Aggregator(max_pending=10)
    for i in range(9):
        agg.record("r", 1, "old", True, 1e-3, None, False, 0.0)
        assert len(agg._pending) == i + 1
    agg.record("r", 1, "old", True, 1e-3, None, False, 0.0)
    assert len(agg._pending) == 0
    for _ in range(1000):
        agg.record("r", 1, "old", True, 1e-3, None, False, 0.0)
        assert len(agg._pending) < 10
    snap = agg.snapshot("r")
    assert snap is not None
    assert snap.old.requests == 1010


def test_drain_returns_how_many_were_folded() -> None:
    """drain() folds the queue and reports the count; a second drain has nothing left."""
    agg = Aggregator()
    for _ in range(7):
        agg.record("r", 1, "new", True, 1e-3, None, False, 0.0)
    assert agg.drain() == 7
    assert agg.drain() == 0


def test_add_counts_merges_pre_aggregated_data() -> None:
    """add_counts adds requests, errors, a histogram (list or sparse mapping) and unit hashes to the step."""
    agg = Aggregator(slot_seconds=10)
    agg.record("r", 4, "new", True, BOUNDS[4] * 1.01, "u", True, 0.0)  # bucket 5: [BOUNDS[4], BOUNDS[5])
    histogram = [0] * NBUCKETS
    histogram[5] = 3
    agg.add_counts("r", 4, "new", requests=10, errors=2, histogram=histogram, unit_hashes=[2, 4, 6], now=1.0)
    agg.add_counts("r", 4, "old", requests=20, errors=1, histogram={7: 15, 8: 5}, unit_hashes=range(10), now=2.0)
    snap = agg.snapshot("r")
    assert snap is not None
    assert (snap.new.requests, snap.new.errors, snap.new.units) == (11, 2, 4)
    assert snap.new.histogram[5] == 4
    assert (snap.old.requests, snap.old.errors, snap.old.units, snap.old.units_with_errors) == (20, 1, 10, 0)
    assert (snap.old.histogram[7], snap.old.histogram[8]) == (15, 5)
    [slot] = agg.history("r")
    assert slot.requests == {"old": 20, "new": 11}
    assert slot.errors == {"old": 1, "new": 2}
    agg.add_counts("r", 5, "old", requests=1, errors=0, now=3.0)  # a newer epoch restarts the step
    snap = agg.snapshot("r")
    assert snap is not None
    assert (snap.epoch, snap.old.requests, snap.new.requests) == (5, 1, 0)


def test_add_counts_histogram_reaches_the_history_slot() -> None:
    """Pre-aggregated latency counts show up in the history slot's percentiles like recorded ones."""
    agg = Aggregator(slot_seconds=10)
    agg.add_counts("r", 1, "new", requests=10, errors=0, histogram={40: 10}, now=1.0)
    [slot] = agg.history("r")
    assert slot.percentile("new", 95) is not None


def test_history_slot_percentile_and_to_dict() -> None:
    """History slots keep coarse (4-bucket) latency; percentile answers that coarse bucket's upper bound."""
    agg = Aggregator(slot_seconds=10)
    for _ in range(90):
        agg.record("r", 1, "old", True, 0.010, None, False, 5.0)
    for _ in range(10):
        agg.record("r", 1, "old", False, 0.500, None, False, 5.0)
    agg.record("r", 1, "new", True, 2e-6, None, False, 5.0)
    [slot] = agg.history("r")
    assert slot.start == 0.0
    p50, p95 = slot.percentile("old", 50), slot.percentile("old", 95)
    assert p50 is not None
    assert p95 is not None
    coarse50 = bucket_index(0.010) // 4
    coarse95 = bucket_index(0.500) // 4
    assert p50 == BOUNDS[coarse50 * 4 + 3]
    assert p95 == BOUNDS[coarse95 * 4 + 3]
    assert 0.010 <= p50 < 0.010 * 2 ** (4 / 16) * 1.05
    assert 0.500 <= p95 < 0.500 * 2 ** (4 / 16) * 1.05
    assert slot.percentile("new", 50) == BOUNDS[3]
    assert HistorySlot(0.0).percentile("old", 50) is None
    data = slot.to_dict()
    assert data == {
        "start": 0.0,
        "requests": {"old": 100, "new": 1},
        "errors": {"old": 10, "new": 0},
        "p95": {"old": p95, "new": BOUNDS[3]},
    }
    json.dumps(data, allow_nan=False)


def test_history_slot_percentile_of_the_overflow_bucket_is_finite() -> None:
    """A slot holding only overflow durations still answers a (finite) percentile."""
    slot = HistorySlot(0.0)
    slot.latency["old"][LAST // 4] = 3
    assert slot.percentile("old", 99) == BOUNDS[-1]


def test_reset_forgets_aggregates() -> None:
    """reset(name) forgets one rollout, reset() forgets every rollout."""
    agg = Aggregator()
    agg.record("a", 1, "old", True, 1e-3, None, False, 0.0)
    agg.record("b", 1, "old", True, 1e-3, None, False, 0.0)
    agg.reset("a")
    assert agg.snapshot("a") is None
    assert agg.snapshot("b") is not None
    agg.reset()
    assert agg.snapshot("b") is None
    assert agg.history("b") == []


@pytest.mark.parametrize(
    "kwargs", [{"slot_seconds": 0}, {"slot_seconds": -1}, {"history_slots": 0}, {"max_pending": 0}]
)
def test_aggregator_rejects_bad_limits(kwargs: dict[str, float]) -> None:
    """Non-positive slot width, history length or queue bound are refused at construction."""
    with pytest.raises(ValueError):
        Aggregator(**kwargs)  # type: ignore[arg-type]
