"""Transition notifications: Python callbacks and webhooks, off the request path, bounded and retried."""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from canary_router import AuditRecord, ConfigError, Controller, Router, Webhook
from canary_router.notify import Notifier, format_text


class Clock:
    """A fake clock."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Hook:
    """A local HTTP endpoint (ThreadingHTTPServer on 127.0.0.1, port 0) that records POSTs.

    ``statuses`` are answered in order (then 200); ``hold`` makes the handler wait (for timeout tests).
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: deque[int] = deque()
        self.hold = threading.Event()
        self.hold.set()
        self.release = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                hook.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": json.loads(body), "at": time.monotonic()}
                )
                if not hook.hold.is_set():
                    hook.release.wait(5)
                status = hook.statuses.popleft() if hook.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def hook() -> Iterator[Hook]:
    """A running local webhook endpoint."""
    server = Hook()
    yield server
    server.close()


@pytest.fixture
def routers() -> Iterator[list[Router]]:
    """Routers built by a test, closed afterwards (stops their notifier threads)."""
    made: list[Router] = []
    yield made
    for router in made:
        router.close()


def make_router(routers: list[Router], **config: Any) -> Router:
    """A router with rollout "r" (steps 5/10/25/50/100) on a fake clock."""
    router = Router.from_config({"rollouts": {"r": {"steps": [5, 10, 25, 50, 100]}}, **config}, clock=Clock())
    routers.append(router)
    return router


def record(**changes: Any) -> AuditRecord:
    """An audit record of a controller rollback."""
    fields: dict[str, Any] = {
        "time": 1_700_000_000.0,
        "rollout": "checkout",
        "actor": "controller",
        "action": "rollback",
        "from_phase": "running",
        "to_phase": "rolled_back",
        "from_percent": 5.0,
        "to_percent": 0.0,
        "reason": "guard failed",
        "details": {"verdict": {"outcome": "fail"}},
        "version": 7,
    }
    fields.update(changes)
    return AuditRecord(**fields)


# ---------------------------------------------------------------------------------------------- callbacks


def test_on_transition_receives_every_audit_record(routers: list[Router]) -> None:
    """Every transition after subscribing reaches the callback, identical to the audit log entry."""
    router = make_router(routers)
    received: list[AuditRecord] = []
    router.on_transition(received.append)
    router.pause("r", actor="alice", reason="lunch")
    router.resume("r", actor="alice")
    router.set_percent("r", 20, actor="bob")
    router.promote("r")
    router.rollback("r", reason="bad", details={"ticket": "INC-1"})
    router.restart("r")
    assert router.notifier.flush(5)
    log = router.status("r").history
    assert [r.to_dict() for r in received] == [r.to_dict() for r in log[1:]]
    assert [r.action for r in received] == ["pause", "resume", "set_percent", "promote", "rollback", "restart"]
    assert [r.version for r in received] == [2, 3, 4, 5, 6, 7]
    assert received[-2].details == {"ticket": "INC-1"}


def test_controller_transitions_are_notified_with_their_numbers(routers: list[Router]) -> None:
    """A controller rollback is delivered to subscribers with the verdict in its details."""
    router = make_router(routers)
    received: list[AuditRecord] = []
    router.on_transition(received.append)
    users = (f"u{i}" for i in range(10**6))
    while len(received) == 0:
        decision = router.decide("r", {"user_id": next(users)})
        router._observe("r", decision, decision.variant == "old", 1e-6)
        Controller(router).tick()
        router.notifier.flush(5)
    [rollback] = received
    assert (rollback.action, rollback.actor) == ("rollback", "controller")
    assert rollback.details["verdict"]["outcome"] == "fail"


def test_unsubscribe_stops_delivery(routers: list[Router]) -> None:
    """The function returned by on_transition removes the callback."""
    router = make_router(routers)
    received: list[AuditRecord] = []
    unsubscribe = router.on_transition(received.append)
    router.pause("r")
    assert router.notifier.flush(5)
    unsubscribe()
    router.resume("r")
    assert router.notifier.flush(5)
    assert [r.action for r in received] == ["pause"]


