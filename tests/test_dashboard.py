"""The dashboard over real HTTP (uvicorn on localhost): its JSON API, sign-in, CSRF and origin checks, mounting.

The browser itself is driven in test_dashboard_browser.py; here every request is made by hand, so each
refusal can be checked for its status, its message and for changing nothing.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from canary_router import MemoryStore, Phase, Router
from canary_router.dashboard import Dashboard
from canary_router.dashboard._auth import Authenticator
from canary_router.dashboard._data import clean
from canary_router.web import RequestInfo
from dashboard_sim import CONFIG, TOKEN, FastClock, Traffic, make_router, running
from webserver import ROOT, free_port, serve

BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def clock() -> FastClock:
    """A clock that moves only when the simulation says so."""
    return FastClock()


@pytest.fixture
def router(clock: FastClock) -> Iterator[Router]:
    """A fresh router with "checkout" running and "search" paused."""
    router = make_router(clock)
    yield router
    router.close()


@pytest.fixture
def traffic(router: Router, clock: FastClock) -> Traffic:
    """Some observed traffic on "checkout" (stopped before the test's requests, so numbers hold still)."""
    with Traffic(router, clock, per_tick=30, step=5.0, pause=0.0) as sim:
        deadline = time.monotonic() + 30
        while sim.calls < 600 and time.monotonic() < deadline:
            time.sleep(0.01)
    return sim


def csrf_of(html: str) -> str:
    """The CSRF token a page carries (in ``data-csrf``)."""
    match = re.search(r'data-csrf="([^"]*)"', html)
    assert match, "the page carries no CSRF token"
    return match[1]


def sign_in(client: httpx.Client, base: str, token: str = TOKEN) -> httpx.Response:
    """Sign in with the login form, as a browser does (Origin header included)."""
    form = client.get(f"{base}/login")
    assert form.status_code == 200
    return client.post(
        f"{base}/login",
        data={"token": token, "csrf_token": csrf_of(form.text)},
        headers={"Origin": base},
    )


def test_overview_lists_every_rollout_with_state_verdict_and_traffic(router: Router, traffic: Traffic) -> None:
    """GET api/rollouts: one entry per rollout in configuration order, with phase, steps, verdict and counts."""
    with running(Dashboard(router)) as base:
        response = httpx.get(f"{base}/api/rollouts")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert [r["name"] for r in data["rollouts"]] == ["checkout", "search"]
    checkout, search = data["rollouts"]
    assert (checkout["phase"], checkout["percent"], checkout["step_index"]) == ("running", 50.0, 2)
    assert checkout["steps"] == [5.0, 25.0, 50.0, 100.0]
    assert checkout["description"] == "Checkout v2"
    assert checkout["verdict"]["outcome"] in ("pass", "fail", "inconclusive", "sample_ratio_mismatch")
    assert checkout["requests"]["old"] > 0
    assert checkout["requests"]["new"] > 0
    assert search["phase"] == "paused"
    assert search["requests"] == {"old": 0, "new": 0}
    assert data["now"] == router.clock()


def test_detail_has_steps_guard_numbers_verdict_and_audit_log(router: Router, traffic: Traffic) -> None:
    """GET api/rollouts/{name}: state, guard settings, per-version numbers, the verdict's checks, history."""
    with running(Dashboard(router)) as base:
        data = httpx.get(f"{base}/api/rollouts/checkout").json()
    snapshot = router.observations("checkout")
    assert snapshot is not None
    assert data["observations"]["old"]["requests"] == snapshot.old.requests
    assert data["observations"]["new"]["errors"] == snapshot.new.errors
    assert data["observations"]["new"]["p95"] == pytest.approx(snapshot.new.percentile(95))
    assert data["guard"]["min_requests"] == 50
    assert data["bake_time"] == 3600.0
    verdict = router.verdict("checkout")
    assert data["verdict"]["outcome"] == verdict.outcome.value
    assert [c["name"] for c in data["verdict"]["checks"]] == [c.name for c in verdict.checks]
    assert all("numbers" in c for c in data["verdict"]["checks"])
    assert [(r["action"], r["actor"]) for r in data["history"]] == [("start", "router"), ("set_percent", "test")]


def test_series_gives_both_variants_per_slot_and_honours_since(router: Router, traffic: Traffic) -> None:
    """GET api/rollouts/{name}/series: per 10-second slot, requests, errors, error rate and p95 of old and new."""
    with running(Dashboard(router)) as base:
        data = httpx.get(f"{base}/api/rollouts/checkout/series").json()
        slots = data["slots"]
        assert data["slot_seconds"] == 10.0
        assert len(slots) >= 3
        assert sum(s["requests"]["old"] for s in slots) > 0
        assert sum(s["requests"]["new"] for s in slots) > 0
        first = slots[0]
        assert set(first) == {"start", "requests", "errors", "error_rate", "p95"}
        for slot in slots:
            for variant in ("old", "new"):
                if slot["requests"][variant]:
                    assert slot["error_rate"][variant] == slot["errors"][variant] / slot["requests"][variant]
                    assert slot["p95"][variant] > 0
        later = httpx.get(f"{base}/api/rollouts/checkout/series", params={"since": slots[-2]["start"]}).json()
        assert [s["start"] for s in later["slots"]] == [s["start"] for s in slots[-2:]]
        bad = httpx.get(f"{base}/api/rollouts/checkout/series", params={"since": "yesterday"})
        assert bad.status_code == 400


def test_unknown_rollout_and_endpoint_are_404(router: Router) -> None:
    """A misspelt rollout gets 404 with a hint, on the API and on its page; an unknown endpoint too."""
    with running(Dashboard(router, token=TOKEN)) as base:
        api = httpx.get(f"{base}/api/rollouts/chekout")
        page = httpx.get(f"{base}/rollouts/chekout")
        action = httpx.post(f"{base}/api/rollouts/chekout/rollback", headers=BEARER)
        other = httpx.get(f"{base}/api/nothing")
        verb = httpx.post(f"{base}/api/rollouts/checkout/explode", headers=BEARER)
    assert api.status_code == 404
    assert "did you mean 'checkout'" in api.json()["error"]
    assert page.status_code == 404
    assert action.status_code == 404
    assert other.status_code == 404
    assert verb.status_code == 404
    assert "promote, pause, resume, rollback" in verb.json()["error"]


def test_without_authentication_the_dashboard_is_read_only(router: Router) -> None:
    """No token and no callable: reads work, every action is 403 with a clear message, nothing changes."""
    dashboard = Dashboard(router)
    assert dashboard.read_only
    with running(dashboard) as base:
        page = httpx.get(f"{base}/rollouts/checkout")
        session = httpx.get(f"{base}/api/session").json()
        refused = [
            httpx.post(f"{base}/api/rollouts/checkout/{action}", headers={**BEARER, "Origin": base})
            for action in ("promote", "pause", "resume", "rollback")
        ]
        login = httpx.get(f"{base}/login")
    assert page.status_code == 200
    assert 'data-can-act="false"' in page.text
    assert "no authentication configured" in page.text
    assert "<fieldset disabled>" in page.text
    assert session == {**session, "can_act": False, "actor": None, "auth": "none"}
    assert {r.status_code for r in refused} == {403}
    assert "read-only" in refused[0].json()["error"]
    assert login.status_code == 404
    assert router.status("checkout").version == 1


def test_bearer_token_rolls_back_and_records_the_actor(router: Router) -> None:
    """A script with the token rolls back (no CSRF needed: browsers never send the header by themselves)."""
    with running(Dashboard(router, token=TOKEN)) as base:
        response = httpx.post(
            f"{base}/api/rollouts/checkout/rollback", headers=BEARER, json={"reason": "errors in checkout"}
        )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "ok": True,
        "action": "rollback",
        "actor": "dashboard:token",
        "reason": "errors in checkout",
        "phase": "rolled_back",
        "percent": 0.0,
        "version": 2,
    }
    status = router.status("checkout")
    assert status.phase is Phase.ROLLED_BACK
    last = status.history[-1]
    assert (last.action, last.actor, last.reason) == ("rollback", "dashboard:token", "errors in checkout")


