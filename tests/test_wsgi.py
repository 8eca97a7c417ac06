"""canary_router.wsgi: decisions, ambient context (streaming too), cookies, split mode, bad input, a real gunicorn."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.validate import validator

import httpx
import pytest
from flask import Flask, Response, jsonify, request, stream_with_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary_router import Context, Decision, Reason, Router, UnknownRolloutError, bucket, current_context
from canary_router.overrides import create_token
from canary_router.testing import RecordingObserver
from canary_router.web import WebOptions
from canary_router.wsgi import CONTEXT_KEY, DECISIONS_KEY, CanaryMiddleware, StartResponse, WSGIApp, decisions
from webserver import ADMIN_TOKEN, ROOT, SECRET, free_port, python_module, serve

KEY = "wsgi-test-secret-0123456789abcdef"
OTHER_KEY = "someone-elses-secret-0123456789"
CONFIG = {
    "rollouts": {
        "r": {"steps": [50, 100], "stickiness": ["user_id", "session_id"]},
        "s": {"steps": [10, 100]},
    }
}
Environ = dict[str, Any]


def make_router() -> Router:
    """A router with rollout "r" (50 %, by user then visitor) and "s" (10 %, by user)."""
    return Router.from_config(CONFIG)


def user_with(variant: str, rollout: str = "r", percent: int = 50) -> str:
    """The first user id u0, u1, ... that the v1 bucketing puts on ``variant`` of ``rollout`` at ``percent``."""
    return next(f"u{i}" for i in range(10_000) if (bucket(rollout, f"u{i}") < percent * 100) == (variant == "new"))


# ---------------------------------------------------------------------------------------------- a tiny server


@dataclass
class Reply:
    """What a WSGI server would send: status, headers and the body, plus whether close() was called."""

    status: str
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive)."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def cookie(self, name: str) -> str | None:
        """The Set-Cookie line for cookie ``name``, if one was set."""
        return next((line for line in self.get("Set-Cookie") if line.startswith(f"{name}=")), None)


def environ_for(
    path: str = "/",
    *,
    headers: Mapping[str, str] | None = None,
    remote: str = "127.0.0.1",
    scheme: str = "http",
    query: str = "",
    method: str = "GET",
) -> Environ:
    """A complete PEP 3333 environ, as a server builds it (header names upper-cased, ``-`` → ``_``)."""
    environ: Environ = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "443" if scheme == "https" else "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": remote,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def call(app: WSGIApp, environ: Environ, *, validate: bool = True) -> Reply:
    """Run one request like a server: call, iterate the body, close it (through wsgiref's PEP 3333 validator)."""
    started: list[tuple[str, list[tuple[str, str]]]] = []
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], Any]:
        started.append((status, list(headers)))
        return written.append

    target = validator(app) if validate else app
    result = target(environ, start_response)
    try:
        chunks = [*written, *result]
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    status, headers = started[-1]
    return Reply(status, headers, b"".join(chunks))


def echo_app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """A raw WSGI app answering with what the middleware gave it: its decisions and the ambient context."""
    ctx = current_context()
    body = {
        "decisions": {name: d.variant for name, d in decisions(environ).items()},
        "context": dict(ctx),
        "same_context": environ.get(CONTEXT_KEY) is ctx,
    }
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]


def echo(reply: Reply) -> dict[str, Any]:
    """The JSON body of an ``echo_app`` reply."""
    data: dict[str, Any] = json.loads(reply.body)
    return data


# ---------------------------------------------------------------------------------------------- decision mode


def test_decisions_and_context_are_exposed_in_environ() -> None:
    """The app finds every rollout's decision and the request's context in environ, and that context is ambient."""
    router = make_router()
    seen: list[Environ] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(environ)
        return echo_app(environ, start_response)

    middleware = CanaryMiddleware(
        app, router=router, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )
    user = user_with("new")
    reply = call(middleware, environ_for(headers={"X-User-Id": user}))
    environ = seen[0]
    found = environ[DECISIONS_KEY]
    assert set(found) == {"r", "s"}
    assert found["r"] == Decision("new", Reason.SPLIT, bucket("r", user), user)
    assert decisions(environ) is found
    assert isinstance(environ[CONTEXT_KEY], Context)
    assert environ[CONTEXT_KEY]["user_id"] == user
    body = echo(reply)
    assert body["decisions"] == {"r": "new", "s": found["s"].variant}
    assert body["same_context"] is True
    assert current_context() == Context()  # nothing leaks into the server's thread


def test_decisions_helper_is_empty_without_the_middleware() -> None:
    """decisions(environ) is an empty mapping when the middleware did not run (or environ holds junk)."""
    assert dict(decisions({})) == {}
    assert dict(decisions({DECISIONS_KEY: "junk"})) == {}


