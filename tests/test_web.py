"""The framework-neutral request resolver: identity and its trust, cookies, overrides, pins, and never raising."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary_router import Context, Router, bucket
from canary_router.errors import UnknownRolloutError
from canary_router.overrides import create_token, sign_value
from canary_router.web import RequestInfo, Resolution, WebOptions, WebResolver, parse_cookies

SECRET = "web-test-secret-0123456789abcdef"
KEY = SECRET.encode()
PROXY = "10.0.0.1"
CLIENT = "203.0.113.9"


class Clock:
    """A settable clock for the router."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_router(clock: Clock | None = None) -> Router:
    """A router with two rollouts: ``checkout`` (user, else session) and ``search`` (user only)."""
    return Router.from_config(
        {
            "rollouts": {
                "checkout": {"steps": [5, 25, 50, 100], "stickiness": ["user_id", "session_id"]},
                "search": {"steps": [10, 50, 100]},
            }
        },
        clock=clock or Clock(),
    )


def resolver(router: Router | None = None, **options: Any) -> WebResolver:
    """A resolver for ``router`` (default: a fresh one) with these options."""
    return WebResolver(router or make_router(), WebOptions(**options))


def request(
    *,
    headers: Mapping[str, str] | None = None,
    cookies: Mapping[str, str] | None = None,
    peer: str | None = CLIENT,
    **fields: Any,
) -> RequestInfo:
    """A request with these (lower-case) headers and cookies."""
    all_headers = dict(headers or {})
    if cookies:
        all_headers["cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
    return RequestInfo(headers=all_headers, peer=peer, **fields)


def set_cookies(resolution: Resolution) -> dict[str, tuple[str, list[str]]]:
    """The resolution's Set-Cookie values by cookie name: (value, [attributes])."""
    out: dict[str, tuple[str, list[str]]] = {}
    for header in resolution.set_cookies:
        first, *attributes = header.split("; ")
        name, _, value = first.partition("=")
        out[name] = (value, attributes)
    return out


def user_in(rollout: str, *, new: bool, percent: float, prefix: str = "u") -> str:
    """A user id that is "new" (or "old") at ``percent`` % of ``rollout``."""
    for i in range(100_000):
        uid = f"{prefix}{i}"
        if (bucket(rollout, uid) < percent * 100) == new:
            return uid
    raise AssertionError("no such user")  # pragma: no cover


def user_between(rollout: str, low: float, high: float) -> str:
    """A user id that is "old" at ``low`` % of ``rollout`` and "new" at ``high`` %."""
    for i in range(100_000):
        uid = f"m{i}"
        if low * 100 <= bucket(rollout, uid) < high * 100:
            return uid
    raise AssertionError("no such user")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------- user id


def test_framework_user_beats_header_and_cookie() -> None:
    """The framework's authenticated user wins over the gateway header and the signed cookie."""
    web = resolver(secret=SECRET, trusted_proxies=(PROXY,), user_header="X-User-Id", user_cookie="uid")
    info = request(
        peer=PROXY,
        headers={"x-user-id": "from-header"},
        cookies={"uid": sign_value(KEY, "user", "from-cookie")},
        user_id="from-framework",
    )
    assert web.resolve(info).context["user_id"] == "from-framework"


def test_trusted_header_beats_signed_cookie() -> None:
    """From a trusted proxy, the gateway's user header wins over the signed cookie."""
    web = resolver(secret=SECRET, trusted_proxies=(PROXY,), user_header="x-user-id", user_cookie="uid")
    info = request(peer=PROXY, headers={"x-user-id": "from-header"}, cookies={"uid": sign_value(KEY, "user", "c")})
    assert web.resolve(info).context["user_id"] == "from-header"


def test_signed_cookie_is_the_last_source() -> None:
    """Without a framework user or a trusted header, a correctly signed user cookie gives the user id."""
    web = resolver(secret=SECRET, user_cookie="uid")
    resolution = web.resolve(request(cookies={"uid": sign_value(KEY, "user", "u-7")}))
    assert resolution.context["user_id"] == "u-7"
    assert web.counters["malformed_input"] == 0


def test_user_header_is_ignored_from_untrusted_peers() -> None:
    """The user header counts only when the request comes from a trusted proxy."""
    web = resolver(trusted_proxies=("10.0.0.0/8",), user_header="x-user-id")
    assert "user_id" not in web.resolve(request(peer=CLIENT, headers={"x-user-id": "admin"})).context
    assert "user_id" not in web.resolve(request(peer=None, headers={"x-user-id": "admin"})).context
    assert "user_id" not in web.resolve(request(peer="garbage", headers={"x-user-id": "admin"})).context
    assert web.resolve(request(peer="10.9.8.7", headers={"x-user-id": "admin"})).context["user_id"] == "admin"
    untrusting = resolver(user_header="x-user-id")  # no trusted proxies at all: never believed
    assert "user_id" not in untrusting.resolve(request(peer=PROXY, headers={"x-user-id": "admin"})).context


def test_user_header_with_unprintable_or_huge_value_is_ignored() -> None:
    """A user header with control characters or over 512 characters is not used."""
    web = resolver(trusted_proxies=(PROXY,), user_header="x-user-id")
    for value in ("a\x00b", "x" * 513, ""):
        assert "user_id" not in web.resolve(request(peer=PROXY, headers={"x-user-id": value})).context


@pytest.mark.parametrize(
    "cookie",
    [
        "u-7",  # unsigned
        sign_value(b"not-the-right-secret-000", "user", "u-7"),  # another secret
        sign_value(KEY, "pin", "u-7"),  # another purpose
        sign_value(KEY, "user", "u-7")[:-3] + "abc",  # tampered
    ],
)
def test_unsigned_or_forged_user_cookie_is_ignored_and_counted(cookie: str) -> None:
    """A user cookie that does not verify gives no user id and counts as malformed input."""
    web = resolver(secret=SECRET, user_cookie="uid")
    resolution = web.resolve(request(cookies={"uid": cookie}))
    assert "user_id" not in resolution.context
    assert web.counters["malformed_input"] == 1


# --------------------------------------------------------------------------------------- client address and CDN


def test_client_ip_is_the_peer_without_trusted_proxies() -> None:
    """Without trusted proxies X-Forwarded-For is ignored and the peer is the client."""
    web = resolver()
    info = request(peer=CLIENT, headers={"x-forwarded-for": "1.2.3.4"})
    assert web.client_ip(info) == CLIENT
    assert web.resolve(info).context["client_ip"] == CLIENT
    assert web.client_ip(request(peer="not an address")) is None
    assert web.client_ip(request(peer="2001:0db8:0000::1")) == "2001:db8::1"


def test_forwarded_for_is_walked_right_to_left_over_trusted_proxies() -> None:
    """The client is the first hop from the right that is not a trusted proxy."""
    web = resolver(trusted_proxies=("10.0.0.0/8", "2001:db8::/32"))
    cases = {
        f"{CLIENT}": CLIENT,
        f"{CLIENT}, 10.0.0.2": CLIENT,
        f"6.6.6.6, {CLIENT}, 10.0.0.2, 10.1.1.1": CLIENT,  # the spoofed left part is never reached
        f"{CLIENT},10.0.0.2": CLIENT,
        "10.0.0.3, 10.0.0.2": "10.0.0.3",  # all trusted: the leftmost
        f"{CLIENT}, 2001:db8::5": CLIENT,
        "[2001:db8:1::9]:443, 10.0.0.2": "2001:db8:1::9",
    }
    for forwarded, expected in cases.items():
        assert web.client_ip(request(peer=PROXY, headers={"x-forwarded-for": forwarded})) == expected, forwarded
    assert web.client_ip(request(peer=PROXY)) == PROXY


def test_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    """A client that sends X-Forwarded-For directly gets its own address, not the one it claims."""
    web = resolver(trusted_proxies=("10.0.0.0/8",))
    assert web.client_ip(request(peer=CLIENT, headers={"x-forwarded-for": "1.2.3.4"})) == CLIENT


def test_long_forwarded_for_cannot_hide_the_real_client() -> None:
    """Padding X-Forwarded-For with many fake hops does not push the proxy-appended client out of view."""
    web = resolver(trusted_proxies=("10.0.0.0/8",))
    forwarded = ", ".join(["6.6.6.6"] * 40 + [CLIENT, "10.0.0.2"])
    assert web.client_ip(request(peer=PROXY, headers={"x-forwarded-for": forwarded})) == CLIENT
    assert web.client_ip(request(peer=PROXY, headers={"x-forwarded-for": "9.9.9.9, " * 900 + CLIENT})) == PROXY


def test_garbage_forwarded_for_hops_are_safe() -> None:
    """An unparsable hop stops the walk at the last trusted address, and is counted; nothing raises."""
    web = resolver(trusted_proxies=("10.0.0.0/8",))
    for forwarded in (f"{CLIENT}, garbage, 10.0.0.2", "garbage", ",,,", "x" * 5000, "1.2.3.4:80", "\x00"):
        client = web.client_ip(request(peer=PROXY, headers={"x-forwarded-for": forwarded}))
        assert client in {"10.0.0.2", PROXY}, forwarded
    assert web.counters["malformed_input"] >= 4


def test_country_and_region_headers_only_from_trusted_proxies() -> None:
    """CDN country and region headers become attributes only when a trusted proxy sent them."""
    web = resolver(trusted_proxies=(PROXY,), country_header="CF-IPCountry", region_header="x-region")
    headers = {"cf-ipcountry": "DE", "x-region": " eu-west-1 "}
    trusted = web.resolve(request(peer=PROXY, headers=headers)).context
    assert (trusted["country"], trusted["region"]) == ("DE", "eu-west-1")
    direct = web.resolve(request(peer=CLIENT, headers=headers)).context
    assert "country" not in direct
    assert "region" not in direct
    odd = web.resolve(request(peer=PROXY, headers={"cf-ipcountry": "D\nE", "x-region": "r" * 65})).context
    assert "country" not in odd
    assert "region" not in odd


# ----------------------------------------------------------------------------------------------- visitor cookie


def test_visitor_cookie_is_created_once_with_safe_flags() -> None:
    """A new visitor gets a random 32-hex id in an HttpOnly, SameSite=Lax cookie with a Max-Age."""
    web = resolver(visitor_max_age=3600)
    first = web.resolve(request())
    value, attributes = set_cookies(first)["canary_vid"]
    assert re.fullmatch(r"[0-9a-f]{32}", value)
    assert first.context["session_id"] == value
    assert attributes == ["Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Lax"]
    again = web.resolve(request(cookies={"canary_vid": value}))
    assert again.context["session_id"] == value
    assert again.set_cookies == []
    other = web.resolve(request())
    assert other.context["session_id"] != value


def test_visitor_cookie_is_secure_only_over_https() -> None:
    """The Secure flag is set on cookies of https requests only."""
    web = resolver()
    assert "Secure" in set_cookies(web.resolve(request(scheme="https")))["canary_vid"][1]
    assert "Secure" not in set_cookies(web.resolve(request(scheme="http")))["canary_vid"][1]


@pytest.mark.parametrize("bad", ["short", "G" * 32, "A" * 32, "0" * 33, "0" * 31 + "\x01"])
def test_malformed_visitor_cookie_is_replaced_and_counted(bad: str) -> None:
    """A visitor cookie that is not 32 lower-case hex digits is replaced by a fresh id and counted."""
    web = resolver()
    resolution = web.resolve(request(cookies={"canary_vid": bad}))
    value, _ = set_cookies(resolution)["canary_vid"]
    assert re.fullmatch(r"[0-9a-f]{32}", value)
    assert resolution.context["session_id"] == value
    assert web.counters["malformed_input"] == (0 if "\x01" in bad else 1)  # unprintable: never even read


def test_visitor_cookie_can_be_turned_off() -> None:
    """With visitor_cookie=None there is no session_id and no cookie."""
    resolution = resolver(visitor_cookie=None).resolve(request())
    assert "session_id" not in resolution.context
    assert resolution.set_cookies == []


# -------------------------------------------------------------------------------------------------- attributes


def test_request_attributes() -> None:
    """Path, method, host, client address, user agent and the first Accept-Language tag become attributes."""
    info = request(
        method="POST",
        path="/cart/checkout",
        headers={"host": "shop.example.com", "user-agent": "Mozilla/5.0", "accept-language": "de-CH;q=1, en;q=0.5"},
    )
    context = resolver(visitor_cookie=None).resolve(info).context
    assert dict(context) == {
        "path": "/cart/checkout",
        "method": "POST",
        "host": "shop.example.com",
        "client_ip": CLIENT,
        "user_agent": "Mozilla/5.0",
        "accept_language": "de-CH",
    }


def test_long_attributes_are_truncated() -> None:
    """Path, host and user agent are cut to 512 characters, the language tag to 64."""
    info = request(
        path="/" + "p" * 2000, headers={"host": "h" * 2000, "user-agent": "a" * 2000, "accept-language": "l" * 99}
    )
    context = resolver().resolve(info).context
    assert len(context["path"]) == len(context["host"]) == len(context["user_agent"]) == 512
    assert len(context["accept_language"]) == 64


def test_attributes_callable_adds_attributes() -> None:
    """The attributes callable sees the request and its mapping is added to the context."""
    seen: list[RequestInfo] = []

    def extra(info: RequestInfo) -> Mapping[str, Any]:
        seen.append(info)
        return {"plan": "pro", "account_id": info.headers.get("x-account")}

    info = request(headers={"x-account": "acme"})
    context = resolver(attributes=extra).resolve(info).context
    assert (context["plan"], context["account_id"]) == ("pro", "acme")
    assert seen == [info]


def test_attributes_callable_that_raises_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """A failing attributes callable is logged; the request still gets a context and decisions."""

    def broken(info: RequestInfo) -> Mapping[str, Any]:
        raise RuntimeError("boom")

    web = resolver(attributes=broken)
    with caplog.at_level(logging.WARNING, logger="canary_router"):
        resolution = web.resolve(request(path="/x", user_id="u-1"))
    assert resolution.context["path"] == "/x"
    assert set(resolution.decisions) == {"checkout", "search"}
    assert "attributes callable failed" in caplog.text
    assert web.counters["errors"] == 0


# --------------------------------------------------------------------------------------------------- overrides


def token(rollout: str = "checkout", variant: str = "new", ttl: float = 3600, now: float = 1_700_000_000.0) -> str:
    """An override token signed with the test secret."""
    return create_token(SECRET, rollout=rollout, variant=variant, ttl=ttl, now=now)  # type: ignore[arg-type]


def test_override_from_the_header() -> None:
    """A valid token in X-Canary-Override forces the variant (reason "override") and is counted."""
    web = resolver(secret=SECRET)
    uid = user_in("checkout", new=False, percent=5)
    resolution = web.resolve(request(user_id=uid, headers={"x-canary-override": f" {token()} "}))
    assert resolution.decisions["checkout"][:2] == ("new", "override")
    assert resolution.context.overrides == {"checkout": "new"}
    assert web.router.decide("checkout", resolution.context)[:2] == ("new", "override")
    assert web.counters["overrides_accepted"] == 1


def test_override_from_the_query_url_encoded() -> None:
    """A token in the canary_override query parameter counts, URL-encoded or not."""
    web = resolver(secret=SECRET)
    for text in (token(variant="old"), quote(token(variant="old"), safe="")):
        query = f"a=1&canary_override={text.replace('.', '%2E')}&b=2"
        assert web.resolve(request(query_string=query)).decisions["checkout"][:2] == ("old", "override")


def test_override_from_the_cookie() -> None:
    """Tokens kept in the override cookie (separated by "~") still apply, without a new Set-Cookie."""
    web = resolver(secret=SECRET)
    stored = f"{token('checkout', 'new')}~{token('search', 'old')}"
    resolution = web.resolve(request(cookies={"canary_override": stored, "canary_vid": "a" * 32}))
    assert resolution.context.overrides == {"checkout": "new", "search": "old"}
    assert resolution.set_cookies == []
    assert web.counters["overrides_accepted"] == 0  # accepted counts fresh tokens only


def test_accepted_token_is_stored_for_its_remaining_lifetime() -> None:
    """An accepted token goes into the override cookie with Max-Age = its remaining lifetime."""
    clock = Clock()
    web = resolver(make_router(clock), secret=SECRET)
    clock.now += 600
    resolution = web.resolve(request(headers={"x-canary-override": token(ttl=3600)}, scheme="https"))
    value, attributes = set_cookies(resolution)["canary_override"]
    assert value == token(ttl=3600)
    assert attributes == ["Path=/", "Max-Age=3000", "HttpOnly", "SameSite=Lax", "Secure"]


def test_fresh_token_replaces_the_stored_one_for_its_rollout() -> None:
    """A new token for a rollout already in the cookie wins, and the cookie keeps the other rollouts' tokens."""
    web = resolver(secret=SECRET)
    stored = f"{token('checkout', 'new')}~{token('search', 'new')}"
    info = request(cookies={"canary_override": stored}, query_string=f"canary_override={token('checkout', 'old')}")
    resolution = web.resolve(info)
    assert resolution.context.overrides == {"checkout": "old", "search": "new"}
    kept = set(set_cookies(resolution)["canary_override"][0].split("~"))
    assert kept == {token("checkout", "old"), token("search", "new")}


@pytest.mark.parametrize(
    "bad",
    [
        create_token("another-secret-0123456789", rollout="checkout", variant="new", ttl=3600, now=1_700_000_000),
        token(ttl=60, now=1_700_000_000 - 120),  # expired
        token(rollout="no-such-rollout"),  # for a rollout this router does not have
        token()[:-4] + "AAAA",  # forged signature
        "garbage",
        "ü" * 40,
    ],
)
def test_rejected_tokens_are_counted_and_ignored(bad: str) -> None:
    """Forged, expired, unknown-rollout and malformed tokens change nothing and count as rejected."""
    web = resolver(secret=SECRET)
    uid = user_in("checkout", new=False, percent=5)
    resolution = web.resolve(request(user_id=uid, headers={"x-canary-override": bad}))
    assert resolution.decisions["checkout"][:2] == ("old", "split")
    assert resolution.context.overrides == {}
    assert "canary_override" not in set_cookies(resolution)
    assert web.counters["overrides_rejected"] == 1
    assert web.counters["overrides_accepted"] == 0


def test_rejected_stored_tokens_are_dropped_from_the_cookie() -> None:
    """A stored token that no longer verifies (expired, secret rotated) is removed, so it is counted once."""
    clock = Clock()
    web = resolver(make_router(clock), secret=SECRET)
    cookie = f"{token('checkout', ttl=60)}~{token('search', ttl=3600)}"
    clock.now += 120
    resolution = web.resolve(request(cookies={"canary_override": cookie}))
    assert resolution.context.overrides == {"search": "new"}
    value, attributes = set_cookies(resolution)["canary_override"]
    assert value == token("search", ttl=3600)
    assert "Max-Age=3480" in attributes
    rotated = resolver(make_router(clock), secret="a-rotated-secret-0123456789")
    cleared = rotated.resolve(request(cookies={"canary_override": cookie}))
    assert set_cookies(cleared)["canary_override"][0] == ""
    assert "Max-Age=0" in set_cookies(cleared)["canary_override"][1]
    assert rotated.counters["overrides_rejected"] == 2


def test_overrides_need_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a secret no token is even looked at."""
    monkeypatch.delenv("CANARY_ROUTER_SECRET", raising=False)
    web = resolver()
    resolution = web.resolve(request(headers={"x-canary-override": token()}))
    assert resolution.context.overrides == {}
    assert web.counters["overrides_rejected"] == 0


def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """WebOptions without a secret uses $CANARY_ROUTER_SECRET."""
    monkeypatch.setenv("CANARY_ROUTER_SECRET", SECRET)
    resolution = resolver().resolve(request(headers={"x-canary-override": token()}))
    assert resolution.context.overrides == {"checkout": "new"}


def test_override_beats_a_rollback() -> None:
    """After router.rollback, a tester with an override still reaches the new version; others get "old"."""
    web = resolver(secret=SECRET)
    web.router.rollback("checkout", "broken")
    uid = user_in("checkout", new=True, percent=5)
    assert web.resolve(request(user_id=uid)).decisions["checkout"][:2] == ("old", "rolled_back")
    forced = web.resolve(request(user_id=uid, headers={"x-canary-override": token()}))
    assert forced.decisions["checkout"][:2] == ("new", "override")


# -------------------------------------------------------------------------------------------------- affinity pins


def pinned(resolution: Resolution) -> str:
    """The pin cookie value set by this resolution."""
    return set_cookies(resolution)["canary_pin"][0]


def test_first_decision_is_pinned_in_a_signed_session_cookie() -> None:
    """With affinity, the first decisions are written to a signed, HttpOnly session cookie (no Max-Age)."""
    web = resolver(secret=SECRET, affinity=True, visitor_cookie=None)
    uid = user_in("checkout", new=False, percent=5)
    resolution = web.resolve(request(user_id=uid))
    value, attributes = set_cookies(resolution)["canary_pin"]
    assert attributes == ["Path=/", "HttpOnly", "SameSite=Lax"]
    assert value.count(".") == 1  # base64url(pins) "." signature
    again = web.resolve(request(user_id=uid, cookies={"canary_pin": value}))
    assert again.decisions == resolution.decisions
    assert again.set_cookies == []  # unchanged pins are not written again


def test_percentage_change_keeps_the_pinned_variant() -> None:
    """A visitor pinned to "old" stays there when the percentage grows past their bucket (reason "pinned")."""
    web = resolver(secret=SECRET, affinity=True, visitor_cookie=None)
    uid = user_between("checkout", 5, 50)
    first = web.resolve(request(user_id=uid))
    assert first.decisions["checkout"][:2] == ("old", "split")
    web.router.set_percent("checkout", 50)
    later = web.resolve(request(user_id=uid, cookies={"canary_pin": pinned(first)}))
    decision = later.decisions["checkout"]
    assert decision[:2] == ("old", "pinned")
    assert decision.bucket == bucket("checkout", uid)
    assert later.set_cookies == []
    assert web.resolve(request(user_id=uid)).decisions["checkout"][:2] == ("new", "split")  # without the pin


def test_percentage_decrease_keeps_pinned_new() -> None:
    """A visitor pinned to "new" stays there when the percentage is lowered below their bucket."""
    web = resolver(secret=SECRET, affinity=True, visitor_cookie=None)
    uid = user_between("checkout", 5, 50)
    web.router.set_percent("checkout", 50)
    first = web.resolve(request(user_id=uid))
    assert first.decisions["checkout"].variant == "new"
    web.router.set_percent("checkout", 5)
    later = web.resolve(request(user_id=uid, cookies={"canary_pin": pinned(first)}))
    assert later.decisions["checkout"][:2] == ("new", "pinned")


def test_rollback_overrides_the_pin_and_clears_it() -> None:
    """A rollback serves "old" to pinned visitors too and removes the pin (the cookie is cleared)."""
    web = resolver(secret=SECRET, affinity=True, visitor_cookie=None, rollouts=("checkout",))
    uid = user_in("checkout", new=True, percent=5)
    first = web.resolve(request(user_id=uid))
    assert first.decisions["checkout"].variant == "new"
    web.router.rollback("checkout", "broken")
    later = web.resolve(request(user_id=uid, cookies={"canary_pin": pinned(first)}))
    assert later.decisions["checkout"][:2] == ("old", "rolled_back")
    value, attributes = set_cookies(later)["canary_pin"]
    assert value == ""
    assert "Max-Age=0" in attributes


def test_rollback_keeps_the_pins_of_other_rollouts() -> None:
    """A rollback removes only that rollout's pin; the cookie is re-signed with the others."""
    web = resolver(secret=SECRET, affinity=True, visitor_cookie=None)
    uid = user_between("checkout", 5, 50)
    first = web.resolve(request(user_id=uid))
    web.router.rollback("checkout", "broken")
    web.router.set_percent("search", 100)
    later = web.resolve(request(user_id=uid, cookies={"canary_pin": pinned(first)}))
    assert later.decisions["checkout"][:2] == ("old", "rolled_back")
    search = first.decisions["search"].variant
    assert later.decisions["search"].variant == search
    final = web.resolve(request(user_id=uid, cookies={"canary_pin": pinned(later)}))
    assert final.decisions["search"].variant == search


@pytest.mark.parametrize(
    "forged",
    [
        "checkout=new",
        sign_value(b"another-secret-0123456789", "pin", "checkout=new"),
        sign_value(KEY, "user", "checkout=new"),
        "garbage.garbage",
    ],
)
def test_forged_pin_cookie_is_ignored_and_counted(forged: str) -> None:
    """A pin cookie that does not verify is ignored (the real decision is served and pinned) and counted."""
    web = resolver(secret=SECRET, affinity=True, visitor_cookie=None)
    uid = user_in("checkout", new=False, percent=5)
    resolution = web.resolve(request(user_id=uid, cookies={"canary_pin": forged}))
    assert resolution.decisions["checkout"][:2] == ("old", "split")
    assert "canary_pin" in set_cookies(resolution)
    assert web.counters["malformed_input"] == 1


def test_pin_of_another_user_is_not_honoured() -> None:
    """A pin cookie copied from another user's browser does not move this user (it is counted)."""
    web = resolver(secret=SECRET, affinity=True, visitor_cookie=None)
    lucky = user_in("checkout", new=True, percent=5)
    other = user_in("checkout", new=False, percent=5, prefix="x")
    stolen = pinned(web.resolve(request(user_id=lucky)))
    resolution = web.resolve(request(user_id=other, cookies={"canary_pin": stolen}))
    assert resolution.decisions["checkout"][:2] == ("old", "split")
    assert web.counters["malformed_input"] == 1


def test_anonymous_pin_is_bound_to_the_visitor_and_dropped_at_login() -> None:
    """An anonymous pin holds for its visitor id only; after login the user's own pin replaces it, uncounted."""
    web = resolver(secret=SECRET, affinity=True)
    first = web.resolve(request())
    visitor = set_cookies(first)["canary_vid"][0]
    cookies = {"canary_vid": visitor, "canary_pin": pinned(first)}
    assert "canary_pin" not in set_cookies(web.resolve(request(cookies=cookies)))
    another_visitor = f"{int(visitor, 16) ^ 1:032x}"
    other = web.resolve(request(cookies={"canary_vid": another_visitor, "canary_pin": pinned(first)}))
    assert "canary_pin" in set_cookies(other)
    assert web.counters["malformed_input"] == 1
    login = web.resolve(request(cookies=cookies, user_id="u-1"))
    assert "canary_pin" in set_cookies(login)
    assert web.counters["malformed_input"] == 1


def test_override_is_not_pinned() -> None:
    """An override decision neither creates nor changes a pin."""
    web = resolver(secret=SECRET, affinity=True, visitor_cookie=None, rollouts=("checkout",))
    resolution = web.resolve(request(headers={"x-canary-override": token()}, user_id="u-1"))
    assert resolution.decisions["checkout"].reason == "override"
    assert "canary_pin" not in set_cookies(resolution)


# ------------------------------------------------------------------------------------------ response headers


def test_vary_cookie_is_set_whenever_a_cookie_can_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Vary: Cookie is asked for on every response when a cookie can change a decision, and only then."""
    monkeypatch.delenv("CANARY_ROUTER_SECRET", raising=False)
    assert resolver().resolve(request()).vary_cookie
    assert not resolver(visitor_cookie=None).resolve(request()).vary_cookie
    signed = resolver(visitor_cookie=None, secret=SECRET)
    assert signed.resolve(request()).vary_cookie  # without an override cookie too: caches must not share it
    assert signed.resolve(request(headers={"x-canary-override": token()})).vary_cookie
    assert resolver(visitor_cookie=None, secret=SECRET, user_cookie="uid").resolve(request()).vary_cookie


def test_canary_variant_header_only_when_enabled() -> None:
    """The Canary-Variant value lists each decided rollout's variant, only with variant_header=True."""
    uid = user_in("checkout", new=True, percent=5)
    assert resolver().resolve(request(user_id=uid)).variant_header is None
    resolution = resolver(variant_header=True).resolve(request(user_id=uid))
    search = resolution.decisions["search"].variant
    assert resolution.variant_header == f"checkout=new, search={search}"
    only = resolver(variant_header=True, rollouts=("checkout",)).resolve(request(user_id=uid))
    assert only.variant_header == "checkout=new"


def test_resolution_variant_defaults_to_old() -> None:
    """Resolution.variant gives the decided variant, and "old" for a rollout that was not decided."""
    uid = user_in("checkout", new=True, percent=5)
    resolution = resolver(rollouts=("checkout",)).resolve(request(user_id=uid))
    assert resolution.variant("checkout") == "new"
    assert resolution.variant("search") == "old"
    assert resolution.variant("nope") == "old"


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trusted_proxies": ("10.0.0.0/33",)}, "trusted_proxies"),
        ({"trusted_proxies": ("proxy.local",)}, "trusted_proxies"),
        ({"visitor_cookie": "bad name"}, "visitor_cookie"),
        ({"pin_cookie": "a;b"}, "pin_cookie"),
        ({"override_cookie": ""}, "override_cookie"),
        ({"user_cookie": "x" * 65, "secret": SECRET}, "user_cookie"),
        ({"user_header": "X User"}, "user_header"),
        ({"country_header": "cf:country"}, "country_header"),
        ({"override_header": "x_override"}, "override_header"),
        ({"affinity": True}, "affinity needs a signing secret"),
        ({"user_cookie": "uid"}, "user_cookie needs a signing secret"),
        ({"visitor_max_age": 0}, "visitor_max_age must be positive"),
        ({"visitor_max_age": -5}, "visitor_max_age must be positive"),
        ({"secret": "short"}, "at least 16 bytes"),
    ],
)
def test_web_options_are_validated(options: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad CIDR blocks, cookie or header names, secrets and ages are ValueErrors at creation, naming the option."""
    monkeypatch.delenv("CANARY_ROUTER_SECRET", raising=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        WebOptions(**options)


def test_unknown_rollout_is_refused_at_creation() -> None:
    """Naming a rollout the router does not have raises UnknownRolloutError when the resolver is built."""
    with pytest.raises(UnknownRolloutError, match="checkot"):
        resolver(rollouts=("checkout", "checkot"))


def test_options_normalise_and_hide_the_secret() -> None:
    """Header names are lower-cased, sequences become tuples, and the secret stays out of repr."""
    options = WebOptions(
        secret=SECRET,
        user_header="X-User-Id",
        rollouts=["checkout"],
        trusted_proxies=["10.0.0.0/8"],  # type: ignore[arg-type]
    )
    assert options.user_header == "x-user-id"
    assert options.rollouts == ("checkout",)
    assert options.trusted_proxies == ("10.0.0.0/8",)
    assert SECRET not in repr(options)
    assert {"cookie", "x-user-id", "x-canary-override", "x-forwarded-for"} <= options.wanted_headers


def test_parse_cookies_skips_malformed_pairs() -> None:
    """Only wanted, well-formed cookies are returned; the first of a repeated name wins; quotes are removed."""
    header = 'junk; a=1; b="two"; a=3; =x; c; d=\x01; e=' + "x" * 5000
    assert parse_cookies(header, {"a", "b", "c", "d", "e"}) == {"a": "1", "b": "two"}
    assert parse_cookies("a=" + "x" * 9000, {"a"}) == {}
    assert parse_cookies(None, {"a"}) == {}


def test_context_is_a_plain_context() -> None:
    """The resolved context is a Context that routes like any other."""
    uid = user_in("checkout", new=True, percent=5)
    resolution = resolver().resolve(request(user_id=uid))
    assert isinstance(resolution.context, Context)
    assert make_router().decide("checkout", resolution.context) == resolution.decisions["checkout"]


# ------------------------------------------------------------------------------------------------ never raises
WEB = resolver(
    secret=SECRET,
    trusted_proxies=("10.0.0.0/8", "::1"),
    user_header="x-user-id",
    user_cookie="uid",
    country_header="cf-ipcountry",
    region_header="x-region",
    affinity=True,
    variant_header=True,
)


_text = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=40),
    st.sampled_from(["", "x" * 10_000, "1.2.3.4", "10.0.0.1", "::1", "[::1]:80", "a=b; c=d", "%ZZ", "\ud7ff\x00"]),
    st.sampled_from([token(), f"canary_override={token('search')}", sign_value(KEY, "user", "u-1"), "a" * 32]),
)


@settings(max_examples=250, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(
            [
                "cookie",
                "host",
                "user-agent",
                "accept-language",
                "x-forwarded-for",
                "x-user-id",
                "cf-ipcountry",
                "x-region",
                "x-canary-override",
            ]
        ),
        _text,
    ),
    cookies=st.lists(st.tuples(st.sampled_from(["canary_vid", "canary_pin", "canary_override", "uid", "x"]), _text)),
    query=_text,
    peer=st.one_of(st.none(), _text),
    path=_text,
    method=_text,
    scheme=_text,
    user=st.one_of(st.none(), _text),
)
def test_resolve_never_raises(
    headers: dict[str, str],
    cookies: list[tuple[str, str]],
    query: str,
    peer: str | None,
    path: str,
    method: str,
    scheme: str,
    user: str | None,
) -> None:
    """Arbitrary, huge or unprintable headers, cookies, query strings and peers never make resolve() fail."""
    web = WEB
    before = web.counters["errors"]
    if cookies:
        headers = {**headers, "cookie": "; ".join(f"{name}={value}" for name, value in cookies)}
    info = RequestInfo(
        method=method, path=path, scheme=scheme, query_string=query, peer=peer, headers=headers, user_id=user
    )
    resolution = web.resolve(info)
    assert web.counters["errors"] == before
    assert set(resolution.decisions) == {"checkout", "search"}
    assert all(header.isascii() and "\n" not in header for header in resolution.set_cookies)


def test_pins_reach_code_that_decides_from_the_context() -> None:
    """A pinned variant is what decide() (and so every decorated function) returns for the request's context."""
    router = Router.from_config({"rollouts": {"r": {"steps": [50, 100]}}})
    resolver = WebResolver(router, WebOptions(secret="pin-secret-0123456789", affinity=True, visitor_cookie=None))
    users = [f"user-{i}" for i in range(200)]
    first = {u: resolver.resolve(RequestInfo(user_id=u)) for u in users}
    cookies = {
        u: next(c.split(";")[0] for c in res.set_cookies if c.startswith("canary_pin=")) for u, res in first.items()
    }
    router.set_percent("r", 100)  # everyone would now get "new"; pinned "old" users must keep "old"
    for user in users:
        before = first[user].decisions["r"].variant
        again = resolver.resolve(RequestInfo(user_id=user, headers={"cookie": cookies[user]}))
        assert router.decide("r", again.context).variant == before
        assert again.decisions["r"].variant == before
    router.rollback("r")
    last = resolver.resolve(RequestInfo(user_id=users[0], headers={"cookie": cookies[users[0]]}))
    assert router.decide("r", last.context).reason == "rolled_back"


# ------------------------------------------------------------------------------------------ the fast paths


def reference_cookies(header: str | None, wanted: set[str]) -> dict[str, str]:
    """The cookie lookup written plainly: the first ``name=`` at a pair boundary, trimmed, unquoted, printable."""
    if not header or len(header) > 8192:
        return {}
    found: dict[str, str] = {}
    for name in wanted:
        for match in re.finditer(re.escape(name + "="), header):
            at = match.start()
            if at == 0 or header[at - 1] in "; ":
                value = header[match.end() :].split(";", 1)[0].strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if len(value) <= 4096 and value.isprintable():
                    found[name] = value
                break
    return found


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["canary_vid", "xcanary_vid", "canary_override", "a", "canary_vid ", ""]),
            st.text(alphabet='ab0f;=" \t\x00é', max_size=12),
        ),
        max_size=5,
    ),
    st.sampled_from(["; ", ";", " ", ""]),
)
def test_cookie_lookup_matches_a_plain_reference(pairs: list[tuple[str, str]], separator: str) -> None:
    """The resolver's cookie lookup agrees with a plain reference on arbitrary, partly malformed headers."""
    header = separator.join(f"{name}={value}" for name, value in pairs)
    wanted = {"canary_vid", "canary_override", "a"}
    assert parse_cookies(header, wanted) == reference_cookies(header, wanted)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789abcdefABx\u00b2\u0663", min_size=30, max_size=34))
