"""Django middleware: decide every configured rollout per request, from ``settings.CANARY_ROUTER``.

::

    # settings.py
    MIDDLEWARE = [
        ...,
        "django.contrib.auth.middleware.AuthenticationMiddleware",  # optional; before ours
        "canary_router.django.CanaryMiddleware",
    ]
    CANARY_ROUTER = {
        "config": BASE_DIR / "canary.toml",    # a TOML/YAML/JSON path, a mapping in the config's shape, or a Router
        "trusted_proxies": ["10.0.0.0/8"],     # any other key is a WebOptions field
        "user_header": "x-user-id",
    }

    # views.py
    from canary_router.django import get_router

    @get_router().canary("recommender", old=recommend_v1)
    def recommend_v2(user_id): ...

The router is built once per process, on first use (thread-safe), and rebuilt after Django's
``setting_changed`` signal for ``CANARY_ROUTER`` (``override_settings`` in tests). A bad setting or a bad
config raises :class:`~django.core.exceptions.ImproperlyConfigured` when the middleware loads, so the
server refuses to boot; after that, nothing a client sends can make the middleware fail a request.

Each request gets ``request.canary`` (rollout name → :class:`~canary_router.Decision`) and
``request.canary_context`` (the :class:`~canary_router.Context` decided on), and the view runs inside that
ambient context, so decorated functions deep in the call stack route the same way. The user id is the
authenticated ``request.user``'s primary key when there is one (``AuthenticationMiddleware`` must come
before this middleware), else the trusted gateway header, the signed user cookie or the visitor cookie.
A streaming response's iterator runs after the middleware returns, outside the ambient context.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from difflib import get_close_matches
from http.cookies import SimpleCookie
from os import PathLike
from pathlib import Path
from types import MappingProxyType
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings  # type: ignore[import-untyped]  # Django ships no type hints
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.core.signals import setting_changed  # type: ignore[import-untyped]
from django.utils.cache import patch_vary_headers  # type: ignore[import-untyped]
from django.utils.functional import LazyObject, empty  # type: ignore[import-untyped]

from .context import Context, use_context
from .errors import CanaryError, ConfigError
from .router import Router
from .web import RequestInfo, Resolution, WebOptions, WebResolver

__all__ = ["SETTING", "CanaryMiddleware", "get_resolver", "get_router", "reset"]

SETTING = "CANARY_ROUTER"
"""The name of the Django setting read by this module."""

_log = logging.getLogger("canary_router")

_WEB_KEYS = tuple(f.name for f in fields(WebOptions) if f.init)
_KEYS = ("config", *_WEB_KEYS)
_SEQUENCE_KEYS = ("rollouts", "trusted_proxies")
_BOOL_KEYS = ("affinity", "variant_header")


@dataclass(frozen=True, slots=True)
class _State:
    router: Router
    resolver: WebResolver
    meta_keys: tuple[tuple[str, str], ...]
    """(lower-case header name, ``request.META`` key) for every header the resolver reads."""
    owned: bool
    """Whether this module built the router (and so closes it on reset)."""


class _Lazy:
    """The process's state, built on first use under a lock (double-checked), dropped by :func:`reset`."""

    __slots__ = ("lock", "state")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state: _State | None = None

    def get(self) -> _State:
        state = self.state
        if state is None:
            with self.lock:
                state = self.state
                if state is None:
                    state = self.state = _build()
        return state

    def take(self) -> _State | None:
        with self.lock:
            state, self.state = self.state, None
        return state


_lazy = _Lazy()


def _setting_error(message: str) -> Exception:
    return ImproperlyConfigured(f"settings.{SETTING}: {message}")  # type: ignore[no-any-return]