def test_middleware_lays_its_context_over_an_enclosing_ambient_context() -> None:
    """An ambient context set around the middleware stays visible, under the request's attributes."""
    router = make_router()
    middleware = CanaryMiddleware(echo_app, router=router, secret=KEY)
    with router.context(tenant="acme"):
        body = echo(call(middleware, environ_for()))
    assert body["context"]["tenant"] == "acme"
    assert "session_id" in body["context"]


def flask_app(router: Router, **options: Any) -> Flask:
    """A Flask app with a decorated engine behind CanaryMiddleware: /variant, /stream, /vary/<value>, /boom."""
    app = Flask("wsgi_test")
    app.testing = True
    options = {"secret": KEY, "trusted_proxies": ["127.0.0.1"], "user_header": "x-user-id", **options}
    app.wsgi_app = CanaryMiddleware(app.wsgi_app, router=router, **options)  # type: ignore[method-assign]

    def engine_v1() -> str:
        return "old"

    @router.canary("r", old=engine_v1)
    def engine_v2() -> str:
        return "new"

    @app.get("/variant")
    def variant() -> Response:
        return jsonify(
            decided=decisions(request.environ)["r"].variant,
            called=engine_v2(),
            user=current_context().get("user_id"),
            session=current_context().get("session_id"),
        )

    @app.get("/stream")
    def stream() -> Response:
        def generate() -> Iterator[str]:
            for _ in range(3):
                yield f"{engine_v2()}:{current_context().get('user_id')}\n"

        return Response(generate(), mimetype="text/plain")

    @app.get("/stream-with-context")
    def stream_ctx() -> Response:
        def generate() -> Iterator[str]:
            yield f"{request.path}:{engine_v2()}\n"
            yield f"{request.path}:{engine_v2()}\n"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.get("/vary/<value>")
    def vary(value: str) -> Response:
        decisions(request.environ)["r"]
        response = Response("ok")
        response.headers["Vary"] = value
        return response

    return app


def test_flask_view_routes_by_the_ambient_context() -> None:
    """In a Flask view, the decorated engine runs the variant decided for the request's user."""
    router = make_router()
    client = flask_app(router).test_client()
    for variant in ("new", "old"):
        user = user_with(variant)
        data = client.get("/variant", headers={"x-user-id": user}).get_json()
        assert data == {"decided": variant, "called": variant, "user": user, "session": data["session"]}


def test_ambient_context_is_in_force_while_a_streamed_body_is_iterated() -> None:
    """A generator body (no stream_with_context) still sees the request's context at every chunk."""
    router = make_router()
    client = flask_app(router).test_client()
    for variant in ("new", "old"):
        user = user_with(variant)
        response = client.get("/stream", headers={"x-user-id": user})
        assert response.get_data(as_text=True) == f"{variant}:{user}\n" * 3
        response.close()
        body = client.get("/stream-with-context", headers={"x-user-id": user}).get_data(as_text=True)
        assert body == f"/stream-with-context:{variant}\n" * 2
    assert current_context() == Context()


def test_ambient_context_is_in_force_in_a_raw_generator_and_its_close() -> None:
    """A raw WSGI app's generator body sees the context while iterated and when closed, and close() is delegated."""
    router = make_router()
    events: list[str] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            for _ in range(2):
                yield str(current_context().get("user_id")).encode()
        finally:
            events.append(f"closed:{current_context().get('user_id')}")

    middleware = CanaryMiddleware(
        app, router=router, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )
    reply = call(middleware, environ_for(headers={"X-User-Id": "u7"}))
    assert reply.body == b"u7u7"
    assert events == ["closed:u7"]


class ClosingBody:
    """A response iterable that records when close() is called, and the ambient user at that moment."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed: list[str | None] = []

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed.append(current_context().get("user_id"))


def closing_app(bodies: list[ClosingBody], chunks: list[bytes]) -> WSGIApp:
    """A raw WSGI app answering with a new ClosingBody of ``chunks`` each time, kept in ``bodies``."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        bodies.append(ClosingBody(chunks))
        return bodies[-1]

    return app


def user_header_middleware(app: WSGIApp, split: bool = False) -> CanaryMiddleware:
    """CanaryMiddleware trusting 127.0.0.1's x-user-id header; in split mode ``app`` serves both variants of "r"."""
    extra: dict[str, Any] = {"rollout": "r", "new_app": app} if split else {}
    return CanaryMiddleware(
        app, router=make_router(), secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id", **extra
    )


@pytest.mark.parametrize("split", [False, True], ids=["decision-mode", "split-mode"])
def test_close_of_the_inner_iterable_is_called_once(split: bool) -> None:
    """The server's close() reaches the app's iterable exactly once, inside the request's context."""
    bodies: list[ClosingBody] = []
    middleware = user_header_middleware(closing_app(bodies, [b"a", b"b"]), split)
    reply = call(middleware, environ_for(headers={"X-User-Id": "u3"}))
    assert reply.body == b"ab"
    assert bodies[0].closed == ["u3"]


