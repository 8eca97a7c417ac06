"""Redis for the tests: the shared server (each test under its own key prefix) and private servers to kill.

The shared server is ``CANARY_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). When it does not
answer, a private ``redis-server`` is started for the session if the binary is on PATH; otherwise the
Redis tests are skipped with the reason, except under ``CI=true``, where they fail: CI must test Redis.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

SHARED_URL = os.environ.get("CANARY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

_session_server: RedisServer | None = None
_shared_url: str | None = None


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def shared_url() -> str:
    """The URL of a Redis the tests may share (under their own prefixes); skip or fail when there is none."""
    global _shared_url, _session_server  # noqa: PLW0603 - one server per test session
    if _shared_url is not None:
        return _shared_url
    if _answers(SHARED_URL):
        _shared_url = SHARED_URL
        return _shared_url
    if shutil.which("redis-server"):
        _session_server = RedisServer()
        _session_server.start()
        atexit.register(stop_session_server)
        _shared_url = _session_server.url
        return _shared_url
    reason = f"no Redis answers at {SHARED_URL} and redis-server is not on PATH"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: the Redis tests must run, but {reason}")
    pytest.skip(reason)


def new_prefix(label: str = "test") -> str:
    """A key prefix no other test (or test run) uses."""
    return f"canary-test-{label}-{uuid.uuid4().hex[:12]}"


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` (never the whole database: the server is shared)."""
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    except redis.RedisError:
        pass
    finally:
        client.close()


def require_redis_server() -> str:
    """The path of the redis-server binary; skip (or fail under CI) without it."""
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true: redis-server must be on PATH for the fault tests")
        pytest.skip("redis-server is not on PATH")
    return path


class RedisServer:
    """A private redis-server on a free port, without persistence, that a test may kill and restart."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="canary-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server (empty: nothing is saved or loaded) and wait until it answers."""
        binary = require_redis_server()
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _answers(self.url):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> None:
        """Start again on the same port, empty."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A private server for one test, stopped afterwards."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def stop_session_server() -> None:
    """Stop the session's private server, if one was started."""
    global _session_server  # noqa: PLW0603
    if _session_server is not None:
        _session_server.stop()
        _session_server = None