def test_wrong_or_missing_token_is_refused_and_changes_nothing(router: Router) -> None:
    """A wrong bearer token is 401 (with a Bearer challenge); no credentials at all is 403."""
    with running(Dashboard(router, token=TOKEN)) as base:
        wrong = httpx.post(f"{base}/api/rollouts/checkout/rollback", headers={"Authorization": "Bearer nope"})
        prefix = httpx.post(f"{base}/api/rollouts/checkout/rollback", headers={"Authorization": f"Bearer {TOKEN[:-1]}"})
        basic = httpx.post(f"{base}/api/rollouts/checkout/rollback", headers={"Authorization": f"Basic {TOKEN}"})
        missing = httpx.post(f"{base}/api/rollouts/checkout/rollback")
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert prefix.status_code == 401
    assert basic.status_code == 403
    assert missing.status_code == 403
    assert "not signed in" in missing.json()["error"]
    assert router.status("checkout").phase is Phase.RUNNING
    assert router.status("checkout").version == 1


def test_sign_in_gives_a_strict_httponly_session_and_actions_need_the_csrf_token(router: Router) -> None:
    """The login form sets a signed HttpOnly, SameSite=Strict session; a POST then also needs the CSRF token."""
    with running(Dashboard(router, token=TOKEN)) as base, httpx.Client() as client:
        signed = sign_in(client, base)
        assert signed.status_code == 303
        assert signed.headers["location"] == "/"
        cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("canary_dashboard_session="))
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Path=/" in cookie
        page = client.get(f"{base}/rollouts/checkout")
        assert 'data-can-act="true"' in page.text
        assert "Signed in as <strong>token</strong>" in page.text
        csrf = csrf_of(page.text)
        url = f"{base}/api/rollouts/checkout/pause"
        no_csrf = client.post(url, headers={"Origin": base}, json={})
        bad_csrf = client.post(url, headers={"Origin": base, "X-CSRF-Token": csrf[:-2] + "xx"}, json={})
        assert (no_csrf.status_code, bad_csrf.status_code) == (403, 403)
        assert "CSRF" in no_csrf.json()["error"]
        assert router.status("checkout").phase is Phase.RUNNING
        ok = client.post(url, headers={"Origin": base, "X-CSRF-Token": csrf}, json={"reason": "looking into it"})
        assert ok.status_code == 200, ok.text
    last = router.status("checkout").history[-1]
    assert (last.action, last.actor, last.reason) == ("pause", "dashboard:token", "looking into it")


