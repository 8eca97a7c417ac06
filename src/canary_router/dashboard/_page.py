"""The dashboard's HTML: server-rendered skeletons that ``static/dashboard.js`` fills from the JSON API.

Every interpolated value is escaped here; the script only ever sets ``textContent``. No inline script or
style, so the Content-Security-Policy can forbid both.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from .._version import __version__

__all__ = ["PageContext", "detail_page", "login_page", "message_page", "overview_page"]


@dataclass(frozen=True, slots=True)
class PageContext:
    """What every page needs: where it is mounted, who is looking, and what they may do."""

    root: str
    title: str
    poll_interval: float
    actor: str | None
    """The signed-in actor, or ``None`` (read-only)."""
    csrf: str
    """The CSRF token of this browser (for its actor, or anonymous)."""
    auth_mode: str
    """``"none"``, ``"token"``, ``"callable"`` or ``"token+callable"``."""
    session: bool
    """Whether the actor signed in through the login form (and may sign out)."""


def _a(value: object) -> str:
    return escape(str(value), quote=True)


def _read_only_note(ctx: PageContext) -> str:
    if ctx.auth_mode == "none":
        return (
            "Read-only: this dashboard has no authentication configured, so it cannot promote, pause, "
            "resume or roll back."
        )
    if "token" in ctx.auth_mode:
        return "Read-only: sign in to promote, pause, resume or roll back."
    return "Read-only: you are not signed in to the application, so you cannot act on rollouts."


def _session_bar(ctx: PageContext) -> str:
    if ctx.actor is not None:
        out = f'<span class="who">Signed in as <strong>{_a(ctx.actor)}</strong></span>'
        if ctx.session:
            out += (
                f'<form class="inline" method="post" action="{_a(ctx.root)}/logout">'
                f'<input type="hidden" name="csrf_token" value="{_a(ctx.csrf)}">'
                '<button type="submit">Sign out</button></form>'
            )
        return out
    out = '<span class="who read-only-badge">Read-only</span>'
    if "token" in ctx.auth_mode:
        out += f' <a href="{_a(ctx.root)}/login">Sign in</a>'
    return out


def _layout(ctx: PageContext, heading: str, main: str, *, rollout: str = "", script: bool = True) -> str:
    root = _a(ctx.root)
    can_act = "true" if ctx.actor is not None else "false"
    script_tag = f'<script src="{root}/static/dashboard.js?v={_a(__version__)}" defer></script>' if script else ""
    title = f"{heading} · {ctx.title}" if heading != ctx.title else ctx.title
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="same-origin">
<title>{_a(title)}</title>
<link rel="icon" href="{root}/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="{root}/static/dashboard.css?v={_a(__version__)}">
{script_tag}
</head>
<body data-root="{root}" data-rollout="{_a(rollout)}" data-poll="{ctx.poll_interval:g}" data-csrf="{_a(ctx.csrf)}"
 data-can-act="{can_act}" data-auth="{_a(ctx.auth_mode)}">
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<p class="brand"><a href="{root}/">{_a(ctx.title)}</a></p>
<nav class="session" aria-label="Session">{_session_bar(ctx)}</nav>
</header>
<main id="main">
{main}
</main>
<footer><p id="connection" role="status" aria-live="polite"></p></footer>
</body>
</html>
"""


def overview_page(ctx: PageContext) -> str:
    """The list of every rollout: phase, step, percentage, verdict and traffic of the current step."""
    main = """<h1>Rollouts</h1>
<noscript><p class="note">This page updates itself with JavaScript; the JSON API is at api/rollouts.</p></noscript>
<table id="rollouts" class="data">
<caption class="visually-hidden">Every rollout, with its phase, step and the guard's verdict</caption>
<thead><tr><th scope="col">Rollout</th><th scope="col">Phase</th><th scope="col">Progress</th>
<th scope="col">Verdict</th><th scope="col" class="num">Requests old</th><th scope="col" class="num">Requests new</th>
<th scope="col">Last change</th></tr></thead>
<tbody id="rollouts-body"><tr><td colspan="7">Loading…</td></tr></tbody>
</table>"""
    return _layout(ctx, ctx.title, main)


_ACTIONS = (
    ("promote", "Promote", "Move to the next step (complete after the last one)"),
    ("pause", "Pause", "Freeze at the current percentage"),
    ("resume", "Resume", "Let the controller expand again"),
    ("rollback", "Roll back", "Send everyone to the old version now"),
)


