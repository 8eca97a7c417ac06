"""Pure ASGI middleware: per-request canary decisions for Starlette, FastAPI or any ASGI app.

No framework is imported: the ASGI types below are plain aliases, shaped like ``starlette.types``.

Decision mode (the default) runs the app with the request's context ambient, so functions decorated with
``router.canary(...)`` anywhere below see it, and resolves the request with a :class:`~canary_router.web.WebResolver`
the first time a decision or a read of the context needs it. The decisions are in ``scope["state"]["canary"]``
(Starlette: ``request.state.canary``) and the context in ``scope["state"]["canary_context"]``; the response
of a resolved HTTP request gets the resolver's cookies, ``Vary: Cookie`` and, when enabled, ``Canary-Variant``
(a request that decided nothing is passed on unchanged)::

    app = CanaryMiddleware(app, router=router, trusted_proxies=["10.0.0.0/8"], user_header="x-user-id")

Split mode routes whole requests between two apps by one rollout's decision, and records one observation
per HTTP request for the guard (an exception or a status of 500 or more is an error; the latency runs
until the last body chunk is sent)::

    app = CanaryMiddleware(old_app, router=router, rollout="checkout-v2", new_app=new_app)

The middleware never fails a request because of its own input: malformed headers, cookies or scopes make
the resolver fall back (and count it), and the request goes on. Application exceptions pass through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypedDict, Unpack, cast

from .context import _EMPTY_CONTEXT, Context, _current
from .web import LazyDecisions, RequestInfo, WebOptions, WebResolver, _Parts, _StagedRequest

if TYPE_CHECKING:
    from .model import Decision
    from .router import Router

__all__ = ["ASGIApp", "CanaryMiddleware", "Message", "Receive", "Scope", "Send", "WebOptionKeywords"]

Scope = MutableMapping[str, Any]
"""An ASGI connection scope."""
Message = MutableMapping[str, Any]
"""An ASGI event message."""
Receive = Callable[[], Awaitable[Message]]
"""The ASGI ``receive`` callable."""
Send = Callable[[Message], Awaitable[None]]
"""The ASGI ``send`` callable."""
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI application."""

_Header = tuple[bytes, bytes]
_Fields = tuple[str, str, str, str, "str | None", Mapping[str, str], "RequestInfo | None"]
"""A request's method, path, scheme, query string, peer, wanted headers and (when built) its RequestInfo."""


class WebOptionKeywords(TypedDict, total=False):
    """The keyword options of :class:`CanaryMiddleware`: the fields of :class:`~canary_router.web.WebOptions`.

    Typed keywords (PEP 692) let a type checker catch a misspelt option, and keep
    ``starlette.middleware.Middleware(CanaryMiddleware, ...)`` well-typed.
    """

    rollouts: Sequence[str] | None
    secret: str | bytes | None
    trusted_proxies: Sequence[str]
    user_header: str | None
    user_cookie: str | None
    country_header: str | None
    region_header: str | None
    visitor_cookie: str | None
    visitor_max_age: int
    affinity: bool
    pin_cookie: str
    override_header: str | None
    override_query: str | None
    override_cookie: str
    variant_header: bool
    attributes: Callable[[RequestInfo], Mapping[str, Any]] | None


_VARY = (b"vary", b"Cookie")
_NO_HEADERS: list[_Header] = []  # shared, never written to
_MAX_HEADER_ITEMS = 1000
_PEER = (str, type(None))