def test_csrf_token_is_bound_to_the_browser(router: Router) -> None:
    """A CSRF token taken from one browser does not work with another browser's cookies."""
    with running(Dashboard(router, token=TOKEN)) as base, httpx.Client() as victim, httpx.Client() as attacker:
        sign_in(victim, base)
        sign_in(attacker, base)
        stolen = csrf_of(attacker.get(f"{base}/").text)
        response = victim.post(
            f"{base}/api/rollouts/checkout/rollback", headers={"Origin": base, "X-CSRF-Token": stolen}, json={}
        )
    assert response.status_code == 403
    assert router.status("checkout").phase is Phase.RUNNING


def test_wrong_token_on_the_login_form_sets_no_session(router: Router) -> None:
    """A wrong token re-shows the form with 401 and no session cookie; the page stays read-only."""
    with running(Dashboard(router, token=TOKEN)) as base, httpx.Client() as client:
        response = sign_in(client, base, token="not-the-token-at-all")
        assert response.status_code == 401
        assert "not the dashboard&#x27;s token" in response.text
        assert not any(c.startswith("canary_dashboard_session=") for c in response.headers.get_list("set-cookie"))
        assert 'data-can-act="false"' in client.get(f"{base}/").text


def test_login_needs_the_forms_csrf_token_and_origin(router: Router) -> None:
    """Login CSRF: a login POST without the form's token, or from another origin, is refused."""
    with running(Dashboard(router, token=TOKEN)) as base, httpx.Client() as client:
        client.get(f"{base}/login")
        without = client.post(f"{base}/login", data={"token": TOKEN}, headers={"Origin": base})
        csrf = csrf_of(client.get(f"{base}/login").text)
        foreign = client.post(
            f"{base}/login", data={"token": TOKEN, "csrf_token": csrf}, headers={"Origin": "http://evil.test"}
        )
    assert without.status_code == 403
    assert foreign.status_code == 403
    for response in (without, foreign):
        assert not any(c.startswith("canary_dashboard_session=") for c in response.headers.get_list("set-cookie"))


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.test"},
        {"Origin": "null"},
        {"Referer": "http://evil.test/page"},
        {"Origin": "http://127.0.0.1:1"},
    ],
    ids=["foreign-origin", "null-origin", "foreign-referer", "other-port"],
)
def test_cross_origin_posts_are_refused_even_with_session_and_csrf(router: Router, headers: dict[str, str]) -> None:
    """A POST whose Origin (or Referer) is not the dashboard's own is 403, whatever credentials it carries."""
    with running(Dashboard(router, token=TOKEN)) as base, httpx.Client() as client:
        sign_in(client, base)
        csrf = csrf_of(client.get(f"{base}/").text)
        response = client.post(
            f"{base}/api/rollouts/checkout/rollback", headers={**headers, "X-CSRF-Token": csrf}, json={}
        )
        bearer = client.post(f"{base}/api/rollouts/checkout/rollback", headers={**headers, **BEARER}, json={})
    assert response.status_code == 403
    assert "cross-origin" in response.json()["error"]
    assert bearer.status_code == 403
    assert router.status("checkout").phase is Phase.RUNNING


