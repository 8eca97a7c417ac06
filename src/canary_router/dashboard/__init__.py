"""The rollout dashboard: a pure ASGI app (no framework) to mount in your application or run on its own.

Mounted under a path of a Starlette or FastAPI app::

    from starlette.routing import Mount
    from canary_router.dashboard import Dashboard

    routes = [..., Mount("/_canary", app=Dashboard(router, token=os.environ["CANARY_DASHBOARD_TOKEN"]))]

Standalone (the ``dashboard`` extra brings uvicorn)::

    from canary_router.dashboard import serve

    serve(router, host="127.0.0.1", port=8050, token=os.environ["CANARY_DASHBOARD_TOKEN"])

Pages, scripts and styles ship inside the package: no CDN, nothing fetched from elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._app import ACTIONS, Dashboard

if TYPE_CHECKING:
    from ..router import Router

__all__ = ["ACTIONS", "Dashboard", "serve"]


def serve(
    router: Router,
    *,
    host: str = "127.0.0.1",
    port: int = 8050,
    token: str | None = None,
    **options: Any,
) -> None:
    """Serve a :class:`Dashboard` of ``router`` with uvicorn on ``host:port`` until interrupted (blocking).

    Without ``token`` (and without an ``authenticate`` callable among ``options``) it is read-only.
    ``options`` are further :class:`Dashboard` keywords (``title``, ``poll_interval``, ...). Needs the
    ``dashboard`` extra (``pip install 'canary-router[dashboard]'``).
    """
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "canary_router.dashboard.serve needs uvicorn: pip install 'canary-router[dashboard]'"
        ) from exc
    app = Dashboard(router, token=token, **options)
    uvicorn.run(app, host=host, port=port, lifespan="on", ws="none", log_level="info")
