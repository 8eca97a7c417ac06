"""The same request bytes give the same bucket under every adapter."""

from __future__ import annotations

import asyncio
from typing import Any

from canary_router import Router, bucket
from canary_router.asgi import CanaryMiddleware as AsgiMiddleware
from canary_router.wsgi import CanaryMiddleware as WsgiMiddleware
from canary_router.wsgi import decisions as wsgi_decisions

USER = "josé-😀"
CONFIG = {"rollouts": {"r": {"steps": [50, 100]}}}


def run_asgi(on_request: Any, raw_user: bytes) -> None:
    """Send one GET through the ASGI middleware from a trusted peer; ``on_request(scope)`` runs in the app."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        on_request(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = AsgiMiddleware(
        app, router=Router.from_config(CONFIG), trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "scheme": "http",
        "query_string": b"",
        "client": ("127.0.0.1", 5000),
        "headers": [(b"x-user-id", raw_user)],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        return None

    asyncio.run(middleware(scope, receive, send))


def asgi_bucket(raw_user: bytes) -> int | None:
    """Send one request through the ASGI middleware and return the bucket decided for rollout r."""
    seen: dict[str, Any] = {}
    run_asgi(lambda scope: seen.update(decision=scope["state"]["canary"]["r"]), raw_user)
    return seen["decision"].bucket


def wsgi_bucket(raw_user: bytes) -> int | None:
    """Send one request through the WSGI middleware (PEP 3333: header bytes as latin-1) and return the bucket."""
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["decision"] = wsgi_decisions(environ)["r"]
        start_response("200 OK", [])
        return [b""]

    middleware = WsgiMiddleware(
        app, router=Router.from_config(CONFIG), trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "HTTP_X_USER_ID": raw_user.decode("latin-1"),
    }
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    list(body)
    return seen["decision"].bucket


def test_utf8_user_ids_bucket_identically_under_asgi_and_wsgi() -> None:
    """A UTF-8 user id header is decoded as UTF-8 by both adapters, so both bucket it like bucket() does."""
    raw = USER.encode("utf-8")
    assert asgi_bucket(raw) == wsgi_bucket(raw) == bucket("r", USER)


def test_non_utf8_header_is_dropped_by_both_adapters() -> None:
    """A user id header that is not UTF-8 is dropped by both adapters (no bucket from mangled text)."""
    raw = b"\xff\xfeuser"
    assert asgi_bucket(raw) != bucket("r", raw.decode("latin-1"))
    assert wsgi_bucket(raw) != bucket("r", raw.decode("latin-1"))


def test_asgi_lays_the_request_context_over_an_enclosing_one() -> None:
    """An ambient context set around the ASGI app survives: the request's attributes are laid over it."""
    from canary_router import current_context, use_context

    seen: dict[str, Any] = {}
    with use_context(tenant="acme"):
        run_asgi(lambda scope: seen.update(current_context()), b"u7")
    assert (seen["tenant"], seen["user_id"]) == ("acme", "u7")
