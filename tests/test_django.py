"""canary_router.django: settings-driven middleware under Django's test clients, and the example under gunicorn."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import django
import httpx
import pytest
from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import AsyncClient, Client, RequestFactory, override_settings
from django.urls import path
from django.utils.decorators import sync_and_async_middleware
from django.utils.functional import SimpleLazyObject
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from canary_router import ConfigError, Router, bucket, current_context, load_file
from canary_router.django import CanaryMiddleware, get_resolver, get_router
from canary_router.overrides import create_token
from webserver import ADMIN_TOKEN, ROOT, SECRET, free_port, python_module, serve

TEST_SECRET = "django-test-secret-0123456789"
CONFIG: dict[str, Any] = {
    "rollouts": {
        "r": {"steps": [50, 100], "stickiness": ["user_id", "session_id"]},
        "other": {"steps": [10, 100]},
    }
}
CANARY = {"config": CONFIG, "secret": TEST_SECRET, "trusted_proxies": ["127.0.0.1"], "user_header": "x-user-id"}
OURS = "canary_router.django.CanaryMiddleware"
FAKE_AUTH = f"{__name__}.fake_auth"


# ---------------------------------------------------------------------------------------------- the test app


class FakeUser:
    """A user object shaped like Django's: ``is_authenticated`` and ``pk``."""

    def __init__(self, pk: object, *, authenticated: bool = True) -> None:
        self.pk = pk
        self.is_authenticated = authenticated


class BrokenUser:
    """A user whose authentication check fails (a broken auth backend or session store)."""

    pk = 1

    @property
    def is_authenticated(self) -> bool:
        raise RuntimeError("session store unavailable")


def _attach_user(request: HttpRequest) -> None:
    """Set ``request.user`` (or ``request.auser``) from the ``x-test-user`` header, as auth middleware would."""
    spec = request.META.get("HTTP_X_TEST_USER")
    if spec is None:
        return
    if spec == "anon":
        request.user = FakeUser(None, authenticated=False)
    elif spec == "broken":
        request.user = BrokenUser()
    elif spec.startswith("lazy:"):
        request.user = SimpleLazyObject(lambda: FakeUser(spec[5:]))
    elif spec.startswith("auser:"):

        async def auser() -> FakeUser:
            return FakeUser(spec[6:])

        request.auser = auser
    else:
        request.user = FakeUser(spec)


@sync_and_async_middleware
def fake_auth(get_response: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
    """A tiny authentication middleware for the tests: sync or async, as the chain needs."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponse:
            _attach_user(request)
            response: HttpResponse = await get_response(request)
            return response

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponse:
        _attach_user(request)
        response: HttpResponse = get_response(request)
        return response

    return middleware


@functools.cache
def implementations(router: Router) -> tuple[Callable[[], dict[str, Any]], Callable[[], Awaitable[dict[str, Any]]]]:
    """Sync and async functions decorated with ``router``, reporting which ran and the context they saw."""

    def old() -> dict[str, Any]:
        return {"ran": "old", "user_id": current_context().get("user_id")}

    @router.canary("r", old=old)
    def new() -> dict[str, Any]:
        return {"ran": "new", "user_id": current_context().get("user_id")}

    async def old_async() -> dict[str, Any]:
        return {"ran": "old", "user_id": current_context().get("user_id")}

    @router.canary("r", old=old_async)
    async def new_async() -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"ran": "new", "user_id": current_context().get("user_id")}

    return new, new_async


def _payload(request: HttpRequest, ran: dict[str, Any]) -> dict[str, Any]:
    decisions = request.canary
    context = getattr(request, "canary_context", None)
    return {
        "decisions": {name: [d.variant, str(d.reason), d.bucket, d.unit] for name, d in decisions.items()},
        "context": dict(context) if context is not None else None,
        "overrides": dict(context.overrides) if context is not None else None,
        "ran": ran,
    }


def decisions_view(request: HttpRequest) -> HttpResponse:
    """A sync view: the request's decisions, its context, and what a decorated function did."""
    sync_impl, _ = implementations(get_router())
    response = JsonResponse(_payload(request, sync_impl()))
    response["Vary"] = "Accept-Language"
    return response


async def async_decisions_view(request: HttpRequest) -> HttpResponse:
    """An async view: the same, through an async decorated function."""
    _, async_impl = implementations(get_router())
    return JsonResponse(_payload(request, await async_impl()))


def cookie_view(request: HttpRequest) -> HttpResponse:
    """A view that sets the visitor cookie itself (the view's cookie must win)."""
    response = HttpResponse("mine")
    response.set_cookie("canary_vid", "f" * 32)
    return response


urlpatterns = [
    path("decisions", decisions_view),
    path("async-decisions", async_decisions_view),
    path("cookie", cookie_view),
]


@pytest.fixture(scope="module", autouse=True)
def django_settings() -> Iterator[None]:
    """Configure Django for this module only: no apps, no database, this module as the URLconf."""
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="django-tests-only",
            ALLOWED_HOSTS=["testserver"],
            INSTALLED_APPS=[],
            DATABASES={},
            USE_TZ=True,
            LOGGING_CONFIG=None,
            ROOT_URLCONF=__name__,
        )
        django.setup()
    with override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=[FAKE_AUTH, OURS], CANARY_ROUTER=CANARY):
        yield