class CanaryMiddleware:
    """Pure ASGI middleware that makes every request's context ambient and decides its rollouts on first use.

    ``CanaryMiddleware(app, router=router, **options)``: the keyword options build a
    :class:`~canary_router.web.WebOptions` (``trusted_proxies=...``, ``user_header=...``, ``secret=...``, ...);
    or pass ``options=WebOptions(...)``. With ``rollout="name", new_app=app2`` (split mode) each request goes
    to ``new_app`` when that rollout's decision is "new", else to ``app``, and is observed for the guard.
    ``lifespan`` and unknown scope types pass through untouched. Configuration errors raise here, at start-up;
    per-request state stays in the call.
    """

    __slots__ = (
        "_identity_get",
        "_lazy",
        "_names",
        "_names_get",
        "_override_query",
        "_router",
        "_staged",
        "_vary",
        "_wanted",
        "app",
        "new_app",
        "resolver",
        "rollout",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        router: Router,
        options: WebOptions | None = None,
        rollout: str | None = None,
        new_app: ASGIApp | None = None,
        **option_kwargs: Unpack[WebOptionKeywords],
    ) -> None:
        if options is not None and option_kwargs:
            raise TypeError(
                f"CanaryMiddleware: pass options=WebOptions(...) or option keywords, not both "
                f"(got {', '.join(sorted(option_kwargs))})"
            )
        if options is None:
            options = WebOptions(**cast("dict[str, Any]", option_kwargs))  # sequences become tuples there
        if (rollout is None) != (new_app is None):
            raise TypeError("CanaryMiddleware: split mode needs both rollout= and new_app=")
        if rollout is not None:
            router._require(rollout)  # an unknown rollout fails at start-up, naming the known ones
            if options.rollouts is not None and rollout not in options.rollouts:
                options = dataclasses.replace(options, rollouts=(*options.rollouts, rollout))
        self.app = app
        """The wrapped application (the old one, in split mode)."""
        self.new_app = new_app
        """The application serving the new version (split mode), else ``None``."""
        self.rollout = rollout
        """The rollout that splits requests between ``app`` and ``new_app`` (split mode), else ``None``."""
        self.resolver = WebResolver(router, options)
        """The resolver shared by every request (its ``counters`` count rejected overrides and bad input)."""
        # header name as sent (lower-case bytes) -> (str key, separator for repeated headers).
        # RFC 9113 §8.2.3: HTTP/2 may split the Cookie header, and the parts join with "; ".
        self._wanted: dict[bytes, tuple[str, str]] = {
            name.encode("latin-1"): (name, "; " if name == "cookie" else ", ") for name in options.wanted_headers
        }
        self._names_get = {name: key for name, (key, _) in self._wanted.items()}.get
        # the headers the first stage of a lazy request reads (WebResolver._identity): the rest waits
        identity = {"cookie", options.user_header, options.override_header}
        self._identity_get = {name: key for name, (key, _) in self._wanted.items() if key in identity}.get
        self._vary = self.resolver._vary
        self._router = router
        self._names = self.resolver.rollout_names
        # Decision mode resolves a request when something first reads its context or decisions; split mode
        # decides every request, and affinity and the Canary-Variant header need every decision up front.
        self._lazy = new_app is None and not self.resolver._eager
        self._staged = options.attributes is None  # else the callable may set the identity: one stage only
        # A tester's override link is stored in the override cookie even if that request decides nothing.
        query_name = options.override_query
        self._override_query = query_name.encode() if query_name and self.resolver._key is not None else None

    def __repr__(self) -> str:
        split = f", rollout={self.rollout!r}" if self.rollout is not None else ""
        return f"CanaryMiddleware({self.app!r}{split})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection: resolve it, then run the app (or split mode's choice) in its context."""
        try:
            kind = scope.get("type")
        except AttributeError:  # not a mapping: not ours to judge
            kind = None
        if kind != "http" and kind != "websocket":  # noqa: PLR1714  # two comparisons beat a tuple on the hot path
            await self.app(scope, receive, send)
            return
        if self._lazy and _current.get() is _EMPTY_CONTEXT and not self._override_link(scope):
            request = _Request(self, scope, kind, send)
            self._publish(scope, LazyDecisions(self._router, request, self._names), request)
            token = _current.set(request)
            try:
                await self.app(scope, receive, request.send if kind == "http" else send)
            finally:
                try:  # noqa: SIM105  # contextlib.suppress costs a context manager per request
                    _current.reset(token)
                except ValueError:  # pragma: no cover - only if the coroutine was resumed in another context
                    pass
                request._detach()
            return
        context, decisions, set_cookies, variant = self._resolve(scope, kind)
        self._publish(scope, decisions, context)
        if kind == "http" and (self._vary or set_cookies or variant is not None):
            send = _header_send(send, set_cookies, variant, self._vary)
        outer = _current.get()  # lay the request's context over an enclosing one, as the other adapters do
        token = _current.set(context if outer is _EMPTY_CONTEXT else outer.merge(context))
        try:
            if self.new_app is None:
                await self.app(scope, receive, send)
            else:
                await self._split(scope, receive, send, decisions, context, kind)
        finally:
            try:  # noqa: SIM105  # contextlib.suppress costs a context manager per request
                _current.reset(token)
            except ValueError:  # pragma: no cover - only if the coroutine was resumed in another context
                pass

    async def _split(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        decisions: Mapping[str, Decision],
        context: Context,
        kind: str,
    ) -> None:
        """Route the request by the split rollout's decision; observe HTTP requests for the guard."""
        name = cast("str", self.rollout)  # split mode sets both
        new_app = cast("ASGIApp", self.new_app)
        router = self.resolver.router
        decision: Decision | None = decisions.get(name)
        if decision is None:  # pragma: no cover - __init__ adds the rollout to the decided ones
            decision = router.decide(name, context)
        app = new_app if decision[0] == "new" else self.app
        if kind != "http":  # a WebSocket's lifetime is no request latency: routed, not observed
            await app(scope, receive, send)
            return
        status = 0
        end = 0.0

        async def observed_send(message: Message) -> None:
            nonlocal status, end
            event = message.get("type")
            if event == "http.response.start":
                status = message.get("status", 0)
            await send(message)
            if (event == "http.response.body" and not message.get("more_body", False)) or (
                event == "http.response.pathsend"
            ):
                end = perf_counter()

        start = perf_counter()
        try:
            await app(scope, receive, observed_send)
        except Exception as exc:
            router._observe(name, decision, False, (end or perf_counter()) - start, exc)
            raise
        failed = type(status) is int and status >= 500
        # HTTP semantic conventions: a 5xx without an exception has the status code as its error.type
        router._observe(
            name, decision, not failed, (end or perf_counter()) - start, error_type=str(status) if failed else None
        )

    def _override_link(self, scope: Scope) -> bool:
        """Whether the query string may carry an override token (the request is then resolved up front)."""
        name = self._override_query
        if name is None:
            return False
        query = scope.get("query_string")
        return bool(query) and (type(query) is not bytes or name in query)

    def _publish(self, scope: Scope, decisions: Any, context: Any) -> None:
        """Expose the decisions and context in ``scope["state"]`` (``request.state`` in Starlette)."""
        try:
            state = scope.get("state")
            if state is None:
                scope["state"] = {"canary": decisions, "canary_context": context}
            else:
                state["canary"] = decisions
                state["canary_context"] = context
        except Exception:  # an immutable scope or state: the ambient context still works
            self.resolver._count("malformed_input")

    def _resolve(self, scope: Scope, kind: str, decide: bool = True) -> _Parts:
        """Resolve the request from its scope (:meth:`_read`); the resolver itself never raises."""
        method, path, scheme, query, peer, headers, info = self._read(scope, kind)
        return self.resolver._resolve(method, path, scheme, query, peer, headers, None, info, decide)

    def _read(self, scope: Scope, kind: str) -> _Fields:
        """The request's fields, as the resolver takes them; odd scopes take the careful path. Never raises.

        The usual scope (header names and values as ``bytes``, each wanted header once, all UTF-8) is read
        in one pass; anything else raises there and goes through :meth:`_info`, which joins repeated headers
        and drops undecodable ones, and then, if the scope is malformed, :meth:`_careful_info`. Both ways give
        the same answer for the usual scope. The last field is the :class:`RequestInfo` when one was built.
        """
        try:
            headers = _scan(scope["headers"], self._names_get)
            client = scope.get("client")
            peer = client[0] if client else None
            method = scope.get("method") or "GET"
            path = scope.get("path") or "/"
            scheme = scope.get("scheme") or ("http" if kind == "http" else "ws")
            if type(method) is not str or type(path) is not str or type(scheme) is not str or type(peer) not in _PEER:
                raise TypeError("a scope value of the wrong type")
            query = scope.get("query_string")
            return method, path, scheme, query.decode("latin-1") if query else "", peer, headers, None
        except Exception:
            info = self._general_info(scope, kind)
            return info.method, info.path, info.scheme, info.query_string, info.peer, info.headers, info

    def _read_identity(self, scope: Scope, kind: str) -> tuple[str, str, str | None, Mapping[str, str]]:
        """What the first stage of a lazy request reads: scheme, query string, peer and the identity headers.

        The usual scope only, read like :meth:`_read` reads it; anything else raises (the caller then uses
        :meth:`_read`), so both give the same values.
        """
        headers = _scan(scope["headers"], self._identity_get)
        client = scope.get("client")
        peer = client[0] if client else None
        scheme = scope.get("scheme") or ("http" if kind == "http" else "ws")
        if type(scheme) is not str or type(peer) not in _PEER:
            raise TypeError("a scope value of the wrong type")
        query = scope.get("query_string")
        return scheme, query.decode("latin-1") if query else "", peer, headers

    def _general_info(self, scope: Scope, kind: str) -> RequestInfo:
        """The request info of any scope: :meth:`_info`, or for a malformed scope :meth:`_careful_info`."""
        try:
            return self._info(scope, kind)
        except Exception:
            self.resolver._count("malformed_input")
            return self._careful_info(scope, kind)

    def _info(self, scope: Scope, kind: str) -> RequestInfo:
        """Build the request info from a well-formed scope, reading only the wanted headers, in one pass."""
        wanted = self._wanted
        headers: dict[str, str] = {}
        for name, value in scope.get("headers") or ():
            spec = wanted.get(name)
            if spec is not None:
                key, separator = spec
                try:  # header values are UTF-8 for every adapter (same bytes, same bucket); else dropped
                    text = value.decode("utf-8")
                except UnicodeDecodeError:
                    self.resolver._count("malformed_input")
                    continue
                previous = headers.get(key)
                headers[key] = text if previous is None else previous + separator + text
        client = scope.get("client")
        peer = client[0] if client else None
        method = scope.get("method") or "GET"
        path = scope.get("path") or "/"
        scheme = scope.get("scheme") or ("http" if kind == "http" else "ws")
        if type(method) is not str or type(path) is not str or type(scheme) is not str or type(peer) not in _PEER:
            raise TypeError("a scope value of the wrong type")  # the careful path keeps the well-formed parts
        query = scope.get("query_string")
        return RequestInfo(method, path, scheme, query.decode("latin-1") if query else "", peer, headers)

    def _careful_info(self, scope: Scope, kind: str) -> RequestInfo:
        """Build the request info from a malformed scope: keep every well-formed piece, drop the rest."""
        info = RequestInfo(scheme="http" if kind == "http" else "ws")
        for attribute in ("method", "path", "scheme"):
            value = _get(scope, attribute)
            if type(value) is str and value:
                setattr(info, attribute, value)
        query = _get(scope, "query_string")
        if isinstance(query, bytes | bytearray):
            info.query_string = bytes(query).decode("latin-1")
        client = _get(scope, "client")
        if isinstance(client, list | tuple) and client and type(client[0]) is str:
            info.peer = client[0]
        headers: dict[str, str] = {}
        try:
            raw = list(_get(scope, "headers") or ())[:_MAX_HEADER_ITEMS]
        except Exception:
            raw = []
        for item in raw:
            try:
                name, value = item
                if isinstance(name, str):
                    name = name.encode("latin-1")
                spec = self._wanted.get(bytes(name).lower())
                if spec is None:
                    continue
                key, separator = spec
                text = value if isinstance(value, str) else bytes(value).decode("latin-1")
            except Exception:  # noqa: S112  # one bad header item is skipped, the others still count
                continue
            previous = headers.get(key)
            headers[key] = text if previous is None else previous + separator + text
        info.headers = headers
        return info


