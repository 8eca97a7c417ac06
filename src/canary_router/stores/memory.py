"""The in-process reference store: the default, for one process."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ..errors import ConflictError
from ..model import AuditRecord, RolloutState
from .base import Versioned

__all__ = ["MemoryStore"]

_log = logging.getLogger("canary_router")


class MemoryStore:
    """Keeps rollout state in this process's memory. Thread-safe; the audit log is bounded per rollout."""

    def __init__(self, *, max_history: int = 1000) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be at least 1, got {max_history!r}")
        self._lock = threading.Lock()
        self._states: dict[str, Versioned] = {}
        self._history: dict[str, deque[AuditRecord]] = {}
        self._max_history = max_history
        self._subscribers: tuple[Callable[[str, Versioned], None], ...] = ()

    def get(self, name: str) -> Versioned | None:
        """Return the state of ``name`` and its version, or ``None``."""
        return self._states.get(name)

    def get_all(self) -> dict[str, Versioned]:
        """Return every rollout's state and version."""
        with self._lock:
            return dict(self._states)

    def compare_and_set(self, name: str, expected_version: int | None, state: RolloutState, record: AuditRecord) -> int:
        """Write ``state`` and append ``record`` if the version still is ``expected_version``."""
        with self._lock:
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

    def close(self) -> None:
        """Drop the subscribers. The state stays readable."""
        with self._lock:
            self._subscribers = ()