def test_allowed_origins_admit_a_proxy_origin(router: Router) -> None:
    """An origin listed in allowed_origins (a proxy's public name) passes the origin check."""
    with running(Dashboard(router, token=TOKEN, allowed_origins=["https://ops.example.com"])) as base:
        response = httpx.post(
            f"{base}/api/rollouts/checkout/pause", headers={**BEARER, "Origin": "https://ops.example.com"}
        )
    assert response.status_code == 200
    with pytest.raises(ValueError, match="allowed_origins"):
        Dashboard(router, allowed_origins=["https://ops.example.com/path"])


def test_sign_out_ends_the_session(router: Router) -> None:
    """Signing out (a CSRF-checked POST) clears the session cookie; the page is read-only again."""
    with running(Dashboard(router, token=TOKEN)) as base, httpx.Client() as client:
        sign_in(client, base)
        csrf = csrf_of(client.get(f"{base}/").text)
        refused = client.post(f"{base}/logout", data={}, headers={"Origin": base})
        assert refused.status_code == 403
        out = client.post(f"{base}/logout", data={"csrf_token": csrf}, headers={"Origin": base})
        assert out.status_code == 303
        assert 'data-can-act="false"' in client.get(f"{base}/").text


def test_authenticate_callable_names_the_actor_and_still_needs_csrf(router: Router) -> None:
    """With the host's own sign-in (a callable), the actor is its answer, and browser POSTs need the CSRF token."""
    seen: list[RequestInfo] = []

    def authenticate(request: RequestInfo) -> str | None:
        seen.append(request)
        return "alice" if request.headers.get("x-demo-user") == "alice" else None

    with running(Dashboard(router, authenticate=authenticate)) as base, httpx.Client() as client:
        client.headers["x-demo-user"] = "alice"
        session = client.get(f"{base}/api/session").json()
        assert (session["actor"], session["can_act"], session["auth"]) == ("alice", True, "callable")
        url = f"{base}/api/rollouts/checkout/rollback"
        without = client.post(url, headers={"Origin": base}, json={})
        assert without.status_code == 403
        done = client.post(url, headers={"Origin": base, "X-CSRF-Token": session["csrf_token"]}, json={})
        assert done.status_code == 200, done.text
        anonymous = httpx.post(url, headers={"Origin": base}, json={})
        assert anonymous.status_code == 403
    assert router.status("checkout").history[-1].actor == "dashboard:alice"
    assert seen[0].path == "/api/session"


