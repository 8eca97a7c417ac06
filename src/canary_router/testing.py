"""Helpers for your own tests: force a variant, record observations, check a store against the contract."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import ConflictError
from .model import AuditRecord, Observation, Phase, RolloutState, Variant
from .stores.base import Lease, ObservationBatch, SharedStore, SlotCounts, Store, VariantCounts, Versioned

if TYPE_CHECKING:
    from .router import Router

__all__ = ["RecordingObserver", "SharedStoreConformance", "StoreConformance", "force"]


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


def _state(percent: float = 5.0, phase: str = "running", epoch: int = 1) -> RolloutState:
    return RolloutState(Phase(phase), 0, percent, 1_000.0, "why", "tester", epoch, 1_000.0, False, 0.0)


def _record(name: str, action: str = "start") -> AuditRecord:
    return AuditRecord(1_000.0, name, "tester", action, None, "running", None, 5.0, "why", {"n": 1})


class StoreConformance:
    """The contract every :class:`~canary_router.Store` keeps, as tests: subclass it and build your store.

    ::

        class TestMyStore(StoreConformance):
            def make_store(self) -> Store:
                return MyStore(...)

    pytest collects the ``test_*`` methods of the subclass. Each test uses its own rollout names, so one
    store instance may be shared, but a fresh one per test is simplest.
    """

    def make_store(self) -> Store:
        """Return a new, empty store (override this)."""
        raise NotImplementedError

    def _store(self) -> Store:
        store = self.make_store()
        self._stores = [*getattr(self, "_stores", []), store]
        return store

    def teardown_method(self) -> None:
        """Close the stores this test made."""
        for store in getattr(self, "_stores", []):
            store.close()
        self._stores = []

    def _name(self, suffix: str) -> str:
        return f"conformance-{uuid.uuid4().hex[:12]}-{suffix}"

    def test_missing_rollout_reads_as_none(self) -> None:
        """get() of a rollout never written is None."""
        assert self._store().get(self._name("missing")) is None

    def test_create_only_when_absent(self) -> None:
        """compare_and_set(expected=None) creates version 1, and only once."""
        store, name = self._store(), self._name("create")
        assert store.compare_and_set(name, None, _state(), _record(name)) == 1
        try:
            store.compare_and_set(name, None, _state(10.0), _record(name))
        except ConflictError:
            pass
        else:
            raise AssertionError("a second create must raise ConflictError")
        current = store.get(name)
        assert current is not None and current.version == 1 and current.state.percent == 5.0

    def test_versions_grow_by_one_and_state_round_trips(self) -> None:
        """Each successful write bumps the version by one and stores every field of the state."""
        store, name = self._store(), self._name("versions")
        store.compare_and_set(name, None, _state(), _record(name))
        state = RolloutState(Phase.PAUSED, 2, 25.5, 2_000.5, "reason ✓", "alice", 7, 1_999.0, True, 1_998.0)
        assert store.compare_and_set(name, 1, state, _record(name, "pause")) == 2
        assert store.get(name) == (state, 2)

    def test_stale_version_conflicts_and_changes_nothing(self) -> None:
        """A write with an outdated expected version raises ConflictError and leaves state and history alone."""
        store, name = self._store(), self._name("stale")
        store.compare_and_set(name, None, _state(), _record(name))
        store.compare_and_set(name, 1, _state(10.0), _record(name, "promote"))
        try:
            store.compare_and_set(name, 1, _state(50.0), _record(name, "promote"))
        except ConflictError:
            pass
        else:
            raise AssertionError("a stale write must raise ConflictError")
        assert store.get(name) == (_state(10.0), 2)
        assert [r.action for r in store.history(name)] == ["start", "promote"]

    def test_history_is_ordered_versioned_and_limited(self) -> None:
        """history() returns records oldest first, each with the version it produced; limit keeps the newest."""
        store, name = self._store(), self._name("history")
        store.compare_and_set(name, None, _state(), _record(name))
        for version in range(1, 5):
            store.compare_and_set(name, version, _state(), _record(name, f"a{version}"))
        history = store.history(name)
        assert [r.action for r in history] == ["start", "a1", "a2", "a3", "a4"]
        assert [r.version for r in history] == [1, 2, 3, 4, 5]
        assert [r.action for r in store.history(name, 2)] == ["a3", "a4"]
        assert history[0].details == {"n": 1}

    def test_get_all_lists_every_rollout(self) -> None:
        """get_all() includes every rollout written."""
        store = self._store()
        names = [self._name(f"all{i}") for i in range(3)]
        for name in names:
            store.compare_and_set(name, None, _state(), _record(name))
        everything = store.get_all()
        assert all(everything[name].version == 1 for name in names)

    def test_subscribers_hear_changes_until_unsubscribed(self) -> None:
        """subscribe() delivers (name, versioned) after writes; the returned function stops it."""
        store, name = self._store(), self._name("subscribe")
        heard: list[tuple[str, int]] = []
        done = threading.Event()

        def listener(changed: str, versioned: Versioned) -> None:
            if changed == name:
                heard.append((changed, versioned.version))
                done.set()

        unsubscribe = store.subscribe(listener)
        store.compare_and_set(name, None, _state(), _record(name))
        assert done.wait(5), "no change notification within 5 s"
        unsubscribe()
        store.compare_and_set(name, 1, _state(10.0), _record(name))
        time.sleep(0.3)
        assert heard == [(name, 1)]

    def test_racing_writers_apply_exactly_one_change(self) -> None:
        """Eight threads writing from the same version: exactly one succeeds, the rest conflict."""
        store, name = self._store(), self._name("race")
        store.compare_and_set(name, None, _state(), _record(name))
        barrier = threading.Barrier(8)
        outcomes: list[str] = []
        lock = threading.Lock()

        def write(i: int) -> None:
            barrier.wait()
            try:
                store.compare_and_set(name, 1, _state(float(10 + i)), _record(name, "promote"))
                outcome = "ok"
            except ConflictError:
                outcome = "conflict"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["conflict"] * 7 + ["ok"]
        current = store.get(name)
        assert current is not None and current.version == 2
        assert len(store.history(name)) == 2

    def test_close_is_idempotent(self) -> None:
        """close() may be called twice."""
        store = self.make_store()
        store.close()
        store.close()


def _batch(
    name: str,
    epoch: int = 1,
    *,
    old: VariantCounts | None = None,
    new: VariantCounts | None = None,
    level: int = 0,
    started_at: float = 1_000.0,
    slots: tuple[SlotCounts, ...] = (),
) -> ObservationBatch:
    variants = {k: v for k, v in (("old", old), ("new", new)) if v is not None}
    return ObservationBatch(name, epoch, started_at, level, variants, slots)


class SharedStoreConformance(StoreConformance):
    """The :class:`~canary_router.stores.SharedStore` contract as tests (it includes :class:`StoreConformance`).

    ::

        class TestMySharedStore(SharedStoreConformance):
            def make_store(self) -> SharedStore:
                return MySharedStore(...)

            def make_peer(self, store: SharedStore) -> SharedStore:
                return MySharedStore(...)  # a second client of the same storage, as another process would open

    ``make_peer`` defaults to returning ``store`` itself; override it so the tests also check that two
    clients of one storage see each other's writes, observations and leases.
    """

    def make_store(self) -> SharedStore:
        """Return a new, empty shared store (override this)."""
        raise NotImplementedError

    def make_peer(self, store: SharedStore) -> SharedStore:
        """Return a second client of ``store``'s storage (default: ``store`` itself)."""
        return store

    def _pair(self) -> tuple[SharedStore, SharedStore]:
        store = self._store()
        assert isinstance(store, SharedStore), f"{type(store).__name__} does not implement SharedStore"
        peer = self.make_peer(store)
        if peer is not store:
            self._stores = [*self._stores, peer]
        return store, peer

    def test_observations_add_up_across_clients(self) -> None:
        """Counts added by two clients sum; histograms add per bucket; unit sets unite."""
        store, peer = self._pair()
        name = self._name("sum")
        assert store.observations(name, 1) is None
        store.add_observations(
            _batch(
                name,
                old=VariantCounts(10, 1, {3: 4, 7: 6}, frozenset({2, 4}), frozenset({4})),
                new=VariantCounts(5, 0, {3: 5}, frozenset({8}), frozenset()),
            )
        )
        peer.add_observations(
            _batch(name, old=VariantCounts(7, 2, {7: 7}, frozenset({4, 6}), frozenset({6})), started_at=900.0)
        )
        snap = store.observations(name, 1)
        assert snap is not None and snap.rollout == name and snap.epoch == 1
        assert (snap.old.requests, snap.old.errors, snap.new.requests, snap.new.errors) == (17, 3, 5, 0)
        assert snap.old.histogram[3] == 4 and snap.old.histogram[7] == 13 and snap.new.histogram[3] == 5
        assert sum(snap.old.histogram) == 17
        assert (snap.old.units, snap.old.units_with_errors, snap.new.units) == (3, 2, 1)
        assert snap.started_at == 900.0, "the earliest step start wins"
        assert peer.observations(name, 1) == snap

    def test_epochs_are_kept_apart(self) -> None:
        """Counts of different steps (epochs) never mix."""
        store, peer = self._pair()
        name = self._name("epochs")
        store.add_observations(_batch(name, 1, old=VariantCounts(3, 1)))
        peer.add_observations(_batch(name, 2, new=VariantCounts(4, 0)))
        one, two = store.observations(name, 1), store.observations(name, 2)
        assert one is not None and two is not None
        assert (one.old.requests, one.new.requests, two.old.requests, two.new.requests) == (3, 0, 0, 4)
        assert store.observations(name, 3) is None

    def test_unit_sample_level_is_the_highest_sent(self) -> None:
        """Unit hashes outside the highest sample level are ignored and the sample is scaled up."""
        store, _ = self._pair()
        name = self._name("sample")
        store.add_observations(_batch(name, old=VariantCounts(4, 0, {}, frozenset({1, 2, 3, 4}))))
        store.add_observations(_batch(name, old=VariantCounts(2, 0, {}, frozenset({6, 8})), level=1))
        snap = store.observations(name, 1)
        assert snap is not None and snap.unit_sample_level == 1
        assert snap.old.units == 4 * 2, "hashes 2, 4, 6, 8 are in the 1/2 sample: 4 × 2"

    def test_history_slots_sum_by_start(self) -> None:
        """History slots from several clients add up per slot start and variant; ``since`` filters."""
        store, peer = self._pair()
        name = self._name("slots")
        store.add_observations(
            _batch(name, slots=(SlotCounts(100.0, "old", 5, 1, {2: 5}), SlotCounts(110.0, "new", 2, 0, {3: 2})))
        )
        peer.add_observations(_batch(name, slots=(SlotCounts(100.0, "old", 3, 0, {2: 1, 4: 2}),)))
        slots = store.observation_history(name)
        assert [s.start for s in slots] == [100.0, 110.0]
        first = slots[0]
        assert first.requests == {"old": 8, "new": 0} and first.errors == {"old": 1, "new": 0}
        assert first.latency["old"] == {2: 6, 4: 2}
        assert slots[1].requests["new"] == 2
        assert [s.start for s in peer.observation_history(name, since=105.0)] == [110.0]

    def test_lease_is_exclusive_renewable_and_fenced(self) -> None:
        """One owner at a time; renewal keeps the token; a new holder gets a higher token; release frees it."""
        store, peer = self._pair()
        name = self._name("lease")
        first = store.acquire_lease(name, "a", 30.0)
        assert first is not None and first.owner == "a"
        assert peer.acquire_lease(name, "b", 30.0) is None
        renewed = peer.acquire_lease(name, "a", 30.0)
        assert renewed is not None and renewed.token == first.token
        peer.release_lease(Lease(name, "b", first.token, 0.0))  # not the holder: nothing happens
        assert store.acquire_lease(name, "b", 30.0) is None
        store.release_lease(first)
        second = peer.acquire_lease(name, "b", 30.0)
        assert second is not None and second.token > first.token

    def test_lease_expires(self) -> None:
        """An expired lease can be taken by another owner, with a higher token."""
        store, peer = self._pair()
        name = self._name("expiry")
        first = store.acquire_lease(name, "a", 0.2)
        assert first is not None
        time.sleep(0.4)
        second = peer.acquire_lease(name, "b", 30.0)
        assert second is not None and second.token > first.token

    def test_fenced_write_needs_the_current_lease(self) -> None:
        """compare_and_set(fence=lease) applies while the lease is current and conflicts once it changed hands."""
        store, peer = self._pair()
        name, lease_name = self._name("fenced"), self._name("fence-lease")
        lease = store.acquire_lease(lease_name, "a", 0.3)
        assert lease is not None
        assert store.compare_and_set(name, None, _state(), _record(name), fence=lease) == 1
        time.sleep(0.5)
        taken = peer.acquire_lease(lease_name, "b", 30.0)
        assert taken is not None
        try:
            store.compare_and_set(name, 1, _state(10.0), _record(name, "promote"), fence=lease)
        except ConflictError:
            pass
        else:
            raise AssertionError("a write fenced by a lost lease must raise ConflictError")
        assert peer.compare_and_set(name, 1, _state(10.0), _record(name, "promote"), fence=taken) == 2
        current = store.get(name)
        assert current is not None and current.version == 2 and current.state.percent == 10.0

    def test_peer_sees_writes_and_hears_changes(self) -> None:
        """A write through one client is read and notified through the other."""
        store, peer = self._pair()
        name = self._name("peer")
        heard = threading.Event()
        unsubscribe = peer.subscribe(lambda changed, versioned: heard.set() if changed == name else None)
        try:
            store.compare_and_set(name, None, _state(), _record(name))
            assert heard.wait(5), "the other client heard no change within 5 s"
            current = peer.get(name)
            assert current is not None and current.version == 1
        finally:
            unsubscribe()

    def test_ping_answers(self) -> None:
        """ping() returns when the store is reachable."""
        store, _ = self._pair()
        store.ping()