def _actions(ctx: PageContext, name: str) -> str:
    root = _a(ctx.root)
    base = f"{root}/api/rollouts/{_a(name)}"
    disabled = "" if ctx.actor is not None else " disabled"
    note = "" if ctx.actor is not None else f'<p id="read-only" class="note read-only">{_a(_read_only_note(ctx))}</p>'
    # The first submit button is the form's default: a disabled one makes Enter in the reason field do
    # nothing, instead of promoting.
    buttons = "".join(
        f'<button type="submit" name="action" value="{key}" formaction="{base}/{key}" '
        f'class="action action-{key}" title="{_a(hint)}">{label}</button>'
        for key, label, hint in _ACTIONS
    )
    return f"""<section class="card" aria-labelledby="actions-title">
<h2 id="actions-title">Actions</h2>
{note}
<form id="actions" method="post" action="{base}/pause">
<fieldset{disabled}>
<legend class="visually-hidden">Change the rollout's state</legend>
<input type="hidden" name="csrf_token" value="{_a(ctx.csrf)}">
<label for="reason">Reason, recorded in the audit log</label>
<input id="reason" name="reason" type="text" maxlength="500" autocomplete="off">
<div class="buttons"><button type="submit" class="visually-hidden" disabled hidden tabindex="-1" aria-hidden="true">
</button>{buttons}</div>
</fieldset>
<p id="action-result" role="status" aria-live="polite"></p>
</form>
</section>"""


def detail_page(ctx: PageContext, name: str, description: str) -> str:
    """One rollout: steps, verdict with its numbers, charts of both versions, actions and the audit log."""
    desc = f'<p class="description">{_a(description)}</p>' if description else ""
    charts = "".join(
        f"""<figure class="chart-box">
<figcaption id="chart-{key}-title">{label}</figcaption>
<svg class="chart" data-chart="{key}" role="img" aria-labelledby="chart-{key}-title chart-{key}-desc"
 viewBox="0 0 640 220"><desc id="chart-{key}-desc">No data yet</desc></svg>
</figure>"""
        for key, label in (
            ("error-rate", "Error rate per time slot"),
            ("p95", "p95 latency per time slot"),
            ("requests", "Requests per time slot"),
        )
    )
    main = f"""<p class="crumbs"><a href="{_a(ctx.root)}/">All rollouts</a></p>
<h1>{_a(name)} <span id="phase" class="phase"></span></h1>
{desc}
<section class="card" aria-labelledby="progress-title">
<h2 id="progress-title">Progress</h2>
<p id="state-line"></p>
<ol id="steps" class="steps" aria-label="Steps"></ol>
<p id="state-reason" class="reason"></p>
</section>
{_actions(ctx, name)}
<section class="card" aria-labelledby="charts-title">
<h2 id="charts-title">Old and new over time</h2>
<p class="legend"><span class="key key-old">old</span> <span class="key key-new">new</span>
<span id="chart-window" class="note"></span></p>
<div class="charts">{charts}</div>
</section>
<section class="card" aria-labelledby="verdict-title">
<h2 id="verdict-title">Verdict of the guard <span id="verdict-outcome" class="outcome"></span></h2>
<p id="verdict-message"></p>
<table id="numbers" class="data">
<caption>Current step, per version</caption>
<thead><tr><th scope="col">Version</th><th scope="col" class="num">Requests</th><th scope="col" class="num">Errors</th>
<th scope="col" class="num">Error rate</th><th scope="col" class="num">p50</th><th scope="col" class="num">p95</th>
<th scope="col" class="num">p99</th><th scope="col" class="num">Units</th></tr></thead>
<tbody id="numbers-body"></tbody>
</table>
<table id="checks" class="data">
<caption>Checks</caption>
<thead><tr><th scope="col">Check</th><th scope="col">Outcome</th><th scope="col">Message</th>
<th scope="col">Numbers</th></tr></thead>
<tbody id="checks-body"></tbody>
</table>
<p id="guard-settings" class="note"></p>
</section>
<section class="card" aria-labelledby="audit-title">
<h2 id="audit-title">Audit log</h2>
<table id="audit" class="data">
<caption class="visually-hidden">State transitions of {_a(name)}, newest first</caption>
<thead><tr><th scope="col">Time (UTC)</th><th scope="col">Actor</th><th scope="col">Action</th>
<th scope="col">Phase</th><th scope="col" class="num">Percent</th><th scope="col">Reason</th></tr></thead>
<tbody id="audit-body"></tbody>
</table>
</section>"""
    return _layout(ctx, name, main, rollout=name)


def login_page(ctx: PageContext, *, error: str = "") -> str:
    """The sign-in form: exchanges the dashboard token for a session cookie."""
    message = f'<p class="error" role="alert">{_a(error)}</p>' if error else ""
    main = f"""<h1>Sign in</h1>
<section class="card narrow">
{message}
<form method="post" action="{_a(ctx.root)}/login">
<input type="hidden" name="csrf_token" value="{_a(ctx.csrf)}">
<label for="token">Dashboard token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<div class="buttons"><button type="submit">Sign in</button></div>
</form>
<p class="note">The token is the one the dashboard was started with. Signing in keeps a session cookie for this
browser; it expires, and signing out removes it.</p>
</section>"""
    return _layout(ctx, "Sign in", main, script=False)


def message_page(ctx: PageContext, heading: str, text: str) -> str:
    """A short page for a refused or failed form submission, with a way back."""
    main = f"""<h1>{_a(heading)}</h1>
<p role="alert">{_a(text)}</p>
<p><a href="{_a(ctx.root)}/">Back to the dashboard</a></p>"""
    return _layout(ctx, heading, main, script=False)
