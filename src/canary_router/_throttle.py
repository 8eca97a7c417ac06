"""A warning logger that says each kind of problem at most once a minute, so bad input cannot flood logs."""

from __future__ import annotations

import logging
import math
import time

__all__ = ["Throttled"]


class Throttled:
    """Log ``message`` at WARNING level at most once per ``interval`` seconds per ``kind``; never raises."""

    __slots__ = ("_interval", "_last", "_logger", "_prefix")

    def __init__(self, logger: logging.Logger, prefix: str, interval: float = 60.0) -> None:
        self._logger = logger
        self._prefix = prefix
        self._interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, message: str) -> None:
        try:
            now = time.monotonic()
            if now - self._last.get(kind, -math.inf) >= self._interval:
                self._last[kind] = now
                self._logger.warning("%s%s", self._prefix, message)
        except Exception:  # pragma: no cover - logging itself failed  # noqa: S110
            pass
