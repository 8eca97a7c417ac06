"""Plain WSGI (PEP 3333) middleware: Flask, Django-on-WSGI, Pyramid, Bottle, any WSGI app. Imports no framework.

Decision mode makes the request's context ambient, for the app call and while the server iterates the
response body, so ``router.canary(...)`` functions deep in a view (or in a streaming generator) see it; the
request is resolved, and its rollouts decided, the first time a decision or a read of the context needs it
(the response of a resolved request gets ``Vary: Cookie`` and the resolver's cookies)::

    app.wsgi_app = CanaryMiddleware(app.wsgi_app, router=router, trusted_proxies=["10.0.0.0/8"])

Split mode routes whole requests between two WSGI apps and records one observation per request for the
guard (errors: an exception or a status of 500 or more; latency: until the body is closed)::

    application = CanaryMiddleware(old_app, router=router, rollout="api-v2", new_app=new_app)

The decisions are in ``environ["canary.decisions"]`` (rollout name → :class:`~canary_router.Decision`,
also :func:`decisions`) and the context in ``environ["canary.context"]``; Flask reads them through
``flask.request.environ``. Bad input never breaks a request: malformed, oversized or non-UTF-8 headers
and cookies are ignored (and counted in ``middleware.resolver.counters``) and the request goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextvars import Context as _VarContext
from contextvars import copy_context
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from .context import _EMPTY_CONTEXT, Context, _current
from .model import OLD, Decision, Reason
from .web import LazyDecisions, RequestInfo, Resolution, WebOptions, WebResolver, _StagedRequest

if TYPE_CHECKING:
    from .router import Router

__all__ = [
    "CONTEXT_KEY",
    "DECISIONS_KEY",
    "CanaryMiddleware",
    "StartResponse",
    "WSGIApp",
    "WSGIEnvironment",
    "decisions",
]

DECISIONS_KEY = "canary.decisions"
"""The environ key holding the request's decisions (rollout name → Decision)."""
CONTEXT_KEY = "canary.context"
"""The environ key holding the request's :class:`~canary_router.Context` (the ambient one while it runs)."""

ExcInfo: TypeAlias = "tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]"
WSGIEnvironment: TypeAlias = dict[str, Any]
"""The WSGI environ."""


class StartResponse(Protocol):
    """The ``start_response`` callable of PEP 3333 (same shape as typeshed's, so Flask's types fit)."""

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = ..., /
    ) -> Callable[[bytes], object]:
        """Begin the response with ``status`` and ``headers``; returns the legacy ``write`` callable."""
        ...


WSGIApp: TypeAlias = Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]
"""A WSGI application."""

_NO_DECISIONS: Mapping[str, Decision] = {}
_NO_HEADERS: list[tuple[str, str]] = []  # shared, never written to
_ERROR_DECISION = Decision(OLD, Reason.ERROR, None)


def decisions(environ: Mapping[str, Any]) -> Mapping[str, Decision]:
    """The decisions :class:`CanaryMiddleware` made for this request (empty when it did not run)."""
    found = environ.get(DECISIONS_KEY)
    return found if isinstance(found, Mapping) else _NO_DECISIONS


def _native(value: object) -> str | None:
    """Decode a PEP 3333 native string (bytes as latin-1) as UTF-8; ``None`` when it is not a UTF-8 string."""
    if not isinstance(value, str):
        return None
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeEncodeError:  # not latin-1 at all: a server that already decoded the text
        return value
    except UnicodeDecodeError:
        return None


