"""Shadow runs: serve the old result, run the new version alongside, compare, and record both.

Sync code runs the new version on a small bounded thread pool (a full pool skips the shadow run and
counts it, so the user's call never waits); async code runs it as a background task. Either way the
user's response waits for nothing but the hand-off.
"""

from __future__ import annotations

import os
import reprlib
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["Mismatch", "ShadowPool", "ShadowStats"]

_repr = reprlib.Repr()
_repr.maxstring = 200
_repr.maxother = 200
_repr.maxlist = 10
_repr.maxdict = 10


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One sampled disagreement between the old and the new result (reprs, truncated)."""

    time: float
    arguments: str
    old: str
    new: str


class ShadowStats:
    """Counts of shadow runs of one rollout, and a sample of the latest mismatches."""

    def __init__(self, *, samples: int = 20) -> None:
        self._lock = threading.Lock()
        self.compared = 0
        """Shadow runs whose result was compared with the old one."""
        self.mismatched = 0
        """Comparisons that disagreed."""
        self.errors = 0
        """Shadow runs of the new version that raised or timed out."""
        self.timeouts = 0
        """Shadow runs that exceeded the timeout."""
        self.skipped = 0
        """Shadow runs not started because the pool or the task budget was full."""
        self.samples: deque[Mismatch] = deque(maxlen=samples)

    def _add(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def mismatch(self, time: float, args: tuple[Any, ...], kwargs: dict[str, Any], old: Any, new: Any) -> None:
        """Count a mismatch and keep a sample of it."""
        try:
            arguments = ", ".join(
                [*(_repr.repr(a) for a in args), *(f"{k}={_repr.repr(v)}" for k, v in kwargs.items())]
            )
            sample = Mismatch(time, arguments, _repr.repr(old), _repr.repr(new))
        except Exception:  # pragma: no cover - a hostile __repr__
            sample = Mismatch(time, "<unrepresentable>", "<unrepresentable>", "<unrepresentable>")
        with self._lock:
            self.compared += 1
            self.mismatched += 1
            self.samples.append(sample)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary with the mismatch samples."""
        with self._lock:
            return {
                "compared": self.compared,
                "mismatched": self.mismatched,
                "errors": self.errors,
                "timeouts": self.timeouts,
                "skipped": self.skipped,
                "samples": [
                    {"time": m.time, "arguments": m.arguments, "old": m.old, "new": m.new} for m in self.samples
                ],
            }


class ShadowPool:
    """A bounded thread pool: ``try_submit`` refuses work instead of queueing without limit. Fork-safe."""

    def __init__(self, *, workers: int = 4, max_pending: int = 64) -> None:
        self._workers = workers
        self.max_pending = max_pending
        """At most this many runs wait or run at once (may be changed at any time)."""
        self._lock = threading.Lock()
        self._pending = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()

    def try_submit(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the pool unless ``max_pending`` runs are already waiting or running."""
        with self._lock:
            if os.getpid() != self._pid:  # forked: the parent's threads do not exist here
                self._pid = os.getpid()
                self._pool = None
                self._pending = 0
            if self._pending >= self.max_pending:
                return False
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="canary-router-shadow")
            self._pending += 1
            pool = self._pool

        def run() -> None:
            try:
                fn(*args)
            finally:
                with self._lock:
                    self._pending -= 1

        try:
            pool.submit(run)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._pending -= 1
            return False
        return True

    @property
    def pending(self) -> int:
        """Shadow runs waiting or running."""
        return self._pending

    def shutdown(self, wait: bool = True) -> None:
        """Stop the pool (waiting for running shadow calls when ``wait``)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait)