def get_json(response: HttpResponse) -> dict[str, Any]:
    """The JSON body of a test-client response."""
    assert response.status_code == 200, response.content
    data: dict[str, Any] = json.loads(response.content)
    return data


def users(router: Router) -> tuple[str, str]:
    """One user id served "new" and one served "old" by rollout "r"."""
    ids = [f"u{i}" for i in range(200)]
    new = next(u for u in ids if router.decide("r", {"user_id": u}).variant == "new")
    old = next(u for u in ids if router.decide("r", {"user_id": u}).variant == "old")
    return new, old


# ---------------------------------------------------------------------------------------------- sync client


def test_request_canary_holds_every_rollouts_decision() -> None:
    """request.canary has the decision of each configured rollout, bucketed by the trusted user header."""
    client = Client()
    for uid in ("u1", "u2", "user-42"):
        data = get_json(client.get("/decisions", headers={"x-user-id": uid}))
        expected = {
            name: [d.variant, str(d.reason), d.bucket, d.unit]
            for name in ("r", "other")
            for d in [get_router().decide(name, {"user_id": uid})]
        }
        assert data["decisions"] == expected
        assert data["decisions"]["r"][2] == bucket("r", uid)
        assert data["context"]["user_id"] == uid


def test_decorated_function_sees_the_request_context() -> None:
    """A function decorated with get_router() runs new or old by the request's decision, seeing its context."""
    new_user, old_user = users(get_router())
    client = Client()
    for uid, variant in ((new_user, "new"), (old_user, "old")):
        data = get_json(client.get("/decisions", headers={"x-user-id": uid}))
        assert data["decisions"]["r"][0] == variant
        assert data["ran"] == {"ran": variant, "user_id": uid}


def test_user_header_is_ignored_from_an_untrusted_peer() -> None:
    """x-user-id from a peer outside trusted_proxies does not choose the user: the visitor cookie does."""
    data = get_json(Client().get("/decisions", headers={"x-user-id": "u1"}, REMOTE_ADDR="203.0.113.9"))
    assert "user_id" not in data["context"]
    assert data["decisions"]["r"][3] == data["context"]["session_id"]


def test_authenticated_request_user_wins_over_the_header() -> None:
    """An authenticated request.user (set by an earlier middleware) is the user id: str(request.user.pk)."""
    data = get_json(Client().get("/decisions", headers={"x-test-user": "42", "x-user-id": "u1"}))
    assert data["context"]["user_id"] == "42"
    assert data["decisions"]["r"][2:] == [bucket("r", "42"), "42"]