def _with_headers(headers: list[tuple[str, str]], extra: list[tuple[str, str]], vary: bool) -> list[tuple[str, str]]:
    """The app's headers plus ours, with ``Cookie`` merged into an existing ``Vary``; the app's on any surprise."""
    try:
        if not vary:
            return [*headers, *extra]
        for name, _ in headers:
            if len(name) == 4 and name.lower() == "vary":
                break
        else:
            return [*headers, ("Vary", "Cookie"), *extra]
        out = list(headers)
        first = -1
        for index, (name, value) in enumerate(out):
            if name.lower() == "vary":
                tokens = {token.strip().lower() for token in value.split(",")}
                if "cookie" in tokens or "*" in tokens:
                    break
                if first < 0:
                    first = index
        else:
            name, value = out[first]
            out[first] = (name, f"{value}, Cookie" if value.strip() else "Cookie")
        out.extend(extra)
        return out
    except Exception:  # a malformed header list is the app's to answer for, not ours
        return headers


class _Start:
    """``start_response`` for the app in decision mode: adds our headers."""

    __slots__ = ("extra", "start", "vary")

    def __init__(self, start: StartResponse, extra: list[tuple[str, str]], vary: bool) -> None:
        self.start = start
        self.extra = extra
        self.vary = vary

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /
    ) -> Callable[[bytes], object]:
        headers = _with_headers(headers, self.extra, self.vary)
        if exc_info is None:
            return self.start(status, headers)
        return self.start(status, headers, exc_info)


def _status_code(status: str | None) -> int:
    if not status:
        return 0
    try:
        return int(status[:3])
    except (TypeError, ValueError):  # not a "NNN reason" string: the server refuses it, so it is an error
        return 0


class _Exchange:
    """Per-request state of one call through the middleware: added headers and, in split mode, the timing."""

    __slots__ = ("decision", "done", "extra", "rollout", "router", "start", "started", "status", "vary")

    def __init__(
        self, start: StartResponse, extra: list[tuple[str, str]], vary: bool, router: Router | None = None
    ) -> None:
        self.start = start
        self.extra = extra
        self.vary = vary
        self.router = router
        self.status: str | None = None
        self.done = False
        self.rollout = ""
        self.decision = _ERROR_DECISION
        self.started = 0.0

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /
    ) -> Callable[[bytes], object]:
        """PEP 3333 ``start_response`` for the app: remembers the status and adds our headers."""
        self.status = status
        if self.extra or self.vary:
            headers = _with_headers(headers, self.extra, self.vary)
        if exc_info is None:
            return self.start(status, headers)
        return self.start(status, headers, exc_info)

    def finish(self, error: BaseException | None) -> None:
        """Record the request once (split mode): an exception or a status ≥ 500 is an error."""
        if self.done or self.router is None:
            return
        self.done = True
        duration = perf_counter() - self.started
        code = _status_code(self.status)
        ok = error is None and 0 < code < 500
        # HTTP semantic conventions: a 5xx without an exception has the status code as its error.type
        error_type = str(code) if error is None and code >= 500 else None
        self.router._observe(self.rollout, self.decision, ok, duration, error, error_type=error_type)


class _Body:
    """Split mode's response: the app's iterable, iterated and closed in the request's ``contextvars`` context.

    The request is recorded for the guard when the body is exhausted or closed, whichever comes first.
    """

    __slots__ = ("_exchange", "_iterable", "_iterator", "_vars")

    def __init__(self, iterable: Iterable[bytes], variables: _VarContext, exchange: _Exchange) -> None:
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._vars = variables
        self._exchange = exchange

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        iterator = self._iterator
        try:
            if iterator is None:
                iterator = self._iterator = self._vars.run(iter, self._iterable)
            return self._vars.run(next, iterator)
        except StopIteration:  # exhausted: record now, even if a lax server never closes us
            self._exchange.finish(None)
            raise
        except Exception as exc:
            self._exchange.finish(exc)
            raise

    def close(self) -> None:
        """Close the app's iterable (PEP 3333) and record the request, unless exhaustion already did."""
        iterable, self._iterable = self._iterable, ()  # a second close() closes nothing again
        try:
            close = getattr(iterable, "close", None)
            if close is not None:
                self._vars.run(close)
        except Exception as exc:
            self._exchange.finish(exc)
            raise
        self._exchange.finish(None)


_END = object()  # the end of a body's iterator (next(iterator, _END)); never a chunk