@pytest.mark.parametrize("split", [False, True], ids=["decision-mode", "split-mode"])
def test_a_body_closed_before_it_is_iterated_still_closes_the_apps_iterable(split: bool) -> None:
    """A server (or outer middleware) that closes the body without iterating it still reaches the app's close()."""
    bodies: list[ClosingBody] = []
    middleware = user_header_middleware(closing_app(bodies, [b"a"]), split)
    body = middleware(environ_for(headers={"X-User-Id": "u5"}), lambda status, headers, exc_info=None: print)
    assert bodies[0].closed == []
    body.close()  # type: ignore[attr-defined]
    assert bodies[0].closed == ["u5"]
    body.close()  # type: ignore[attr-defined]
    assert bodies[0].closed == ["u5"]


def test_an_exhausted_body_closes_the_apps_iterable_even_if_the_server_never_closes() -> None:
    """Decision mode closes the app's iterable, in the request's context, once its body is exhausted."""
    bodies: list[ClosingBody] = []
    middleware = user_header_middleware(closing_app(bodies, [b"a", b"b"]))
    body = middleware(environ_for(headers={"X-User-Id": "u6"}), lambda status, headers, exc_info=None: print)
    assert list(body) == [b"a", b"b"]
    assert bodies[0].closed == ["u6"]
    body.close()  # type: ignore[attr-defined]
    assert bodies[0].closed == ["u6"]


def test_an_error_while_the_body_is_iterated_reaches_the_server_and_closes_the_apps_iterable() -> None:
    """An exception from the app's iterator propagates unchanged, and the app's close() still runs, in context."""
    events: list[str] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            yield b"first"
            raise LookupError("broken stream")
        finally:
            events.append(f"closed:{current_context().get('user_id')}")

    middleware = user_header_middleware(app)
    body = iter(middleware(environ_for(headers={"X-User-Id": "u8"}), lambda status, headers, exc_info=None: print))
    assert next(body) == b"first"
    with pytest.raises(LookupError, match="broken stream"):
        next(body)
    assert events == ["closed:u8"]
    assert current_context() == Context()


def test_list_bodies_and_file_wrappers_pass_through_untouched() -> None:
    """Bodies that run no app code while iterated (lists, the server's file_wrapper) are returned as they are."""
    router = make_router()

    class FileWrapper:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def __iter__(self) -> Iterator[bytes]:
            yield self.data

    listed: list[bytes] = [b"listed"]
    wrapped = FileWrapper(b"file")

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return listed if environ["PATH_INFO"] == "/list" else environ["wsgi.file_wrapper"](b"file")

    middleware = CanaryMiddleware(app, router=router, secret=KEY)
    environ = environ_for("/list")
    assert middleware(environ, lambda status, headers, exc_info=None: lambda data: None) is listed
    environ = environ_for("/file")
    environ["wsgi.file_wrapper"] = FileWrapper
    result = middleware(environ, lambda status, headers, exc_info=None: lambda data: None)
    assert type(result) is FileWrapper
    assert list(result) == list(wrapped)


def test_legacy_write_callable_still_works() -> None:
    """An app that writes through start_response's write() gets the server's write callable, headers added."""
    router = make_router()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        decisions(environ)["r"]  # decides: the response gets the visitor cookie
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"returned"]

    reply = call(CanaryMiddleware(app, router=router, secret=KEY), environ_for(), validate=False)
    assert reply.body == b"written returned"
    assert reply.cookie("canary_vid") is not None


# ---------------------------------------------------------------------------------------------- response headers


def test_visitor_cookie_is_httponly_lax_and_secure_only_over_https() -> None:
    """The visitor cookie carries HttpOnly and SameSite=Lax always, and Secure exactly for https requests."""
    router = make_router()
    middleware = CanaryMiddleware(echo_app, router=router, secret=KEY)
    plain = call(middleware, environ_for()).cookie("canary_vid")
    secure = call(middleware, environ_for(scheme="https")).cookie("canary_vid")
    assert plain is not None
    assert secure is not None
    for line in (plain, secure):
        attributes = [part.strip() for part in line.split(";")]
        assert "HttpOnly" in attributes
        assert "SameSite=Lax" in attributes
        assert "Path=/" in attributes
    assert "Secure" not in [part.strip() for part in plain.split(";")]
    assert "Secure" in [part.strip() for part in secure.split(";")]


