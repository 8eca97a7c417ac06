"""CanaryMiddleware (pure ASGI): decisions, ambient context, cookies, split mode, bad input, and a real server.

The in-process tests run real Starlette apps through the middleware with ``httpx.ASGITransport`` (or raw ASGI
calls where the input must be malformed on purpose); the smoke tests start ``integrations/starlette`` under
a real uvicorn and drive it over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from canary_router import Router, UnknownRolloutError, bucket, current_context
from canary_router.asgi import CanaryMiddleware, WebOptionKeywords
from canary_router.overrides import create_token
from canary_router.testing import RecordingObserver
from canary_router.web import WebOptions
from webserver import ADMIN_TOKEN, ROOT, SECRET, free_port, python_module, serve

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

KEY = "in-process-test-secret-0123456789"
OTHER_KEY = "somebody-elses-secret-0123456789"
CONFIG: dict[str, Any] = {
    "rollouts": {
        "recommender": {"steps": [25, 50, 100], "stickiness": ["user_id", "session_id"]},
        "checkout-v2": {"steps": [50, 100]},
    }
}
EXAMPLE = ROOT / "integrations" / "starlette"


@pytest.fixture
def router() -> Iterator[Router]:
    """A fresh router over the two test rollouts (recommender at 25 %, checkout-v2 at 50 %)."""
    with Router.from_config(CONFIG) as built:
        yield built


def expected(rollout: str, unit: str, percent: float) -> str:
    """The variant the v1 bucketing spec gives ``unit`` at ``percent``."""
    return "new" if bucket(rollout, unit) < round(percent * 100) else "old"


def users(rollout: str, variant: str, count: int) -> list[str]:
    """The first ``count`` user ids ``u0, u1, ...`` that ``rollout`` at its first step puts on ``variant``."""
    percent = CONFIG["rollouts"][rollout]["steps"][0]
    found = [f"u{i}" for i in range(10_000) if expected(rollout, f"u{i}", percent) == variant]
    return found[:count]


def state_app(router: Router) -> Starlette:
    """A Starlette app whose endpoints report what the middleware gave them."""

    def recommend_v1() -> str:
        return "old"

    @router.canary("recommender", old=recommend_v1)
    def recommend_v2() -> str:
        return "new"

    async def recommend_v1_async() -> str:
        await asyncio.sleep(0)
        return "old"

    @router.canary("recommender", old=recommend_v1_async)
    async def recommend_v2_async() -> str:
        await asyncio.sleep(0)
        return "new"

    async def decisions(request: Request) -> Response:
        context = request.state.canary_context
        return JSONResponse(
            {
                "decisions": {name: list(d) for name, d in request.state.canary.items()},
                "user_id": context.get("user_id"),
                "session_id": context.get("session_id"),
                "overrides": dict(context.overrides),
            }
        )

    def sync_endpoint(request: Request) -> Response:  # Starlette runs it in a worker thread
        return JSONResponse({"variant": recommend_v2(), "user_id": current_context().get("user_id")})

    async def async_endpoint(request: Request) -> Response:
        for _ in range(3):
            await asyncio.sleep(0)  # let concurrent requests interleave
        return JSONResponse({"variant": await recommend_v2_async(), "user_id": current_context().get("user_id")})

    shared = PlainTextResponse("shared", headers={"Vary": "Accept-Encoding"})

    async def vary(request: Request) -> Response:
        request.state.canary["recommender"]  # decides: the response depends on the request's cookies
        given = request.query_params.get("vary")
        return PlainTextResponse("ok", headers={"Vary": given} if given else None)

    async def reused(request: Request) -> Response:
        request.state.canary["recommender"]
        return shared

    async def plain(request: Request) -> Response:  # decides nothing, reads no context
        return PlainTextResponse("plain", headers={"Vary": "Accept-Encoding"})

    return Starlette(
        routes=[
            Route("/decisions", decisions),
            Route("/sync", sync_endpoint),
            Route("/async", async_endpoint),
            Route("/vary", vary),
            Route("/reused", reused),
            Route("/plain", plain),
        ]
    )


async def _get(
    app: Any,
    paths: list[str],
    *,
    base: str = "http://testserver",
    peer: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    async with httpx.AsyncClient(transport=transport, base_url=base) as client:
        return [await client.get(path, headers=headers) for path in paths]


def get(app: Any, *paths: str, **kwargs: Any) -> list[httpx.Response]:
    """GET ``paths`` in order with one client (its cookie jar carries cookies from one response to the next)."""
    return asyncio.run(_get(app, list(paths), **kwargs))


async def call_asgi(app: Any, scope: Scope, incoming: list[Message] | None = None) -> list[Message]:
    """Call an ASGI app directly; return the messages it sent."""
    queue = list(incoming or [{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[Message] = []

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # pragma: no cover - nothing more to receive
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http_scope(headers: list[tuple[bytes, bytes]] | None = None, **extra: Any) -> Scope:
    """A well-formed HTTP scope for ``GET /decisions`` from 127.0.0.1."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/decisions",
        "raw_path": b"/decisions",
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    scope.update(extra)
    return scope


