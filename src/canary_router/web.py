"""Framework-agnostic request handling shared by the ASGI, WSGI and Django middleware.

A :class:`WebResolver` turns one request (:class:`RequestInfo`) into a :class:`Context`, the decisions of
the configured rollouts, and the cookies and headers to add to the response. It never raises: malformed,
oversized or non-UTF-8 cookies and headers are ignored (and counted), and the request goes on.

Trust model: nothing the client sends can put a user into, or out of, a canary. The user id comes from the
framework's authenticated user, from a header set by a trusted gateway (honoured only when the request
arrives from a configured trusted proxy), or from a cookie signed with the secret. Tester overrides and
session pins are HMAC-signed, pins for one identity. ``X-Forwarded-For`` and CDN country headers count only
from trusted proxies. (The anonymous visitor id is the client's own cookie: only the cohort of that
anonymous visitor, for rollouts bucketed by ``session_id``, depends on it.)
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .context import Context, _Deferred, _new_context, _set_attrs, _set_overrides, _set_pins
from .model import Decision, Reason, Variant
from .overrides import decode_pins, encode_pins, resolve_secret, sign_value, verify_token, verify_value

if TYPE_CHECKING:
    from .router import Router

__all__ = ["RequestInfo", "Resolution", "WebOptions", "WebResolver", "parse_cookies"]

_log = logging.getLogger("canary_router")

_VISITOR_ID = re.compile(r"[0-9a-f]{32}").fullmatch  # 128 random bits as lower-case hex
_MAX_COOKIE_HEADER = 8192
_MAX_HEADER = 4096
_MAX_ATTRIBUTE = 512
_TOKEN_SEPARATOR = "~"  # noqa: S105  # separates tokens in the cookie
_NO_COOKIES: Mapping[str, str] = {}  # shared, never written to
_NO_VARIANTS: Mapping[str, Variant] = {}  # shared, never written to
_NO_DECISIONS: Mapping[str, Decision] = {}  # shared, never written to

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(values: Iterable[str]) -> tuple[Network, ...]:
    out: list[Network] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted_proxies: expected an IP address or CIDR block, got {value!r}") from None
    return tuple(out)


def _cookie_name(value: str | None, what: str) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", value):
        raise ValueError(f"{what}: expected a cookie name of letters, digits, '_', '.' or '-', got {value!r}")
    return value


def _header_name(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not re.fullmatch(r"[A-Za-z0-9\-]{1,64}", value):
        raise ValueError(f"{what}: expected an HTTP header name, got {value!r}")
    return value.lower()


@dataclass(frozen=True, slots=True)
class WebOptions:
    """How the middleware builds a request's context and which cookies it keeps. Validated at creation."""

    rollouts: tuple[str, ...] | None = None
    """Rollouts to decide on every request (``None``: every rollout of the router)."""
    secret: str | bytes | None = field(default=None, repr=False)
    """HMAC key for override tokens, pins and signed user cookies (default: ``$CANARY_ROUTER_SECRET``)."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or CIDR blocks of proxies whose ``X-Forwarded-For`` and identity headers are believed."""
    user_header: str | None = None
    """Header carrying the user id, set by a trusted gateway (ignored from anyone else)."""
    user_cookie: str | None = None
    """Cookie carrying a user id signed with the secret (``overrides.sign_value(secret, "user", id)``)."""
    country_header: str | None = None
    """Header carrying the country, set by a trusted CDN (e.g. ``cf-ipcountry``)."""
    region_header: str | None = None
    """Header carrying the region, set by a trusted CDN or gateway."""
    visitor_cookie: str | None = "canary_vid"
    """Cookie with a random 128-bit id for anonymous visitors (``session_id``); ``None`` turns it off."""
    visitor_max_age: int = 365 * 86400
    """Lifetime of the visitor cookie, in seconds."""
    affinity: bool = False
    """Keep each visitor on the variant they first got, with a pin cookie signed for the user (else the visitor id);
    a rollback or completion overrides it."""
    pin_cookie: str = "canary_pin"
    """Name of the pin cookie (with ``affinity``)."""
    override_header: str | None = "x-canary-override"
    """Header that carries a signed tester override token."""
    override_query: str | None = "canary_override"
    """Query parameter that carries a signed tester override token."""
    override_cookie: str = "canary_override"
    """Cookie that keeps accepted override tokens."""
    variant_header: bool = False
    """Add a ``Canary-Variant: name=variant, ...`` response header (off by default)."""
    attributes: Callable[[RequestInfo], Mapping[str, Any]] | None = None
    """Optional callable adding your own attributes from the request."""
    _networks: tuple[Network, ...] = field(default=(), init=False, repr=False)
    _key: bytes | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_networks", _networks(self.trusted_proxies))
        object.__setattr__(self, "_key", resolve_secret(self.secret))
        for attr in ("user_header", "country_header", "region_header", "override_header"):
            object.__setattr__(self, attr, _header_name(getattr(self, attr), attr))
        _cookie_name(self.visitor_cookie, "visitor_cookie")
        _cookie_name(self.pin_cookie, "pin_cookie")
        _cookie_name(self.override_cookie, "override_cookie")
        _cookie_name(self.user_cookie, "user_cookie")
        if self.affinity and self._key is None:
            raise ValueError("affinity needs a signing secret (secret=... or $CANARY_ROUTER_SECRET) for the pin cookie")
        if self.user_cookie is not None and self._key is None:
            raise ValueError("user_cookie needs a signing secret: an unsigned user id cookie could be forged")
        if self.visitor_max_age <= 0:
            raise ValueError(f"visitor_max_age must be positive, got {self.visitor_max_age!r}")
        if self.rollouts is not None:
            object.__setattr__(self, "rollouts", tuple(self.rollouts))
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))

    @property
    def wanted_headers(self) -> frozenset[str]:
        """Lower-case names of the request headers the resolver reads."""
        names = {"cookie", "host", "user-agent", "accept-language", "x-forwarded-for"}
        for name in (self.user_header, self.country_header, self.region_header, self.override_header):
            if name:
                names.add(name)
        return frozenset(names)


