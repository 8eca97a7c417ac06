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
from .stores.base import Store, Versioned

if TYPE_CHECKING:
    from .router import Router

__all__ = ["RecordingObserver", "StoreConformance", "force"]


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
