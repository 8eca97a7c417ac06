"""Helpers for smoke tests that run an example app under a real server on a free localhost port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SECRET = "smoke-test-secret-0123456789"
ADMIN_TOKEN = "smoke-admin-token"


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(command: Sequence[str], port: int, *, cwd: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``command`` (a server listening on ``port``), wait until it answers, yield its base URL, stop it."""
    environment = {**os.environ, "CANARY_ROUTER_SECRET": SECRET, "CANARY_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), environment.get("PYTHONPATH")]))
    process = subprocess.Popen(
        list(command), cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                output = process.stdout.read() if process.stdout else ""
                raise RuntimeError(f"server exited with {process.returncode}:\n{output}")
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not answer within 30 s") from None
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()


def python_module(module: str, *args: str) -> list[str]:
    """A command line that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