def _context_body(
    result: Iterable[bytes], run: Callable[..., Any], request: _Request | None
) -> Generator[bytes, None, None]:
    """The app's response ``result``, iterated and closed inside the request's ``contextvars`` context.

    ``run`` is that context's ``run``. The caller primes the generator (one ``next``): that calls ``iter``
    on ``result`` in the context and yields ``_END``, which the caller drops, so the ``finally`` below runs
    even when the server closes the body without iterating it. There it closes ``result`` (PEP 3333), in the
    context, when the body is exhausted or closed, whichever comes first, and then lets the request
    (``None`` in the eager path) go.
    """
    try:
        iterator = run(iter, result)
        yield _END  # type: ignore[misc]  # the priming value, dropped by the caller
        chunk = run(next, iterator, _END)
        while chunk is not _END:
            yield chunk
            chunk = run(next, iterator, _END)
    finally:
        try:
            close = getattr(result, "close", None)
            if close is not None:
                run(close)
        finally:
            if request is not None:
                request._detach()


_NO_ENVIRON: WSGIEnvironment = {}  # shared, never written to


def _completed(status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /) -> Any:
    """The ``start_response`` of a request whose response is complete."""
    raise RuntimeError("start_response called after the response was complete")


class _Request(_StagedRequest):
    """One request in decision mode: its context, worked out on first use, and the ``start_response`` for the app.

    Until something reads the context or decides, ``start_response`` passes the app's headers on as they are:
    the response depends on no cookie, so it gets no ``Vary: Cookie`` and no cookie. The work is done in two
    stages, as in the ASGI middleware: the identity (the user, the visitor cookie, the overrides), which is all
    a rollout bucketed by ``user_id`` or ``session_id`` without other rules needs, then the request's other
    attributes, for any other read. Once the identity is known, the response gets ``Vary: Cookie`` and the
    resolution's ``Set-Cookie`` headers.
    """

    __slots__ = ("_environ", "_extra", "_headers", "_place", "_start", "_started", "_trusted", "_user")

    # Made by CanaryMiddleware.__call__ without an __init__ call (one call less on every request), which sets
    # _resolved, _ident, _middleware, _environ, _start and _started; the first stage sets the others.
    _middleware: CanaryMiddleware
    _environ: WSGIEnvironment
    _start: StartResponse
    _started: bool

    def _first_stage(self) -> Context:
        """Read the identity headers and work the identity out (never raises: a failure gives an empty context)."""
        middleware = self._middleware
        self._headers: dict[str, str] | None = None
        try:
            environ = self._environ
            headers = middleware._read_headers(environ, middleware._identity_keys)
            self._user = user = middleware._user(environ)
            self._place = scheme, query, peer = middleware._scheme_query_peer(environ)
            ident, cookies, self._trusted, _ = middleware.resolver._identity(scheme, query, peer, headers, user)
            self._headers = headers
        except Exception as exc:  # pragma: no cover - defensive: reading the environ never raises, resolving neither
            middleware.resolver._count("errors")
            middleware.router._warn("wsgi", f"request resolution failed, deciding on an empty context: {exc!r}")
            ident, cookies = Context(), []
        self._ident = ident
        self._extra = [("Set-Cookie", cookie) for cookie in cookies] if cookies else _NO_HEADERS
        if self._started and cookies:  # e.g. a decision in a streaming body: a new visitor's id is not kept
            middleware.router._warn(
                "wsgi-late",
                "a request was resolved after its response started, so its Vary and Set-Cookie headers were not sent "
                "(read the decisions or decide before the response starts)",
            )
        return ident

    def _resolve(self) -> Context:
        """Both stages: the identity, then the other attributes over it (never raises)."""
        ident = self._ident
        if ident is None:
            ident = self._first_stage()
        headers = self._headers
        if headers is None:  # pragma: no cover - the first stage failed
            return ident
        middleware = self._middleware
        try:
            environ = self._environ
            headers.update(middleware._read_headers(environ, middleware._other_keys))
            method, path = middleware._method_path(environ)
            scheme, query, peer = self._place
            return middleware.resolver._complete(
                ident, self._trusted, method, path, scheme, query, peer, headers, self._user, None
            )
        except Exception as exc:  # pragma: no cover - defensive: reading the environ never raises, resolving neither
            middleware.resolver._count("errors")
            middleware.router._warn("wsgi", f"request resolution failed, deciding on the identity alone: {exc!r}")
            return ident

    def _detach(self) -> None:
        """At the end of the request: drop the references back to the environ and the server.

        The environ refers to this object, so they would form a reference cycle, freed only by the garbage
        collector. A request whose attributes were not read yet keeps a copy of the environ without our keys,
        for a late read.
        """
        self._start = _completed
        environ = self._environ
        if self._resolved is None and environ is not _NO_ENVIRON:
            try:
                detached = environ.copy()
                del detached[DECISIONS_KEY], detached[CONTEXT_KEY]
            except Exception:  # the app took our keys out: keep what is left
                detached = {k: v for k, v in environ.items() if k not in (DECISIONS_KEY, CONTEXT_KEY)}
            self._environ = detached
        else:
            self._environ = _NO_ENVIRON

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None, /
    ) -> Callable[[bytes], object]:
        """PEP 3333 ``start_response`` for the app: adds our headers once the request's identity is known."""
        if self._ident is None:  # nothing depended on the request's cookies so far
            self._started = True
        else:
            vary = self._middleware._vary
            if vary or self._extra:
                headers = _with_headers(headers, self._extra, vary)
        if exc_info is None:
            return self._start(status, headers)
        return self._start(status, headers, exc_info)