@dataclass(slots=True)
class RequestInfo:
    """What the resolver needs from a request, in framework-neutral form."""

    method: str = "GET"
    path: str = "/"
    scheme: str = "http"
    query_string: str = ""
    peer: str | None = None
    """The address of the TCP peer (the client, or the last proxy)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Lower-case header names to values (repeated headers joined with ``", "``)."""
    user_id: str | None = None
    """The framework's authenticated user, if any (trusted)."""


class LazyDecisions(Mapping[str, Decision]):
    """Rollout name → :class:`Decision`, decided on first access (most requests never look at most rollouts).

    Deciding is deterministic for the request's context, so deciding late gives the same answer as deciding
    early — unless the rollout's state changes in between, and then the newer state is the right one.
    """

    __slots__ = ("_context", "_decided", "_names", "_router")

    def __init__(self, router: Router, context: Context, names: tuple[str, ...]) -> None:
        self._router = router
        self._context = context
        self._names = names
        self._decided: dict[str, Decision] | None = None  # made on the first decision

    def __getitem__(self, name: str) -> Decision:
        decided = self._decided
        if decided is None:
            decided = self._decided = {}
        decision = decided.get(name)
        if decision is None:
            if name not in self._names:
                raise KeyError(name)
            decision = decided[name] = self._router.decide(name, self._context)
        return decision

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __repr__(self) -> str:
        return f"LazyDecisions({dict(self)!r})"


class _StagedRequest(_Deferred):
    """A lazy web request worked out in two stages: what the ASGI and WSGI adapters' requests share.

    The first stage, :meth:`_first_stage` (the adapter's), works out the identity (:meth:`WebResolver._identity`);
    :meth:`_resolve` (the adapter's too) lays the request's other attributes over it. ``_middleware._staged``
    is false when an ``attributes`` callable may set the identity: the request is then resolved in one step.
    """

    __slots__ = ("_ident", "_middleware")

    _ident: Context | None
    _middleware: Any

    def _identity(self) -> Context:
        """The first stage: the identity, or the resolved context once there is one."""
        resolved = self._resolved
        if resolved is not None:
            return resolved
        if not self._middleware._staged:  # an attributes callable may set the identity: resolve it all
            return self._get()
        ident = self._ident
        return ident if ident is not None else self._first_stage()

    def _first_stage(self) -> Context:
        """Work the identity out and keep it in ``_ident`` (never raises)."""
        raise NotImplementedError


@dataclass(slots=True)
class Resolution:
    """The outcome for one request: its context, decisions, and what to add to the response."""

    context: Context
    decisions: Mapping[str, Decision]
    """Rollout name → decision (decided on first access; the decorators decide from the context anyway)."""
    set_cookies: list[str] = field(default_factory=list)
    vary_cookie: bool = False
    variant_header: str | None = None

    def variant(self, rollout: str) -> Variant:
        """The variant decided for ``rollout`` ("old" when it was not decided)."""
        decision = self.decisions.get(rollout)
        return decision.variant if decision is not None else "old"