class _Request(_StagedRequest):
    """One request in decision mode: its context, worked out on first use, and the ``send`` that adds our headers.

    Until something reads the context or decides, the request costs this object, and ``send`` forwards the
    messages as they are: the response depends on no cookie, so it gets no ``Vary: Cookie`` and no cookie.
    The work is done in two stages. The first, the identity (the user, the visitor cookie, the overrides), is
    all that a decision of a rollout bucketed by ``user_id`` or ``session_id`` without other rules needs; the
    second lays the request's other attributes over it, for any other read. Once the identity is known,
    ``http.response.start`` gets ``Vary: Cookie`` and the resolution's ``Set-Cookie`` headers.
    """

    __slots__ = (
        "_extra",
        "_fields",
        "_kind",
        "_read",
        "_scope",
        "_send",
        "_started",
        "_trusted",
    )

    _middleware: CanaryMiddleware

    def __init__(self, middleware: CanaryMiddleware, scope: Scope, kind: str, send: Send) -> None:
        self._resolved = None
        self._ident = None
        self._middleware = middleware
        self._scope = scope
        self._kind = kind
        self._send = send
        self._started = False

    def _first_stage(self) -> Context:
        """Read the scope and work out the identity (never raises: a failure gives an empty context)."""
        middleware = self._middleware
        read = True
        self._fields = None
        try:
            try:  # the second stage reads the scope again, for the other headers
                scheme, query, peer, headers = middleware._read_identity(self._scope, self._kind)
            except Exception:  # an odd scope: read all of it carefully now
                fields = self._fields = middleware._read(self._scope, self._kind)
                _, _, scheme, query, peer, headers, _ = fields
            ident, set_cookies, self._trusted, _ = middleware.resolver._identity(scheme, query, peer, headers, None)
        except Exception as exc:  # pragma: no cover - defensive: the scope is read carefully, the resolver is total
            middleware.resolver._count("errors")
            middleware._router._warn("asgi", f"request resolution failed, deciding on an empty context: {exc!r}")
            ident, set_cookies, read = Context(), [], False
        self._read = read
        self._ident = ident
        self._extra = (
            [(b"set-cookie", cookie.encode("latin-1", "replace")) for cookie in set_cookies]
            if set_cookies
            else _NO_HEADERS
        )
        if self._started and set_cookies:  # e.g. a decision in a streaming body: a new visitor's id is not kept
            middleware._router._warn(
                "asgi-late",
                "a request was resolved after its response started, so its Vary and Set-Cookie headers were not sent "
                "(read request.state.canary or decide before the response starts)",
            )
        return ident

    def _resolve(self) -> Context:
        """Both stages: the identity, then the other attributes over it (never raises)."""
        ident = self._ident
        if ident is None:
            ident = self._first_stage()
        if not self._read:  # pragma: no cover - the first stage failed
            return ident
        middleware = self._middleware
        resolver = middleware.resolver
        try:
            fields = self._fields
            if fields is None:
                fields = middleware._read(self._scope, self._kind)
            method, path, scheme, query, peer, headers, info = fields
            return resolver._complete(ident, self._trusted, method, path, scheme, query, peer, headers, None, info)
        except Exception as exc:  # pragma: no cover - defensive: the resolver is total
            resolver._count("errors")
            resolver.router._warn("asgi", f"request resolution failed, deciding on the identity alone: {exc!r}")
            return ident

    def _detach(self) -> None:
        """At the end of the call: drop the references back to the scope and the server.

        The scope's state refers to this object, so they would form a reference cycle, freed only by the garbage
        collector. A request whose attributes were not read yet keeps a copy of the scope without its state, for a
        late read.
        """
        self._send = _completed
        if self._resolved is None and (self._ident is None or (self._read and self._fields is None)):
            try:
                detached = dict(self._scope)
                detached.pop("state", None)
            except Exception:  # a scope that is no mapping: a late read gets the careful path's answer
                detached = {}
            self._scope = detached
        else:
            self._scope = _NO_SCOPE

    def send(self, message: Message) -> Awaitable[None]:
        """The app's ``send``: forwards, adding our headers to the response start once the identity is known."""
        if self._ident is None:  # nothing depended on the request's cookies so far
            self._started = True
            return self._send(message)
        if message.get("type") == "http.response.start":
            middleware = self._middleware
            if middleware._vary or self._extra:
                message = _with_headers(message, self._extra, middleware._vary)
        return self._send(message)