def header_values(message: Message, name: bytes) -> list[bytes]:
    """The values of header ``name`` in an ``http.response.start`` message."""
    return [value for key, value in message.get("headers", []) if key.lower() == name]


# ---------------------------------------------------------------------------------------------- decision mode


def test_decisions_and_context_are_on_request_state(router: Router) -> None:
    """request.state.canary holds every rollout's decision and request.state.canary_context the context."""
    app = CanaryMiddleware(state_app(router), router=router, trusted_proxies=["127.0.0.1"], user_header="x-user-id")
    for uid in ("u1", "u2", "u3", "user-42"):
        (response,) = get(app, "/decisions", headers={"x-user-id": uid})
        body = response.json()
        assert response.status_code == 200
        assert body["user_id"] == uid
        assert set(body["decisions"]) == {"recommender", "checkout-v2"}
        variant, reason, bucket_, unit = body["decisions"]["recommender"]
        assert (variant, reason, bucket_, unit) == (
            expected("recommender", uid, 25),
            "split",
            bucket("recommender", uid),
            uid,
        )
        assert body["decisions"]["checkout-v2"][0] == expected("checkout-v2", uid, 50)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_decorated_function_sees_the_request_context(router: Router, kind: str) -> None:
    """A decorated function deep in a sync or async endpoint serves the variant of the request's user."""
    app = CanaryMiddleware(state_app(router), router=router, trusted_proxies=["127.0.0.1"], user_header="x-user-id")
    observer = RecordingObserver()
    router.add_observer(observer)
    for i in range(60):
        uid = f"u{i}"
        (response,) = get(app, f"/{kind}", headers={"x-user-id": uid})
        assert response.json() == {"variant": expected("recommender", uid, 25), "user_id": uid}
    assert observer.count("recommender") == 60  # decision mode leaves observations to the decorator


def test_concurrent_requests_keep_their_own_context(router: Router) -> None:
    """Interleaved requests on one event loop never see one another's user or decision."""
    app = CanaryMiddleware(state_app(router), router=router, trusted_proxies=["127.0.0.1"], user_header="x-user-id")

    async def main() -> list[tuple[str, httpx.Response]]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            ids = [f"u{i}" for i in range(80)]
            responses = await asyncio.gather(*(client.get("/async", headers={"x-user-id": uid}) for uid in ids))
            return list(zip(ids, responses, strict=True))

    for uid, response in asyncio.run(main()):
        assert response.json() == {"variant": expected("recommender", uid, 25), "user_id": uid}


def test_context_is_reset_after_the_request(router: Router) -> None:
    """Once the middleware returns, the caller's ambient context is what it was before."""
    app = CanaryMiddleware(state_app(router), router=router, trusted_proxies=["127.0.0.1"], user_header="x-user-id")

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        before = dict(current_context())
        await call_asgi(app, http_scope([(b"x-user-id", b"u7")]))
        return before, dict(current_context())

    before, after = asyncio.run(main())
    assert before == after == {}


@pytest.mark.parametrize(("base", "secure"), [("http://testserver", False), ("https://testserver", True)])
def test_new_visitor_gets_a_lax_http_only_cookie_secure_only_on_https(router: Router, base: str, secure: bool) -> None:
    """A new visitor's id cookie is HttpOnly and SameSite=Lax, and Secure exactly when the request is https."""
    app = CanaryMiddleware(state_app(router), router=router)
    first, second = get(app, "/decisions", "/decisions", base=base)
    (cookie,) = first.headers.get_list("set-cookie")
    attributes = [part.strip() for part in cookie.split(";")]
    name, _, value = attributes[0].partition("=")
    assert name == "canary_vid"
    assert len(value) == 32
    assert "HttpOnly" in attributes
    assert "SameSite=Lax" in attributes
    assert "Path=/" in attributes
    assert ("Secure" in attributes) == secure
    assert first.json()["session_id"] == value
    if not secure:  # the jar sends it back over http; the visitor keeps its id and gets no new cookie
        assert second.json()["session_id"] == value
        assert second.headers.get_list("set-cookie") == []


@pytest.mark.parametrize(
    ("app_vary", "sent"),
    [
        (None, "Cookie"),
        ("Accept-Encoding", "Accept-Encoding, Cookie"),
        ("Accept-Encoding, Origin", "Accept-Encoding, Origin, Cookie"),
        ("cookie", "cookie"),
        ("Accept, Cookie", "Accept, Cookie"),
        ("*", "*"),
    ],
)
def test_vary_cookie_is_merged_with_the_apps_vary(router: Router, app_vary: str | None, sent: str) -> None:
    """The response varies on Cookie: added to the app's Vary header once, never duplicated, never to '*'."""
    app = CanaryMiddleware(state_app(router), router=router)
    (response,) = get(app, "/vary" if app_vary is None else f"/vary?{urlencode({'vary': app_vary})}")
    assert response.headers.get_list("vary") == [sent]


def test_a_reused_response_object_is_not_changed(router: Router) -> None:
    """The middleware adds headers to a copy: a response object sent twice gets them once per request."""
    app = CanaryMiddleware(state_app(router), router=router)
    first, second = get(app, "/reused", "/reused")
    assert first.headers.get_list("vary") == second.headers.get_list("vary") == ["Accept-Encoding, Cookie"]
    assert len(first.headers.get_list("set-cookie")) == 1
    assert second.headers.get_list("set-cookie") == []  # a returning visitor: no new cookie, none left over