def test_async_authenticate_callable_is_awaited_and_a_failing_one_denies(router: Router) -> None:
    """A coroutine callable works; one that raises denies (and never grants)."""

    async def authenticate(request: RequestInfo) -> str | None:
        await asyncio.sleep(0)
        if request.headers.get("x-demo-user") == "boom":
            raise RuntimeError("identity service down")
        return request.headers.get("x-demo-user")

    with running(Dashboard(router, authenticate=authenticate)) as base:
        bob = httpx.get(f"{base}/api/session", headers={"x-demo-user": "bob"}).json()
        boom = httpx.get(f"{base}/api/session", headers={"x-demo-user": "boom"}).json()
    assert bob["actor"] == "bob"
    assert boom["actor"] is None


def test_form_posts_work_without_javascript(router: Router) -> None:
    """The actions form posts to each action's URL; a plain form submission is redirected back to the page."""
    with running(Dashboard(router, token=TOKEN)) as base, httpx.Client() as client:
        sign_in(client, base)
        page = client.get(f"{base}/rollouts/checkout")
        assert 'formaction="/api/rollouts/checkout/rollback"' in page.text
        response = client.post(
            f"{base}/api/rollouts/checkout/rollback",
            data={"csrf_token": csrf_of(page.text), "reason": "from a form"},
            headers={"Origin": base, "Accept": "text/html"},
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/rollouts/checkout"
        again = client.post(
            f"{base}/api/rollouts/checkout/promote",
            data={"csrf_token": csrf_of(page.text)},
            headers={"Origin": base, "Accept": "text/html"},
        )
        assert again.status_code == 409
        assert "rolled back" in again.text
    assert router.status("checkout").history[-1].reason == "from a form"


def test_refused_transitions_and_stale_versions_are_409(router: Router) -> None:
    """Promoting a rolled-back rollout, or acting on a version that changed, is 409 and changes nothing."""
    with running(Dashboard(router, token=TOKEN)) as base:
        stale = httpx.post(f"{base}/api/rollouts/checkout/pause", headers=BEARER, json={"expected_version": 99})
        assert stale.status_code == 409
        assert "changed since you looked" in stale.json()["error"]
        httpx.post(f"{base}/api/rollouts/checkout/rollback", headers=BEARER)
        promote = httpx.post(f"{base}/api/rollouts/checkout/promote", headers=BEARER)
        assert promote.status_code == 409
        bad = httpx.post(f"{base}/api/rollouts/checkout/resume", headers=BEARER, json={"reason": 42})
        assert bad.status_code == 400
        xml = httpx.post(
            f"{base}/api/rollouts/checkout/resume", headers={**BEARER, "Content-Type": "text/xml"}, content=b"<x/>"
        )
        assert xml.status_code == 415
        huge = httpx.post(f"{base}/api/rollouts/checkout/resume", headers=BEARER, content=b"x" * 70_000)
        assert huge.status_code == 413
    assert [r.action for r in router.status("checkout").history] == ["start", "rollback"]


def test_security_headers_on_every_response(router: Router) -> None:
    """CSP with no external source and no framing, X-Frame-Options DENY and nosniff: on pages, API and files."""
    with running(Dashboard(router, token=TOKEN)) as base:
        responses = [
            httpx.get(f"{base}/"),
            httpx.get(f"{base}/rollouts/checkout"),
            httpx.get(f"{base}/login"),
            httpx.get(f"{base}/api/rollouts"),
            httpx.get(f"{base}/static/dashboard.js"),
            httpx.get(f"{base}/nothing"),
            httpx.post(f"{base}/api/rollouts/checkout/rollback"),
        ]
    for response in responses:
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp
        assert "script-src 'self';" in csp
        assert "http" not in csp
        assert "unsafe" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
    assert responses[3].headers["cache-control"] == "no-store"


def test_pages_have_no_inline_script_style_or_external_resource(router: Router) -> None:
    """Every page loads only its own files: no inline script, handler or style, no absolute URL."""
    with running(Dashboard(router, token=TOKEN)) as base:
        pages = [httpx.get(f"{base}{path}").text for path in ("/", "/rollouts/checkout", "/login")]
    for html in pages:
        scripts = re.findall(r"<script\b[^>]*>", html)
        assert all("src=" in tag for tag in scripts)
        assert "<style" not in html
        assert not re.search(r"\sstyle=", html)
        assert not re.search(r"\son[a-z]+=", html)
        assert not re.search(r"(src|href|action)=\"(https?:)?//", html)


def test_static_files_are_served_from_the_package(router: Router) -> None:
    """The script, the styles and the icon come from the package with the right types; nothing else does."""
    with running(Dashboard(router)) as base:
        js = httpx.get(f"{base}/static/dashboard.js")
        css = httpx.get(f"{base}/static/dashboard.css")
        icon = httpx.get(f"{base}/static/favicon.svg")
        missing = httpx.get(f"{base}/static/_app.py")
        traversal = httpx.get(f"{base}/static/..%2F_app.py")
        head = httpx.head(f"{base}/static/dashboard.js")
        wrong = httpx.post(f"{base}/static/dashboard.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert "textContent" in js.text
    assert css.headers["content-type"].startswith("text/css")
    assert icon.headers["content-type"] == "image/svg+xml"
    assert missing.status_code == traversal.status_code == 404
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) == len(js.content)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET, HEAD"


def test_mounted_under_a_path_of_a_starlette_app(router: Router) -> None:
    """Mount("/_canary", app=Dashboard(...)) under uvicorn: links, files, API, cookies and actions use the path."""

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the shop")

    app = Starlette(routes=[Route("/", home), Mount("/_canary", app=Dashboard(router, token=TOKEN))])
    with running(app) as base, httpx.Client() as client:
        assert client.get(f"{base}/").text == "the shop"
        page = client.get(f"{base}/_canary/")
        assert page.status_code == 200
        assert 'data-root="/_canary"' in page.text
        assert 'src="/_canary/static/dashboard.js' in page.text
        assert client.get(f"{base}/_canary/static/dashboard.css").status_code == 200
        assert [r["name"] for r in client.get(f"{base}/_canary/api/rollouts").json()["rollouts"]] == [
            "checkout",
            "search",
        ]
        detail = client.get(f"{base}/_canary/rollouts/checkout")
        assert 'formaction="/_canary/api/rollouts/checkout/rollback"' in detail.text
        form = client.get(f"{base}/_canary/login")
        signed = client.post(
            f"{base}/_canary/login",
            data={"token": TOKEN, "csrf_token": csrf_of(form.text)},
            headers={"Origin": base},
        )
        assert signed.status_code == 303
        assert signed.headers["location"] == "/_canary/"
        assert all("Path=/_canary;" in c for c in signed.headers.get_list("set-cookie"))
        csrf = csrf_of(client.get(f"{base}/_canary/rollouts/checkout").text)
        done = client.post(
            f"{base}/_canary/api/rollouts/checkout/rollback",
            headers={"Origin": base, "X-CSRF-Token": csrf},
            json={"reason": "mounted"},
        )
        assert done.status_code == 200, done.text
        bare = client.get(f"{base}/_canary", follow_redirects=True)
        assert bare.status_code == 200
        assert 'data-root="/_canary"' in bare.text
    assert router.status("checkout").history[-1].actor == "dashboard:token"


def test_server_root_path_is_honoured_standalone(router: Router) -> None:
    """Behind a proxy that strips a prefix (uvicorn --root-path), the page links carry the prefix."""
    with running(Dashboard(router), root_path="/ops/canary") as base:
        page = httpx.get(f"{base}/")
        api = httpx.get(f"{base}/api/rollouts")
    assert 'data-root="/ops/canary"' in page.text
    assert 'href="/ops/canary/static/dashboard.css' in page.text
    assert api.status_code == 200


def test_serve_runs_the_dashboard_with_uvicorn(tmp_path: Any) -> None:
    """serve(router, host=..., port=..., token=...) blocks serving the dashboard, as the CLI calls it."""
    port = free_port()
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from dashboard_sim import TOKEN, make_router\n"
        "from canary_router.dashboard import serve\n"
        "serve(make_router(), host='127.0.0.1', port=int(sys.argv[1]), token=TOKEN)\n"
    )
    with serve([sys.executable, str(script), str(port), str(ROOT / "tests")], port, cwd=tmp_path) as base:
        names = [r["name"] for r in httpx.get(f"{base}/api/rollouts").json()["rollouts"]]
        assert names == ["checkout", "search"]
        assert httpx.post(f"{base}/api/rollouts/search/resume", headers=BEARER).status_code == 200
        assert httpx.post(f"{base}/api/rollouts/search/pause").status_code == 403