_NO_SCOPE: Scope = {}  # shared, never written to


def _scan(raw: Any, names: Callable[[bytes], str | None]) -> dict[str, str]:
    """The headers ``names`` knows, from a usual scope's header list, in one pass; raises on anything else.

    Anything else: a repeated wanted header (the general path joins it), a wanted header whose value is not
    UTF-8 ``bytes``, a list whose items are not pairs.
    """
    headers: dict[str, str] = {}
    for name, value in raw:
        key = names(name)
        if key is not None:
            if key in headers:
                raise LookupError(key)
            headers[key] = value.decode()
    return headers


def _completed(message: Message) -> Awaitable[None]:
    """The ``send`` of a request whose call has returned: its response is complete."""
    raise RuntimeError(f"ASGI message {message.get('type')!r} sent after the application returned")


def _get(scope: Scope, key: str) -> Any:
    try:
        return scope.get(key)
    except Exception:
        return None


def _header_send(send: Send, set_cookies: list[str], variant: str | None, vary: bool) -> Send:
    """Wrap ``send`` to add the response headers of a resolution to ``http.response.start``."""
    extra = _NO_HEADERS
    if set_cookies or variant is not None:
        extra = [(b"set-cookie", cookie.encode("latin-1", "replace")) for cookie in set_cookies]
        if variant is not None:
            extra.append((b"canary-variant", variant.encode("latin-1", "replace")))

    def send_with_headers(message: Message) -> Awaitable[None]:
        # A plain function returning the server's awaitable: no coroutine of our own per message.
        if message.get("type") == "http.response.start":
            message = _with_headers(message, extra, vary)
        return send(message)

    return send_with_headers


