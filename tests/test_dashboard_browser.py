"""The dashboard in a real browser: headless Chromium (the system's, driven by Playwright) on a live rollout.

The dashboard is served by uvicorn on localhost while simulated traffic goes through the real decorator.
Chromium is Debian's ``chromium`` package (Playwright never downloads a browser here). Under CI a missing
browser fails these tests; on a workstation without it they are skipped, saying why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canary_router import Phase, Router
from canary_router.dashboard import Dashboard
from dashboard_sim import TOKEN, FastClock, Traffic, make_router, running
from webserver import ROOT

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ARTIFACTS = ROOT / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
POINTS = "svg[data-chart='{chart}'] circle[data-variant='{variant}']"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}: the browser tests must run in CI (.ci/run installs Debian's chromium)")
    pytest.skip(reason)


def _chromium() -> str:
    path = os.environ.get("CANARY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        _unavailable(f"no Chromium at {path} (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module's tests."""
    executable = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (it is part of the 'test' extra)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def live() -> Iterator[tuple[str, Router]]:
    """A dashboard (with a token) on a real server, over a rollout that is receiving traffic right now."""
    clock = FastClock()
    router = make_router(clock)
    dashboard = Dashboard(router, token=TOKEN, poll_interval=0.4, title="Shop rollouts")
    with Traffic(router, clock, per_tick=25, step=2.5, pause=0.05), running(dashboard) as base:
        yield base, router
    router.close()


class Problems:
    """Console errors, uncaught exceptions and failed or refused requests of one page."""

    def __init__(self, page: Any) -> None:
        self.items: list[str] = []
        page.on("console", lambda m: self.items.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.items.append(f"uncaught: {e}"))
        page.on("requestfailed", self._failed)
        page.on("response", lambda r: self.items.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)

    def _failed(self, request: Any) -> None:
        if request.failure != "net::ERR_ABORTED":  # a poll still in flight when the test navigates away
            self.items.append(f"request failed: {request.url} {request.failure}")


def _count(page: Any, chart: str, variant: str) -> int:
    return int(page.locator(POINTS.format(chart=chart, variant=variant)).count())


def _wait_for_points(page: Any, minimum: int) -> None:
    """Wait until every chart has at least ``minimum`` points of each version."""
    selectors = [POINTS.format(chart=c, variant=v) for c in ("error-rate", "p95", "requests") for v in ("old", "new")]
    page.wait_for_function(
        "([selectors, minimum]) => selectors.every(s => document.querySelectorAll(s).length >= minimum)",
        arg=[selectors, minimum],
        timeout=20_000,
    )


def _sign_in(page: Any, base: str) -> None:
    page.goto(f"{base}/login")
    page.get_by_label("Dashboard token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/")
    page.get_by_text("Signed in as").wait_for()


def test_page_loads_cleanly_and_charts_of_both_versions_update(browser: Any, live: tuple[str, Router]) -> None:
    """Overview and rollout page load without console errors; every chart has points of old and new, and gains more."""
    base, _ = live
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = Problems(page)
    page.goto(f"{base}/")
    rows = page.locator("#rollouts-body tr[data-rollout]")
    rows.first.wait_for()
    assert rows.count() == 2
    assert page.locator("tr[data-rollout='checkout'] .phase").inner_text() == "running"
    assert page.locator("tr[data-rollout='search'] .phase").inner_text() == "paused"
    _sign_in(page, base)
    page.get_by_role("link", name="checkout").click()
    page.wait_for_url(f"{base}/rollouts/checkout")
    _wait_for_points(page, 2)
    before = {v: _count(page, "requests", v) for v in ("old", "new")}
    latest = page.locator(POINTS.format(chart="requests", variant="new")).last.get_attribute("data-start")
    page.wait_for_function(
        "([selector, n]) => document.querySelectorAll(selector).length > n",
        arg=[POINTS.format(chart="requests", variant="new"), before["new"]],
        timeout=20_000,
    )
    _wait_for_points(page, max(before.values()) + 1)
    after = {v: _count(page, "requests", v) for v in ("old", "new")}
    assert after["old"] > before["old"]
    assert after["new"] > before["new"]
    newest = page.locator(POINTS.format(chart="requests", variant="new")).last.get_attribute("data-start")
    assert float(newest or 0) > float(latest or 0)
    assert page.locator("#numbers-body tr[data-variant='new'] td").first.inner_text() != "0"
    assert page.locator("#verdict-outcome").inner_text() in ("pass", "fail", "inconclusive", "sample ratio mismatch")
    assert page.locator("#steps li[aria-current='step']").inner_text().startswith("50 %")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000
    assert problems.items == []
    page.close()


