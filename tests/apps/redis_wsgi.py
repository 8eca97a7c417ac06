"""A WSGI app for the pre-fork test: each request answers with the worker's pid and its decision.

Built at import time, so under ``gunicorn --preload`` the router (and its store) exist before the fork.
The store URL comes from ``CANARY_ROUTER_STORE``; ``refresh_interval`` in it is set high by the test, and
the router's is set high here, so only the change channel can bring a change in time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from canary_router import Rollout, Router
from canary_router.stores import open_store

# the router's own periodic re-read is made rare too: only the store's change channel can be in time
router = Router([Rollout("checkout", steps=(100.0,))], store=open_store(), telemetry=None, refresh_interval=3600)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer ``{"pid", "variant", "reason"}`` for a fixed user; ``?hold=S`` keeps the worker busy S seconds first.

    Holding lets a test reach every worker: while one is busy, the next request goes to another.
    """
    hold = parse_qs(environ.get("QUERY_STRING", "")).get("hold")
    if hold:
        time.sleep(min(float(hold[0]), 2.0))
    decision = router.decide("checkout", {"user_id": "user-1"})
    body = json.dumps({"pid": os.getpid(), "variant": decision.variant, "reason": decision.reason}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