def test_importing_the_dashboard_loads_no_framework() -> None:
    """canary_router.dashboard is pure ASGI: importing it loads neither Starlette nor uvicorn."""
    code = (
        "import sys, canary_router.dashboard\n"
        "print(','.join(m for m in ('starlette', 'uvicorn', 'fastapi', 'click') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_token_must_be_long_enough(router: Router) -> None:
    """A short token (easy to guess) is refused at start-up, with how to make a good one."""
    with pytest.raises(ValueError, match="at least 16 characters"):
        Dashboard(router, token="secret")
    with pytest.raises(ValueError, match="poll_interval"):
        Dashboard(router, poll_interval=0)


def test_session_cookies_are_signed_and_expire() -> None:
    """A session cookie verifies only unedited, with its key, and before it expires."""
    auth = Authenticator(token=TOKEN, authenticate=None, secret=None, session_ttl=60)
    cookie = auth.session_cookie("token", now=1000.0)
    assert auth.session_actor(cookie, now=1059.0) == "token"
    assert auth.session_actor(cookie, now=1060.0) is None
    body, signature = cookie.split(".")
    assert auth.session_actor(f"{body}.{signature[:-1]}A", now=1000.0) is None
    other = Authenticator(token=TOKEN + "x", authenticate=None, secret=None, session_ttl=60)
    assert other.session_actor(cookie, now=1000.0) is None
    same = Authenticator(token=TOKEN, authenticate=None, secret=None, session_ttl=60)
    assert same.session_actor(cookie, now=1000.0) == "token", "workers sharing the token share sessions"
    assert auth.token_matches(TOKEN)
    assert not auth.token_matches(TOKEN[:-1])
    assert not auth.csrf_valid("nonce", "token", auth.csrf_token("nonce", "alice"))
    assert auth.csrf_valid("nonce", "token", auth.csrf_token("nonce", "token"))


def test_documents_are_strict_json() -> None:
    """Non-finite numbers (an overflowing latency bucket) become null, so browsers can parse every document."""
    assert clean({"p95": float("inf"), "x": [1.5, float("nan")], "t": (1, 2)}) == {
        "p95": None,
        "x": [1.5, None],
        "t": [1, 2],
    }


class _BrokenWrites(MemoryStore):
    """A store whose writes fail once ``broken`` is set (reads keep working)."""

    broken = False

    def compare_and_set(self, *args: Any, **kwargs: Any) -> int:
        if self.broken:
            raise OSError("disk full")
        return super().compare_and_set(*args, **kwargs)


def test_a_store_that_cannot_write_is_503_and_the_page_still_reads() -> None:
    """When the store refuses the write, the action is 503 with the store's reason; reading goes on."""
    store = _BrokenWrites()
    router = Router.from_config(CONFIG, store=store, clock=FastClock(), telemetry=None)
    store.broken = True
    try:
        with running(Dashboard(router, token=TOKEN)) as base:
            response = httpx.post(f"{base}/api/rollouts/checkout/rollback", headers=BEARER)
            overview = httpx.get(f"{base}/api/rollouts")
        assert response.status_code == 503
        assert "disk full" in response.json()["error"]
        assert overview.status_code == 200
        assert router.status("checkout").phase is Phase.RUNNING
    finally:
        router.close()
