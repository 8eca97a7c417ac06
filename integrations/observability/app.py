"""A Starlette app whose canary rollout is observable in Prometheus through OpenTelemetry.

Run it from this directory with ``uvicorn app:app``. It is the ``integrations/starlette`` pattern (a
``CanaryMiddleware`` that believes ``x-user-id`` from 127.0.0.1, and a ``recommend`` function decorated with
``@router.canary("recommender", old=recommend_v1)``) plus the OpenTelemetry SDK: a ``MeterProvider`` whose
``PrometheusMetricReader`` (``opentelemetry-exporter-prometheus``) is served at ``GET /metrics``, handed to the
router through ``canary_router.Telemetry(meter_provider=...)``. One call in twenty of the new engine fails, so
the failure series (``error_type``) and the alert rules have something to see.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from canary_router import Router, Telemetry, current_context
from canary_router.asgi import ASGIApp, CanaryMiddleware, Receive, Scope, Send

ROLLOUT = "recommender"
FAILURE_EVERY = 20
"""One call in this many of the new engine raises :class:`RecommenderUnavailable`."""

# The reader registers with prometheus_client's default registry, which make_asgi_app() serves (with the
# process and GC metrics prometheus_client adds there). Exporter 0.52b0 or later: older ones put the label
# values of series that lack error.type under the wrong label names.
meter_provider = MeterProvider(
    resource=Resource.create({"service.name": "recommender-example"}),
    metric_readers=[PrometheusMetricReader()],
)
router = Router.from_file(Path(__file__).with_name("canary.toml"), telemetry=Telemetry(meter_provider=meter_provider))

CATALOGUE = ("espresso", "flat white", "cortado", "matcha", "chai", "filter", "cold brew", "mocha")
_new_calls = itertools.count(1)


class RecommenderUnavailable(RuntimeError):
    """The new engine failed (on purpose, one call in :data:`FAILURE_EVERY`)."""


def _unit() -> str:
    """The request's user id (the decorated functions need no argument: the context is ambient)."""
    return str(current_context().get("user_id") or "")


async def recommend_v1() -> dict[str, Any]:
    """The old engine: the same best-sellers for everyone, in 1-3 ms."""
    await asyncio.sleep(0.001 + (sum(_unit().encode()) % 3) / 1000)
    return {"variant": "old", "items": list(CATALOGUE[:3])}


@router.canary(ROLLOUT, old=recommend_v1)
async def recommend() -> dict[str, Any]:
    """The new engine: a per-user pick in 2-5 ms; one call in twenty fails."""
    start = sum(_unit().encode()) % len(CATALOGUE)
    await asyncio.sleep(0.002 + start % 4 / 1000)
    if next(_new_calls) % FAILURE_EVERY == 0:
        raise RecommenderUnavailable("the new engine timed out")
    return {"variant": "new", "items": [CATALOGUE[(start + i) % len(CATALOGUE)] for i in range(3)]}


async def health(request: Request) -> Response:
    """Liveness: answers "ok"."""
    return PlainTextResponse("ok")


async def recommendations(request: Request) -> Response:
    """The served variant and its items; 503 when the engine failed (the failure is already recorded)."""
    try:
        return JSONResponse(await recommend())
    except RecommenderUnavailable as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)


class ASGIEndpoint:
    """An ASGI app as a ``Route`` endpoint: served at its exact path (a ``Mount`` redirects to ``/metrics/``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Hand the request to the wrapped app."""
        await self.app(scope, receive, send)


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/recommendations", recommendations),
        Route("/metrics", ASGIEndpoint(make_asgi_app())),  # prometheus_client's exposition app
    ],
    middleware=[
        Middleware(
            CanaryMiddleware,
            router=router,
            trusted_proxies=["127.0.0.1"],
            user_header="x-user-id",
            visitor_cookie=None,  # users are bucketed by x-user-id only; scrapers get no cookie
        )
    ],
)
