"""Who may act on the dashboard: bearer token, signed session cookie, host callable; CSRF and origin checks.

Nothing is kept on the server: a session is a cookie signed with HMAC-SHA256, and a CSRF token is an HMAC
of a random per-browser nonce (kept in its own cookie) and the actor, so any number of workers that share
the key agree, and rotating the key (or the token it is derived from) ends every session at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from ..overrides import resolve_secret, sign_value, verify_value
from ..web import RequestInfo

__all__ = ["Authenticator", "Identity"]

SESSION_COOKIE = "canary_dashboard_session"
CSRF_COOKIE = "canary_dashboard_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
TOKEN_ACTOR = "token"  # noqa: S105  # the actor name of the shared token, not a secret
_MIN_TOKEN = 16
_MAX_ACTOR = 200
_SESSION_KIND = "dashboard-session"

Authenticate = Callable[[RequestInfo], "str | Awaitable[str | None] | None"]
"""``authenticate(request) -> actor | None`` (may be a coroutine function)."""

Method = Literal["bearer", "session", "callable"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who sent a request, and how that was established."""

    actor: str
    """The name recorded in the audit log (after ``dashboard:``)."""
    method: Method
    """``"bearer"`` (``Authorization: Bearer``), ``"session"`` (the login cookie) or ``"callable"``."""

    @property
    def needs_csrf(self) -> bool:
        """Whether the browser sends this credential by itself, so that a POST must also prove its origin."""
        return self.method != "bearer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    """Checks credentials and issues sessions and CSRF tokens for one dashboard.

    The signing key is ``secret`` when given, else derived from ``token`` (so every worker started with the
    same token shares it), else ``$CANARY_ROUTER_SECRET``, else random for this process.
    """

    def __init__(
        self,
        *,
        token: str | None,
        authenticate: Authenticate | None,
        secret: str | bytes | None,
        session_ttl: float,
    ) -> None:
        if token is not None:
            if not isinstance(token, str):
                raise TypeError(f"token must be a str, got {type(token).__name__}")
            if len(token) < _MIN_TOKEN:
                raise ValueError(
                    f"the dashboard token must be at least {_MIN_TOKEN} characters long (it guards rollbacks "
                    'and promotions); generate one with: python -c "import secrets; print(secrets.token_urlsafe(32))"'
                )
        if authenticate is not None and not callable(authenticate):
            raise TypeError(f"authenticate must be callable, got {authenticate!r}")
        if not session_ttl > 0:
            raise ValueError(f"session_ttl must be > 0 seconds, got {session_ttl!r}")
        self._token_digest = _digest(token) if token is not None else None
        self._authenticate = authenticate
        self.session_ttl = float(session_ttl)
        key = resolve_secret(secret)
        if key is None and token is not None:
            key = hmac.new(token.encode(), b"canary_router dashboard signing key v1", hashlib.sha256).digest()
        if key is None:
            key = resolve_secret(None) or secrets.token_bytes(32)
        self._key = key

    # ------------------------------------------------------------------ what is configured

    @property
    def has_token(self) -> bool:
        """Whether a bearer token is configured (and the login form offered)."""
        return self._token_digest is not None

    @property
    def enabled(self) -> bool:
        """Whether any way to authenticate is configured; without one the dashboard is read-only."""
        return self._token_digest is not None or self._authenticate is not None

    @property
    def mode(self) -> str:
        """``"none"``, ``"token"``, ``"callable"`` or ``"token+callable"``."""
        parts = [name for name, on in (("token", self.has_token), ("callable", self._authenticate)) if on]
        return "+".join(parts) or "none"

    # ------------------------------------------------------------------ credentials

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the configured token (compared in constant time, on digests)."""
        expected = self._token_digest
        return expected is not None and hmac.compare_digest(_digest(given), expected)

    @staticmethod
    def bearer(info: RequestInfo) -> str | None:
        """The token of an ``Authorization: Bearer`` header, if the request has one."""
        header = info.headers.get("authorization")
        if not header:
            return None
        scheme, _, value = header.strip().partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    async def identify(self, info: RequestInfo, cookies: dict[str, str], now: float) -> Identity | None:
        """Who sent the request: the bearer token, else a valid session cookie, else ``authenticate``."""
        given = self.bearer(info)
        if given is not None and self.token_matches(given):
            return Identity(TOKEN_ACTOR, "bearer")
        session = cookies.get(SESSION_COOKIE)
        if session:
            actor = self.session_actor(session, now)
            if actor is not None:
                return Identity(actor, "session")
        if self._authenticate is not None:
            result = self._authenticate(info)
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return Identity(_clean_actor(str(result)), "callable")
        return None

    # ------------------------------------------------------------------ sessions

    def session_cookie(self, actor: str, now: float) -> str:
        """A signed session value for ``actor``, valid for ``session_ttl`` seconds from ``now``."""
        expires = int(now + self.session_ttl)
        return sign_value(self._key, _SESSION_KIND, f"{expires}|{actor}")

    def session_actor(self, value: str, now: float) -> str | None:
        """The actor of a session cookie, or ``None`` when it is forged, malformed or expired."""
        payload = verify_value(self._key, _SESSION_KIND, value)
        if payload is None:
            return None
        expires_text, _, actor = payload.partition("|")
        try:
            expires = int(expires_text)
        except ValueError:
            return None
        return actor if actor and expires > now else None

    # ------------------------------------------------------------------ CSRF

    @staticmethod
    def new_nonce() -> str:
        """A fresh random value for the CSRF cookie."""
        return secrets.token_urlsafe(18)

    def csrf_token(self, nonce: str, actor: str) -> str:
        """The CSRF token of a browser (its CSRF cookie's ``nonce``) acting as ``actor``."""
        mac = hmac.new(self._key, f"v1|dashboard-csrf|{nonce}|{actor}".encode(), hashlib.sha256).digest()
        return _b64(mac)

    def csrf_valid(self, nonce: str | None, actor: str, given: str | None) -> bool:
        """Whether ``given`` is the CSRF token for this browser's nonce and actor (constant-time)."""
        if not nonce or not given or len(given) > 256:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.csrf_token(nonce, actor).encode())


def _clean_actor(actor: str) -> str:
    """An actor name fit for the audit log: printable, one line, bounded."""
    text = "".join(ch if ch.isprintable() else "?" for ch in actor.strip())
    return text[:_MAX_ACTOR] or "unknown"


def same_origin(info: RequestInfo, allowed: frozenset[str]) -> tuple[bool, str]:
    """Whether a state-changing request comes from the dashboard's own pages (``Origin``, else ``Referer``).

    The origin's ``host[:port]`` must equal the request's ``Host`` (or be in ``allowed``, as ``scheme://host``).
    A request with neither header is not from a current browser's page: it passes here and must authenticate
    some other way (the caller refuses it unless it carries the bearer token).
    """
    origin = info.headers.get("origin")
    source = "Origin"
    if origin == "null":  # a sandboxed frame, a data: URL or a cross-origin redirect
        return False, "cross-origin request (Origin: null)"
    if not origin:
        origin, source = info.headers.get("referer") or "", "Referer"
        if not origin:
            return True, ""
    try:
        parts = urlsplit(origin)
        netloc = parts.netloc.lower()
        full = f"{parts.scheme.lower()}://{netloc}"
    except ValueError:
        return False, f"malformed {source} header"
    host = (info.headers.get("host") or "").lower()
    if (host and netloc == host) or full in allowed:
        return True, ""
    return False, f"cross-origin request ({source} {full!r} is not this dashboard's origin)"