def test_anonymous_or_broken_request_user_falls_back() -> None:
    """An unauthenticated user, or one whose check raises, is anonymous: the trusted header decides, no 500."""
    for spec in ("anon", "broken"):
        data = get_json(Client().get("/decisions", headers={"x-test-user": spec, "x-user-id": "u7"}))
        assert data["context"]["user_id"] == "u7"


def test_works_without_any_auth_middleware() -> None:
    """With no authentication middleware at all (no request.user), requests are served normally."""
    with override_settings(MIDDLEWARE=[OURS]):
        data = get_json(Client().get("/decisions", headers={"x-user-id": "u3"}))
    assert data["context"]["user_id"] == "u3"


def test_visitor_cookie_is_set_once_and_keeps_the_visitor_put() -> None:
    """An anonymous visitor gets an HttpOnly, SameSite=Lax visitor cookie, and the same variant with it."""
    client = Client()
    first = client.get("/decisions")
    morsel = first.cookies["canary_vid"]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Lax"
    assert morsel["path"] == "/"
    assert not morsel["secure"]
    assert "Cookie" in first["Vary"]
    assert "Accept-Language" in first["Vary"]  # the view's own Vary is kept
    visitor = morsel.value
    data = get_json(first)
    assert data["context"]["session_id"] == visitor
    assert data["decisions"]["r"][2:] == [bucket("r", visitor), visitor]
    for _ in range(3):
        again = client.get("/decisions")
        assert "canary_vid" not in again.cookies
        assert get_json(again)["decisions"]["r"] == data["decisions"]["r"]


def test_cookies_are_secure_over_https_and_a_views_own_cookie_wins() -> None:
    """Over https the cookie is Secure; a cookie the view set itself is not overwritten."""
    assert Client().get("/decisions", secure=True).cookies["canary_vid"]["secure"] is True
    assert Client().get("/cookie").cookies["canary_vid"].value == "f" * 32


def test_canary_variant_header_only_when_enabled() -> None:
    """Canary-Variant is absent by default and lists every decision when variant_header is on."""
    response = Client().get("/decisions", headers={"x-user-id": "u1"})
    assert "Canary-Variant" not in response
    with override_settings(CANARY_ROUTER={**CANARY, "variant_header": True}):
        response = Client().get("/decisions", headers={"x-user-id": "u1"})
        router = get_router()
        expected = ", ".join(f"{n}={router.decide(n, {'user_id': 'u1'}).variant}" for n in ("r", "other"))
    assert response["Canary-Variant"] == expected


def test_forged_override_is_ignored_and_counted() -> None:
    """An override token not signed with the secret changes nothing, and the resolver counts it."""
    _, old_user = users(get_router())
    before = get_resolver().counters["overrides_rejected"]
    forged = create_token("another-secret-0123456789", rollout="r", variant="new", ttl=3600)
    for token in (forged, "garbage", forged + "x"):
        data = get_json(Client().get("/decisions", headers={"x-user-id": old_user, "x-canary-override": token}))
        assert data["decisions"]["r"][0] == "old"
        assert data["overrides"] == {}
    assert get_resolver().counters["overrides_rejected"] == before + 3


def test_signed_override_forces_the_variant_and_sticks_by_cookie() -> None:
    """A token signed with the secret puts the tester on its variant, everywhere, and a cookie keeps it."""
    _, old_user = users(get_router())
    client = Client()
    token = create_token(TEST_SECRET, rollout="r", variant="new", ttl=3600)
    first = client.get(f"/decisions?canary_override={token}", headers={"x-user-id": old_user})
    data = get_json(first)
    assert data["decisions"]["r"][:2] == ["new", "override"]
    assert data["ran"]["ran"] == "new"  # the decorated function saw the override too
    assert first.cookies["canary_override"].value == token
    again = get_json(client.get("/decisions", headers={"x-user-id": old_user}))
    assert again["decisions"]["r"][:2] == ["new", "override"]


# ---------------------------------------------------------------------------------------------- async