def test_visitor_cookie_keeps_an_anonymous_visitor_on_one_variant() -> None:
    """A returning visitor sends the cookie back, keeps the same id and variant, and gets no new cookie."""
    router = make_router()
    client = flask_app(router).test_client()
    first = client.get("/variant")
    session = first.get_json()["session"]
    assert first.headers.get("Set-Cookie", "").startswith(f"canary_vid={session};")
    expected = "new" if bucket("r", session) < 5000 else "old"
    for _ in range(3):
        again = client.get("/variant")
        assert again.get_json() == {"decided": expected, "called": expected, "user": None, "session": session}
        assert "Set-Cookie" not in again.headers


@pytest.mark.parametrize(
    ("app_vary", "expected"),
    [
        (None, ["Cookie"]),
        ("Accept-Encoding", ["Accept-Encoding, Cookie"]),
        ("Accept-Encoding, cookie", ["Accept-Encoding, cookie"]),
        ("*", ["*"]),
    ],
)
def test_vary_cookie_is_merged_with_the_apps_vary(app_vary: str | None, expected: list[str]) -> None:
    """Vary gains "Cookie" once: added, appended to the app's value, or left alone when already covered."""
    router = make_router()
    headers = [("Content-Type", "text/plain")] + ([("Vary", app_vary)] if app_vary else [])

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        decisions(environ)["r"]  # decides: the response depends on the request's cookies
        start_response("200 OK", list(headers))
        return [b"ok"]

    reply = call(CanaryMiddleware(app, router=router, secret=KEY), environ_for())
    assert reply.get("Vary") == expected


def test_vary_is_merged_in_a_flask_response() -> None:
    """Flask's own Vary header is merged with ours, not duplicated."""
    client = flask_app(make_router()).test_client()
    assert client.get("/vary/Accept-Encoding").headers.getlist("Vary") == ["Accept-Encoding, Cookie"]


def test_canary_variant_header_only_when_enabled() -> None:
    """Canary-Variant lists every decision when variant_header=True, and is absent by default."""
    router = make_router()
    user = user_with("new")
    environ = environ_for(headers={"X-User-Id": user})
    common: dict[str, Any] = {"secret": KEY, "trusted_proxies": ["127.0.0.1"], "user_header": "x-user-id"}
    default = call(CanaryMiddleware(echo_app, router=router, **common), dict(environ))
    assert default.get("Canary-Variant") == []
    enabled = call(CanaryMiddleware(echo_app, router=router, variant_header=True, **common), dict(environ))
    s = router.decide("s", {"user_id": user}).variant
    assert enabled.get("Canary-Variant") == [f"r=new, s={s}"]


def test_options_object_and_keywords_combine() -> None:
    """options=WebOptions(...) is used as given, and keyword options override its fields."""
    router = make_router()
    middleware = CanaryMiddleware(echo_app, router=router, options=WebOptions(secret=KEY), variant_header=True)
    assert middleware.options.variant_header is True
    assert middleware.options.secret == KEY


def test_bad_configuration_fails_at_creation() -> None:
    """Unknown options, bad proxies, half a split configuration or an unknown rollout raise at init."""
    router = make_router()
    with pytest.raises(TypeError):
        CanaryMiddleware(echo_app, router=router, no_such_option=True)
    with pytest.raises(ValueError, match="trusted_proxies"):
        CanaryMiddleware(echo_app, router=router, trusted_proxies=["not-an-ip"])
    with pytest.raises(TypeError, match="new_app"):
        CanaryMiddleware(echo_app, router=router, rollout="r")
    with pytest.raises(UnknownRolloutError):
        CanaryMiddleware(echo_app, router=router, rollout="nope", new_app=echo_app)


# ---------------------------------------------------------------------------------------------- trust


def test_user_header_from_an_untrusted_peer_is_ignored() -> None:
    """x-user-id counts only from a trusted proxy; from anyone else the visitor is anonymous."""
    router = make_router()
    middleware = CanaryMiddleware(
        echo_app, router=router, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )
    trusted = echo(call(middleware, environ_for(headers={"X-User-Id": "u1"})))
    untrusted = echo(call(middleware, environ_for(headers={"X-User-Id": "u1"}, remote="203.0.113.9")))
    assert trusted["context"]["user_id"] == "u1"
    assert "user_id" not in untrusted["context"]
    session = untrusted["context"]["session_id"]
    assert untrusted["decisions"]["r"] == ("new" if bucket("r", session) < 5000 else "old")


def test_forwarded_for_counts_only_through_trusted_proxies() -> None:
    """The client IP comes from X-Forwarded-For behind a trusted proxy, and is the peer otherwise."""
    router = make_router()
    middleware = CanaryMiddleware(echo_app, router=router, secret=KEY, trusted_proxies=["127.0.0.1"])
    forwarded = {"X-Forwarded-For": "198.51.100.7, 127.0.0.1"}
    assert echo(call(middleware, environ_for(headers=forwarded)))["context"]["client_ip"] == "198.51.100.7"
    direct = echo(call(middleware, environ_for(headers=forwarded, remote="203.0.113.9")))
    assert direct["context"]["client_ip"] == "203.0.113.9"