_new_request = _Request.__new__
_new_decisions = LazyDecisions.__new__


def _call_app(
    app: WSGIApp, context: Context, environ: WSGIEnvironment, start_response: StartResponse
) -> Iterable[bytes]:
    _current.set(context)  # inside the request's copied contextvars context: no reset needed
    return app(environ, start_response)


class CanaryMiddleware:
    """WSGI middleware that decides rollouts per request, makes the context ambient, and (optionally) splits apps.

    ``CanaryMiddleware(app, router=router, **web_options)``: ``web_options`` are the fields of
    :class:`~canary_router.web.WebOptions` (``trusted_proxies``, ``user_header``, ``variant_header``, ...),
    or pass ``options=WebOptions(...)`` (keywords then override its fields). With ``rollout=`` and
    ``new_app=``, requests decided "new" for that rollout go to ``new_app``, the others to ``app``, and each
    request is recorded for the guard. ``user_id_from(environ)`` may return the user authenticated by the
    server (e.g. ``environ.get("REMOTE_USER")`` under Apache/mod_wsgi); it is trusted.

    Configuration is fixed at creation (bad options raise here); nothing per request is stored on ``self``.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        router: Router,
        options: WebOptions | None = None,
        rollout: str | None = None,
        new_app: WSGIApp | None = None,
        user_id_from: Callable[[WSGIEnvironment], str | None] | None = None,
        **option_kwargs: Any,
    ) -> None:
        if options is None:
            options = WebOptions(**option_kwargs)
        elif option_kwargs:
            options = dataclasses.replace(options, **option_kwargs)
        if (rollout is None) != (new_app is None):
            raise TypeError("split mode needs both rollout= and new_app= (decision mode needs neither)")
        if rollout is not None:
            router._require(rollout)
            if options.rollouts is not None and rollout not in options.rollouts:
                options = dataclasses.replace(options, rollouts=(*options.rollouts, rollout))
        self.app = app
        self.new_app = new_app
        self.rollout = rollout
        self.router = router
        self.options = options
        self.resolver = WebResolver(router, options)
        """The resolver; ``resolver.counters`` counts rejected overrides, malformed input and internal errors."""
        self.user_id_from = user_id_from
        self._vary = self.resolver._vary
        self._environ_keys: tuple[tuple[str, str], ...] = tuple(
            ("HTTP_" + name.upper().replace("-", "_"), name) for name in sorted(options.wanted_headers)
        )
        identity = {"cookie", options.user_header, options.override_header}  # what WebResolver._identity reads
        self._identity_keys = tuple((key, name) for key, name in self._environ_keys if name in identity)
        self._other_keys = tuple((key, name) for key, name in self._environ_keys if name not in identity)
        self._staged = options.attributes is None  # else the callable may set the identity: one stage only
        self._names = self.resolver.rollout_names
        # Decision mode resolves a request when something first reads its context or decisions; split mode
        # decides every request, and affinity and the Canary-Variant header need every decision up front.
        self._lazy = new_app is None and not self.resolver._eager
        # A tester's override link is stored in the override cookie even if that request decides nothing.
        self._override_query = options.override_query if self.resolver._key is not None else None

    # ------------------------------------------------------------------ per request

    def request_info(self, environ: WSGIEnvironment) -> RequestInfo:
        """The framework-neutral view of ``environ`` (wanted headers only, strings re-decoded as UTF-8)."""
        return RequestInfo(*self._fields(environ))

    def _fields(self, environ: WSGIEnvironment) -> tuple[str, str, str, str, str | None, dict[str, str], str | None]:
        """:meth:`request_info`'s fields in order, for the resolver (no :class:`RequestInfo` per request)."""
        headers = self._read_headers(environ, self._environ_keys)
        method, path = self._method_path(environ)
        scheme, query, peer = self._scheme_query_peer(environ)
        return method, path, scheme, query, peer, headers, self._user(environ)

    def _read_headers(self, environ: WSGIEnvironment, keys: tuple[tuple[str, str], ...]) -> dict[str, str]:
        """The ``keys`` (environ key, header name) found in ``environ``, re-decoded as UTF-8; bad ones dropped."""
        get = environ.get
        headers: dict[str, str] = {}
        malformed = False
        for key, name in keys:
            value = get(key)
            if value:
                if type(value) is not str or not value.isascii():
                    value = _native(value)
                    if value is None:
                        malformed = True
                        continue
                headers[name] = value
        if malformed:
            self.resolver._count("malformed_input")
        return headers

    @staticmethod
    def _method_path(environ: WSGIEnvironment) -> tuple[str, str]:
        """The request's method and path (``SCRIPT_NAME`` + ``PATH_INFO``, re-decoded as UTF-8)."""
        get = environ.get
        script, path = get("SCRIPT_NAME", ""), get("PATH_INFO", "")
        if type(script) is not str or type(path) is not str or not (script.isascii() and path.isascii()):
            script, path = _native(script) or "", _native(path) or ""
        method = get("REQUEST_METHOD")
        return method if type(method) is str else "GET", script + path or "/"

    @staticmethod
    def _scheme_query_peer(environ: WSGIEnvironment) -> tuple[str, str, str | None]:
        """The request's URL scheme, query string (re-decoded as UTF-8) and peer address."""
        get = environ.get
        scheme = get("wsgi.url_scheme")
        query = get("QUERY_STRING")
        peer = get("REMOTE_ADDR")
        return (
            scheme if type(scheme) is str else "http",
            (query if query.isascii() else _native(query) or "") if type(query) is str else "",
            peer if type(peer) is str else None,
        )

    def _user(self, environ: WSGIEnvironment) -> str | None:
        """The user ``user_id_from`` finds in ``environ`` (``None`` without one, or when it fails)."""
        if self.user_id_from is None:
            return None
        try:
            found = self.user_id_from(environ)
        except Exception as exc:
            self.router._warn("wsgi-user", f"user_id_from failed: {exc!r}")
            return None
        return found if isinstance(found, str) and found else None

    def resolve(self, environ: WSGIEnvironment) -> Resolution:
        """Resolve the request's context and decisions; never raises (an empty context when all else fails)."""
        try:
            return self.resolver.resolve(self.request_info(environ))
        except Exception as exc:  # defensive: a request must never fail because of us
            self.resolver._count("errors")
            self.router._warn("wsgi", f"reading the request failed, deciding on an empty context: {exc!r}")
            context = Context()
            return Resolution(
                context, {name: self.router.decide(name, context) for name in self.resolver.rollout_names}
            )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Handle one request (PEP 3333)."""
        if self._lazy and _current.get() is _EMPTY_CONTEXT:
            override = self._override_query  # a tester's override link is resolved up front, stored in its cookie
            query = environ.get("QUERY_STRING") if override is not None else None
            if override is None or not query or (type(query) is str and override not in query):
                # _Request(self, environ, start_response) and LazyDecisions(router, request, names), inlined:
                # two calls less on every request
                request = _new_request(_Request)
                request._resolved = None
                request._ident = None
                request._middleware = self
                request._environ = environ
                request._start = start_response
                request._started = False
                decisions = _new_decisions(LazyDecisions)
                decisions._router = self.router
                decisions._context = request
                decisions._names = self._names
                decisions._decided = None
                environ[DECISIONS_KEY] = decisions
                environ[CONTEXT_KEY] = request
                run = copy_context().run
                run(_current.set, request)  # in the copy only: nothing to reset
                try:
                    result = run(self.app, environ, request.start_response)
                except BaseException:
                    request._detach()
                    raise
                kind = type(result)
                # nothing runs while a list or tuple is iterated; a file wrapper keeps the server's sendfile path
                if kind is list or kind is tuple or kind is environ.get("wsgi.file_wrapper"):
                    request._detach()
                    return result
                body = _context_body(result, run, request)
                next(body)  # prime it: iter(result), in the context; from here on, close() reaches its finally
                return body
        try:
            context, found, cookies, variant = self.resolver._resolve(*self._fields(environ))
        except Exception:  # pragma: no cover - defensive: reading the environ never raises, resolving neither
            resolution = self.resolve(environ)
            context, found = resolution.context, resolution.decisions
            cookies, variant = resolution.set_cookies, resolution.variant_header
        base = _current.get()
        if base is not _EMPTY_CONTEXT:  # lay it over an enclosing ambient context, as use_context() does
            try:
                context = base.merge(context)
            except Exception as exc:  # pragma: no cover - defensive
                self.router._warn("wsgi-merge", f"cannot merge with the enclosing context: {exc!r}")
        environ[DECISIONS_KEY] = found
        environ[CONTEXT_KEY] = context
        extra = _NO_HEADERS
        if cookies or variant is not None:
            extra = [("Set-Cookie", cookie) for cookie in cookies]
            if variant is not None:
                extra.append(("Canary-Variant", variant))
        vary = self._vary
        variables = copy_context()
        rollout = self.rollout
        if rollout is None:  # decision mode
            if vary or extra:
                start_response = _Start(start_response, extra, vary)
            result = variables.run(_call_app, self.app, context, environ, start_response)
            kind = type(result)
            if kind is list or kind is tuple:  # nothing runs while it is iterated
                return result
            wrapper = environ.get("wsgi.file_wrapper")
            if wrapper is not None and kind is wrapper:  # keep the server's sendfile path
                return result
            body = _context_body(result, variables.run, None)
            next(body)  # prime it (see above)
            return body
        decision = found.get(rollout) or _ERROR_DECISION
        app: WSGIApp = self.new_app if decision[0] == "new" and self.new_app is not None else self.app
        exchange = _Exchange(start_response, extra, vary, self.router)
        exchange.rollout = rollout
        exchange.decision = decision
        exchange.started = perf_counter()
        try:
            result = variables.run(_call_app, app, context, environ, exchange.start_response)
        except Exception as exc:
            exchange.finish(exc)
            raise
        return _Body(result, variables, exchange)

    def __repr__(self) -> str:
        mode = f"split {self.rollout!r}" if self.rollout is not None else "decisions"
        return f"CanaryMiddleware({self.app!r}, {mode}, rollouts={self.resolver.rollout_names!r})"
