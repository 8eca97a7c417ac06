"""A live simulated rollout for the dashboard's tests, and a real uvicorn server on a free localhost port.

The traffic goes through the real decorator (decision, routing, timing, error capture, aggregation); only
the users, the failures and the clock are simulated. The clock runs fast (one simulated ``step`` seconds per
tick), so the 10-second history slots of the charts fill in a fraction of a real second.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import uvicorn

from canary_router import Router
from webserver import free_port

TOKEN = "dashboard-test-token-0123456789"
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z

CONFIG: dict[str, Any] = {
    "rollouts": {
        "checkout": {
            "description": "Checkout v2",
            "steps": [5, 25, 50, 100],
            "bake_time": "1h",
            "guard": {"min_requests": 50},
        },
        "search": {"description": "Search ranking", "steps": [10, 50, 100], "start": "paused"},
    }
}


class FastClock:
    """A thread-safe clock that only moves when told to."""

    def __init__(self, start: float = START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def make_router(clock: FastClock | None = None) -> Router:
    """A router with two rollouts ("checkout" running at 5 %, "search" paused) on the given clock."""
    return Router.from_config(CONFIG, clock=clock or FastClock(), telemetry=None)


class Traffic:
    """Calls a decorated function for random users on a background thread, advancing the clock as it goes.

    ``checkout``'s split is raised to 50 % so both versions get plenty of requests; the new version is a
    little slower and fails a little more often. Bounded: it stops after ``max_seconds`` of real time.
    """

    def __init__(
        self,
        router: Router,
        clock: FastClock,
        *,
        per_tick: int = 40,
        step: float = 2.0,
        pause: float = 0.02,
        max_seconds: float = 120.0,
    ) -> None:
        self.router = router
        self.clock = clock
        self.per_tick = per_tick
        self.step = step
        self.pause = pause
        self.max_seconds = max_seconds
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-traffic", daemon=True)
        self._rng = random.Random(7)  # simulated traffic, not secrets

        def charge_v1(user_id: str) -> str:
            time.sleep(0.0004)
            if self._rng.random() < 0.01:
                raise RuntimeError("v1 failed")
            return "ok"

        @router.canary("checkout", old=charge_v1, context_from="user_id")
        def charge_v2(user_id: str) -> str:
            time.sleep(0.0008)
            if self._rng.random() < 0.03:
                raise RuntimeError("v2 failed")
            return "ok"

        self._call = charge_v2

    def __enter__(self) -> Traffic:
        self.router.set_percent("checkout", 50, actor="test", reason="enough traffic on both versions")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            for _ in range(self.per_tick):
                user = f"user-{self._rng.randrange(5000)}"
                with suppress(RuntimeError):  # the simulated failures are counted by the decorator
                    self._call(user)
                self.calls += 1
            self.clock.advance(self.step)
            self._stop.wait(self.pause)


@contextmanager
def running(app: Any, *, root_path: str = "") -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", ws="none", root_path=root_path
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