def test_variant_header_only_when_enabled(router: Router) -> None:
    """Canary-Variant lists every decision when variant_header=True, and is absent by default."""
    options = {"trusted_proxies": ["127.0.0.1"], "user_header": "x-user-id"}
    plain = CanaryMiddleware(state_app(router), router=router, **options)  # type: ignore[arg-type]
    shown = CanaryMiddleware(state_app(router), router=router, variant_header=True, **options)  # type: ignore[arg-type]
    (without,) = get(plain, "/decisions", headers={"x-user-id": "u5"})
    (with_,) = get(shown, "/decisions", headers={"x-user-id": "u5"})
    assert "canary-variant" not in without.headers
    recommender, checkout = expected("recommender", "u5", 25), expected("checkout-v2", "u5", 50)
    assert with_.headers["canary-variant"] == f"recommender={recommender}, checkout-v2={checkout}"


def test_lifespan_and_unknown_scopes_pass_through_untouched(router: Router) -> None:
    """Lifespan reaches the app's own lifespan (its flag is set), and an unknown scope type arrives unchanged."""
    flags: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        flags.append("started")
        yield
        flags.append("stopped")

    app = CanaryMiddleware(Starlette(lifespan=lifespan), router=router)
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    sent = asyncio.run(call_asgi(app, scope, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]))
    assert flags == ["started", "stopped"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert scope["state"] == {}

    seen: list[Scope] = []

    async def raw(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope)

    custom: Scope = {"type": "x-custom", "value": 1}
    asyncio.run(call_asgi(CanaryMiddleware(raw, router=router), custom))
    assert seen == [custom]
    assert seen[0] is custom
    assert custom == {"type": "x-custom", "value": 1}


def test_websocket_scope_gets_decisions_and_no_cookies(router: Router) -> None:
    """A WebSocket endpoint sees the decisions and the context; the handshake sets no cookie."""

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        decisions = websocket.state.canary
        await websocket.send_json(
            {
                "variant": decisions["recommender"].variant,
                "user_id": websocket.state.canary_context.get("user_id"),
                "ambient": current_context().get("user_id"),
            }
        )
        await websocket.close()

    app = CanaryMiddleware(
        Starlette(routes=[WebSocketRoute("/ws", endpoint)]),
        router=router,
        trusted_proxies=["127.0.0.1"],
        user_header="x-user-id",
    )
    scope = http_scope([(b"x-user-id", b"u3")], type="websocket", scheme="ws", path="/ws", raw_path=b"/ws")
    del scope["method"], scope["http_version"]
    scope["subprotocols"] = []
    sent = asyncio.run(call_asgi(app, scope, [{"type": "websocket.connect"}]))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert not any(name == b"set-cookie" for name, _ in sent[0].get("headers") or [])
    assert sent[1]["text"] == f'{{"variant":"{expected("recommender", "u3", 25)}","user_id":"u3","ambient":"u3"}}'


# ---------------------------------------------------------------------------------------------- overrides and trust


def override_app(router: Router) -> CanaryMiddleware:
    """The state app behind a middleware that trusts 127.0.0.1 and signs with ``KEY``."""
    return CanaryMiddleware(
        state_app(router), router=router, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )


def test_forged_expired_and_unknown_tokens_are_ignored_and_counted(router: Router) -> None:
    """Override tokens that are forged, expired, malformed or for an unknown rollout change nothing, and count."""
    app = override_app(router)
    uid = users("recommender", "old", 1)[0]
    now = time.time()
    tokens = [
        create_token(OTHER_KEY, rollout="recommender", variant="new", ttl=3600),  # forged: another secret
        create_token(KEY, rollout="recommender", variant="new", ttl=3600, now=now - 7200),  # expired
        create_token(KEY, rollout="no-such-rollout", variant="new", ttl=3600),  # unknown rollout
        "not-a-token",
        "a.b",
    ]
    for token in tokens:
        (response,) = get(app, "/decisions", headers={"x-user-id": uid, "x-canary-override": token})
        body = response.json()
        assert body["decisions"]["recommender"][:2] == ["old", "split"]
        assert body["overrides"] == {}
        assert not any(c.startswith("canary_override=") for c in response.headers.get_list("set-cookie"))
    assert app.resolver.counters["overrides_rejected"] == len(tokens)
    assert app.resolver.counters["overrides_accepted"] == 0


def test_token_for_another_rollout_changes_only_that_rollout(router: Router) -> None:
    """A valid token for checkout-v2 forces checkout-v2 and leaves recommender to the user's bucket."""
    app = override_app(router)
    uid = users("checkout-v2", "old", 1)[0]
    token = create_token(KEY, rollout="checkout-v2", variant="new", ttl=3600)
    (response,) = get(app, "/decisions", headers={"x-user-id": uid, "x-canary-override": token})
    decisions = response.json()["decisions"]
    assert decisions["checkout-v2"][:2] == ["new", "override"]
    assert decisions["recommender"][:2] == [expected("recommender", uid, 25), "split"]


def test_signed_override_works_is_kept_in_a_cookie_and_reaches_decorated_code(router: Router) -> None:
    """A signed token moves its holder to the variant, survives into the ambient context, and is kept in a cookie."""
    app = override_app(router)
    uid = users("recommender", "old", 1)[0]
    token = create_token(KEY, rollout="recommender", variant="new", ttl=3600)

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            headers = {"x-user-id": uid}
            first = await client.get("/decisions", headers={**headers, "x-canary-override": token})
            later = await client.get("/async", headers=headers)  # only the cookie carries the token now
            synced = await client.get("/sync", headers=headers)
            return [first, later, synced]

    first, later, synced = asyncio.run(main())
    assert first.json()["decisions"]["recommender"][:2] == ["new", "override"]
    assert first.json()["overrides"] == {"recommender": "new"}
    kept = [c for c in first.headers.get_list("set-cookie") if c.startswith("canary_override=")]
    assert len(kept) == 1
    assert kept[0].split(";")[0] == f"canary_override={token}"
    assert "HttpOnly" in kept[0]
    assert later.json() == synced.json() == {"variant": "new", "user_id": uid}
    assert app.resolver.counters["overrides_accepted"] == 1
    assert app.resolver.counters["overrides_rejected"] == 0


def test_signed_override_in_the_query_string_works(router: Router) -> None:
    """The token may come as ?canary_override=..., e.g. from a link sent to a tester."""
    app = override_app(router)
    uid = users("recommender", "old", 1)[0]
    token = create_token(KEY, rollout="recommender", variant="new", ttl=3600)
    (response,) = get(app, f"/decisions?canary_override={token}", headers={"x-user-id": uid})
    assert response.json()["decisions"]["recommender"][:2] == ["new", "override"]


@pytest.mark.parametrize(
    ("trusted", "peer", "believed"),
    [
        (["10.0.0.1"], "127.0.0.1", False),  # someone else's proxy list: the header is ignored
        ([], "127.0.0.1", False),  # no trusted proxy at all
        (["10.0.0.1"], "10.0.0.1", True),  # from the trusted gateway
        (["10.0.0.0/8"], "10.20.30.40", True),
    ],
)
def test_user_header_counts_only_from_a_trusted_peer(
    router: Router, trusted: list[str], peer: str, believed: bool
) -> None:
    """An unsigned x-user-id header is believed only when the TCP peer is a trusted proxy."""
    app = CanaryMiddleware(state_app(router), router=router, trusted_proxies=trusted, user_header="x-user-id")
    (response,) = get(app, "/decisions", peer=peer, headers={"x-user-id": "u1"})
    body = response.json()
    assert body["user_id"] == ("u1" if believed else None)
    unit = "u1" if believed else body["session_id"]
    assert body["decisions"]["recommender"][3] == unit


# ---------------------------------------------------------------------------------------------- bad input

WANTED = [b"cookie", b"host", b"user-agent", b"accept-language", b"x-forwarded-for", b"x-user-id", b"x-canary-override"]
header_names = st.one_of(st.sampled_from(WANTED), st.binary(max_size=20))
header_values_ = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"\xff\xfe\xfd", b"canary_vid=\xc3\x28; canary_override=\x80", b"1.2.3.4, \xff, ::::", b""]),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
)


