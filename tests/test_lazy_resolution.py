"""Decision-mode middleware resolves a request on first use: the same answers as resolving up front, or nothing.

Each request is sent to a lazily resolving middleware and to the same middleware configured to resolve up front
(``variant_header=True`` makes it decide every request before the app runs, as every request did before): the
decision, its reason, the context, the cookies, ``Vary`` and the counters must agree. A request that decides
nothing must get neither ``Vary`` nor a cookie, and count nothing.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import pytest

from canary_router import Context, Router, current_context, use_context
from canary_router.asgi import CanaryMiddleware as AsgiMiddleware
from canary_router.context import _current, _Deferred
from canary_router.overrides import create_token
from canary_router.wsgi import CONTEXT_KEY, DECISIONS_KEY, decisions
from canary_router.wsgi import CanaryMiddleware as WsgiMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

KEY = "lazy-test-secret-0123456789abcdef"
OTHER_KEY = "someone-elses-secret-0123456789"
CONFIG: dict[str, Any] = {
    "rollouts": {
        "r": {"steps": [50, 100], "stickiness": ["user_id", "session_id"]},
        "s": {"steps": [10, 100]},
    }
}
OPTIONS: dict[str, Any] = {"secret": KEY, "trusted_proxies": ["127.0.0.1"], "user_header": "x-user-id"}
VID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def router() -> Iterator[Router]:
    """A router with rollout "r" (50 %, by user then visitor) and "s" (10 %, by user)."""
    with Router.from_config(CONFIG) as built:
        yield built


def token(variant: str = "new", key: str = KEY, rollout: str = "r") -> str:
    """A tester override token for ``rollout``, valid for an hour."""
    return create_token(key, rollout=rollout, variant=variant, ttl=3600)  # type: ignore[arg-type]


# (name, peer, headers, query): requests that exercise every part of the resolution
REQUESTS: list[tuple[str, str, dict[str, str], str]] = [
    ("returning visitor, user header", "127.0.0.1", {"x-user-id": "u7", "cookie": f"canary_vid={VID}"}, ""),
    ("new visitor, no user", "127.0.0.1", {}, ""),
    ("malformed visitor cookie", "127.0.0.1", {"cookie": "canary_vid=not-hex; theme=dark"}, ""),
    ("user header from an untrusted peer", "203.0.113.9", {"x-user-id": "u7", "cookie": f"canary_vid={VID}"}, ""),
    ("override token in the header", "127.0.0.1", {"x-canary-override": token(), "cookie": f"canary_vid={VID}"}, ""),
    ("stored override cookie", "127.0.0.1", {"cookie": f"canary_vid={VID}; canary_override={token('old')}"}, ""),
    ("forged override token", "127.0.0.1", {"x-canary-override": token(key=OTHER_KEY), "x-user-id": "u3"}, ""),
    ("override link in the query", "127.0.0.1", {"cookie": f"canary_vid={VID}"}, f"canary_override={token()}"),
    ("malformed forwarded hop", "127.0.0.1", {"x-forwarded-for": "nonsense, 10.0.0.1", "x-user-id": "u9"}, ""),
]


def cookie_names(lines: Iterable[str]) -> list[str]:
    """The names of the cookies set, in order."""
    return [line.split("=", 1)[0] for line in lines]


def comparable(reply: dict[str, Any]) -> dict[str, Any]:
    """What must be identical between the two ways (a new visitor's random id aside: it is checked apart)."""
    decision = reply["decision"]
    new_visitor = "canary_vid" in cookie_names(reply["set_cookies"])
    context = {k: v for k, v in reply["context"].items() if not (new_visitor and k == "session_id")}
    if new_visitor and decision[3] == reply["context"].get("session_id"):
        decision = [decision[1]]  # bucketed on the random id: only the reason can agree
    lines = [line if not line.startswith("canary_vid=") else line.split(";", 1)[1] for line in reply["set_cookies"]]
    lines = [";".join(p for p in line.split(";") if not p.strip().startswith("Max-Age")) for line in lines]
    return {**reply, "decision": decision, "context": context, "set_cookies": lines}


# ---------------------------------------------------------------------------------------------------------- ASGI


def asgi_app(router: Router, deciding: bool) -> Callable[..., Any]:
    """A raw ASGI app: decides "r" through the ambient context (when ``deciding``), reports it, answers."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        body: dict[str, Any] = {}
        if deciding:
            body["decision"] = list(router.decide("r"))
            ambient = current_context()
            body["context"] = dict(ambient)
            body["overrides"] = dict(ambient.overrides)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    return app


def asgi_call(app: Any, peer: str, headers: Mapping[str, str], query: str = "", path: str = "/") -> dict[str, Any]:
    """One request through ``app``; what it answered, its Set-Cookie lines and Vary."""
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "query_string": query.encode(),
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": (peer, 50000),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    response = [(k.decode().lower(), v.decode()) for k, v in sent[0]["headers"]]
    reply = json.loads(sent[1]["body"])
    reply["set_cookies"] = [v for k, v in response if k == "set-cookie"]
    reply["vary"] = [v for k, v in response if k == "vary"]
    return reply


@pytest.mark.parametrize(("name", "peer", "headers", "query"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_asgi_lazy_resolution_answers_as_resolving_up_front(
    router: Router, name: str, peer: str, headers: dict[str, str], query: str
) -> None:
    """Decision, reason, context, overrides, cookies, Vary and counters: the same as the eager path's."""
    lazy = AsgiMiddleware(asgi_app(router, True), router=router, **OPTIONS)
    eager = AsgiMiddleware(asgi_app(router, True), router=router, variant_header=True, **OPTIONS)
    assert lazy._lazy
    assert not eager._lazy
    got, want = asgi_call(lazy, peer, headers, query), asgi_call(eager, peer, headers, query)
    assert comparable(got) == comparable(want)
    assert lazy.resolver.counters == eager.resolver.counters
    assert got["vary"] == ["Cookie"]
    if "canary_vid" in cookie_names(got["set_cookies"]):  # a new visitor's id is the one decided on
        sent = next(c for c in got["set_cookies"] if c.startswith("canary_vid=")).split(";")[0].split("=")[1]
        assert got["context"]["session_id"] == sent


@pytest.mark.parametrize(("name", "peer", "headers", "query"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_asgi_request_that_decides_nothing_gets_no_vary_no_cookie(
    router: Router, name: str, peer: str, headers: dict[str, str], query: str
) -> None:
    """Nothing read: no Vary, no cookie, nothing counted (except an override link, stored as before)."""
    lazy = AsgiMiddleware(asgi_app(router, False), router=router, **OPTIONS)
    reply = asgi_call(lazy, peer, headers, query)
    if query:  # an override link is resolved up front, so that its cookie is kept
        assert reply["vary"] == ["Cookie"]
        assert cookie_names(reply["set_cookies"]) == ["canary_override"]
        assert lazy.resolver.counters["overrides_accepted"] == 1
        return
    assert reply["vary"] == []
    assert reply["set_cookies"] == []
    assert set(lazy.resolver.counters.values()) == {0}


def test_asgi_new_visitor_gets_the_cookie_it_was_decided_on(router: Router) -> None:
    """A decision bucketed by session_id sets the visitor cookie; its value is the unit decided on."""
    lazy = AsgiMiddleware(asgi_app(router, True), router=router, **OPTIONS)
    reply = asgi_call(lazy, "127.0.0.1", {})
    (line,) = reply["set_cookies"]
    assert line.startswith(f"canary_vid={reply['decision'][3]};")
    again = asgi_call(lazy, "127.0.0.1", {"cookie": line.split(";")[0]})
    assert again["decision"] == reply["decision"]
    assert again["set_cookies"] == []


def test_asgi_reading_the_context_alone_resolves(router: Router) -> None:
    """Reading the ambient context (no decision) makes the response depend on cookies: Vary and the cookie."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        current_context().get("user_id")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    reply = asgi_call(AsgiMiddleware(app, router=router, **OPTIONS), "127.0.0.1", {})
    assert reply["vary"] == ["Cookie"]
    assert cookie_names(reply["set_cookies"]) == ["canary_vid"]


def test_asgi_decision_after_the_response_started_never_fails(router: Router, caplog: Any) -> None:
    """Deciding while streaming the body works; the headers are gone by then, which is logged, not raised."""
    seen: list[Any] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(scope["state"]["canary"]["r"])
        await send({"type": "http.response.body", "body": b"{}"})

    reply = asgi_call(AsgiMiddleware(app, router=router, **OPTIONS), "127.0.0.1", {})
    assert reply["vary"] == []
    assert reply["set_cookies"] == []
    assert seen[0].reason.value == "split"
    assert "after its response started" in caplog.text


def test_asgi_failed_resolution_degrades_to_an_empty_context(router: Router, monkeypatch: Any) -> None:
    """If reading the request fails, the decision is made on an empty context; the request still succeeds."""
    lazy = AsgiMiddleware(asgi_app(router, True), router=router, **OPTIONS)

    def broken(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(AsgiMiddleware, "_read_identity", broken)  # the middleware has __slots__: patch its class
    monkeypatch.setattr(AsgiMiddleware, "_read", broken)
    reply = asgi_call(lazy, "127.0.0.1", {"x-user-id": "u7"})
    assert reply["context"] == {}
    assert reply["decision"][0] == "old"
    assert lazy.resolver.counters["errors"] == 1


# ---------------------------------------------------------------------------------------------------------- WSGI


def wsgi_app(router: Router, deciding: bool) -> Callable[..., Iterable[bytes]]:
    """A raw WSGI app: decides "r" through the ambient context (when ``deciding``), reports it, answers."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body: dict[str, Any] = {}
        if deciding:
            body["decision"] = list(router.decide("r"))
            ambient = current_context()
            body["context"] = dict(ambient)
            body["overrides"] = dict(ambient.overrides)
        start_response("200 OK", [("Content-Type", "application/json")])
        return iter([json.dumps(body).encode()])  # an iterator: the middleware wraps it

    return app


def wsgi_call(app: Any, peer: str, headers: Mapping[str, str], query: str = "", path: str = "/") -> dict[str, Any]:
    """One request through ``app`` like a server; what it answered, its Set-Cookie lines and Vary."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "REMOTE_ADDR": peer,
        "wsgi.url_scheme": "http",
    }
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    started: list[list[tuple[str, str]]] = []

    def start_response(status: str, response: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append(response)
        return lambda data: None

    result = app(environ, start_response)
    body = b"".join(result)
    getattr(result, "close", lambda: None)()
    reply = json.loads(body)
    reply["set_cookies"] = [v for k, v in started[-1] if k.lower() == "set-cookie"]
    reply["vary"] = [v for k, v in started[-1] if k.lower() == "vary"]
    reply["environ"] = environ
    return reply


@pytest.mark.parametrize(("name", "peer", "headers", "query"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_wsgi_lazy_resolution_answers_as_resolving_up_front(
    router: Router, name: str, peer: str, headers: dict[str, str], query: str
) -> None:
    """Decision, reason, context, overrides, cookies, Vary and counters: the same as the eager path's."""
    lazy = WsgiMiddleware(wsgi_app(router, True), router=router, **OPTIONS)
    eager = WsgiMiddleware(wsgi_app(router, True), router=router, variant_header=True, **OPTIONS)
    assert lazy._lazy
    assert not eager._lazy
    got, want = wsgi_call(lazy, peer, headers, query), wsgi_call(eager, peer, headers, query)
    got.pop("environ"), want.pop("environ")
    assert comparable(got) == comparable(want)
    assert lazy.resolver.counters == eager.resolver.counters
    assert got["vary"] == ["Cookie"]


@pytest.mark.parametrize(("name", "peer", "headers", "query"), REQUESTS, ids=[r[0] for r in REQUESTS])
def test_wsgi_request_that_decides_nothing_gets_no_vary_no_cookie(
    router: Router, name: str, peer: str, headers: dict[str, str], query: str
) -> None:
    """Nothing read: no Vary, no cookie, nothing counted (except an override link, stored as before)."""
    lazy = WsgiMiddleware(wsgi_app(router, False), router=router, **OPTIONS)
    reply = wsgi_call(lazy, peer, headers, query)
    if query:
        assert reply["vary"] == ["Cookie"]
        assert cookie_names(reply["set_cookies"]) == ["canary_override"]
        return
    assert reply["vary"] == []
    assert reply["set_cookies"] == []
    assert set(lazy.resolver.counters.values()) == {0}
    environ = reply["environ"]
    assert isinstance(environ[CONTEXT_KEY], Context)  # still there for the app, unresolved
    assert set(decisions(environ)) == {"r", "s"}
    assert environ[DECISIONS_KEY] is decisions(environ)


def test_wsgi_new_visitor_gets_the_cookie_it_was_decided_on(router: Router) -> None:
    """A decision bucketed by session_id sets the visitor cookie; its value is the unit decided on."""
    lazy = WsgiMiddleware(wsgi_app(router, True), router=router, **OPTIONS)
    reply = wsgi_call(lazy, "127.0.0.1", {})
    (line,) = reply["set_cookies"]
    assert line.startswith(f"canary_vid={reply['decision'][3]};")
    assert reply["vary"] == ["Cookie"]


# ------------------------------------------------------------------------------------ the lazy context itself


class _Fixed(_Deferred):
    """A lazy context resolving to a given context, counting its resolutions."""

    __slots__ = ("calls", "target")

    def __init__(self, target: Context) -> None:
        self._resolved = None
        self.target = target
        self.calls = 0

    def _resolve(self) -> Context:
        self.calls += 1
        return self.target


def test_a_lazy_context_decides_as_its_resolved_context(router: Router) -> None:
    """Overrides and pins of the resolved context are honoured, and it is resolved once."""
    for target in (
        Context(user_id="u1"),
        Context(user_id="u1", overrides={"r": "new"}),
        Context(user_id="u1", pins={"r": "new", "s": "old"}),
    ):
        lazy = _Fixed(target)
        assert [router.decide(n, lazy) for n in ("r", "s")] == [router.decide(n, target) for n in ("r", "s")]
        assert lazy.calls == 1


def test_a_lazy_ambient_context_is_seen_resolved_everywhere(router: Router) -> None:
    """current_context(), use_context() layering, mapping reads and decorators all see the resolved context."""
    lazy = _Fixed(Context(user_id="u1", region="eu", overrides={"r": "new"}))
    seen: list[Any] = []

    def old(user: str) -> str:
        return "old"

    @router.canary("r", old=old, context_from=lambda user: {"account_id": user})
    def new(user: str) -> str:
        seen.append(router.decide("r"))
        return "new"

    with use_context(lazy, replace=True) as copied:  # a lazy context passed in keeps its overrides
        assert copied.overrides == {"r": "new"}
        assert lazy.calls == 1
    lazy = _Fixed(Context(user_id="u1", region="eu", overrides={"r": "new"}))
    token = _current.set(lazy)  # as the middleware makes it ambient
    try:
        assert lazy.calls == 0
        assert current_context() is lazy
        assert lazy.calls == 1
        assert dict(current_context()) == {"user_id": "u1", "region": "eu"}
        with use_context(plan="pro") as layered:
            assert type(layered) is Context
            assert dict(layered) == {"user_id": "u1", "region": "eu", "plan": "pro"}
            assert layered.overrides == {"r": "new"}
        assert new("a9") == "new"  # the override, through context_from's merge with the ambient context
        assert lazy.merge(x=1)["x"] == 1
        assert lazy == Context(user_id="u1", region="eu", overrides={"r": "new"})
    finally:
        _current.reset(token)
    assert lazy.calls == 1
    assert seen == [router.decide("r", Context(user_id="u1", region="eu", account_id="a9", overrides={"r": "new"}))]


def test_asgi_decisions_read_after_the_call_are_the_requests(router: Router) -> None:
    """A read after the app returned (an access log outside, say) decides on the request, with no cycle left."""
    headers = {"x-user-id": "u7", "cookie": f"canary_vid={VID}"}
    lazy = AsgiMiddleware(asgi_app(router, False), router=router, **OPTIONS)
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        return None

    asyncio.run(lazy(scope, receive, send))
    request = scope["state"]["canary_context"]
    assert "state" not in request._scope  # the scope's state no longer leads back to it
    deciding = asgi_call(AsgiMiddleware(asgi_app(router, True), router=router, **OPTIONS), "127.0.0.1", headers)
    assert list(scope["state"]["canary"]["r"]) == deciding["decision"]
    assert lazy.resolver.counters == dict.fromkeys(lazy.resolver.counters, 0)


# ------------------------------------------------------------------------------------------- two stages

STAGED_CONFIG: dict[str, Any] = {
    "segments": {"beta-paths": {"when": [{"attribute": "path", "operator": "STR_STARTS_WITH", "values": ["/beta"]}]}},
    "rollouts": {
        "by-user": {"steps": [50, 100], "stickiness": ["user_id", "session_id"]},
        "testers": {
            "steps": [1, 100],
            "rules": [{"when": [{"attribute": "user_id", "operator": "IN", "values": ["u7"]}], "serve": "new"}],
        },
        "by-path": {
            "steps": [1, 100],
            "rules": [{"when": [{"attribute": "path", "operator": "IN", "values": ["/beta"]}], "serve": "new"}],
        },
        "by-segment": {"steps": [1, 100], "rules": [{"segments": ["beta-paths"], "serve": "new"}]},
        "by-agent": {"steps": [50, 100], "stickiness": ["user_agent"]},
    },
}


@pytest.fixture
def staged() -> Iterator[Router]:
    """A router whose rollouts read the identity only (by-user, testers) or other attributes too (the rest)."""
    with Router.from_config(STAGED_CONFIG) as built:
        yield built


def test_rollouts_know_whether_the_identity_is_enough(staged: Router) -> None:
    """Stickiness and rule attributes, segments included, decide whether a rollout reads beyond the identity."""
    identity_only = {name: compiled.identity_only for name, compiled in staged._compiled.items()}
    assert identity_only == {
        "by-user": True,
        "testers": True,
        "by-path": False,
        "by-segment": False,
        "by-agent": False,
    }


def staged_asgi_app(router: Router, names: list[str], read_context: bool) -> Callable[..., Any]:
    """Decides ``names`` through the ambient context, then (optionally) reads the whole context; reports both."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        request = _current.get()
        body: dict[str, Any] = {name: list(router.decide(name)) for name in names}
        body["attributes_worked_out"] = request._resolved is not None  # type: ignore[attr-defined]
        if read_context:
            body["context"] = dict(current_context())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    return app


def staged_wsgi_app(router: Router, names: list[str], read_context: bool) -> Callable[..., Iterable[bytes]]:
    """The WSGI twin of :func:`staged_asgi_app`."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request = _current.get()
        body: dict[str, Any] = {name: list(router.decide(name)) for name in names}
        body["attributes_worked_out"] = request._resolved is not None  # type: ignore[attr-defined]
        if read_context:
            body["context"] = dict(current_context())
        start_response("200 OK", [])
        return [json.dumps(body).encode()]

    return app


def staged_call(kind: str, router: Router, names: list[str], path: str, headers: dict[str, str], read: bool) -> Any:
    """One request at ``path`` through the lazy middleware of ``kind`` (asgi or wsgi) around the staged app."""
    if kind == "asgi":
        lazy_asgi = AsgiMiddleware(staged_asgi_app(router, names, read), router=router, **OPTIONS)
        return asgi_call(lazy_asgi, "127.0.0.1", headers, path=path)
    lazy_wsgi = WsgiMiddleware(staged_wsgi_app(router, names, read), router=router, **OPTIONS)
    reply = wsgi_call(lazy_wsgi, "127.0.0.1", headers, path=path)
    del reply["environ"]
    return reply


ADAPTERS = ["asgi", "wsgi"]


@pytest.mark.parametrize("kind", ADAPTERS)
def test_identity_rollouts_are_decided_without_the_other_attributes(staged: Router, kind: str) -> None:
    """A rollout bucketed by user or visitor decides on the identity alone, as it would on the whole context."""
    headers = {"x-user-id": "u7", "cookie": f"canary_vid={VID}", "user-agent": "agent"}
    reply = staged_call(kind, staged, ["by-user", "testers"], "/", headers, read=False)
    assert reply["attributes_worked_out"] is False
    whole = Context(user_id="u7", session_id=VID, path="/", method="GET", client_ip="127.0.0.1", user_agent="agent")
    assert reply["by-user"] == list(staged.decide("by-user", whole))
    assert reply["testers"] == ["new", "rule_match", None, None]
    assert reply["vary"] == ["Cookie"]  # the response depends on the cookie: said even at the first stage
    assert reply["set_cookies"] == []


@pytest.mark.parametrize("kind", ADAPTERS)
@pytest.mark.parametrize("name", ["by-path", "by-segment"])
def test_rollouts_reading_other_attributes_get_the_whole_context(staged: Router, kind: str, name: str) -> None:
    """A rule on the path (directly or through a segment) sees the path: the request is worked out in full."""
    beta = staged_call(kind, staged, [name], "/beta", {"x-user-id": "u1"}, read=False)
    other = staged_call(kind, staged, [name], "/other", {"x-user-id": "u1"}, read=False)
    assert beta["attributes_worked_out"] is True
    assert beta[name][:2] == ["new", "rule_match"]
    assert other[name][0] == "old"


@pytest.mark.parametrize("kind", ADAPTERS)
def test_stickiness_on_another_attribute_buckets_on_it(staged: Router, kind: str) -> None:
    """A rollout bucketed by the user agent is decided on the user agent, not on an identity without it."""
    reply = staged_call(kind, staged, ["by-agent"], "/", {"user-agent": "agent-42"}, read=False)
    assert reply["by-agent"][3] == "agent-42"


@pytest.mark.parametrize("kind", ADAPTERS)
def test_a_new_visitor_keeps_one_id_through_both_stages(staged: Router, kind: str) -> None:
    """The visitor id made at the first stage is the one in the whole context and in the Set-Cookie header."""
    reply = staged_call(kind, staged, ["by-user"], "/page", {"user-agent": "agent"}, read=True)
    [cookie] = reply["set_cookies"]
    visitor = cookie.split(";", 1)[0].removeprefix("canary_vid=")
    assert reply["context"]["session_id"] == visitor
    assert reply["by-user"][3] == visitor
    assert reply["context"]["path"] == "/page"
    assert reply["context"]["user_agent"] == "agent"
    assert reply["context"]["client_ip"] == "127.0.0.1"  # the peer, as the first stage read it


@pytest.mark.parametrize("deciding", [False, True], ids=["nothing decided", "decided"])
@pytest.mark.parametrize("body", ["iterator", "list"])
def test_a_wsgi_request_leaves_no_reference_cycle(router: Router, deciding: bool, body: str) -> None:
    """Once the response is done the request lets its environ go: nothing is left for the garbage collector."""
    if body == "list":
        app = WsgiMiddleware(staged_wsgi_app(router, ["r"] if deciding else [], False), router=router, **OPTIONS)
    else:
        app = WsgiMiddleware(wsgi_app(router, deciding), router=router, **OPTIONS)
    wsgi_call(app, "127.0.0.1", {"x-user-id": "u7"})  # warm: first calls fill caches
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            reply = wsgi_call(app, "127.0.0.1", {"x-user-id": "u7", "cookie": f"canary_vid={VID}"})
            late = reply["environ"][DECISIONS_KEY]
            del reply
        assert late["r"].unit == "u7"  # a late read, after the response, still resolves the request
        del late
        assert gc.collect() == 0
    finally:
        gc.enable()