def test_async_view_under_async_client() -> None:
    """Under AsyncClient the middleware runs async; an async decorated function sees the request context."""
    new_user, old_user = users(get_router())

    async def main() -> list[dict[str, Any]]:
        client = AsyncClient()
        out = []
        for uid in (new_user, old_user):
            out.append(get_json(await client.get("/async-decisions", headers={"x-user-id": uid})))
        out.append(get_json(await client.get("/decisions", headers={"x-user-id": new_user})))  # a sync view
        return out

    new_data, old_data, sync_data = asyncio.run(main())
    assert new_data["ran"] == {"ran": "new", "user_id": new_user}
    assert old_data["ran"] == {"ran": "old", "user_id": old_user}
    assert sync_data["ran"] == {"ran": "new", "user_id": new_user}


def test_async_user_from_auser_lazy_user_or_plain_user() -> None:
    """In async mode the user comes from request.auser(), a lazy request.user, or a plain request.user."""

    async def main() -> list[dict[str, Any]]:
        client = AsyncClient()
        return [
            get_json(await client.get("/async-decisions", headers={"x-test-user": spec, "x-user-id": "u1"}))
            for spec in ("auser:7", "lazy:8", "9", "anon", "broken")
        ]

    found = [data["context"]["user_id"] for data in asyncio.run(main())]
    assert found == ["7", "8", "9", "u1", "u1"]


def test_middleware_is_a_coroutine_function_only_in_async_mode() -> None:
    """The middleware marks itself as a coroutine function when, and only when, get_response is async."""

    async def async_response(request: HttpRequest) -> HttpResponse:
        return HttpResponse(str(current_context().get("user_id")))

    def sync_response(request: HttpRequest) -> HttpResponse:
        return HttpResponse(str(current_context().get("user_id")))

    async_middleware = CanaryMiddleware(async_response)
    sync_middleware = CanaryMiddleware(sync_response)
    assert iscoroutinefunction(async_middleware)
    assert not iscoroutinefunction(sync_middleware)
    request = RequestFactory().get("/", headers={"x-user-id": "u5"})
    assert sync_middleware(request).content == b"u5"
    request = RequestFactory().get("/", headers={"x-user-id": "u6"})
    assert asyncio.run(async_middleware(request)).content == b"u6"
    assert current_context().get("user_id") is None  # nothing leaks out of the request


# ---------------------------------------------------------------------------------------------- settings


def load_error(setting: Any) -> str:
    """The ImproperlyConfigured message that loading the middleware under ``setting`` raises."""
    with override_settings(CANARY_ROUTER=setting), pytest.raises(ImproperlyConfigured) as info:
        Client().get("/decisions")
    return str(info.value)


def test_unknown_setting_key_is_improperly_configured_with_a_hint() -> None:
    """A misspelled key stops the boot, naming the key and the one it was probably meant to be."""
    message = load_error({**CANARY, "trusted_proxy": ["127.0.0.1"]})
    assert "'trusted_proxy'" in message
    assert "did you mean 'trusted_proxies'?" in message


def test_invalid_config_file_surfaces_the_config_error(tmp_path: Any) -> None:
    """A missing or invalid config file stops the boot with the ConfigError's own message."""
    for config in (tmp_path / "missing.toml", tmp_path / "bad.toml"):
        if config.name == "bad.toml":
            config.write_text("[rollouts.r]\nsteps = [50, 20]\n", encoding="utf-8")
        with pytest.raises(ConfigError) as expected:
            load_file(config)
        assert str(expected.value) in load_error({"config": config})
        assert str(expected.value) in load_error({"config": str(config)})


def test_invalid_config_mapping_and_options_are_improperly_configured() -> None:
    """Invalid mapping configs, option values and missing keys all stop the boot with a precise message."""
    assert "rollouts.r.steps" in load_error({"config": {"rollouts": {"r": {"steps": [50, 20]}}}})
    assert "trusted_proxies" in load_error({**CANARY, "trusted_proxies": "127.0.0.1"})
    assert "trusted_proxies" in load_error({**CANARY, "trusted_proxies": ["not-an-ip"]})
    assert "at least 16 bytes" in load_error({**CANARY, "secret": "short"})
    assert "visitor_max_age" in load_error({**CANARY, "visitor_max_age": "1y"})
    assert "variant_header" in load_error({**CANARY, "variant_header": "yes"})
    assert "nope" in load_error({**CANARY, "rollouts": ["r", "nope"]})
    assert "missing key 'config'" in load_error({"secret": TEST_SECRET})
    assert "expected a dict" in load_error(["config"])
    assert "not set" in load_error(None)
    assert "config: expected a file path" in load_error({"config": 42})


