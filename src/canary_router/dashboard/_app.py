"""The dashboard as a pure ASGI application: pages, static files, the JSON API and the actions."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs

from ..errors import ConflictError, StoreError, TransitionError, UnknownRolloutError
from ..web import RequestInfo, parse_cookies
from . import _data, _page
from ._auth import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    TOKEN_ACTOR,
    Authenticate,
    Authenticator,
    Identity,
    same_origin,
)

if TYPE_CHECKING:
    from ..asgi import Receive, Scope, Send
    from ..router import Router

__all__ = ["ACTIONS", "Dashboard"]

_log = logging.getLogger("canary_router")

ACTIONS = ("promote", "pause", "resume", "rollback")
"""The actions ``POST api/rollouts/{name}/{action}`` accepts."""

_MAX_BODY = 64 * 1024
_MAX_REASON = 500
_STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", _CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
_HTML = "text/html; charset=utf-8"
_JSON = "application/json"

T = TypeVar("T")


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    cache: bytes = b"no-store"

    async def send(self, send: Send, *, head: bool) -> None:
        headers = [
            (b"content-type", self.content_type.encode()),
            (b"content-length", str(len(self.body)).encode()),
            (b"cache-control", self.cache),
            *_SECURITY_HEADERS,
            *self.headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.body})


def _json(status: int, document: Any, headers: list[tuple[bytes, bytes]] | None = None) -> _Response:
    body = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    return _Response(status, body, _JSON, headers or [])


def _error(status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> _Response:
    return _json(status, {"error": message}, headers)


def _redirect(location: str, headers: list[tuple[bytes, bytes]] | None = None) -> _Response:
    return _Response(303, b"", headers=[(b"location", location.encode("utf-8")), *(headers or [])])


@dataclass(slots=True)
class _Request:
    """One HTTP request, as the dashboard reads it (all per-request state lives here, never on the app)."""

    method: str
    path: str
    """The path inside the dashboard (without the mount's root path)."""
    root: str
    """Where the dashboard is mounted (``""`` at the server's root)."""
    secure: bool
    info: RequestInfo
    cookies: dict[str, str]
    set_cookies: list[tuple[bytes, bytes]] = field(default_factory=list)

    @classmethod
    def from_scope(cls, scope: Scope) -> _Request:
        root = str(scope.get("root_path") or "").rstrip("/")
        path = str(scope.get("path") or "/")
        if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
            path = path[len(root) :]  # ASGI servers and Starlette's Mount keep the full path in ``path``
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers") or ():
            name = bytes(raw_name).decode("latin-1").lower()
            value = bytes(raw_value).decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        client = scope.get("client")
        scheme = str(scope.get("scheme") or "http")
        query = scope.get("query_string") or b""
        info = RequestInfo(
            method=str(scope.get("method") or "GET").upper(),
            path=path,
            scheme=scheme,
            query_string=bytes(query).decode("latin-1"),
            peer=client[0] if client else None,
            headers=headers,
            user_id=_scope_user(scope),
        )
        cookies = parse_cookies(headers.get("cookie"), (SESSION_COOKIE, CSRF_COOKIE))
        return cls(info.method, path, root, scheme == "https", info, cookies)

    def cookie(self, name: str, value: str, max_age: int) -> None:
        """Add a ``Set-Cookie`` for the dashboard's path: HttpOnly, SameSite=Strict, Secure on https."""
        parts = [f"{name}={value}", f"Path={self.root or '/'}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
        if self.secure:
            parts.append("Secure")
        self.set_cookies.append((b"set-cookie", "; ".join(parts).encode("latin-1")))

    def query(self, name: str) -> str | None:
        values = parse_qs(self.info.query_string).get(name)
        return values[0] if values else None

    @property
    def wants_html(self) -> bool:
        """Whether a POST came from a plain HTML form (answered with a redirect, not JSON)."""
        content_type = self.info.headers.get("content-type", "")
        return content_type.startswith("application/x-www-form-urlencoded") and "text/html" in self.info.headers.get(
            "accept", ""
        )


def _scope_user(scope: Scope) -> str | None:
    """The host application's authenticated user (Starlette's ``AuthenticationMiddleware`` sets ``scope["user"]``)."""
    user = scope.get("user")
    if user is None:
        return None
    try:
        if not getattr(user, "is_authenticated", False):
            return None
    except Exception:
        return None
    for attribute in ("identity", "username", "display_name"):
        try:  # Starlette's BaseUser.identity raises NotImplementedError on SimpleUser
            value = getattr(user, attribute, None)
        except Exception:  # noqa: S112  # an odd user object: try its next attribute
            continue
        if value:
            return str(value)
    return None


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or ``None`` when it is larger than the dashboard accepts."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _parse_form(request: _Request, body: bytes) -> dict[str, Any] | str:
    """The body as a dict (JSON object or URL-encoded form), or an error message."""
    content_type = request.info.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body.strip():
        return {}
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return "the body is not valid JSON"
        return data if isinstance(data, dict) else "the body must be a JSON object"
    if content_type == "application/x-www-form-urlencoded":
        try:
            return {k: v[0] for k, v in parse_qs(body.decode("utf-8"), max_num_fields=20).items()}
        except (ValueError, UnicodeDecodeError):
            return "the form is malformed"
    return f"unsupported content type {content_type or '(none)'!r}: send JSON or a form"


class Dashboard:
    """The rollout dashboard: a pure ASGI app to mount in your application or to run on its own.

    ``Dashboard(router, token="...")`` shows every rollout of ``router`` (phase, steps, the guard's verdict
    with its numbers, error rate, p95 latency and requests of old and new over time, the audit log) and,
    for an authenticated user, offers promote, pause, resume and rollback, recorded with the actor as
    ``dashboard:<actor>``. Mount it under a path (Starlette: ``Mount("/_canary", app=dashboard)``) or run it
    with :func:`canary_router.dashboard.serve`.

    Authentication, one or both:

    * ``token``: a shared secret (at least 16 characters). Scripts send ``Authorization: Bearer <token>``;
      browsers sign in with a form and get a signed, ``HttpOnly``, ``SameSite=Strict`` session cookie
      (``session_ttl`` seconds). The actor is ``"token"``.
    * ``authenticate``: ``authenticate(request) -> actor | None`` (sync or async), given a
      :class:`~canary_router.web.RequestInfo` with every request header (and ``user_id`` from
      ``scope["user"]`` when the host set one), to reuse the host application's own sign-in.

    Without either, the dashboard is read-only and every action answers 403. Every browser POST must carry
    the page's CSRF token and come from the dashboard's own origin (``Origin``/``Referer``; list other origins
    a proxy presents in ``allowed_origins``, as ``"https://host"``). ``secret`` signs sessions and CSRF
    tokens (default: derived from ``token``, else ``$CANARY_ROUTER_SECRET``, else random per process).
    Reading is open to whoever reaches the dashboard: mount it behind your application's access control
    when rollout names, numbers and the audit log are not for everyone.
    """

    def __init__(
        self,
        router: Router,
        *,
        token: str | None = None,
        authenticate: Authenticate | None = None,
        title: str = "canary_router",
        poll_interval: float = 2.0,
        secret: str | bytes | None = None,
        session_ttl: float = 12 * 3600.0,
        allowed_origins: tuple[str, ...] | list[str] = (),
        history: int = 200,
    ) -> None:
        if not 0.2 <= poll_interval <= 3600:
            raise ValueError(f"poll_interval must be between 0.2 and 3600 seconds, got {poll_interval!r}")
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history!r}")
        for origin in allowed_origins:
            if "://" not in origin or origin.rstrip("/") != origin or origin.count("/") != 2:
                raise ValueError(f"allowed_origins: expected 'scheme://host[:port]', got {origin!r}")
        self.router = router
        """The router whose rollouts are shown (and acted on)."""
        self.title = title
        """The page title."""
        self.poll_interval = float(poll_interval)
        """Seconds between two refreshes of the page's data."""
        self.history = history
        """Audit records shown per rollout (the newest)."""
        self._auth = Authenticator(token=token, authenticate=authenticate, secret=secret, session_ttl=session_ttl)
        self._allowed_origins = frozenset(origin.lower() for origin in allowed_origins)
        self._static = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in _STATIC}

    @property
    def read_only(self) -> bool:
        """``True`` when no authentication is configured: nobody can act through this dashboard."""
        return not self._auth.enabled

    def __repr__(self) -> str:
        return f"Dashboard({self.router!r}, auth={self._auth.mode!r})"

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection (HTTP; ``lifespan`` is acknowledged; anything else is closed)."""
        kind = scope.get("type")
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return
        request = _Request.from_scope(scope)
        try:
            response = await self._route(request, receive)
        except Exception:
            _log.exception("canary_router: dashboard request %s %s failed", request.method, request.path)
            response = _error(500, "internal error: see the server's log")
        response.headers.extend(request.set_cookies)
        await response.send(send, head=request.method == "HEAD")

    async def _route(self, request: _Request, receive: Receive) -> _Response:
        path, method = request.path, request.method
        if path == "":
            return _redirect(f"{request.root}/")
        parts = path.strip("/").split("/") if path.strip("/") else []
        get = method in ("GET", "HEAD")
        if not parts:
            return await self._page(request, None) if get else _not_allowed("GET, HEAD")
        head = parts[0]
        if head == "static" and len(parts) == 2:
            return self._static_file(parts[1]) if get else _not_allowed("GET, HEAD")
        if head == "rollouts" and len(parts) == 2:
            return await self._page(request, parts[1]) if get else _not_allowed("GET, HEAD")
        if head == "login" and len(parts) == 1:
            if get:
                return await self._login_form(request)
            return await self._login(request, receive) if method == "POST" else _not_allowed("GET, HEAD, POST")
        if head == "logout" and len(parts) == 1:
            return await self._logout(request, receive) if method == "POST" else _not_allowed("POST")
        if head == "api":
            return await self._api(request, parts[1:], receive)
        return _Response(404, b"not found")

    async def _api(self, request: _Request, parts: list[str], receive: Receive) -> _Response:
        get = request.method in ("GET", "HEAD")
        if parts == ["session"]:
            return await self._session(request) if get else _not_allowed("GET, HEAD")
        if not parts or parts[0] != "rollouts" or len(parts) > 3:
            return _error(404, f"no such endpoint: {request.path}")
        if len(parts) == 1:
            return await self._read(request, _data.overview, self.router) if get else _not_allowed("GET, HEAD")
        name = parts[1]
        if len(parts) == 2:
            if not get:
                return _not_allowed("GET, HEAD")
            return await self._read(request, lambda: _data.rollout_detail(self.router, name, history=self.history))
        tail = parts[2]
        if tail == "series":
            if not get:
                return _not_allowed("GET, HEAD")
            since_text = request.query("since")
            try:
                since = float(since_text) if since_text is not None else 0.0
            except ValueError:
                return _error(400, f"since: expected POSIX seconds, got {since_text!r}")
            return await self._read(request, lambda: _data.series(self.router, name, since))
        if tail in ACTIONS:
            return await self._act(request, name, tail, receive) if request.method == "POST" else _not_allowed("POST")
        return _error(404, f"no such endpoint: {request.path} (actions: {', '.join(ACTIONS)})")

    # ------------------------------------------------------------------ reading

    async def _read(self, request: _Request, fn: Callable[..., dict[str, Any]], *args: Any) -> _Response:
        try:
            document = await _in_thread(fn, *args)
        except UnknownRolloutError as exc:
            return _error(404, str(exc))
        except StoreError as exc:
            return _error(503, str(exc))
        return _json(200, document)

    def _static_file(self, name: str) -> _Response:
        content_type = _STATIC.get(name)
        if content_type is None:
            return _Response(404, b"not found")
        return _Response(200, self._static[name], content_type, cache=b"public, max-age=3600")

    async def _identity(self, request: _Request) -> Identity | None:
        try:
            return await self._auth.identify(request.info, request.cookies, time.time())
        except Exception:  # a failing authenticate callable denies; it never grants
            _log.exception("canary_router: the dashboard's authenticate callable failed")
            return None

    def _csrf_nonce(self, request: _Request) -> str:
        """Return the browser's CSRF nonce, creating (and setting) one when it has none."""
        nonce = request.cookies.get(CSRF_COOKIE)
        if not nonce or len(nonce) > 64:
            nonce = self._auth.new_nonce()
            request.cookies[CSRF_COOKIE] = nonce
            request.cookie(CSRF_COOKIE, nonce, int(self._auth.session_ttl))
        return nonce

    async def _context(self, request: _Request) -> _page.PageContext:
        identity = await self._identity(request)
        nonce = self._csrf_nonce(request)
        actor = identity.actor if identity is not None else None
        return _page.PageContext(
            root=request.root,
            title=self.title,
            poll_interval=self.poll_interval,
            actor=actor,
            csrf=self._auth.csrf_token(nonce, actor or ""),
            auth_mode=self._auth.mode,
            session=identity is not None and identity.method == "session",
        )

    async def _page(self, request: _Request, name: str | None) -> _Response:
        ctx = await self._context(request)
        if name is None:
            return _Response(200, _page.overview_page(ctx).encode(), _HTML)
        rollout = self.router.rollouts.get(name)
        if rollout is None:
            page = _page.message_page(ctx, "Not found", f"There is no rollout called {name!r}.")
            return _Response(404, page.encode(), _HTML)
        return _Response(200, _page.detail_page(ctx, name, rollout.description).encode(), _HTML)

    async def _session(self, request: _Request) -> _Response:
        ctx = await self._context(request)
        return _json(
            200,
            {
                "actor": ctx.actor,
                "can_act": ctx.actor is not None,
                "auth": ctx.auth_mode,
                "csrf_token": ctx.csrf,
                "poll_interval": self.poll_interval,
                "actions": list(ACTIONS),
            },
        )

    # ------------------------------------------------------------------ sign-in

    async def _login_form(self, request: _Request) -> _Response:
        if not self._auth.has_token:
            return _Response(404, b"this dashboard has no token to sign in with")
        ctx = await self._context(request)
        return _Response(200, _page.login_page(ctx).encode(), _HTML)

    async def _login(self, request: _Request, receive: Receive) -> _Response:
        if not self._auth.has_token:
            return _Response(404, b"this dashboard has no token to sign in with")
        body = await _read_body(receive)
        form = _parse_form(request, body) if body is not None else "the request body is too large"
        ctx = await self._context(request)
        ok, why = same_origin(request.info, self._allowed_origins)
        if not ok:
            return _Response(403, _page.message_page(ctx, "Refused", why).encode(), _HTML)
        if isinstance(form, str):
            return _Response(400, _page.login_page(ctx, error=form).encode(), _HTML)
        nonce = request.cookies.get(CSRF_COOKIE)
        if not self._auth.csrf_valid(nonce, "", _text(form.get(CSRF_FIELD))):
            error = "The form expired or did not come from this page; please sign in again."
            return _Response(403, _page.login_page(ctx, error=error).encode(), _HTML)
        if not self._auth.token_matches(_text(form.get("token")) or ""):
            return _Response(401, _page.login_page(ctx, error="That is not the dashboard's token.").encode(), _HTML)
        request.cookie(SESSION_COOKIE, self._auth.session_cookie(TOKEN_ACTOR, time.time()), int(self._auth.session_ttl))
        return _redirect(f"{request.root}/")

    async def _logout(self, request: _Request, receive: Receive) -> _Response:
        body = await _read_body(receive)
        form = _parse_form(request, body) if body is not None else {}
        identity = await self._identity(request)
        ok, why = same_origin(request.info, self._allowed_origins)
        given = _text(form.get(CSRF_FIELD)) if isinstance(form, dict) else None
        actor = identity.actor if identity is not None else ""
        if not ok or not self._auth.csrf_valid(request.cookies.get(CSRF_COOKIE), actor, given):
            return _error(403, why or "missing or invalid CSRF token")
        request.cookie(SESSION_COOKIE, "", 0)
        return _redirect(f"{request.root}/")

    # ------------------------------------------------------------------ acting

    async def _act(self, request: _Request, name: str, action: str, receive: Receive) -> _Response:
        body = await _read_body(receive)
        if body is None:
            return _error(413, f"the request body is larger than {_MAX_BODY} bytes")
        if not self._auth.enabled:
            return self._refuse(
                request,
                403,
                "this dashboard is read-only: no authentication is configured (start it with a token, or "
                "give it an authenticate callable)",
            )
        identity = await self._identity(request)
        if identity is None:
            if self._auth.bearer(request.info) is not None:
                challenge = [(b"www-authenticate", b'Bearer error="invalid_token"')]
                return _error(401, "the bearer token is not valid for this dashboard", challenge)
            return self._refuse(
                request, 403, "not signed in: sign in on the dashboard, or send 'Authorization: Bearer <token>'"
            )
        ok, why = same_origin(request.info, self._allowed_origins)
        if not ok:
            return self._refuse(request, 403, why)
        form = _parse_form(request, body)
        if isinstance(form, str):
            return _error(415 if form.startswith("unsupported") else 400, form)
        if identity.needs_csrf:
            given = request.info.headers.get(CSRF_HEADER) or _text(form.get(CSRF_FIELD))
            if not self._auth.csrf_valid(request.cookies.get(CSRF_COOKIE), identity.actor, given):
                return self._refuse(
                    request, 403, "missing or invalid CSRF token: reload the dashboard page and try again"
                )
        reason = form.get("reason", "")
        if not isinstance(reason, str) or len(reason) > _MAX_REASON:
            return _error(400, f"reason: expected a text of at most {_MAX_REASON} characters")
        expected = form.get("expected_version")
        if isinstance(expected, str) and expected.strip():
            expected = int(expected) if expected.strip().isdigit() else expected
        if expected == "":
            expected = None
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)):
            return _error(400, f"expected_version: expected an integer, got {expected!r}")
        actor = f"dashboard:{identity.actor}"
        reason = " ".join(reason.split()) or f"{action} from the dashboard"
        try:
            await _in_thread(self._apply, name, action, actor, reason, expected)
        except UnknownRolloutError as exc:
            return self._refuse(request, 404, str(exc))
        except (TransitionError, ConflictError) as exc:
            return self._refuse(request, 409, str(exc))
        except StoreError as exc:
            return self._refuse(request, 503, str(exc))
        _log.info("canary_router: %s %s rollout %r from the dashboard: %s", actor, action, name, reason)
        if request.wants_html:
            return _redirect(f"{request.root}/rollouts/{name}")
        status = await _in_thread(self.router.status, name, history=1)
        return _json(
            200,
            _data.clean(
                {
                    "ok": True,
                    "action": action,
                    "actor": actor,
                    "reason": reason,
                    "phase": status.phase.value,
                    "percent": status.percent,
                    "version": status.version,
                }
            ),
        )

    def _apply(self, name: str, action: str, actor: str, reason: str, expected: int | None) -> None:
        router = self.router
        if action == "rollback":
            router.rollback(name, reason, actor=actor, expected_version=expected)
        elif action == "promote":
            router.promote(name, actor=actor, reason=reason, expected_version=expected)
        elif action == "pause":
            router.pause(name, actor=actor, reason=reason, expected_version=expected)
        else:
            router.resume(name, actor=actor, reason=reason, expected_version=expected)

    def _refuse(self, request: _Request, status: int, message: str) -> _Response:
        """A refusal: JSON for scripts and the page's script, a short page for a plain form."""
        if request.wants_html:
            ctx = _page.PageContext(request.root, self.title, self.poll_interval, None, "", self._auth.mode, False)
            return _Response(status, _page.message_page(ctx, "Not done", message).encode(), _HTML)
        return _error(status, message)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _not_allowed(allow: str) -> _Response:
    return _Response(405, b"method not allowed", headers=[(b"allow", allow.encode())])


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run router calls (which may wait on a store) off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
