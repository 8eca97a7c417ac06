"""Views: a health check, the recommendations served by the canary, and an authenticated rollback.

``recommend`` is decorated with the process's router (``get_router()``, built from ``settings.CANARY_ROUTER``):
it runs the new engine or the old one by the request's decision, which ``CanaryMiddleware`` made ambient, so
no argument carries it. ``POST /admin/rollback`` with ``Authorization: Bearer $CANARY_ADMIN_TOKEN`` sends
everyone back to the old engine at once.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from canary_router import current_context
from canary_router.django import get_router

ROLLOUT = "recommender"

CATALOGUE = ("espresso", "flat white", "cortado", "matcha", "chai", "filter", "cold brew", "mocha")


def recommend_v1() -> dict[str, Any]:
    """The old engine: the same best-sellers for everyone."""
    return {"variant": "old", "items": list(CATALOGUE[:3])}


@get_router().canary(ROLLOUT, old=recommend_v1)
def recommend() -> dict[str, Any]:
    """The new engine: a per-user pick (the request's context is ambient; no argument is needed)."""
    context = current_context()
    unit = str(context.get("user_id") or context.get("session_id") or "")
    start = sum(unit.encode()) % len(CATALOGUE)
    return {"variant": "new", "items": [CATALOGUE[(start + i) % len(CATALOGUE)] for i in range(3)]}


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    """Liveness: answers "ok"."""
    return HttpResponse("ok", content_type="text/plain")


@require_GET
def recommendations(request: HttpRequest) -> HttpResponse:
    """The served variant and its items."""
    return JsonResponse(recommend())


def _authorized(request: HttpRequest) -> bool:
    """True when the request carries ``Authorization: Bearer $CANARY_ADMIN_TOKEN`` (never without a token set)."""
    token = os.environ.get("CANARY_ADMIN_TOKEN", "")
    given = request.headers.get("Authorization", "")
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


@csrf_exempt
@require_POST
def rollback(request: HttpRequest) -> HttpResponse:
    """Roll the recommender back (everyone gets the old engine); 401 without the admin token."""
    if not _authorized(request):
        response = JsonResponse({"error": "unauthorized"}, status=401)
        response["WWW-Authenticate"] = "Bearer"
        return response
    reason = request.GET.get("reason", "manual rollback via POST /admin/rollback")[:200]
    status = get_router().rollback(ROLLOUT, reason=reason, actor="admin")
    return JsonResponse({"rollout": ROLLOUT, "phase": status.phase.value, "reason": status.reason})
