"""The store contract: MemoryStore passes the conformance suite that third-party stores run too."""

from __future__ import annotations

from canary_router import MemoryStore
from canary_router.stores import SharedStore
from canary_router.testing import SharedStoreConformance, StoreConformance


class TestMemoryStore(SharedStoreConformance):
    """MemoryStore keeps the Store and SharedStore contracts (it is their reference implementation)."""

    def make_store(self) -> SharedStore:
        return MemoryStore()


class BrokenStore(MemoryStore):
    """A store that ignores expected versions: the suite must catch it."""

    def compare_and_set(self, name, expected_version, state, record):  # type: ignore[no-untyped-def]
        current = self.get(name)
        return super().compare_and_set(name, None if current is None else current.version, state, record)


def test_the_suite_catches_a_store_that_ignores_versions() -> None:
    """The conformance suite fails for a store whose compare-and-set does not compare."""
    suite = type("TestBroken", (StoreConformance,), {"make_store": lambda self: BrokenStore()})()
    failures = 0
    for test in ("test_create_only_when_absent", "test_stale_version_conflicts_and_changes_nothing"):
        try:
            getattr(suite, test)()
        except AssertionError:
            failures += 1
        finally:
            suite.teardown_method()
    assert failures == 2