def test_user_id_from_trusts_the_servers_authenticated_user() -> None:
    """user_id_from(environ) supplies the authenticated user (e.g. REMOTE_USER); a failing one is ignored."""
    router = make_router()
    middleware = CanaryMiddleware(echo_app, router=router, secret=KEY, user_id_from=lambda e: e.get("REMOTE_USER"))
    environ = environ_for()
    environ["REMOTE_USER"] = "alice"
    assert echo(call(middleware, environ))["context"]["user_id"] == "alice"

    def broken(environ: Environ) -> str | None:
        raise RuntimeError("auth backend down")

    failing = CanaryMiddleware(echo_app, router=router, secret=KEY, user_id_from=broken)
    reply = call(failing, environ_for())
    assert reply.status == "200 OK"
    assert "user_id" not in echo(reply)["context"]


def test_utf8_header_values_are_re_decoded_from_latin1() -> None:
    """A UTF-8 user id, which the server hands over as latin-1, is bucketed as the text the gateway sent."""
    router = make_router()
    middleware = CanaryMiddleware(
        echo_app, router=router, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )
    native = "josé-✓".encode().decode("latin-1")
    body = echo(call(middleware, environ_for(headers={"X-User-Id": native})))
    assert body["context"]["user_id"] == "josé-✓"
    before = middleware.resolver.counters["malformed_input"]
    not_utf8 = "jos\xe9"  # the latin-1 byte 0xE9 alone is not UTF-8
    body = echo(call(middleware, environ_for(headers={"X-User-Id": not_utf8})))
    assert "user_id" not in body["context"]
    assert middleware.resolver.counters["malformed_input"] == before + 1


# ---------------------------------------------------------------------------------------------- overrides


def test_forged_expired_and_unknown_rollout_overrides_are_ignored_and_counted() -> None:
    """Tokens signed with another secret, expired, or for a rollout the router lacks change nothing and count."""
    router = make_router()
    middleware = CanaryMiddleware(
        echo_app, router=router, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )
    user = user_with("old")
    now = time.time()
    bad = [
        create_token(OTHER_KEY, rollout="r", variant="new", ttl=600),
        create_token(KEY, rollout="r", variant="new", ttl=60, now=now - 3600),
        create_token(KEY, rollout="checkout", variant="new", ttl=600),
        "not-a-token",
    ]
    for index, token in enumerate(bad, start=1):
        via_header = call(middleware, environ_for(headers={"X-User-Id": user, "X-Canary-Override": token}))
        via_query = call(middleware, environ_for(headers={"X-User-Id": user}, query=f"canary_override={token}"))
        for reply in (via_header, via_query):
            assert echo(reply)["decisions"]["r"] == "old"
            assert reply.cookie("canary_override") is None
        assert middleware.resolver.counters["overrides_rejected"] == 2 * index
    assert middleware.resolver.counters["overrides_accepted"] == 0


def test_signed_override_wins_and_is_kept_in_a_cookie() -> None:
    """A token signed with the secret puts the tester on its variant, and the cookie keeps it there."""
    router = make_router()
    client = flask_app(router).test_client()
    user = user_with("old")
    token = create_token(KEY, rollout="r", variant="new", ttl=600)
    first = client.get("/variant", headers={"x-user-id": user, "x-canary-override": token})
    assert first.get_json()["called"] == "new"
    kept = next(line for line in first.headers.getlist("Set-Cookie") if line.startswith("canary_override="))
    assert kept.startswith(f"canary_override={token};")
    assert "HttpOnly" in kept
    again = client.get("/variant", headers={"x-user-id": user})  # no header: the cookie carries it
    assert again.get_json()["called"] == "new"
    assert (
        client.get("/variant", headers={"x-user-id": user}, query_string={"canary_override": "junk"}).get_json()[
            "called"
        ]
        == "new"
    )


# ---------------------------------------------------------------------------------------------- bad input

latin1 = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=300)
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=100)
header_value = latin1 | any_text | st.sampled_from(["", " ", ",", ";", "=", '"', "\x00", "\xff" * 50])
ip_like = st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "[::1]:80", "999.1.1.1", "", "unknown", "1.2.3"])
forwarded = st.lists(ip_like | latin1, max_size=40).map(", ".join)
cookie_pair = st.tuples(st.sampled_from(["canary_vid", "canary_override", "canary_pin", "x"]), header_value).map(
    "=".join
)
cookie_header = st.lists(cookie_pair, max_size=20).map("; ".join) | st.integers(5_000, 40_000).map(
    lambda n: "canary_vid=" + "a" * n
)