def _with_headers(message: Message, extra: list[_Header], vary: bool) -> Message:
    """A copy of a ``http.response.start`` message with ``extra`` headers and ``Cookie`` merged into ``Vary``.

    The app's header list is not changed in place (a response object may be sent again). Malformed headers
    from the app leave the message as it was.
    """
    try:
        headers: Any = message.get("headers") or ()
        if type(headers) is not list and type(headers) is not tuple:  # an iterator could be read only once
            headers = list(headers)
        if vary:
            for name, _ in headers:
                if len(name) == 4 and name.lower() == b"vary":
                    merged = _merge_vary(headers)
                    merged += extra
                    return {**message, "headers": merged}
            return {**message, "headers": [*headers, _VARY, *extra]}  # the usual case: the app sent no Vary
        return {**message, "headers": [*headers, *extra]}
    except Exception:
        return message


def _merge_vary(headers: list[Any]) -> list[Any]:
    """A copy of ``headers`` with ``Cookie`` in its ``Vary`` (added to the first one, unless one covers it)."""
    headers = list(headers)
    first = -1
    for index, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            tokens = {token.strip().lower() for token in bytes(value).split(b",")}
            if b"cookie" in tokens or b"*" in tokens:
                return headers
            if first < 0:
                first = index
    if first < 0:  # pragma: no cover - only called when there is a Vary
        headers.append(_VARY)
    else:
        name, value = headers[first]
        value = bytes(value).strip()
        headers[first] = (name, value + b", Cookie" if value else b"Cookie")
    return headers