def test_setting_broken_after_startup_serves_requests_without_decisions() -> None:
    """If the setting turns invalid after the middleware loaded, requests are still served, without decisions."""

    def get_response(request: HttpRequest) -> HttpResponse:
        return HttpResponse(",".join(request.canary))

    middleware = CanaryMiddleware(get_response)
    assert middleware(RequestFactory().get("/")).content == b"r,other"
    with override_settings(CANARY_ROUTER={**CANARY, "trusted_proxy": []}):
        response = middleware(RequestFactory().get("/", headers={"x-user-id": "u1"}))
    assert (response.status_code, response.content) == (200, b"")


def test_router_is_rebuilt_after_the_setting_changes() -> None:
    """override_settings(CANARY_ROUTER=...) gives a new router; leaving it rebuilds the original setup."""
    first = get_router()
    assert get_router() is first
    with override_settings(CANARY_ROUTER={"config": {"rollouts": {"solo": {"steps": [5]}}}}):
        assert list(get_router().rollouts) == ["solo"]
    restored = get_router()
    assert restored is not first
    assert list(restored.rollouts) == ["r", "other"]


def test_a_ready_router_can_be_the_config() -> None:
    """A Router instance as "config" is used as is (e.g. one with a shared store)."""
    router = Router.from_config({"rollouts": {"mine": {"steps": [100]}}})
    with override_settings(CANARY_ROUTER={"config": router}):
        assert get_router() is router
    router.close()


def test_lazy_initialisation_is_thread_safe() -> None:
    """Threads racing to the first use of a freshly reset router all get one and the same router."""
    with override_settings(CANARY_ROUTER={**CANARY}):  # resets the router
        barrier = threading.Barrier(16)

        def first_use() -> Router:
            barrier.wait()
            return get_router()

        with ThreadPoolExecutor(16) as pool:
            routers = list(pool.map(lambda _: first_use(), range(16)))
    assert all(r is routers[0] for r in routers)


# ---------------------------------------------------------------------------------------------- bad input

GARBAGE = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=50),
    st.sampled_from(
        [
            "",
            "a.b",
            "canary_vid=" + "0" * 32,
            "canary_vid=xyz; canary_override=a.b~c.d; canary_pin=e.f",
            '"' * 7,
            "=" * 9000,
            "x" * 5000,
            "\x00\r\n",
            "[::1]:80",
            "é".encode().decode("latin-1"),
        ]
    ),
)


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cookie=GARBAGE, user=GARBAGE, override=GARBAGE, peer=GARBAGE, query=GARBAGE, forwarded=GARBAGE)
def test_garbage_input_never_breaks_a_request(
    cookie: str, user: str, override: str, peer: str, query: str, forwarded: str
) -> None:
    """Garbage cookies, headers, peer addresses and query strings are ignored: the request is served, never a 500."""
    response = Client().get(
        "/decisions",
        HTTP_COOKIE=cookie,
        HTTP_X_USER_ID=user,
        HTTP_X_CANARY_OVERRIDE=override,
        HTTP_X_FORWARDED_FOR=forwarded,
        HTTP_X_TEST_USER="broken" if user.startswith("b") else "anon",
        REMOTE_ADDR=peer,
        QUERY_STRING=query,
    )
    data = get_json(response)
    assert set(data["decisions"]) == {"r", "other"}


LATIN1 = st.text(alphabet=st.characters(max_codepoint=255), max_size=300)