def test_visitor_id_check_accepts_exactly_32_lower_case_hex_digits(value: str) -> None:
    """A visitor cookie is kept only when it is 32 lower-case hex digits, whatever else it looks like."""
    web = resolver()
    resolution = web.resolve(request(cookies={"canary_vid": value}))
    valid = len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    assert (resolution.context["session_id"] == value) is valid
    assert (resolution.set_cookies == []) is valid


@pytest.mark.parametrize(
    "info",
    [
        request(user_id="u-1", path="/a", method="POST", query_string="x=1", scheme="https"),
        request(headers={"host": "shop.example", "user-agent": "UA", "accept-language": "de-CH, en;q=0.5"}),
        request(headers={"accept-language": " ;q=1"}, peer="not an address"),
        request(headers={"x-forwarded-for": "203.0.113.9, 10.0.0.7"}, peer="10.0.0.5"),
        request(headers={"x-forwarded-for": "junk, 10.0.0.7", "x-user-id": "gateway-user"}, peer="10.0.0.5"),
        request(headers={"x-user-id": "from-a-client"}, peer="198.51.100.4"),
        request(cookies={"canary_vid": "0123456789abcdef0123456789abcdef"}, peer=None),
    ],
)
def test_resolving_from_fields_matches_resolving_a_request_info(info: RequestInfo) -> None:
    """The adapters' field-by-field entry gives what ``resolve(RequestInfo)`` gives, attributes callable included."""
    seen: list[RequestInfo] = []

    def attributes(given: RequestInfo) -> dict[str, str]:
        seen.append(given)
        return {"plan": "pro"}

    options: dict[str, Any] = {
        "trusted_proxies": ("10.0.0.0/8",),
        "user_header": "x-user-id",
        "country_header": "cf-ipcountry",
        "attributes": attributes,
    }
    one, two = resolver(**options), resolver(**options)
    whole = one.resolve(info)
    fields = (info.method, info.path, info.scheme, info.query_string, info.peer, info.headers, info.user_id)
    context, decisions, set_cookies, variant = two._resolve(*fields)
    visitor = {"session_id": context["session_id"]}  # random for a new visitor: compared apart
    assert {**dict(whole.context), **visitor} == dict(context)
    assert whole.context.get("session_id") is not None
    assert len(whole.set_cookies) == len(set_cookies)
    assert whole.variant_header == variant
    assert one.counters == two.counters
    assert seen[0] == seen[1] == info  # the callable gets an equal RequestInfo either way
    for name in ("checkout", "search"):
        assert whole.decisions[name].reason == decisions[name].reason