def ok_app(router: Router) -> CanaryMiddleware:
    """A middleware (secret, trusted 127.0.0.1, user header) over a Starlette app that answers 200 with the state."""
    return CanaryMiddleware(
        state_app(router), router=router, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(st.tuples(header_names, header_values_), max_size=12), query=st.binary(max_size=200))
def test_arbitrary_header_bytes_never_yield_a_500(
    router: Router, headers: list[tuple[bytes, bytes]], query: bytes
) -> None:
    """Any header bytes (non-UTF-8, repeated, empty, garbage X-Forwarded-For) and query bytes: the request gets 200."""
    app = ok_app(router)
    sent = asyncio.run(call_asgi(app, http_scope(headers, query_string=query)))
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 200


def test_huge_cookies_and_garbage_forwarded_for_are_ignored(router: Router) -> None:
    """A 200 kB cookie header, a cookie-bomb of 5,000 pairs and nonsense X-Forwarded-For still get a normal answer."""
    app = ok_app(router)
    cases = [
        {"cookie": "canary_vid=" + "a" * 200_000},
        {"cookie": "; ".join(f"c{i}=v{i}" for i in range(5000))},
        {"cookie": 'canary_vid="' + "0" * 32 + '"; canary_override=' + "~".join(["x.y"] * 100)},
        {"x-forwarded-for": "not-an-ip, 999.1.1.1, ::::, [::1]:80, " + "1.2.3.4, " * 500},
        {"x-forwarded-for": ",,,", "x-user-id": "\x00\x01"},
        {"x-user-id": "u" * 10_000},
    ]
    for headers in cases:
        (response,) = get(app, "/decisions", headers=headers)
        assert response.status_code == 200, headers
        assert set(response.json()["decisions"]) == {"recommender", "checkout-v2"}