@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cookie=LATIN1, user=LATIN1, override=LATIN1, query=LATIN1)
def test_garbage_input_never_breaks_an_async_request(cookie: str, user: str, override: str, query: str) -> None:
    """The async path shrugs off garbage the same way (header bytes are latin-1 on the wire)."""

    async def main() -> HttpResponse:
        response: HttpResponse = await AsyncClient().get(
            "/async-decisions",
            headers={"cookie": cookie, "x-user-id": user, "x-canary-override": override},
            QUERY_STRING=query,
        )
        return response

    data = get_json(asyncio.run(main()))
    assert set(data["decisions"]) == {"r", "other"}


# ---------------------------------------------------------------------------------------------- gunicorn smoke


@pytest.mark.slow
def test_example_under_gunicorn_routes_users_and_rolls_back() -> None:
    """integrations/django under real gunicorn: sticky exact 25 % cohort, overrides, and an authenticated rollback."""
    example = ROOT / "integrations" / "django"
    port = free_port()
    command = python_module("gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "project.wsgi")
    with serve(command, port, cwd=example) as base:

        def variant(client: httpx.Client, headers: dict[str, str] | None = None, url: str = "/recommendations") -> str:
            response = client.get(base + url, headers=headers)
            assert response.status_code == 200, response.text
            assert "cookie" in response.headers.get("vary", "").lower()
            payload = response.json()
            assert len(payload["items"]) == 3
            return str(payload["variant"])

        def user_variants(chunk: list[str]) -> list[tuple[str, str]]:
            out = []
            with httpx.Client(timeout=10) as client:  # one client per thread: creating one is costly
                for uid in chunk:
                    client.cookies.clear()  # each simulated user starts without cookies
                    out.append((variant(client, {"x-user-id": uid}), variant(client, {"x-user-id": uid})))
            return out

        uids = [f"u{i}" for i in range(1000)]
        chunks = [uids[i::8] for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(user_variants, chunks))
        seen = {
            uid: pair
            for chunk, pairs in zip(chunks, results, strict=True)
            for uid, pair in zip(chunk, pairs, strict=True)
        }
        for uid, (first, second) in seen.items():
            assert first == second, uid
            assert (first == "new") == (bucket("recommender", uid) < 2500), uid
        share = sum(first == "new" for first, _ in seen.values()) / len(uids)
        assert abs(share - 0.25) <= 4 * (0.25 * 0.75 / len(uids)) ** 0.5

        for _ in range(20):  # anonymous visitors: bucketed by, and kept by, their visitor cookie
            with httpx.Client(timeout=10) as client:
                first = variant(client)
                visitor = client.cookies["canary_vid"]
                assert (first == "new") == (bucket("recommender", visitor) < 2500)
                assert variant(client) == first
                assert client.cookies["canary_vid"] == visitor

        old_user = next(uid for uid, (v, _) in seen.items() if v == "old")
        new_users = [uid for uid, (v, _) in seen.items() if v == "new"][:5]
        with httpx.Client(timeout=10) as client:
            forged = create_token("not-the-secret-0123456789", rollout="recommender", variant="new", ttl=600)
            assert variant(client, {"x-user-id": old_user, "x-canary-override": forged}) == "old"
            assert "canary_override" not in client.cookies
        with httpx.Client(timeout=10) as client:
            signed = create_token(SECRET, rollout="recommender", variant="new", ttl=600)
            assert variant(client, {"x-user-id": old_user, "x-canary-override": signed}) == "new"
            assert variant(client, {"x-user-id": old_user}) == "new"  # kept by the override cookie

        assert httpx.post(f"{base}/admin/rollback", timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer wrong-token"}
        assert httpx.post(f"{base}/admin/rollback", headers=wrong, timeout=10).status_code == 401
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        response = httpx.post(f"{base}/admin/rollback", headers=admin, timeout=10)
        assert response.status_code == 200
        assert response.json()["phase"] == "rolled_back"
        with httpx.Client(timeout=10) as client:
            assert [variant(client, {"x-user-id": uid}) for uid in new_users] == ["old"] * len(new_users)