FUZZ_ROUTER = make_router()
FUZZ_APP = CanaryMiddleware(
    echo_app,
    router=FUZZ_ROUTER,
    secret=KEY,
    trusted_proxies=["127.0.0.0/8", "::1"],
    user_header="x-user-id",
    country_header="cf-ipcountry",
    affinity=True,
    variant_header=True,
)


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(
        st.sampled_from(
            [
                "Cookie",
                "X-Forwarded-For",
                "X-User-Id",
                "Host",
                "User-Agent",
                "Accept-Language",
                "X-Canary-Override",
                "CF-IPCountry",
            ]
        ),
        header_value,
    ),
    cookie=cookie_header,
    xff=forwarded,
    path=header_value,
    query=header_value,
    remote=ip_like | latin1,
    drop=st.sets(st.sampled_from(["REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "REMOTE_ADDR", "wsgi.url_scheme"])),
)
def test_bad_input_never_breaks_a_request(
    headers: dict[str, str], cookie: str, xff: str, path: str, query: str, remote: str, drop: set[str]
) -> None:
    """Garbage headers, huge cookies, junk X-Forwarded-For and missing environ keys still get the app's 200."""
    environ = environ_for(headers={**headers, "Cookie": cookie, "X-Forwarded-For": xff}, remote=remote)
    environ["PATH_INFO"] = path
    environ["QUERY_STRING"] = query
    for key in drop:
        environ.pop(key, None)
    reply = call(FUZZ_APP, environ, validate=False)
    assert reply.status == "200 OK"
    assert set(echo(reply)["decisions"]) == {"r", "s"}


def test_wrong_types_in_environ_never_break_a_request() -> None:
    """Non-string environ values (a broken server or middleware) are ignored, not raised."""
    environ: Environ = {
        "REQUEST_METHOD": b"GET",
        "PATH_INFO": None,
        "QUERY_STRING": 7,
        "REMOTE_ADDR": ("1.2.3.4", 80),
        "wsgi.url_scheme": None,
        "HTTP_COOKIE": b"canary_vid=x",
        "HTTP_X_USER_ID": 42,
    }
    reply = call(FUZZ_APP, environ, validate=False)
    assert reply.status == "200 OK"


def test_huge_cookie_and_garbage_forwarded_for_in_flask() -> None:
    """Through Flask too, an oversized cookie and a garbage X-Forwarded-For leave the request working."""
    router = make_router()
    client = flask_app(router).test_client()
    garbage = {
        "Cookie": "canary_vid=" + "f" * 10_000 + "; canary_override=" + "\xff" * 100,
        "X-Forwarded-For": "::::, 1.2.3.4.5, \xff\xfe, ,,",
        "Host": "\xe9",
    }
    response = client.get("/variant", headers=garbage)
    assert response.status_code == 200
    assert response.get_json()["called"] in ("old", "new")


# ---------------------------------------------------------------------------------------------- split mode


def variant_app(variant: str, *, status: str = "200 OK", fail: bool = False) -> WSGIApp:
    """A raw WSGI app that answers ``variant`` with ``status``, or raises when ``fail``."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if fail:
            raise RuntimeError(f"{variant} failed")
        start_response(status, [("Content-Type", "text/plain")])
        return [variant.encode()]

    return app


def split(router: Router, old: WSGIApp, new: WSGIApp) -> CanaryMiddleware:
    """Split mode on rollout "r" between ``old`` and ``new``, trusting x-user-id from 127.0.0.1."""
    return CanaryMiddleware(
        old, router=router, rollout="r", new_app=new, secret=KEY, trusted_proxies=["127.0.0.1"], user_header="x-user-id"
    )


def test_split_mode_routes_each_user_to_the_decided_app() -> None:
    """Requests decided "new" reach new_app, the others the old app, and each is observed once."""
    router = make_router()
    router.add_observer(recorder := RecordingObserver())
    middleware = split(router, variant_app("old"), variant_app("new"))
    users = [f"u{i}" for i in range(200)]
    for user in users:
        reply = call(middleware, environ_for(headers={"X-User-Id": user}))
        assert reply.body.decode() == ("new" if bucket("r", user) < 5000 else "old")
    expected_new = sum(bucket("r", u) < 5000 for u in users)
    assert recorder.count("r", "new", ok=True) == expected_new
    assert recorder.count("r", "old", ok=True) == len(users) - expected_new
    assert len(recorder.observations) == len(users)
    snapshot = router.aggregator.snapshot("r") if router.aggregator else None
    assert snapshot is not None
    assert (snapshot.new.requests, snapshot.old.requests) == (expected_new, len(users) - expected_new)
    assert snapshot.new.errors == snapshot.old.errors == 0


def test_split_mode_counts_5xx_as_errors() -> None:
    """A 500 from the new app is an error of "new"; a 404 from the old app is not an error."""
    router = make_router()
    router.add_observer(recorder := RecordingObserver())
    middleware = split(router, variant_app("old", status="404 Not Found"), variant_app("new", status="503 Busy"))
    call(middleware, environ_for(headers={"X-User-Id": user_with("new")}))
    call(middleware, environ_for(headers={"X-User-Id": user_with("old")}))
    assert recorder.count("r", "new", ok=False) == 1
    assert recorder.count("r", "old", ok=True) == 1
    snapshot = router.aggregator.snapshot("r") if router.aggregator else None
    assert snapshot is not None
    assert snapshot.new.errors == 1
    assert snapshot.old.errors == 0


def test_split_mode_records_exceptions_and_reraises_them() -> None:
    """An exception from the app, at call time or while streaming, is recorded as an error and re-raised."""
    router = make_router()
    router.add_observer(recorder := RecordingObserver())

    def streams_then_fails(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"partial"
        raise ValueError("lost the database mid-stream")

    middleware = split(router, streams_then_fails, variant_app("new", fail=True))
    with pytest.raises(RuntimeError, match="new failed"):
        call(middleware, environ_for(headers={"X-User-Id": user_with("new")}))
    with pytest.raises(ValueError, match="mid-stream"):
        call(middleware, environ_for(headers={"X-User-Id": user_with("old")}))
    errors = [o for o in recorder.observations if not o.ok]
    assert [(o.variant, type(o.error)) for o in errors] == [("new", RuntimeError), ("old", ValueError)]
    assert len(recorder.observations) == 2


def test_split_mode_with_flask_counts_a_500_response_and_a_propagated_exception() -> None:
    """Flask's 500 page and an exception Flask propagates are both errors of the variant that served them."""
    router = make_router()
    router.add_observer(recorder := RecordingObserver())
    new = Flask("new_app")

    @new.get("/")
    def broken() -> str:
        raise KeyError("bug in v2")

    old = Flask("old_app")

    @old.get("/")
    def fine() -> str:
        return "old"

    wrapper = Flask("wrapper")
    wrapper.wsgi_app = split(router, old.wsgi_app, new.wsgi_app)  # type: ignore[method-assign]
    http = wrapper.test_client()
    assert http.get("/", headers={"x-user-id": user_with("new")}, buffered=True).status_code == 500
    new.testing = True  # now Flask re-raises the view's exception instead of answering 500
    with pytest.raises(KeyError):
        http.get("/", headers={"x-user-id": user_with("new")}, buffered=True)
    assert http.get("/", headers={"x-user-id": user_with("old")}, buffered=True).data == b"old"
    assert recorder.count("r", "new", ok=False) == 2
    assert recorder.count("r", "old", ok=True) == 1


def test_start_response_with_exc_info_reaches_the_server_and_counts_as_an_error() -> None:
    """An app answering an exception with start_response(..., exc_info) passes it on, and a 500 is an error."""
    router = make_router()
    router.add_observer(recorder := RecordingObserver())
    received: list[Any] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            raise LookupError("no such item")
        except LookupError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info())
        return [b"sorry"]

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], Any]:
        received.append((status, exc_info))
        return lambda data: None

    middleware = split(router, app, app)
    body = middleware(environ_for(headers={"X-User-Id": "u1"}), start_response)
    assert b"".join(body) == b"sorry"
    getattr(body, "close", lambda: None)()
    ((status, exc_info),) = received
    assert status.startswith("500")
    assert exc_info is not None
    assert exc_info[0] is LookupError
    (observation,) = recorder.observations
    assert not observation.ok