def _options(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check the setting's keys and value types, and return the WebOptions keyword arguments."""
    for key in raw:
        if key not in _KEYS:
            close = get_close_matches(str(key), _KEYS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(_KEYS)}"
            raise _setting_error(f"unknown key {key!r} ({hint})")
    options: dict[str, Any] = {}
    for key in _WEB_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if key in _SEQUENCE_KEYS and value is not None:
            if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
                raise _setting_error(f"{key}: expected a list of strings, got {value!r}")
            value = tuple(value)
            if not all(isinstance(item, str) for item in value):
                raise _setting_error(f"{key}: expected a list of strings, got {list(value)!r}")
        elif key in _BOOL_KEYS and not isinstance(value, bool):
            raise _setting_error(f"{key}: expected True or False, got {value!r}")
        elif key == "visitor_max_age" and (isinstance(value, bool) or not isinstance(value, int)):
            raise _setting_error(f"{key}: expected a number of seconds (an int), got {value!r}")
        options[key] = value
    return options


def _build() -> _State:
    raw = getattr(settings, SETTING, None)
    if raw is None:
        raise _setting_error("not set; expected a dict with at least 'config' (a config file path or mapping)")
    if not isinstance(raw, Mapping):
        raise _setting_error(f"expected a dict, got {type(raw).__name__}")
    options = _options(raw)
    if "config" not in raw:
        raise _setting_error("missing key 'config' (a TOML/YAML/JSON file path, a mapping, or a Router)")
    config = raw["config"]
    try:
        web = WebOptions(**options)
    except (TypeError, ValueError) as exc:
        raise _setting_error(str(exc)) from exc
    owned = not isinstance(config, Router)
    try:
        if isinstance(config, Router):
            router = config
        elif isinstance(config, str | PathLike):
            router = Router.from_file(Path(os.fsdecode(config)))
        elif isinstance(config, Mapping):
            router = Router.from_config(config)
        else:
            raise _setting_error(f"config: expected a file path, a mapping or a Router, got {type(config).__name__}")
    except ConfigError as exc:
        raise ImproperlyConfigured(f"settings.{SETTING}['config']: {exc}") from exc
    try:
        resolver = WebResolver(router, web)
    except CanaryError as exc:  # e.g. 'rollouts' names a rollout the config does not define
        if owned:
            router.close()
        raise _setting_error(f"rollouts: {exc}") from exc
    meta_keys = tuple(sorted((name, "HTTP_" + name.upper().replace("-", "_")) for name in web.wanted_headers))
    return _State(router, resolver, meta_keys, owned)


def get_router() -> Router:
    """The process's router, built from ``settings.CANARY_ROUTER`` on first use.

    Raises :class:`~django.core.exceptions.ImproperlyConfigured` when the setting or the config is invalid.
    """
    return _lazy.get().router


def get_resolver() -> WebResolver:
    """The process's request resolver (its ``counters`` count rejected overrides and malformed input)."""
    return _lazy.get().resolver


def reset() -> None:
    """Forget the router; the next use rebuilds it from the settings (a router built here is closed)."""
    state = _lazy.take()
    if state is not None and state.owned:
        try:
            state.router.close()
        except Exception as exc:  # closing must not break a settings change
            _log.warning("canary_router: closing the previous router failed: %r", exc)


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING:
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="canary_router.django.reset")


def _user_id(user: Any) -> str | None:
    """The primary key of an authenticated user, as a string; ``None`` for anyone else, or on any failure."""
    if user is None:
        return None
    try:
        if getattr(user, "is_authenticated", False) is not True:
            return None
        pk = getattr(user, "pk", None)
        return None if pk is None else str(pk)
    except Exception:  # a failing auth backend or session store: treat the request as anonymous
        return None


async def _user_id_async(request: Any) -> str | None:
    auser = getattr(request, "auser", None)  # set by AuthenticationMiddleware since Django 5.0
    if auser is not None and callable(auser):
        try:
            return _user_id(await auser())
        except Exception:
            return None
    user = getattr(request, "user", None)
    if isinstance(user, LazyObject) and user._wrapped is empty:
        # Evaluating it may query the database, which Django forbids in async code.
        try:
            return await sync_to_async(_user_id, thread_sensitive=True)(user)
        except Exception:
            return None
    return _user_id(user)