@pytest.mark.parametrize(
    "change",
    [
        {"headers": None},
        {"headers": 5},
        {"headers": [(b"x-user-id",)]},
        {"headers": [("x-user-id", "u1"), (b"cookie", "canary_vid=1")]},
        {"headers": [[b"x-user-id", bytearray(b"u1")], (b"host", None)]},
        {"client": None},
        {"client": "127.0.0.1"},
        {"client": (None, None)},
        {"query_string": "canary_override=x"},
        {"method": None, "path": None, "scheme": None},
        {"path": 42},
        {"state": MappingProxyType({})},
        {"state": None},
    ],
    ids=repr,
)
def test_odd_scopes_still_reach_the_app(router: Router, change: dict[str, Any]) -> None:
    """Missing or mistyped scope keys: the app still runs, with decisions in its state and a context ambient."""
    seen: list[tuple[Any, Any]] = []

    async def raw(scope: Scope, receive: Any, send: Any) -> None:
        state = scope.get("state")
        seen.append((state.get("canary") if state else None, current_context()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = CanaryMiddleware(raw, router=router, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id")
    scope = http_scope([(b"x-user-id", b"u1")])
    for key, value in change.items():
        if value is None:
            scope.pop(key, None)
        else:
            scope[key] = value
    sent = asyncio.run(call_asgi(app, scope))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200
    ((decisions, context),) = seen
    if not isinstance(scope.get("state"), MappingProxyType):
        assert set(decisions) == {"recommender", "checkout-v2"}
    assert "session_id" in context


def test_malformed_app_headers_are_sent_as_they_are(router: Router) -> None:
    """If the app's own response headers cannot be read, its message goes out unchanged rather than failing."""

    async def raw(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"vary",)]})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = asyncio.run(call_asgi(CanaryMiddleware(raw, router=router), http_scope()))
    assert sent[0]["headers"] == [(b"vary",)]


# ---------------------------------------------------------------------------------------------- split mode


def split_apps() -> tuple[Starlette, Starlette]:
    """An old and a new app: /who says which served; /fail answers 500; /boom raises; /stream streams slowly."""

    def build(name: str) -> Starlette:
        async def who(request: Request) -> Response:
            return PlainTextResponse(name)

        async def fail(request: Request) -> Response:
            return PlainTextResponse("broken", status_code=503)

        async def boom(request: Request) -> Response:
            raise RuntimeError(f"{name} exploded")

        async def stream(request: Request) -> Response:
            async def chunks() -> AsyncIterator[bytes]:
                for i in range(4):
                    await asyncio.sleep(0.05)
                    yield f"{name}-{i};".encode()

            return StreamingResponse(chunks())

        return Starlette(
            routes=[Route("/who", who), Route("/fail", fail), Route("/boom", boom), Route("/stream", stream)]
        )

    return build("old"), build("new")


def split(router: Router) -> CanaryMiddleware:
    """Old and new apps split by checkout-v2, users identified by x-user-id from 127.0.0.1."""
    old, new = split_apps()
    return CanaryMiddleware(
        old, router=router, rollout="checkout-v2", new_app=new, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )


def test_split_mode_routes_each_request_by_its_decision_and_observes_it(router: Router) -> None:
    """Each request goes to the new app exactly when checkout-v2 decides "new", and is observed once."""
    app = split(router)
    observer = RecordingObserver()
    router.add_observer(observer)
    served = {"old": 0, "new": 0}
    for i in range(200):
        uid = f"u{i}"
        (response,) = get(app, "/who", headers={"x-user-id": uid})
        assert response.text == expected("checkout-v2", uid, 50)
        served[response.text] += 1
    snapshot = router.aggregator.snapshot("checkout-v2") if router.aggregator else None
    assert snapshot is not None
    assert (snapshot.old.requests, snapshot.new.requests) == (served["old"], served["new"])
    assert snapshot.old.errors == snapshot.new.errors == 0
    assert observer.count("checkout-v2", "new", ok=True) == served["new"]
    assert observer.count("checkout-v2", "old", ok=True) == served["old"]
    assert observer.count("recommender") == 0


def test_split_mode_records_5xx_as_errors(router: Router) -> None:
    """A response with status 500 or more counts as an error of the variant that served it."""
    app = split(router)
    router.set_percent("checkout-v2", 100)
    observer = RecordingObserver()
    router.add_observer(observer)
    responses = get(app, "/who", "/fail", "/who", headers={"x-user-id": "u1"})
    assert [r.status_code for r in responses] == [200, 503, 200]
    snapshot = router.aggregator.snapshot("checkout-v2") if router.aggregator else None
    assert snapshot is not None
    assert (snapshot.new.requests, snapshot.new.errors) == (3, 1)
    assert [o.ok for o in observer.observations] == [True, False, True]