def parse_cookies(header: str | None, wanted: Iterable[str]) -> dict[str, str]:
    """Extract the ``wanted`` cookies from a ``Cookie`` header; malformed pairs are skipped, never raised.

    Looks each wanted name up directly (the header may hold dozens of other cookies), taking the first
    occurrence at a pair boundary, as browsers send the most specific cookie first.
    """
    if not header:
        return {}
    return _find_cookies(header, _cookie_keys(wanted))


def _cookie_keys(names: Iterable[str]) -> tuple[tuple[str, str, int], ...]:
    """``(name, "name=", len("name="))`` for each cookie name: what :func:`_find_cookies` looks for."""
    return tuple((name, name + "=", len(name) + 1) for name in names)


def _find_cookies(header: str, keys: tuple[tuple[str, str, int], ...]) -> dict[str, str]:
    """:func:`parse_cookies` with the names prepared once by :func:`_cookie_keys` (the resolver's per-request form)."""
    found: dict[str, str] = {}
    if len(header) > _MAX_COOKIE_HEADER:
        return found
    for name, key, size in keys:
        at = header.find(key)
        if at < 0:  # the usual answer for most names
            continue
        while at > 0 and header[at - 1] not in "; ":  # "xcanary_vid=" is another cookie: look further
            at = header.find(key, at + 1)
            if at < 0:
                break
        else:
            start = at + size
            end = header.find(";", start)
            value = (header[start:] if end < 0 else header[start:end]).strip()
            if value[:1] == '"' and len(value) >= 2 and value[-1] == '"':
                value = value[1:-1]
            if len(value) <= _MAX_HEADER and value.isprintable():
                found[name] = value
    return found


def _query_value(query: str, name: str) -> str | None:
    if not query or len(query) > _MAX_HEADER:
        return None
    from urllib.parse import unquote

    for part in query.split("&", 100)[:100]:
        key, sep, value = part.partition("=")
        if sep and unquote(key) == name:
            return unquote(value)
    return None


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text or len(text) > 64:
        return None
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _pin_kind(identity: object) -> str:
    """The signing purpose of a pin cookie for one identity (length-prefixed, so no two identities share one)."""
    text = "" if identity is None else str(identity)
    return f"pin:{len(text)}:{text}"


_Parts = tuple[Context, Mapping[str, Decision], list[str], str | None]
"""What the adapters need of a resolution: context, decisions, ``Set-Cookie`` values, ``Canary-Variant`` value."""