def test_split_mode_records_an_error_raised_by_close() -> None:
    """If the app's close() raises, the request is recorded as an error and the exception reaches the server."""
    router = make_router()
    router.add_observer(recorder := RecordingObserver())

    class FailingClose(ClosingBody):
        def close(self) -> None:
            raise OSError("cannot release the connection")

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return FailingClose([b"a"])

    middleware = split(router, app, app)
    body = middleware(environ_for(headers={"X-User-Id": "u1"}), lambda status, headers, exc_info=None: print)
    iterator = iter(body)
    assert next(iterator) == b"a"
    with pytest.raises(OSError, match="release"):
        getattr(body, "close")()  # noqa: B009  # the body's type is private: close() as a server calls it
    (observation,) = recorder.observations
    assert not observation.ok
    assert isinstance(observation.error, OSError)


def test_split_rollout_is_always_decided() -> None:
    """In split mode the split rollout is decided even when options.rollouts names only others."""
    router = make_router()
    middleware = CanaryMiddleware(echo_app, router=router, rollout="r", new_app=echo_app, secret=KEY, rollouts=["s"])
    assert middleware.resolver.rollout_names == ("s", "r")
    assert set(echo(call(middleware, environ_for()))["decisions"]) == {"r", "s"}


def test_split_mode_duration_covers_the_streamed_body() -> None:
    """The observed latency runs until the body is closed, so a slow stream shows up in the histogram."""
    router = make_router()
    router.add_observer(recorder := RecordingObserver())

    def slow_stream(environ: Environ, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for _ in range(3):
            time.sleep(0.05)
            yield b"chunk"

    middleware = split(router, variant_app("old"), slow_stream)
    started = time.perf_counter()
    call(middleware, environ_for(headers={"X-User-Id": user_with("new")}))
    elapsed = time.perf_counter() - started
    (observation,) = recorder.observations
    assert observation.variant == "new"
    assert observation.ok
    assert 0.15 <= observation.duration <= elapsed
    snapshot = router.aggregator.snapshot("r") if router.aggregator else None
    assert snapshot is not None
    p50 = snapshot.new.percentile(50)
    assert p50 is not None
    assert p50 >= 0.15


def test_split_mode_keeps_the_decision_features() -> None:
    """In split mode the apps still get decisions, the ambient context, the cookie and Vary."""
    router = make_router()
    middleware = split(router, echo_app, echo_app)
    reply = call(middleware, environ_for(headers={"X-User-Id": "u5"}))
    body = echo(reply)
    assert body["context"]["user_id"] == "u5"
    assert body["same_context"] is True
    assert body["decisions"]["r"] == ("new" if bucket("r", "u5") < 5000 else "old")
    assert reply.get("Vary") == ["Cookie"]
    assert reply.cookie("canary_vid") is not None


# ---------------------------------------------------------------------------------------------- a real server

EXAMPLE = ROOT / "integrations" / "flask"


@pytest.mark.slow
def test_flask_example_under_gunicorn_serves_1000_users(tmp_path: Path) -> None:
    """The Flask example under a real gunicorn routes 1,000 users by the v1 buckets, honours overrides and rollback."""
    port = free_port()
    command = python_module("gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "app:app")
    with (
        serve(command, port, cwd=EXAMPLE, env={"HOME": str(tmp_path)}) as base,
        httpx.Client(base_url=base, timeout=10) as http,
    ):
        # 1,000 identified users, twice each: sticky, and exactly the v1 cohort of 25 %
        seen: dict[str, str] = {}
        for round_ in range(2):
            for i in range(1000):
                uid = f"u{i}"
                variant = http.get("/recommendations", headers={"x-user-id": uid}).json()["variant"]
                if round_ == 0:
                    seen[uid] = variant
                assert variant == seen[uid], uid
                assert variant == ("new" if bucket("recommender", uid) < 2500 else "old"), uid
        share = sum(v == "new" for v in seen.values()) / len(seen)
        assert abs(share - 0.25) <= 4 * (0.25 * 0.75 / 1000) ** 0.5  # within 4 standard deviations

        # 20 anonymous visitors, each with their own cookie jar, stay on one variant
        for _ in range(20):
            with httpx.Client(base_url=base, timeout=10) as visitor:
                first = visitor.get("/recommendations")
                vid = visitor.cookies["canary_vid"]
                cookie = first.headers["set-cookie"]
                assert "HttpOnly" in cookie
                assert "SameSite=Lax" in cookie
                assert "Secure" not in cookie
                expected = "new" if bucket("recommender", vid) < 2500 else "old"
                assert first.json()["variant"] == expected
                for _ in range(2):
                    again = visitor.get("/recommendations")
                    assert again.json()["variant"] == expected
                    assert "set-cookie" not in again.headers

        # overrides: one signed with another secret is refused, one signed with the server's works
        old_user = next(uid for uid, v in seen.items() if v == "old")
        forged = create_token(OTHER_KEY, rollout="recommender", variant="new", ttl=600)
        reply = http.get("/recommendations", headers={"x-user-id": old_user, "x-canary-override": forged})
        assert reply.json()["variant"] == "old"
        signed = create_token(SECRET, rollout="recommender", variant="new", ttl=600)
        with httpx.Client(base_url=base, timeout=10) as tester:
            reply = tester.get("/recommendations", headers={"x-user-id": old_user, "x-canary-override": signed})
            assert reply.json()["variant"] == "new"
            assert tester.get("/recommendations", headers={"x-user-id": old_user}).json()["variant"] == "new"

        # rollback: refused without the admin token, immediate with it
        assert http.post("/admin/rollback").status_code == 401
        assert http.post("/admin/rollback", headers={"Authorization": "Bearer wrong"}).status_code == 401
        new_user = next(uid for uid, v in seen.items() if v == "new")
        token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        rolled = http.post("/admin/rollback", headers=token, json={"reason": "smoke test"})
        assert rolled.status_code == 200
        assert rolled.json()["phase"] == "rolled_back"
        assert http.get("/recommendations", headers={"x-user-id": new_user}).json()["variant"] == "old"
