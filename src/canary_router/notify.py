"""Notifications of state transitions: Python callbacks and webhooks, delivered off the request path.

A :class:`Notifier` owns one daemon thread and a bounded queue; a slow or failing subscriber never blocks
a transition, and a full queue drops (and counts) the oldest notification instead of growing.
:class:`Webhook` POSTs JSON with a Slack-compatible ``text`` field, with a timeout and retries.
The standard library's ``urllib`` is used so the core keeps only its two dependencies.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from .model import AuditRecord

__all__ = ["Notifier", "Webhook", "format_text"]

_log = logging.getLogger("canary_router")

Subscriber = Callable[[AuditRecord], None]


def format_text(record: AuditRecord) -> str:
    """One human line for chat: ``canary_router: checkout rolled back by controller (5 % → 0 %): <reason>``."""
    verbs = {
        "rollback": "rolled back",
        "promote": "promoted",
        "pause": "paused",
        "resume": "resumed",
        "restart": "restarted",
        "set_percent": "set",
        "start": "started",
    }
    verb = verbs.get(record.action, record.action)
    if record.to_phase == "completed":
        verb = "completed"
    before = "—" if record.from_percent is None else f"{record.from_percent:g} %"
    text = f"canary_router: {record.rollout} {verb} by {record.actor} ({before} → {record.to_percent:g} %)"
    if record.reason:
        text += f": {record.reason}"
    return text


class Webhook:
    """A subscriber that POSTs each transition as JSON to ``url`` (``text`` for Slack, plus the record).

    Delivery happens on the notifier's thread; each attempt has ``timeout`` seconds, and failures are
    retried ``retries`` times with exponential backoff starting at ``backoff`` seconds.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must start with http:// or https://, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.headers = {"Content-Type": "application/json", "User-Agent": "canary-router"}
        self.headers.update(headers or {})
        self.delivered = 0
        self.failed = 0

    def payload(self, record: AuditRecord) -> dict[str, Any]:
        """The JSON body sent for ``record``."""
        return {"text": format_text(record), **record.to_dict()}

    def __call__(self, record: AuditRecord) -> None:
        """Deliver ``record``; raises after the last retry fails."""
        body = json.dumps(self.payload(record), default=str).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")  # noqa: S310
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                    if 200 <= response.status < 300:
                        self.delivered += 1
                        return
                    last = RuntimeError(f"HTTP {response.status}")
            except urllib.error.HTTPError as exc:
                exc.close()  # release the socket of the error response
                last = RuntimeError(f"HTTP {exc.code}")
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = exc
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        self.failed += 1
        raise RuntimeError(f"webhook {self.url} failed after {self.retries + 1} attempts: {last}")

    def __repr__(self) -> str:
        return f"Webhook({self.url!r})"


class Notifier:
    """Delivers transitions to subscribers on a background thread (started lazily, restarted after fork)."""

    def __init__(self, *, max_queue: int = 1000) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._queue: queue.Queue[AuditRecord | None] = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.dropped = 0
        """Notifications dropped because the queue was full."""

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(record)`` for every transition; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    def publish(self, record: AuditRecord) -> None:
        """Queue ``record`` for delivery; never blocks and never raises."""
        if not self._subscribers:
            return
        self._ensure_thread()
        while True:
            try:
                self._queue.put_nowait(record)
                return
            except queue.Full:
                try:  # drop the oldest: the newest transition (say, a rollback) matters most
                    oldest = self._queue.get_nowait()
                    self._queue.task_done()
                except queue.Empty:  # pragma: no cover - drained meanwhile
                    continue
                self.dropped += 1
                name = oldest.rollout if oldest is not None else "?"
                _log.warning("canary_router: notification queue full; dropped the oldest one (for %s)", name)

    def _ensure_thread(self) -> None:
        if os.getpid() != self._pid:  # forked: the parent's thread does not exist here
            self._pid = os.getpid()
            self._thread = None
            self._queue = queue.Queue(maxsize=self._queue.maxsize)
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="canary-router-notify", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        q = self._queue
        while True:
            record = q.get()
            try:
                if record is None:
                    return
                for subscriber in self._subscribers:
                    try:
                        subscriber(record)
                    except Exception:
                        _log.exception("canary_router: notification subscriber %r failed", subscriber)
            finally:
                q.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued notification was delivered (or ``timeout``); True when all were."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Deliver what is queued, then stop the thread."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self.flush()
            self._queue.put(None)
            thread.join(timeout=5)
        self._thread = None