def test_rollback_with_the_token_works_and_shows_in_the_audit_log(browser: Any, live: tuple[str, Router]) -> None:
    """Signed in with the token, "Roll back" rolls the live rollout back and the audit log names the actor."""
    base, router = live
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = Problems(page)
    _sign_in(page, base)
    page.goto(f"{base}/rollouts/checkout")
    page.locator("#audit-body tr").first.wait_for()
    reason = page.get_by_label("Reason, recorded in the audit log")
    reason.fill("error rate up in the browser test")
    version = router.status("checkout").version
    reason.press("Enter")  # Enter must not submit (the first button would be "Promote")
    page.wait_for_timeout(500)
    assert router.status("checkout").version == version
    page.get_by_role("button", name="Roll back").click()
    page.get_by_text("Done: rollback by dashboard:token").wait_for(timeout=10_000)
    newest = page.locator("#audit-body tr").first
    page.wait_for_function("() => document.querySelector('#audit-body tr').dataset.action === 'rollback'")
    cells = newest.locator("td").all_inner_texts()
    assert cells[1:4] == ["dashboard:token", "rollback", "running → rolled back"]
    assert cells[5] == "error rate up in the browser test"
    assert page.locator("#phase").inner_text() == "rolled back"
    status = router.status("checkout")
    assert status.phase is Phase.ROLLED_BACK
    assert status.history[-1].actor == "dashboard:token"
    assert problems.items == []
    page.close()


def test_without_the_token_the_page_is_read_only_and_actions_are_refused(
    browser: Any, live: tuple[str, Router]
) -> None:
    """Not signed in: the page says read-only, its buttons are disabled, and a POST from the page gets 403."""
    base, router = live
    page = browser.new_page()
    page.goto(f"{base}/rollouts/checkout")
    page.locator("#audit-body tr").first.wait_for()
    assert "Read-only" in page.locator("#read-only").inner_text()
    assert page.get_by_role("button", name="Roll back").is_disabled()
    assert page.locator(".session").inner_text().startswith("Read-only")
    result = page.evaluate(
        """async () => {
            const r = await fetch("/api/rollouts/checkout/rollback", {
                method: "POST",
                headers: {"Content-Type": "application/json", "X-CSRF-Token": document.body.dataset.csrf},
                body: "{}",
            });
            return [r.status, (await r.json()).error];
        }"""
    )
    assert result[0] == 403
    assert "not signed in" in result[1]
    assert router.status("checkout").phase is Phase.RUNNING
    page.close()


def test_signed_in_without_the_csrf_token_is_refused(browser: Any, live: tuple[str, Router]) -> None:
    """Even with the session cookie, a POST from the page without the CSRF token is 403 and changes nothing."""
    base, router = live
    page = browser.new_page()
    _sign_in(page, base)
    result = page.evaluate(
        """async () => {
            const r = await fetch("/api/rollouts/checkout/rollback", {
                method: "POST", headers: {"Content-Type": "application/json"}, body: "{}",
            });
            return [r.status, (await r.json()).error];
        }"""
    )
    assert result[0] == 403
    assert "CSRF" in result[1]
    assert router.status("checkout").phase is Phase.RUNNING
    page.close()


def test_a_form_on_another_origin_cannot_roll_back(browser: Any, live: tuple[str, Router]) -> None:
    """A page on another port (same site, so the Strict cookie is sent) posting to the dashboard gets 403."""
    base, router = live
    target = f"{base}/api/rollouts/checkout/rollback"
    html = (
        f'<!doctype html><form method="post" action="{target}"><input name="reason" value="csrf">'
        '<button type="submit">Win a prize</button></form>'
    ).encode()

    async def evil(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": html})

    page = browser.new_page()
    _sign_in(page, base)
    with running(evil) as other:
        page.goto(f"{other}/")
        with page.expect_navigation() as navigation:
            page.get_by_role("button", name="Win a prize").click()
        response = navigation.value
        assert response.status == 403
        assert "cross-origin" in page.content()
    assert router.status("checkout").phase is Phase.RUNNING
    page.close()