def test_raising_subscriber_breaks_neither_transitions_nor_other_subscribers(
    routers: list[Router], caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber that raises is logged; the transition succeeds and later subscribers still get the record."""
    router = make_router(routers)

    def broken(rec: AuditRecord) -> None:
        raise RuntimeError("subscriber bug")

    received: list[AuditRecord] = []
    router.on_transition(broken)
    router.on_transition(received.append)
    with caplog.at_level("ERROR", logger="canary_router"):
        assert router.pause("r").phase == "paused"
        assert router.resume("r").phase == "running"
        assert router.notifier.flush(5)
    assert [r.action for r in received] == ["pause", "resume"]
    assert any("subscriber" in m and "failed" in m for m in caplog.messages)


def test_slow_subscriber_does_not_block_transitions(routers: list[Router]) -> None:
    """Delivery runs on the notifier thread: a blocked subscriber does not delay the control call."""
    router = make_router(routers)
    gate = threading.Event()

    def blocked(rec: AuditRecord) -> None:
        gate.wait(5)

    router.on_transition(blocked)
    start = time.monotonic()
    router.pause("r")
    router.resume("r")
    assert time.monotonic() - start < 0.5
    gate.set()
    assert router.notifier.flush(5)


def test_full_queue_drops_and_counts() -> None:
    """With the delivery thread stuck, a bounded queue drops what does not fit and counts it."""
    notifier = Notifier(max_queue=2)
    taken = threading.Event()
    gate = threading.Event()
    delivered: list[int] = []

    def slow(rec: AuditRecord) -> None:
        taken.set()
        gate.wait(5)
        delivered.append(rec.version)

    notifier.subscribe(slow)
    notifier.publish(record(version=1))
    assert taken.wait(5)  # the thread holds record 1; the queue is empty again
    for version in range(2, 7):
        notifier.publish(record(version=version))
    assert notifier.dropped == 3
    gate.set()
    assert notifier.flush(5)
    assert len(delivered) == 3
    notifier.close()


def test_full_queue_drops_the_oldest_and_keeps_the_latest() -> None:
    """As documented, a full queue drops the oldest notification, so the latest transition is delivered."""
    notifier = Notifier(max_queue=2)
    taken = threading.Event()
    gate = threading.Event()
    delivered: list[int] = []

    def slow(rec: AuditRecord) -> None:
        taken.set()
        gate.wait(5)
        delivered.append(rec.version)

    notifier.subscribe(slow)
    notifier.publish(record(version=1))
    assert taken.wait(5)
    for version in range(2, 7):
        notifier.publish(record(version=version))
    gate.set()
    assert notifier.flush(5)
    notifier.close()
    assert delivered[-1] == 6


def test_publish_without_subscribers_starts_no_thread() -> None:
    """Nothing is queued (and no thread started) when nobody listens."""
    notifier = Notifier()
    notifier.publish(record())
    assert notifier._thread is None
    assert notifier.flush(0.1)


# ---------------------------------------------------------------------------------------------- webhooks


def test_format_text_is_one_human_line() -> None:
    """The Slack text names rollout, verb, actor, the percentage change and the reason."""
    assert format_text(record()) == "canary_router: checkout rolled back by controller (5 % → 0 %): guard failed"
    done = record(action="promote", to_phase="completed", from_percent=100.0, to_percent=100.0, reason="")
    assert format_text(done) == "canary_router: checkout completed by controller (100 % → 100 %)"
    start = record(action="start", from_percent=None, to_percent=5.0, reason="")
    assert format_text(start) == "canary_router: checkout started by controller (— → 5 %)"


def test_webhook_posts_slack_text_and_the_record(hook: Hook) -> None:
    """The webhook POSTs JSON with a Slack-compatible "text" and every field of the audit record."""
    webhook = Webhook(hook.url, headers={"Authorization": "Bearer t0ken"})
    rec = record()
    webhook(rec)
    assert (webhook.delivered, webhook.failed) == (1, 0)
    [request] = hook.requests
    assert request["path"] == "/hook"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["Authorization"] == "Bearer t0ken"
    body = request["body"]
    assert body["text"] == format_text(rec)
    for key, value in rec.to_dict().items():
        assert body[key] == value
    assert body["details"] == {"verdict": {"outcome": "fail"}}


def test_webhook_retries_after_server_errors_then_succeeds(hook: Hook) -> None:
    """HTTP 500 answers are retried with backoff until the endpoint accepts the notification."""
    hook.statuses.extend([500, 500])
    webhook = Webhook(hook.url, retries=3, backoff=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        webhook(record())
        gc.collect()
    assert (webhook.delivered, webhook.failed) == (1, 0)
    assert len(hook.requests) == 3
    gaps = [b["at"] - a["at"] for a, b in zip(hook.requests, hook.requests[1:], strict=False)]
    assert gaps[0] >= 0.02
    assert gaps[1] >= 0.04


def test_webhook_gives_up_after_its_retries(hook: Hook) -> None:
    """After retries + 1 failed attempts (with a short exponential backoff) it raises and counts a failure."""
    hook.statuses.extend([500] * 10)
    webhook = Webhook(hook.url, retries=2, backoff=0.05)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(RuntimeError, match="failed after 3 attempts"):
            webhook(record())
        gc.collect()
    elapsed = time.monotonic() - start
    assert (webhook.delivered, webhook.failed) == (0, 1)
    assert len(hook.requests) == 3
    assert 0.15 <= elapsed < 2.0


def test_webhook_timeout_is_honoured(hook: Hook) -> None:
    """An endpoint that does not answer is abandoned after ``timeout`` seconds per attempt."""
    hook.hold.clear()
    webhook = Webhook(hook.url, timeout=0.2, retries=0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="failed after 1 attempts"):
        webhook(record())
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.5
    assert webhook.failed == 1


def test_webhook_rejects_non_http_urls() -> None:
    """Only http(s) URLs are accepted."""
    with pytest.raises(ValueError):
        Webhook("file:///etc/passwd")


def test_webhook_error_responses_do_not_leak_sockets(hook: Hook) -> None:
    """Retrying after an HTTP error closes that response's connection (no ResourceWarning)."""
    hook.statuses.append(500)
    webhook = Webhook(hook.url, retries=1, backoff=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        webhook(record())
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_config_webhooks_receive_transitions(routers: list[Router], hook: Hook) -> None:
    """notifications.webhooks in the config builds webhooks (with its timeout and retries) that get transitions."""
    router = make_router(routers, notifications={"webhooks": [hook.url], "timeout": "2s", "retries": 1})
    webhooks = [s for s in router.notifier._subscribers if isinstance(s, Webhook)]
    assert [(w.url, w.timeout, w.retries) for w in webhooks] == [(hook.url, 2.0, 1)]
    router.pause("r", actor="alice", reason="maintenance")
    assert router.notifier.flush(5)
    start, request = hook.requests
    assert start["body"]["action"] == "start"
    body = request["body"]
    assert body["text"] == "canary_router: r paused by alice (5 % → 5 %): maintenance"
    assert (body["rollout"], body["action"], body["actor"], body["to_phase"]) == ("r", "pause", "alice", "paused")
    assert body["version"] == router.status("r").version


def test_config_webhooks_hear_that_a_rollout_started(routers: list[Router], hook: Hook) -> None:
    """The first-seen "start" transition is an audit record too, and reaches the configured webhooks."""
    router = make_router(routers, notifications={"webhooks": [hook.url]})
    assert router.notifier.flush(5)
    assert [r["body"]["action"] for r in hook.requests] == ["start"]


def test_failing_config_webhook_does_not_break_transitions(routers: list[Router]) -> None:
    """A webhook whose endpoint refuses connections is counted as failed, and the transition still happens."""
    with socket.socket() as probe:  # a port that was just free: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    router = make_router(routers, notifications={"webhooks": [f"http://127.0.0.1:{port}/"], "retries": 0})
    [webhook] = [s for s in router.notifier._subscribers if isinstance(s, Webhook)]
    assert router.pause("r").phase == "paused"
    assert router.notifier.flush(5)
    assert (webhook.delivered, webhook.failed) == (0, 2)  # the "start" record and the pause
    assert router.status("r").phase == "paused"


@pytest.mark.parametrize(
    ("notifications", "path"),
    [
        ({"webhooks": ["ftp://example.com"]}, "notifications.webhooks[0]"),
        ({"webhooks": "http://example.com"}, "notifications.webhooks"),
        ({"retries": 11}, "notifications.retries"),
        ({"timeout": "soon"}, "notifications.timeout"),
        ({"webhook": []}, "notifications.webhook"),
    ],
)
def test_bad_notifications_config_names_the_path(notifications: dict[str, Any], path: str) -> None:
    """Invalid notification settings are ConfigErrors naming their exact path."""
    with pytest.raises(ConfigError) as caught:
        Router.from_config({"rollouts": {"r": {}}, "notifications": notifications})
    assert [i.path for i in caught.value.issues] == [path]
