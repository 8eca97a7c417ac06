"""Flask example: the recommender rollout behind canary_router's WSGI middleware.

Run it (from this directory) with ``gunicorn -w 1 -b 127.0.0.1:8000 app:app``; one worker, because the
rollout state lives in an in-memory store, which is per process (several workers need a shared store).
``$CANARY_ROUTER_SECRET`` signs tester overrides and ``$CANARY_ADMIN_TOKEN`` guards the admin endpoint.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from canary_router import Router
from canary_router.wsgi import CanaryMiddleware

HERE = Path(__file__).resolve().parent

router = Router.from_file(HERE / "canary.toml")
app = Flask(__name__)
app.wsgi_app = CanaryMiddleware(  # type: ignore[method-assign]  # Flask's documented way to add WSGI middleware
    app.wsgi_app,
    router=router,
    trusted_proxies=["127.0.0.1"],  # the gateway that sets x-user-id runs on this host
    user_header="x-user-id",
)

CATALOGUE = ["espresso", "croissant", "baguette", "macaron", "eclair", "madeleine"]


def recommend_v1(limit: int = 3) -> dict[str, Any]:
    """The current engine: the best sellers."""
    return {"variant": "old", "items": CATALOGUE[:limit]}


@router.canary("recommender", old=recommend_v1)
def recommend_v2(limit: int = 3) -> dict[str, Any]:
    """The new engine, served to the canary cohort (the decision comes from the request's ambient context)."""
    return {"variant": "new", "items": sorted(CATALOGUE, key=len)[:limit]}


@app.get("/health")
def health() -> str:
    """Liveness probe."""
    return "ok"


@app.get("/recommendations")
def recommendations() -> Response:
    """Recommendations from whichever engine this user is routed to."""
    return jsonify(recommend_v2())


def _authorized() -> bool:
    expected = os.environ.get("CANARY_ADMIN_TOKEN", "")
    given = request.headers.get("Authorization", "")
    return bool(expected) and hmac.compare_digest(given.encode(), f"Bearer {expected}".encode())


@app.post("/admin/rollback")
def rollback() -> tuple[Response, int]:
    """Send everyone back to the old engine (needs ``Authorization: Bearer $CANARY_ADMIN_TOKEN``)."""
    if not _authorized():
        return jsonify(error="unauthorized"), 401
    body = request.get_json(silent=True)
    reason = body.get("reason") if isinstance(body, dict) else None
    status = router.rollback("recommender", reason=str(reason or "manual rollback via /admin/rollback"), actor="admin")
    return jsonify(rollout=status.name, phase=str(status.phase), percent=status.percent), 200