def test_split_mode_records_exceptions_and_reraises_them(router: Router) -> None:
    """An exception in the chosen app is recorded as an error with the exception, then propagates unchanged."""
    app = split(router)
    router.set_percent("checkout-v2", 100)
    observer = RecordingObserver()
    router.add_observer(observer)
    with pytest.raises(RuntimeError, match="new exploded"):
        get(app, "/boom", headers={"x-user-id": "u1"})
    (observation,) = observer.observations
    assert (observation.rollout, observation.variant, observation.ok) == ("checkout-v2", "new", False)
    assert isinstance(observation.error, RuntimeError)
    assert str(observation.error) == "new exploded"

    async def raw(scope: Scope, receive: Any, send: Any) -> None:
        raise KeyError("raw")

    raw_app = CanaryMiddleware(raw, router=router, rollout="checkout-v2", new_app=raw)
    with pytest.raises(KeyError) as caught:
        asyncio.run(call_asgi(raw_app, http_scope()))
    assert observer.observations[-1].error is caught.value


def test_split_mode_measures_streaming_responses_to_the_last_chunk(router: Router) -> None:
    """A streamed response's latency runs until its last body chunk is sent, not until its headers."""
    app = split(router)
    observer = RecordingObserver()
    router.add_observer(observer)
    uid = users("checkout-v2", "new", 1)[0]
    (response,) = get(app, "/stream", headers={"x-user-id": uid})
    assert response.text == "new-0;new-1;new-2;new-3;"
    (observation,) = observer.observations
    assert observation.variant == "new"
    assert observation.ok
    assert observation.duration >= 0.19


