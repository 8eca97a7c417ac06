"""A WSGI app for the pre-fork test: one router on the store ``CANARY_ROUTER_STORE`` names, made at import.

Under ``gunicorn --preload`` the import (and so the store and its watcher) happens in the master, before
the workers are forked. ``/decide?user=ID`` answers ``"<variant> <pid>"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from canary_router import Router

router = Router.from_config({"rollouts": {"checkout": {"steps": [100]}}}, telemetry=None)  # the store: from the env


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Serve ``/health`` and ``/decide?user=ID``."""
    if environ.get("PATH_INFO") == "/health":
        body = b"ok"
    else:
        user = parse_qs(environ.get("QUERY_STRING", "")).get("user", ["user-1"])[0]
        body = f"{router.decide('checkout', {'user_id': user}).variant} {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
