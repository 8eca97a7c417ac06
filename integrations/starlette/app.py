"""A Starlette app that ships a new recommendation engine to a deterministic slice of its users.

Run it from this directory with ``uvicorn app:app``. ``CanaryMiddleware`` resolves every request: the user id
comes from the ``x-user-id`` header (believed only from the trusted proxy, 127.0.0.1), anonymous visitors get
a visitor cookie, and testers may carry a signed override token (``$CANARY_ROUTER_SECRET``). The decorated
``recommend`` below then serves the new or the old engine by the request's decision, and records each call
for the guard. ``POST /admin/rollback`` with ``Authorization: Bearer $CANARY_ADMIN_TOKEN`` sends everyone
back to the old engine at once.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from canary_router import Router, current_context
from canary_router.asgi import CanaryMiddleware

ROLLOUT = "recommender"

router = Router.from_file(Path(__file__).with_name("canary.toml"))

CATALOGUE = ("espresso", "flat white", "cortado", "matcha", "chai", "filter", "cold brew", "mocha")


async def recommend_v1() -> dict[str, Any]:
    """The old engine: the same best-sellers for everyone."""
    return {"variant": "old", "items": list(CATALOGUE[:3])}


@router.canary(ROLLOUT, old=recommend_v1)
async def recommend() -> dict[str, Any]:
    """The new engine: a per-user pick (the request's context is ambient; no argument is needed)."""
    unit = str(current_context().get("user_id") or current_context().get("session_id") or "")
    start = sum(unit.encode()) % len(CATALOGUE)
    return {"variant": "new", "items": [CATALOGUE[(start + i) % len(CATALOGUE)] for i in range(3)]}


async def health(request: Request) -> Response:
    """Liveness: answers "ok"."""
    return PlainTextResponse("ok")


async def recommendations(request: Request) -> Response:
    """The served variant and its items."""
    return JSONResponse(await recommend())


def _authorized(request: Request) -> bool:
    """True when the request carries ``Authorization: Bearer $CANARY_ADMIN_TOKEN`` (never without a token set)."""
    token = os.environ.get("CANARY_ADMIN_TOKEN", "")
    given = request.headers.get("authorization", "")
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def rollback(request: Request) -> Response:
    """Roll the recommender back (everyone gets the old engine); 401 without the admin token."""
    if not _authorized(request):
        return JSONResponse({"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    reason = request.query_params.get("reason", "manual rollback via POST /admin/rollback")[:200]
    status = router.rollback(ROLLOUT, reason=reason, actor="admin")
    return JSONResponse({"rollout": ROLLOUT, "phase": status.phase.value, "reason": status.reason})


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/recommendations", recommendations),
        Route("/admin/rollback", rollback, methods=["POST"]),
    ],
    middleware=[Middleware(CanaryMiddleware, router=router, trusted_proxies=["127.0.0.1"], user_header="x-user-id")],
)