def _text(value: str) -> str | None:
    """Undo WSGI's latin-1 decoding of header bytes: UTF-8 text, or ``None`` (dropped) when it is not UTF-8.

    The ASGI and WSGI middleware apply the same policy, so the same bytes give the same bucket everywhere.
    """
    if value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None


def _request_info(request: Any, state: _State, user_id: str | None) -> RequestInfo:
    meta = request.META
    headers: dict[str, str] = {}
    for name, key in state.meta_keys:
        value = meta.get(key)
        if isinstance(value, str) and value:
            text = _text(value)
            if text is None:
                state.resolver._count("malformed_input")
            else:
                headers[name] = text
    try:
        scheme = str(request.scheme)
    except Exception:  # e.g. a malformed SECURE_PROXY_SSL_HEADER setting
        scheme = "http"
    query = meta.get("QUERY_STRING")
    peer = meta.get("REMOTE_ADDR")
    method = request.method
    return RequestInfo(
        method=method if isinstance(method, str) and method else "GET",
        path=str(request.path),
        scheme=scheme,
        query_string=query if isinstance(query, str) else "",
        peer=peer if isinstance(peer, str) and peer else None,
        headers=headers,
        user_id=user_id,
    )


def _prepare(request: Any, user_id: str | None) -> tuple[_State, Resolution] | None:
    """Resolve the request and annotate it; ``None`` (the request goes on untouched) if anything fails."""
    try:
        state = _lazy.get()
    except Exception as exc:  # settings changed to something invalid after the middleware loaded
        _log.error("canary_router: no router, serving the request without canary decisions: %s", exc)
        request.canary = MappingProxyType({})
        request.canary_context = Context()
        return None
    try:
        resolution = state.resolver.resolve(_request_info(request, state, user_id))
    except Exception as exc:
        state.router._warn("django", f"cannot resolve the request, serving it without canary decisions: {exc!r}")
        request.canary = MappingProxyType({})
        request.canary_context = Context()
        return None
    request.canary = MappingProxyType(resolution.decisions)
    request.canary_context = resolution.context
    return state, resolution


def _finish(state: _State, resolution: Resolution, response: Any) -> None:
    """Add the resolver's cookies and headers to the response; never raises."""
    try:
        if resolution.set_cookies:
            jar = response.cookies
            for line in resolution.set_cookies:
                parsed: SimpleCookie = SimpleCookie()
                parsed.load(line)
                for name, morsel in parsed.items():
                    if name not in jar:  # a cookie the view set itself wins
                        jar[name] = morsel
        if resolution.vary_cookie:
            patch_vary_headers(response, ("Cookie",))
        if resolution.variant_header is not None:
            response.headers["Canary-Variant"] = resolution.variant_header
    except Exception as exc:
        state.router._warn("django-response", f"cannot add canary cookies or headers to the response: {exc!r}")


class CanaryMiddleware:
    """Decide the configured rollouts for each request and run the view inside that context.

    Sync and async capable: Django hands it the kind of ``get_response`` its chain needs, and the
    middleware behaves as a coroutine function when that is async. Keeps per-request state in locals.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)
        _lazy.get()  # fail at startup, with ImproperlyConfigured, on a bad setting or config

    def __call__(self, request: Any) -> Any:
        """Handle one request (returns a coroutine when the chain is async)."""
        if self._async:
            return self.__acall__(request)
        user_id = _user_id(getattr(request, "user", None))
        prepared = _prepare(request, user_id)
        if prepared is None:
            return self.get_response(request)
        state, resolution = prepared
        with use_context(resolution.context):
            response = self.get_response(request)
        _finish(state, resolution, response)
        return response

    async def __acall__(self, request: Any) -> Any:
        """The async path: the same steps, awaiting the rest of the chain."""
        get_response: Callable[[Any], Awaitable[Any]] = self.get_response
        user_id = await _user_id_async(request)
        prepared = _prepare(request, user_id)
        if prepared is None:
            return await get_response(request)
        state, resolution = prepared
        with use_context(resolution.context):
            response = await get_response(request)
        _finish(state, resolution, response)
        return response