def test_split_mode_routes_websockets_without_observing_them(router: Router) -> None:
    """A WebSocket goes to the app of its decision, and its (session-long) lifetime is not recorded as latency."""

    def build(name: str) -> Starlette:
        async def endpoint(websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.send_text(name)
            await websocket.close()

        return Starlette(routes=[WebSocketRoute("/ws", endpoint)])

    observer = RecordingObserver()
    router.add_observer(observer)
    app = CanaryMiddleware(
        build("old"),
        router=router,
        rollout="checkout-v2",
        new_app=build("new"),
        trusted_proxies=["127.0.0.1"],
        user_header="x-user-id",
    )
    for uid in ("u1", "u2", "u3", "u4"):
        scope = http_scope([(b"x-user-id", uid.encode())], type="websocket", scheme="ws", path="/ws")
        sent = asyncio.run(call_asgi(app, scope, [{"type": "websocket.connect"}]))
        assert sent[1]["text"] == expected("checkout-v2", uid, 50)
    assert observer.observations == []


def test_split_rollout_is_decided_even_when_options_name_other_rollouts(router: Router) -> None:
    """With options.rollouts not naming the split rollout, it is added, so routing and state still have it."""
    old, new = split_apps()
    options = WebOptions(rollouts=("recommender",), trusted_proxies=("127.0.0.1",), user_header="x-user-id")
    app = CanaryMiddleware(old, router=router, options=options, rollout="checkout-v2", new_app=new)
    assert app.resolver.rollout_names == ("recommender", "checkout-v2")
    uid = users("checkout-v2", "new", 1)[0]
    (response,) = get(app, "/who", headers={"x-user-id": uid})
    assert response.text == "new"


# ---------------------------------------------------------------------------------------------- configuration


def test_configuration_errors_fail_at_start_up(router: Router) -> None:
    """Conflicting, incomplete or invalid configuration raises when the middleware is built, not per request."""
    app, other = split_apps()
    with pytest.raises(TypeError, match="not both"):
        CanaryMiddleware(app, router=router, options=WebOptions(), user_header="x-user-id")
    with pytest.raises(TypeError, match="both rollout= and new_app="):
        CanaryMiddleware(app, router=router, rollout="checkout-v2")
    with pytest.raises(TypeError, match="both rollout= and new_app="):
        CanaryMiddleware(app, router=router, new_app=other)
    with pytest.raises(UnknownRolloutError):
        CanaryMiddleware(app, router=router, rollout="nope", new_app=other)
    with pytest.raises(ValueError, match="trusted_proxies"):
        CanaryMiddleware(app, router=router, trusted_proxies=["not-an-address"])
    with pytest.raises(TypeError, match="unexpected keyword"):
        CanaryMiddleware(app, router=router, user_headr="x-user-id")  # type: ignore[call-arg]


def test_importing_the_adapter_loads_no_framework() -> None:
    """canary_router.asgi is pure ASGI: importing it pulls in no Starlette, FastAPI, anyio or httpx."""
    code = (
        "import sys, canary_router.asgi\n"
        "print(','.join(m for m in ('starlette', 'fastapi', 'anyio', 'httpx', 'uvicorn') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_option_keywords_are_exactly_the_web_options() -> None:
    """The typed keyword options of CanaryMiddleware stay in step with the fields of WebOptions."""
    fields = {f.name for f in dataclasses.fields(WebOptions) if f.init}
    assert set(WebOptionKeywords.__optional_keys__) == fields


def test_starlette_middleware_list_builds_it(router: Router) -> None:
    """CanaryMiddleware plugs into Starlette(middleware=[Middleware(CanaryMiddleware, ...)]) with keyword options."""
    from starlette.middleware import Middleware

    async def who(request: Request) -> Response:
        return PlainTextResponse(request.state.canary["recommender"].variant)

    app = Starlette(
        routes=[Route("/", who)],
        middleware=[
            Middleware(CanaryMiddleware, router=router, trusted_proxies=["127.0.0.1"], user_header="x-user-id")
        ],
    )
    (response,) = get(app, "/", headers={"x-user-id": "u9"})
    assert response.text == expected("recommender", "u9", 25)


# ---------------------------------------------------------------------------------------------- smoke: real uvicorn


def uvicorn_example() -> tuple[list[str], int]:
    """The command line that serves the Starlette example on a free port, quietly (no access log)."""
    port = free_port()
    command = python_module("uvicorn", "app:app", "--port", str(port), "--no-access-log", "--log-level", "warning")
    return command, port


@pytest.fixture(scope="module")
def example() -> Iterator[str]:
    """The Starlette example app served by a real uvicorn; yields its base URL."""
    command, port = uvicorn_example()
    with serve(command, port, cwd=EXAMPLE) as base:
        yield base


def variant_of(client: httpx.Client, uid: str | None = None, **headers: str) -> str:
    """GET /recommendations (as ``uid`` when given) and return the variant served."""
    if uid is not None:
        headers["x-user-id"] = uid
    response = client.get("/recommendations", headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert len(body["items"]) == 3
    return str(body["variant"])


def test_smoke_1000_users_get_their_bucket_every_time(example: str) -> None:
    """Under uvicorn, each of 1,000 users gets the variant of their v1 bucket on both visits; ~25 % get "new"."""
    with httpx.Client(base_url=example, timeout=10) as client:
        seen: dict[str, str] = {}
        for visit in range(2):
            for i in range(1000):
                uid = f"u{i}"
                client.cookies.clear()  # identified users: the header alone decides
                variant = variant_of(client, uid)
                assert variant == ("new" if bucket("recommender", uid) < 2500 else "old"), uid
                if visit:
                    assert variant == seen[uid], uid
                seen[uid] = variant
    new = sum(v == "new" for v in seen.values())
    tolerance = 4 * math.sqrt(1000 * 0.25 * 0.75)
    assert abs(new - 250) <= tolerance


def test_smoke_anonymous_visitors_stick_through_their_cookie(example: str) -> None:
    """Twenty anonymous visitors, each with its own cookie jar, keep their variant over three requests."""
    for _ in range(20):
        with httpx.Client(base_url=example, timeout=10) as visitor:
            first = visitor.get("/recommendations")
            vid = first.cookies.get("canary_vid")
            assert vid is not None
            assert len(vid) == 32
            variants = [first.json()["variant"]] + [variant_of(visitor) for _ in range(2)]
            assert variants == [expected("recommender", vid, 25)] * 3
            assert visitor.cookies.get("canary_vid") == vid


def test_smoke_override_tokens_forged_refused_signed_honoured(example: str) -> None:
    """Over HTTP, a token signed with another secret is refused; one signed with the server's secret works."""
    uid = users("recommender", "old", 1)[0]
    forged = create_token(OTHER_KEY, rollout="recommender", variant="new", ttl=3600)
    signed = create_token(SECRET, rollout="recommender", variant="new", ttl=3600)
    with httpx.Client(base_url=example, timeout=10) as client:
        assert variant_of(client, uid, **{"x-canary-override": forged}) == "old"
        assert "canary_override" not in client.cookies
        assert variant_of(client, uid, **{"x-canary-override": signed}) == "new"
        assert client.cookies.get("canary_override") == signed
        assert variant_of(client, uid) == "new"  # kept by the cookie


def test_smoke_admin_rollback_needs_the_token_and_acts_at_once() -> None:
    """Unauthenticated rollback gets 401; after an authenticated one, a user who had "new" gets "old" at once."""
    command, port = uvicorn_example()
    uid = users("recommender", "new", 1)[0]
    with serve(command, port, cwd=EXAMPLE) as base, httpx.Client(base_url=base, timeout=10) as client:
        assert variant_of(client, uid) == "new"
        assert client.post("/admin/rollback").status_code == 401
        assert client.post("/admin/rollback", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/admin/rollback", headers={"authorization": ADMIN_TOKEN}).status_code == 401
        assert variant_of(client, uid) == "new"
        done = client.post("/admin/rollback", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert done.status_code == 200
        assert done.json()["phase"] == "rolled_back"
        assert variant_of(client, uid) == "old"


def test_example_readme_gives_one_command() -> None:
    """The example's README shows exactly one shell command, and it serves app:app with uvicorn."""
    text = (EXAMPLE / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in text.split("```")[1::2] if b.startswith(("bash", "sh", "console"))]
    assert len(blocks) == 1
    assert "uvicorn" in blocks[0]
    assert "app:app" in blocks[0]


# ------------------------------------------------------------------------------------------ the fast paths

VISITOR = "0123456789abcdef0123456789abcdef"
BROWSER: list[tuple[bytes, bytes]] = [
    (b"host", b"shop.example.com"),
    (b"user-agent", b"Mozilla/5.0"),
    (b"accept", b"*/*"),
    (b"accept-language", b"de-CH, en;q=0.5"),
    (b"cookie", f"canary_vid={VISITOR}; theme=dark".encode()),
    (b"x-user-id", "josé".encode()),
]


@pytest.mark.parametrize(
    "scope",
    [
        http_scope(BROWSER),
        http_scope(BROWSER, client=("10.0.0.5", 1), query_string=b"canary_override=junk&a=1"),
        http_scope([*BROWSER, (b"x-forwarded-for", b"203.0.113.9, 10.0.0.7")], client=("10.0.0.5", 1)),
        http_scope([*BROWSER, (b"cookie", b"b=2"), (b"x-user-id", b"second")]),  # repeated: joined
        http_scope([*BROWSER, (b"accept", b"text/html")]),  # a repeated header nobody reads
        http_scope([*BROWSER, (b"host", b"\xff\xfe")]),  # not UTF-8: dropped and counted
        http_scope(tuple(BROWSER), client=None, scheme="https"),
        http_scope([(b"x-canary-override", b"forged")], client=["127.0.0.1", 1]),
        http_scope(iter(BROWSER)),  # an iterator: read once, by the general path
        http_scope([("host", "text-names")]),  # str pairs: the careful path
        http_scope(BROWSER, method=b"GET"),  # a value of the wrong type: the careful path
        {"type": "http", "headers": BROWSER},  # the bare minimum
    ],
)
def test_fast_scope_reading_decides_like_the_general_path(router: Router, scope: Scope) -> None:
    """The one-pass reading of a usual scope gives what the general (and careful) reading gives, counters too."""
    options: dict[str, Any] = {
        "secret": KEY,
        "trusted_proxies": ["10.0.0.0/8", "127.0.0.1"],
        "user_header": "x-user-id",
    }
    fast = CanaryMiddleware(PlainTextResponse("ok"), router=router, **options)
    general = CanaryMiddleware(PlainTextResponse("ok"), router=router, **options)
    if isinstance(scope.get("headers"), Iterator):
        fast_scope, general_scope = dict(scope, headers=iter(BROWSER)), dict(scope, headers=iter(BROWSER))
    else:
        fast_scope, general_scope = scope, scope
    context, decisions, set_cookies, variant = fast._resolve(fast_scope, "http")
    info = general._general_info(general_scope, "http")
    expected = general.resolver.resolve(info)
    visitor = {"session_id": context["session_id"]}  # random for a new visitor: compared apart
    assert dict(context) == {**dict(expected.context), **visitor}
    assert context.overrides == expected.context.overrides
    assert [c.split("=")[0] for c in set_cookies] == [c.split("=")[0] for c in expected.set_cookies]
    assert variant == expected.variant_header
    assert fast.resolver.counters == general.resolver.counters
    for name in CONFIG["rollouts"]:
        assert decisions[name].reason == expected.decisions[name].reason


def test_fast_scope_reading_keeps_user_ids_and_joined_headers(router: Router) -> None:
    """Spot checks of what the equivalence test compares: UTF-8 user ids, joined cookies, dropped bad bytes."""
    middleware = CanaryMiddleware(
        PlainTextResponse("ok"), router=router, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )
    context = middleware._resolve(http_scope(BROWSER), "http")[0]
    assert (context["user_id"], context["session_id"], context["accept_language"]) == ("josé", VISITOR, "de-CH")
    split = [(b"cookie", b"theme=dark"), (b"cookie", f"canary_vid={VISITOR}".encode())]  # HTTP/2 splits Cookie
    assert middleware._resolve(http_scope(split), "http")[0]["session_id"] == VISITOR
    assert "host" not in middleware._resolve(http_scope([(b"host", b"\xff")]), "http")[0]
    assert middleware.resolver.counters["malformed_input"] == 1


@pytest.mark.parametrize(
    ("headers", "sent"),
    [
        ([(b"content-type", b"text/plain")], [(b"content-type", b"text/plain"), (b"vary", b"Cookie")]),
        ((h for h in [(b"vary", b"Accept")]), [(b"vary", b"Accept, Cookie")]),  # an iterator, read once
        ([(b"Vary", b"cookie")], [(b"Vary", b"cookie")]),
        ([(b"vary", b"*"), (b"vary", b"Accept")], [(b"vary", b"*"), (b"vary", b"Accept")]),
        ([(b"vary", b"")], [(b"vary", b"Cookie")]),
        (None, [(b"vary", b"Cookie")]),
        ([("vary", "Accept")], [("vary", "Accept"), (b"vary", b"Cookie")]),  # str names are not a Vary to us
    ],
)
def test_response_headers_get_cookie_in_vary_and_the_extra_headers(headers: Any, sent: list[Any]) -> None:
    """``Cookie`` is merged into the app's Vary (or added), the extra headers follow, the app's list is untouched."""
    from canary_router.asgi import _with_headers

    message: Message = {"type": "http.response.start", "status": 200, "headers": headers}
    before = list(headers) if isinstance(headers, list) else None
    extra = [(b"set-cookie", b"a=1")]
    out = _with_headers(message, extra, True)
    assert out["headers"] == [*sent, *extra]
    assert out is not message
    assert message["headers"] is headers
    if before is not None:
        assert headers == before
    assert _with_headers({"type": "http.response.start", "headers": [(b"x", b"1")]}, extra, False)["headers"] == [
        (b"x", b"1"),
        *extra,
    ]
    malformed = {"type": "http.response.start", "headers": [(b"only-a-name",)]}
    assert _with_headers(malformed, extra, True) is malformed
