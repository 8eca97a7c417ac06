"""Process entry points for the SQLite store tests (importable by ``multiprocessing`` spawn children)."""

from __future__ import annotations

import time
from typing import Any

from canary_router import ConflictError
from canary_router.model import AuditRecord, Phase, RolloutState
from canary_router.stores import ObservationBatch, SlotCounts, VariantCounts
from canary_router.stores.sqlite import SQLiteStore


def state(percent: float) -> RolloutState:
    """A running state at ``percent``."""
    return RolloutState(Phase.RUNNING, 0, percent, 1_000.0, "test", "tester", 1, 1_000.0)


def record(name: str, percent: float) -> AuditRecord:
    """An audit record of a change to ``percent``."""
    return AuditRecord(1_000.0, name, "tester", "set", "running", "running", 5.0, percent, "test")


def race(path: str, name: str, index: int, barrier: Any, results: Any) -> None:
    """Wait for every racer, then try to move ``name`` from version 1; report "ok" or "conflict"."""
    store = SQLiteStore(path)
    try:
        barrier.wait(30)
        try:
            store.compare_and_set(name, 1, state(10.0 + index), record(name, 10.0 + index))
            results.put((index, "ok"))
        except ConflictError:
            results.put((index, "conflict"))
    finally:
        store.close()


def add_counts(path: str, name: str, index: int, batches: int, barrier: Any) -> None:
    """Add ``batches`` known batches of observations to epoch 1 of ``name`` (unit hashes unique per process)."""
    store = SQLiteStore(path)
    try:
        barrier.wait(30)
        for b in range(batches):
            unit = (index * 1_000 + b) * 4  # multiples of 4: in every sample up to level 2
            store.add_observations(
                ObservationBatch(
                    name,
                    1,
                    1_000.0 + index,
                    0,
                    {
                        "old": VariantCounts(3, 1, {10: 2, 20: 1}, frozenset({unit}), frozenset({unit})),
                        "new": VariantCounts(2, 0, {10: 2}, frozenset({unit + 2}), frozenset()),
                    },
                    (SlotCounts(100.0 + 10 * (b % 3), "old", 3, 1, {1: 3}),),
                )
            )
    finally:
        store.close()


def listen(path: str, name: str, ready: Any, heard: Any, last: int = 3) -> None:
    """Subscribe (default ``poll_interval``) and report the time each change of ``name`` is heard, until ``last``."""
    store = SQLiteStore(path)

    def on_change(changed: str, versioned: Any) -> None:
        if changed == name:
            heard.put((versioned.version, time.time()))

    store.subscribe(on_change)
    ready.set()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            current = store.get(name)
            if current is not None and current.version >= last:
                time.sleep(0.2)
                return
            time.sleep(0.05)
    finally:
        store.close()


ROUTER_CONFIG: dict[str, Any] = {
    "rollouts": {"r": {"steps": [10, 50, 100], "bake_time": "10m", "guard": {"min_requests": 50}}},
}


def serve_traffic(url: str, first: int, count: int, barrier: Any) -> None:
    """A serving process: route ``count`` users from ``first`` on, observe each call, flush once, close."""
    from canary_router import Router

    router = Router.from_config({**ROUTER_CONFIG, "store": url}, telemetry=None)
    try:
        barrier.wait(30)
        for i in range(first, first + count):
            decision = router.decide("r", {"user_id": f"u{i}"})
            router._observe("r", decision, i % 10 != 0, 0.002)
        router.flush()
    finally:
        router.close()


def control(url: str, index: int, barrier: Any, results: Any) -> None:
    """A controller process: one tick at the same moment as the others; report whether it stood by."""
    from canary_router import Router
    from canary_router.controller import Controller

    router = Router.from_config({**ROUTER_CONFIG, "store": url}, telemetry=None)
    try:
        controller = Controller(router, lease_ttl=30.0)
        barrier.wait(30)
        actions = controller.tick()
        results.put((index, [a.reason for a in actions]))
    finally:
        router.close()