class WebResolver:
    """Resolves requests for one router with one set of :class:`WebOptions`. Thread-safe; never raises."""

    def __init__(self, router: Router, options: WebOptions | None = None) -> None:
        self.router = router
        self.options = opts = options or WebOptions()
        names = opts.rollouts
        if names is not None:
            for name in names:
                router._require(name)
        self._names: tuple[str, ...] = names if names is not None else tuple(router.rollouts)
        self._peers: dict[str, tuple[str | None, bool]] = {}
        self._languages: dict[str, str] = {}  # Accept-Language value -> its first tag (few distinct values)
        key = opts._key
        self._key = key
        # Cookies are looked for only when something reads them: the override cookie and a signed user cookie
        # mean nothing without the secret (and a user cookie or affinity without one is refused up front).
        self._cookies = frozenset(
            n
            for n in (
                opts.visitor_cookie,
                opts.pin_cookie if opts.affinity else None,
                opts.override_cookie if key is not None else None,
                opts.user_cookie,
            )
            if n
        )
        self._cookie_keys = _cookie_keys(sorted(self._cookies))
        self._geo = tuple(
            (attribute, header)
            for attribute, header in (("country", opts.country_header), ("region", opts.region_header))
            if header
        )
        self._eager = opts.affinity or opts.variant_header
        # Whether a response can depend on a cookie. Vary must then be on every response, not only the ones a
        # cookie changed: a shared cache keeps a response without Vary for every request of that URL.
        self._vary = bool(opts.visitor_cookie or opts.user_cookie or opts.affinity or key is not None)
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {
            "overrides_accepted": 0,
            "overrides_rejected": 0,
            "malformed_input": 0,
            "errors": 0,
        }
        """Requests counted by outcome: accepted / rejected override tokens, malformed input, internal errors."""

    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    @property
    def rollout_names(self) -> tuple[str, ...]:
        """The rollouts decided per request."""
        return self._names

    def _peer(self, peer: str | None) -> tuple[str | None, bool]:
        """The peer's normalised address and whether it is a trusted proxy (cached: parsing costs microseconds)."""
        if peer is None:
            return None, False
        cached = self._peers.get(peer)
        if cached is None:
            address = _ip(peer)
            trusted = address is not None and any(address in n for n in self.options._networks)
            cached = (str(address) if address is not None else None, trusted)
            if len(self._peers) >= 4096:  # bounded: a scan of many addresses cannot grow it
                self._peers.clear()
            self._peers[peer] = cached
        return cached

    def client_ip(self, info: RequestInfo) -> str | None:
        """The client address: the peer, or (behind trusted proxies only) the last untrusted X-Forwarded-For hop."""
        address, trusted = self._peer(info.peer)
        if not trusted:
            return address
        return self._forwarded_client(address, info.headers)

    def _forwarded_client(self, address: str | None, headers: Mapping[str, str]) -> str | None:
        """The client behind the trusted peer ``address``, from ``X-Forwarded-For`` (walked from the right)."""
        forwarded = headers.get("x-forwarded-for")
        if not forwarded or len(forwarded) > _MAX_HEADER:
            return address
        networks = self.options._networks
        hops = [_ip(h) for h in forwarded.rsplit(",", 32)[-32:]]  # the right end is what our proxies wrote
        client = address
        for hop in reversed(hops):
            if hop is None:
                self._count("malformed_input")
                return client
            client = str(hop)
            if not any(hop in n for n in networks):
                break
        return client

    def _language(self, value: str) -> str:
        """The first tag of an ``Accept-Language`` value, at most 64 characters ("" when there is none); cached."""
        first = self._languages.get(value)
        if first is None:
            first = value.split(",", 1)[0].split(";", 1)[0].strip()[:64]
            if len(value) <= _MAX_ATTRIBUTE:  # bounded, like the peers: odd values are not kept
                if len(self._languages) >= 1024:
                    self._languages.clear()
                self._languages[value] = first
        return first

    def resolve(self, info: RequestInfo) -> Resolution:
        """Build the request's context and decisions; never raises (falls back to deciding on an empty context)."""
        context, decisions, set_cookies, header = self._resolve(
            info.method, info.path, info.scheme, info.query_string, info.peer, info.headers, info.user_id, info
        )
        return Resolution(context, decisions, set_cookies, self._vary, header)

    def _resolve(
        self,
        method: str,
        path: str,
        scheme: str,
        query: str,
        peer: str | None,
        headers: Mapping[str, str],
        user_id: str | None,
        info: RequestInfo | None = None,
        decide: bool = True,
    ) -> _Parts:
        """:meth:`resolve` from the request's fields (an adapter need not build a :class:`RequestInfo`); never raises.

        The identity (:meth:`_identity`), then the request's attributes laid over it (:meth:`_complete`). With
        ``decide=False`` (a lazy adapter, which has its own decisions mapping) and no eager option, the
        decisions part is an empty mapping.
        """
        try:
            identity, set_cookies, trusted, cookies = self._identity(scheme, query, peer, headers, user_id)
            context = self._complete(identity, trusted, method, path, scheme, query, peer, headers, user_id, info)
            if not self._eager:
                decisions = LazyDecisions(self.router, context, self._names) if decide else _NO_DECISIONS
                return context, decisions, set_cookies, None
            opts = self.options
            pins: Mapping[str, Variant] = _NO_VARIANTS
            pin_kind = ""
            if opts.affinity:
                pins, pin_kind = self._read_pins(cookies, context._attrs)
            _set_pins(context, pins)  # decide() serves them (after a rollback or completion)
            router_decide = self.router.decide
            decided = {name: router_decide(name, context) for name in self._names}
            if opts.affinity:
                self._update_pins(decided, pins, pin_kind, set_cookies, scheme in ("https", "wss"))
            variant: str | None = None
            if opts.variant_header:
                variant = ", ".join(f"{name}={d.variant}" for name, d in decided.items())
            return context, decided, set_cookies, variant
        except Exception as exc:  # pragma: no cover - defensive: a request must never fail because of us
            self._count("errors")
            self.router._warn("web", f"request resolution failed, serving 'old': {exc!r}")
            context = Context()
            return context, LazyDecisions(self.router, context, self._names), [], None

    def _identity(
        self, scheme: str, query: str, peer: str | None, headers: Mapping[str, str], user_id: str | None
    ) -> tuple[Context, list[str], bool, Mapping[str, str]]:
        """The first stage of a resolution: who the request is, and the cookies that follow from it.

        Returns a context holding only ``user_id`` and ``session_id`` (what most rollouts are bucketed by) with
        the verified overrides, the ``Set-Cookie`` values (a new visitor id, a rewritten override cookie),
        whether the peer is a trusted proxy, and the request's own cookies. :meth:`_complete` lays the request's
        other attributes over it. One function on purpose: it runs on every request that decides, and each call
        saved is a measurable share of it. Raises only on a bug (the callers catch it).
        """
        opts = self.options
        cookies: Mapping[str, str] = _NO_COOKIES
        if self._cookie_keys:
            cookie_header = headers.get("cookie")
            if cookie_header:
                cookies = _find_cookies(cookie_header, self._cookie_keys)
        set_cookies: list[str] = []
        trusted = False
        if peer is not None:
            cached = self._peers.get(peer)
            trusted = (cached if cached is not None else self._peer(peer))[1]
        attrs: dict[str, Any] = {}
        user = user_id
        if user is None and trusted and opts.user_header:
            value = headers.get(opts.user_header)
            if value and len(value) <= _MAX_ATTRIBUTE and value.isprintable():
                user = value
        if user is None and opts.user_cookie:
            signed = cookies.get(opts.user_cookie)
            if signed:
                user = verify_value(self._key, "user", signed)
                if user is None:
                    self._count("malformed_input")
        if user is not None and user != "":
            attrs["user_id"] = user
        visitor_cookie = opts.visitor_cookie
        if visitor_cookie:
            visitor = cookies.get(visitor_cookie)
            if visitor is None or _VISITOR_ID(visitor) is None:
                if visitor is not None:
                    self._count("malformed_input")
                visitor = secrets.token_hex(16)
                secure = scheme == "https" or scheme == "wss"  # noqa: PLR1714  # no tuple on the hot path
                set_cookies.append(self._cookie(visitor_cookie, visitor, opts.visitor_max_age, secure))
            attrs["session_id"] = visitor
        overrides: Mapping[str, Variant] = _NO_VARIANTS
        if self._key is not None and (
            (opts.override_cookie in cookies)
            or (opts.override_header and opts.override_header in headers)
            or (opts.override_query and opts.override_query in query)
        ):
            overrides = self._overrides(query, headers, cookies, set_cookies, scheme in ("https", "wss"))
        context = _new_context(Context)
        _set_attrs(context, attrs)
        _set_overrides(context, overrides)
        _set_pins(context, _NO_VARIANTS)
        return context, set_cookies, trusted, cookies

    def _complete(
        self,
        identity: Context,
        trusted: bool,
        method: str,
        path: str,
        scheme: str,
        query: str,
        peer: str | None,
        headers: Mapping[str, str],
        user_id: str | None,
        info: RequestInfo | None,
    ) -> Context:
        """The second stage: a new context with the request's attributes laid over ``identity``'s.

        ``identity`` is left as it was (decisions may have been made on it). Raises only on a bug.
        """
        attrs = identity._attrs.copy()
        attrs["path"] = path[:_MAX_ATTRIBUTE]
        attrs["method"] = method
        host = headers.get("host")
        if host:
            attrs["host"] = host[:_MAX_ATTRIBUTE]
        if peer is not None:
            cached = self._peers.get(peer)
            client = (cached if cached is not None else self._peer(peer))[0]
            if trusted and "x-forwarded-for" in headers:
                client = self._forwarded_client(client, headers)
            if client:
                attrs["client_ip"] = client
        agent = headers.get("user-agent")
        if agent:
            attrs["user_agent"] = agent[:_MAX_ATTRIBUTE]
        language = headers.get("accept-language")
        if language:
            first = self._languages.get(language)
            if first is None:
                first = self._language(language)
            if first:
                attrs["accept_language"] = first
        if trusted:
            for attribute, header in self._geo:
                value = headers.get(header)
                if value and len(value) <= 64 and value.isprintable():
                    attrs[attribute] = value.strip()
        if self.options.attributes is not None:
            if info is None:
                info = RequestInfo(method, path, scheme, query, peer, headers, user_id)
            try:
                attrs.update(self.options.attributes(info))
            except Exception as exc:
                self.router._warn("web-attributes", f"the attributes callable failed: {exc!r}")
        context = _new_context(Context)
        _set_attrs(context, attrs)
        _set_overrides(context, identity._overrides)
        _set_pins(context, _NO_VARIANTS)
        return context

    def _overrides(
        self, query: str, headers: Mapping[str, str], cookies: Mapping[str, str], set_cookies: list[str], secure: bool
    ) -> dict[str, Variant]:
        opts = self.options
        key = opts._key
        now = self.router.clock()
        accepted: dict[str, tuple[Variant, float, str]] = {}
        rewrite = False  # the override cookie must be written again
        candidates: list[tuple[str, bool]] = []
        # The stored tokens first, then the fresh ones, so a fresh token replaces a stored one for its rollout.
        stored = cookies.get(opts.override_cookie)
        if stored:
            candidates.extend((token, False) for token in stored.split(_TOKEN_SEPARATOR)[:16])
        if opts.override_query:
            value = _query_value(query, opts.override_query)
            if value:
                candidates.append((value.strip(), True))
        if opts.override_header:
            value = headers.get(opts.override_header)
            if value:
                candidates.append((value.strip(), True))
        for token, new in candidates:
            grant = verify_token(key, token, now=now)
            if grant is None or grant.rollout not in self.router.rollouts:
                self._count("overrides_rejected")
                rewrite = rewrite or not new  # rewrite the cookie without it (or clear it), so it is counted once
                continue
            if new:
                self._count("overrides_accepted")
                rewrite = True
            accepted[grant.rollout] = (grant.variant, grant.expires, token)
        if rewrite and accepted:
            value = _TOKEN_SEPARATOR.join(token for _, _, token in accepted.values())
            max_age = int(max(expires for _, expires, _ in accepted.values()) - now)
            set_cookies.append(self._cookie(opts.override_cookie, value, max(1, max_age), secure))
        elif rewrite:
            set_cookies.append(self._cookie(opts.override_cookie, "", 0, secure))
        return {name: variant for name, (variant, _, _) in accepted.items()}

    def _read_pins(self, cookies: Mapping[str, str], attrs: Mapping[str, Any]) -> tuple[Mapping[str, Variant], str]:
        """The visitor's verified pins, and the signing purpose bound to this visitor's identity."""
        key = self.options._key
        # A pin is signed for one identity (the user, else the visitor), so a pin cookie copied from another
        # browser or user is not honoured: otherwise a "new" pin could be handed around to join the canary.
        user, visitor = attrs.get("user_id"), attrs.get("session_id")
        kind = _pin_kind(user if user is not None and user != "" else visitor)
        raw = cookies.get(self.options.pin_cookie)
        if not raw or key is None:
            return {}, kind
        value = verify_value(key, kind, raw)
        if value is not None:
            return decode_pins(value), kind
        if not (user and visitor and verify_value(key, _pin_kind(visitor), raw) is not None):
            self._count("malformed_input")  # forged, or another identity's (a visitor's pin after login is not)
        return {}, kind

    def _update_pins(
        self,
        decisions: Mapping[str, Decision],
        pins: Mapping[str, Variant],
        kind: str,
        set_cookies: list[str],
        secure: bool,
    ) -> None:
        """Pin what was decided for the first time, drop pins that a rollback or completion overrode."""
        key = self.options._key
        if key is None:  # pragma: no cover - WebOptions refuses affinity without a secret
            return
        updated = dict(pins)
        pinnable = (Reason.SPLIT, Reason.RULE_SPLIT, Reason.RULE_MATCH)
        for name, decision in decisions.items():
            reason = decision.reason
            if reason in (Reason.ROLLED_BACK, Reason.COMPLETED):
                updated.pop(name, None)
            elif reason in pinnable and name not in updated:
                updated[name] = decision.variant
        if updated != pins:
            cookie = self.options.pin_cookie
            if updated:
                set_cookies.append(self._cookie(cookie, sign_value(key, kind, encode_pins(updated)), None, secure))
            else:
                set_cookies.append(self._cookie(cookie, "", 0, secure))

    @staticmethod
    def _cookie(name: str, value: str, max_age: int | None, secure: bool) -> str:
        parts = [f"{name}={value}", "Path=/"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        parts += ["HttpOnly", "SameSite=Lax"]
        if secure:
            parts.append("Secure")
        return "; ".join(parts)
