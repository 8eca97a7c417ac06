"""Micro-benchmark of ``canary_router.wsgi.CanaryMiddleware``: its cost per request, in process.

No server and no socket: each case calls a WSGI app directly, like a server would, with a minimal
environ (the keys gunicorn sets, plus the request's headers), a ``start_response`` that drops its
arguments, then iterates the body and closes it. The app is the same small Flask app in every case (one
route answering ``ok``), called:

* bare (``app.wsgi_app``);
* behind a pass-through WSGI middleware (the floor any middleware pays: one more call);
* behind a hand-rolled split (the user id header, one mmh3 hash: the floor of deciding per request);
* behind ``CanaryMiddleware`` in decision mode, configured like ``integrations/flask`` (trusted proxy,
  ``x-user-id`` header, a signing secret), for a returning visitor (visitor cookie and user id header)
  and for a new visitor (no cookie).

Those are the (a) cases: the route decides nothing. In the (b) cases the route makes one decision: behind
``CanaryMiddleware`` through the ambient context (a new visitor then gets a ``Set-Cookie``), and in the bare
app on a context it builds from the user id header, which is what the (b) overheads are measured against.

The same middleware around a trivial raw WSGI app (a one-item list body) is timed too: without Flask's
~40 µs the difference is far less noisy. The cases are interleaved (a shuffled order in every round) so
that a noisy neighbour slows all of them alike; each is reported as the MEDIAN per-request time over the
rounds, and the overhead of a middleware is the median over the rounds of (its time minus the bare app's
in the same round), which cancels most of the drift of a shared machine. Times are the CPU time of the
benchmark thread (``time.thread_time_ns``), so time the OS gives to other processes does not count. The
requests cycle through 10,000 distinct user ids. Pieces of the middleware's work are timed on their own, to
show where its time goes.

Usage::

    python bench/bench_wsgi.py                               # print the table
    python bench/bench_wsgi.py --write docs/benchmarks.md    # also rewrite the marked section

The exit status never depends on a timing: a case over its target is reported as "over target".
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import copy_context
from dataclasses import dataclass, field
from typing import Any

import mmh3
from flask import Flask
from flask import request as flask_request

import benchlib
import canary_router
from canary_router.context import _current
from canary_router.web import _find_cookies
from canary_router.wsgi import CanaryMiddleware, StartResponse, WSGIApp, WSGIEnvironment

SECTION = "wsgi"
"""The name in the markers of this script's section of docs/benchmarks.md."""
HEADING = "## WSGI middleware"
"""The heading put above the markers when the file has none."""

N_IDS = 10_000
SECRET = "bench-secret-0123456789abcdef"  # noqa: S105  # a throwaway signing key for the benchmark
TARGET_US = 3.0
"""Decision-mode overhead over the bare Flask app, returning visitor (CPython 3.11, median), on a machine where ..."""
REFERENCE_BARE_US = 39.0
"""... the bare Flask app takes this long: the target scales with its time in the same run (3/39 of it)."""

CONFIG: dict[str, Any] = {
    "rollouts": {
        "recommender": {"steps": [25, 50, 100], "bake_time": "1h", "stickiness": ["user_id", "session_id"]},
    }
}


@dataclass
class Case:
    """One timed loop: ``run()`` does ``calls`` requests (or piece calls) and returns the elapsed nanoseconds."""

    key: str
    label: str
    run: Callable[[], int]
    calls: int
    samples_ns: list[float] = field(default_factory=list)
    """Per-call nanoseconds, one entry per round."""


@dataclass
class Row:
    """One printed row: a case, or an overhead (the median of a case's per-round differences from its baseline)."""

    label: str
    median_us: float
    p25_us: float | None = None
    p75_us: float | None = None
    target_us: float | None = None

    @property
    def status(self) -> str:
        """Return "pass", "over target", or "—" when the row has no target."""
        return benchlib.verdict(self.median_us, self.target_us)


def drop(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
    """A ``start_response`` that forgets what it is given, as cheap as one can be."""
    return _write


def _write(data: bytes) -> None:
    """The legacy ``write`` callable, dropping its data."""


def minimal_environ() -> WSGIEnvironment:
    """The environ a server (gunicorn) builds for ``GET /`` from 127.0.0.1, before any request header."""
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "RAW_URI": "/",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "HTTP_HOST": "127.0.0.1:8000",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def make_ids(seed: int) -> tuple[list[str], list[str]]:
    """``N_IDS`` distinct user ids and as many visitor ids (32 hex digits, the visitor cookie's shape)."""
    rng = random.Random(seed)
    users = benchlib.distinct_user_ids(rng, N_IDS)
    visitors = [f"{rng.getrandbits(128):032x}" for _ in range(N_IDS)]
    out = sorted(users)
    rng.shuffle(out)
    return out, visitors


def flask_app(decide: Callable[[], object] | None = None) -> WSGIApp:
    """The app under test: Flask, one route answering ``ok`` (after calling ``decide``, if given)."""
    app = Flask("bench_wsgi")

    if decide is None:

        @app.get("/")
        def index() -> str:
            return "ok"

    else:

        @app.get("/")
        def index_deciding() -> str:
            decide()
            return "ok"

    return app.wsgi_app


def raw_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """A trivial raw WSGI app: what remains of a request when the framework costs nothing."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


def raw_app_deciding(decide: Callable[[WSGIEnvironment], object]) -> WSGIApp:
    """The trivial raw WSGI app, calling ``decide(environ)`` before it answers."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        decide(environ)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    return app


class HandRolledSplit:
    """A minimal hand-rolled canary split: the user id header, one mmh3 hash, the variant in the environ.

    No visitor cookie, no trusted-proxy check, no override, no Vary, no ambient context: the floor of
    deciding per request.
    """

    def __init__(self, app: WSGIApp, salt: str, percent: float) -> None:
        self.app = app
        self.prefix = f"{salt}:"
        self.threshold = int(percent * 100)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Split by the user id header, then call the wrapped app."""
        user = environ.get("HTTP_X_USER_ID")
        variant = "old"
        if user:
            h = mmh3.hash((self.prefix + user).encode(), 0, False)
            if (h % 100) * 100 + (h // 100) % 100 < self.threshold:  # the v1 bucket
                variant = "new"
        environ["canary.variant"] = variant
        return self.app(environ, start_response)


_END = object()


class AmbientFloor:
    """The least a lazy decision-mode WSGI middleware does on a request that decides nothing: a reference for (a).

    Publishes one per-request object in the environ, and makes it the ambient context while the app runs and
    while the server iterates and closes the body: the app runs in a copied ``contextvars`` context, and the body
    is a primed generator that iterates and closes the app's iterable in it (PEP 3333: closed even when the server
    closes the body unread). The object keeps no reference to the environ (so it could not be worked out later,
    and leaves no reference cycle). No decisions mapping, no ``start_response`` of its own (so no ``Vary`` or
    cookie), no override link, no enclosing context, no pass-through of lists and file wrappers: not a usable
    middleware, only a floor under what CanaryMiddleware does for the same request.
    """

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Make a per-request object ambient for the app call and the body, then call the wrapped app."""
        request = _new_floor_request(_FloorRequest)
        environ["floor.context"] = request
        run = copy_context().run
        run(_current.set, request)
        body = _floor_body(run(self.app, environ, start_response), run)
        next(body)
        return body


class _FloorRequest(canary_router.Context):
    """The floor's per-request object, made without ``__init__`` (nothing is read before the first use)."""

    __slots__ = ()


_new_floor_request = _FloorRequest.__new__


def _floor_body(result: Iterable[bytes], run: Callable[..., Any]) -> Iterator[bytes]:
    """Iterate and close ``result`` inside ``run``'s context (primed by the caller)."""
    try:
        iterator = run(iter, result)
        yield b""  # the priming value, dropped by the caller
        chunk = run(next, iterator, _END)
        while chunk is not _END:
            yield chunk
            chunk = run(next, iterator, _END)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            run(close)


class PassThrough:
    """The floor any WSGI middleware pays: one more call, nothing else."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Call the wrapped app."""
        return self.app(environ, start_response)


def serve(app: WSGIApp, environs: Sequence[WSGIEnvironment]) -> Callable[[], int]:
    """A loop that serves every environ (a fresh copy each) like a server: call, iterate, close."""

    def run() -> int:
        start = time.thread_time_ns()
        for template in environs:
            body = app(template.copy(), drop)
            for _ in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return time.thread_time_ns() - start

    return run


def piece(func: Callable[[Any], object], inputs: Sequence[Any]) -> Callable[[], int]:
    """A loop that calls ``func`` on every input."""

    def run() -> int:
        start = time.thread_time_ns()
        for item in inputs:
            func(item)
        return time.thread_time_ns() - start

    return run


def build(users: Sequence[str], visitors: Sequence[str], calls: int) -> tuple[dict[str, Any], list[Case]]:
    """Build the apps, the request environs and the timed cases (all inputs precomputed outside the timing)."""
    router = canary_router.Router.from_config(CONFIG)
    options: dict[str, Any] = {"secret": SECRET, "trusted_proxies": ["127.0.0.1"], "user_header": "x-user-id"}
    decide_now = router.decide

    def ambient_decision(*_: object) -> object:
        return decide_now("recommender")  # the ambient context: the middleware's request

    def flask_hand_rolled() -> object:  # the user id header, as the hand-rolled split reads it
        return decide_now("recommender", {"user_id": flask_request.environ.get("HTTP_X_USER_ID")})

    def raw_hand_rolled(environ: WSGIEnvironment) -> object:
        return decide_now("recommender", {"user_id": environ.get("HTTP_X_USER_ID")})

    bare = flask_app()
    bare_deciding = flask_app(flask_hand_rolled)
    wrapped = CanaryMiddleware(bare, router=router, **options)
    wrapped_deciding = CanaryMiddleware(flask_app(ambient_decision), router=router, **options)
    raw_wrapped = CanaryMiddleware(raw_app, router=router, **options)
    raw_bare_deciding = raw_app_deciding(raw_hand_rolled)
    raw_wrapped_deciding = CanaryMiddleware(raw_app_deciding(ambient_decision), router=router, **options)
    base = minimal_environ()
    returning = [
        {**base, "HTTP_X_USER_ID": users[i % N_IDS], "HTTP_COOKIE": f"canary_vid={visitors[i % N_IDS]}"}
        for i in range(calls)
    ]
    first = [{**base, "HTTP_X_USER_ID": users[i % N_IDS]} for i in range(calls)]
    resolver = wrapped.resolver
    infos = [wrapped.request_info(dict(environ)) for environ in returning]
    fields = [wrapped._fields(dict(environ)) for environ in returning]
    contexts = [resolver.resolve(info).context for info in infos]
    cookie_keys = resolver._cookie_keys

    def decide(context: canary_router.Context) -> object:
        return router.decide("recommender", context)

    def context_run(context: canary_router.Context) -> object:
        return copy_context().run(len, ())

    cases = [
        Case("flask_bare", "(a) Flask app, bare", serve(bare, returning), calls),
        Case(
            "flask_pass",
            "(a) Flask app behind a pass-through WSGI middleware",
            serve(PassThrough(bare), returning),
            calls,
        ),
        Case(
            "flask_split",
            "(a) Flask app behind a hand-rolled split (user id header, one mmh3 hash)",
            serve(HandRolledSplit(bare, "recommender", 25.0), returning),
            calls,
        ),
        Case(
            "flask_floor",
            "(a) Flask app behind the minimal ambient middleware (reference)",
            serve(AmbientFloor(bare), returning),
            calls,
        ),
        Case(
            "flask_returning",
            "(a) Flask app behind CanaryMiddleware, returning visitor, no decision",
            serve(wrapped, returning),
            calls,
        ),
        Case(
            "flask_first",
            "(a) Flask app behind CanaryMiddleware, new visitor, no decision",
            serve(wrapped, first),
            calls,
        ),
        Case(
            "flask_bare_decide",
            "(b) Flask app, bare, deciding on a hand-rolled context {user_id}",
            serve(bare_deciding, returning),
            calls,
        ),
        Case(
            "flask_decide",
            "(b) Flask app behind CanaryMiddleware + one ambient decision, returning visitor",
            serve(wrapped_deciding, returning),
            calls,
        ),
        Case(
            "flask_decide_first",
            "(b) Flask app behind CanaryMiddleware + one ambient decision, new visitor (Set-Cookie)",
            serve(wrapped_deciding, first),
            calls,
        ),
        Case("raw_bare", "(a) raw WSGI app (list body), bare", serve(raw_app, returning), calls),
        Case(
            "raw_returning",
            "(a) raw WSGI app behind CanaryMiddleware, returning visitor, no decision",
            serve(raw_wrapped, returning),
            calls,
        ),
        Case(
            "raw_bare_decide",
            "(b) raw WSGI app, bare, deciding on a hand-rolled context {user_id}",
            serve(raw_bare_deciding, returning),
            calls,
        ),
        Case(
            "raw_decide",
            "(b) raw WSGI app behind CanaryMiddleware + one ambient decision, returning visitor",
            serve(raw_wrapped_deciding, returning),
            calls,
        ),
        Case(
            "p_info",
            "piece: read the environ (the request's fields; its copy included)",
            piece(lambda e: wrapped._fields(e.copy()), returning),
            calls,
        ),
        Case("p_copy", "piece: environ.copy() alone (inside the row above)", piece(dict.copy, returning), calls),
        Case(
            "p_resolve",
            "piece: the resolver on the request's fields, returning visitor (both stages)",
            piece(lambda f: resolver._resolve(*f), fields),
            calls,
        ),
        Case(
            "p_identity",
            "piece: the first stage alone: WebResolver._identity (user, visitor, overrides)",
            piece(lambda f: resolver._identity(f[2], f[3], f[4], f[5], f[6]), fields),
            calls,
        ),
        Case("p_client_ip", "piece: peer trust and client IP (cached)", piece(resolver.client_ip, infos), calls),
        Case(
            "p_cookies",
            "piece: the cookie lookup (visitor and override cookies)",
            piece(lambda i: _find_cookies(i.headers["cookie"], cookie_keys), infos),
            calls,
        ),
        Case("p_decide", "piece: router.decide(...) on the resolved context", piece(decide, contexts), calls),
        Case("p_contextvars", "piece: copy_context().run(...)", piece(context_run, contexts), calls),
    ]
    namespace = {
        "router": router,
        "wrapped": wrapped,
        "wrapped_deciding": wrapped_deciding,
        "raw_wrapped": raw_wrapped,
        "raw_wrapped_deciding": raw_wrapped_deciding,
        "returning": returning,
        "first": first,
    }
    return namespace, cases


def sanity_check(namespace: dict[str, Any]) -> list[str]:
    """Check that each case exercises the path it claims to; return the problems found."""
    problems: list[str] = []
    for key in ("wrapped", "raw_wrapped", "wrapped_deciding", "raw_wrapped_deciding"):
        middleware: CanaryMiddleware = namespace[key]
        deciding = key.endswith("_deciding")
        for kind, environ, new_visitor in (
            ("returning", namespace["returning"][0], False),
            ("first", namespace["first"][0], True),
        ):
            seen: list[tuple[str, list[tuple[str, str]]]] = []

            def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
                seen.append((status, headers))  # noqa: B023  # used before the loop moves on
                return _write

            env = dict(environ)
            body = middleware(env, start)
            data = b"".join(body)
            getattr(body, "close", lambda: None)()
            status, headers = seen[-1]
            names = [name.lower() for name, _ in headers]
            if status != "200 OK" or data != b"ok":
                problems.append(f"{key}/{kind}: got {status} {data!r}, expected 200 ok")
            wants_cookie = deciding and new_visitor
            if ("set-cookie" in names) != wants_cookie:
                problems.append(f"{key}/{kind}: Set-Cookie {'missing' if wants_cookie else 'unexpected'}")
            if ("vary" in names) != deciding:
                problems.append(f"{key}/{kind}: Vary {'missing' if deciding else 'on a request that decided nothing'}")
            if not deciding:
                continue
            decision = env["canary.decisions"]["recommender"]
            if decision.unit != environ["HTTP_X_USER_ID"]:
                problems.append(f"{key}/{kind}: decided on {decision.unit!r}, not on the user id header")
    return problems


def measure(cases: list[Case], args: argparse.Namespace) -> None:
    """Warm up, then run every case once per round in a shuffled order, ``args.repeats`` rounds."""
    enabled = gc.isenabled()
    if not args.gc:
        gc.disable()
    try:
        benchlib.run_rounds(
            cases,
            lambda case: case.run() / case.calls,
            warmup=args.warmup,
            repeats=args.repeats,
            seed=args.seed,
            quiet=args.quiet,
        )
    finally:
        if enabled:
            gc.enable()


def summarize(cases: list[Case]) -> tuple[list[Row], list[Row], list[Row]]:
    """The measured cases, the overheads (median over the rounds of case − baseline), and the pieces."""
    by_key = {case.key: case for case in cases}

    def overhead(key: str, base: str) -> float:
        pairs = zip(by_key[key].samples_ns, by_key[base].samples_ns, strict=True)
        return statistics.median(a - b for a, b in pairs) / 1000

    def row(case: Case) -> Row:
        q1, median, q3 = benchlib.quartiles(case.samples_ns)
        return Row(case.label, median / 1000, q1 / 1000, q3 / 1000)

    target = statistics.median(by_key["flask_bare"].samples_ns) / 1000 * TARGET_US / REFERENCE_BARE_US
    measured = [row(c) for c in cases if not c.key.startswith("p_")]
    pieces = [row(c) for c in cases if c.key.startswith("p_")]
    overheads = [
        Row("pass-through middleware − bare (Flask)", overhead("flask_pass", "flask_bare")),
        Row("hand-rolled split − bare (Flask)", overhead("flask_split", "flask_bare")),
        Row("(a) reference: minimal ambient middleware − bare (Flask)", overhead("flask_floor", "flask_bare")),
        Row(
            "**(a) CanaryMiddleware − bare (Flask), returning visitor, no decision**",
            overhead("flask_returning", "flask_bare"),
            target_us=target,
        ),
        Row("(a) CanaryMiddleware − bare (Flask), new visitor, no decision", overhead("flask_first", "flask_bare")),
        Row(
            "(b) CanaryMiddleware + decision − bare deciding (Flask), returning visitor",
            overhead("flask_decide", "flask_bare_decide"),
        ),
        Row(
            "(b) CanaryMiddleware + decision − bare deciding (Flask), new visitor",
            overhead("flask_decide_first", "flask_bare_decide"),
        ),
        Row("(b) the hand-rolled decision itself − bare (Flask)", overhead("flask_bare_decide", "flask_bare")),
        Row("(a) CanaryMiddleware − bare (raw app), no decision", overhead("raw_returning", "raw_bare")),
        Row(
            "(b) CanaryMiddleware + decision − bare deciding (raw app)",
            overhead("raw_decide", "raw_bare_decide"),
        ),
    ]
    return measured, overheads, pieces


def cost_structure(cases: list[Case]) -> str:
    """Where the decision-mode overhead goes, without and with a decision (pieces timed apart: an estimate)."""
    by_key = {case.key: statistics.median(case.samples_ns) / 1000 for case in cases}
    samples = {case.key: case.samples_ns for case in cases}

    def overhead(key: str, base: str) -> float:
        return statistics.median(a - b for a, b in zip(samples[key], samples[base], strict=True)) / 1000

    lazy_raw = overhead("raw_returning", "raw_bare")
    lazy_flask = overhead("flask_returning", "flask_bare")
    floor = overhead("flask_floor", "flask_bare")
    decide_raw = overhead("raw_decide", "raw_bare_decide")
    decide_flask = overhead("flask_decide", "flask_bare_decide")
    info = by_key["p_info"] - by_key["p_copy"]
    resolve = by_key["p_resolve"]
    bare = by_key["flask_bare"]
    target = bare * TARGET_US / REFERENCE_BARE_US
    return (
        f"Target. The bare Flask app takes {bare:.2f} µs per request in this run; the target, {TARGET_US:g} µs where "
        f"it takes {REFERENCE_BARE_US:g} µs, scales with it to {target:.2f} µs "
        f"({TARGET_US / REFERENCE_BARE_US * 100:.1f} %), so that it means the same on a slower or busier machine: "
        "it is the (a) row, the middleware around the same bare app as the pass-through and the hand-rolled split. "
        f"(a) A request that decides nothing: {lazy_flask:.2f} µs over the bare Flask app "
        f"({lazy_flask / bare * 100:.1f} %; {lazy_raw:.2f} µs around the raw app): nothing is read from the environ; "
        "the middleware makes the request object and its lazy decisions, stores them in the environ, runs the app in "
        f"a copied `contextvars` context (≈ {by_key['p_contextvars']:.2f} µs), hands the server a body that iterates "
        "and closes the app's in that context (a primed generator), and passes the app's headers on unchanged; when "
        "the body ends it lets the environ go (a copy without our keys is kept for a late read). The minimal ambient "
        f"middleware, which does only the publishing and the context, costs {floor:.2f} µs "
        f"({floor / bare * 100:.1f} %) on the same request. "
        f"(b) A request that makes one decision: {decide_flask:.2f} µs over a bare Flask app making the same "
        f"decision on a hand-rolled context ({decide_raw:.2f} µs around the raw app). On top of (a), the decision "
        "works out the request's first stage, its identity (the rollout is bucketed by user and visitor, so that is "
        f"all it reads): the identity headers of the environ (≤ {info:.2f} µs, every wanted header timed alone), the "
        f"user, the visitor cookie and the overrides (≈ {by_key['p_identity']:.2f} µs; the whole resolution, both "
        f"stages, ≈ {resolve:.2f} µs, of which the peer address ≈ {by_key['p_client_ip']:.2f} and the cookie lookup "
        f"≈ {by_key['p_cookies']:.2f}), and the `Vary` header; the decision itself (≈ {by_key['p_decide']:.2f} µs "
        "timed alone) is paid by both apps. Behind Flask the same work costs more than around the raw app (between "
        "a Flask request's own work, ours runs with colder caches)."
    )


def environment(args: argparse.Namespace, calls: int) -> dict[str, Any]:
    """Describe where and how the numbers were produced."""
    versions = {
        "canary_router": canary_router.__version__,
        "flask": benchlib.version_of("flask"),
        "werkzeug": benchlib.version_of("werkzeug"),
    }
    return {
        **benchlib.environment(versions),
        "rounds": args.repeats,
        "warmup_rounds": args.warmup,
        "calls": calls,
        "gc": bool(args.gc),
    }


def fmt(value: float | None) -> str:
    """Format microseconds (two decimals)."""
    return benchlib.fmt_us(value, digits=2)


def spread(row: Row) -> str:
    """Format the interquartile range of a row."""
    return benchlib.fmt_range(row.p25_us, row.p75_us, digits=2)


def print_table(tables: tuple[list[Row], list[Row], list[Row]], note: str, env: dict[str, Any]) -> None:
    """Print the results as plain text."""
    measured, overheads, pieces = tables
    print(f"canary_router {env['canary_router']} · Flask {env['flask']} · {benchlib.platform_summary(env)}")
    print(f"{env['rounds']} interleaved rounds × {env['calls']} requests, {env['warmup_rounds']} warm-up rounds")
    width = max(len(r.label) for r in (*measured, *overheads, *pieces))
    for title, rows in (("per request", measured), ("overhead", overheads), ("pieces, per call", pieces)):
        print(f"\n{title:<{width}}  {'median µs':>9}  {'p25–p75 µs':>13}  {'target':>7}  result")
        for r in rows:
            target, flag = benchlib.fmt_target(r.target_us), benchlib.over_flag(r.status)
            print(
                f"{r.label.strip('*'):<{width}}  {fmt(r.median_us):>9}  {spread(r):>13}  {target:>7}  {r.status}{flag}"
            )
    print()
    print(note)


def markdown(tables: tuple[list[Row], list[Row], list[Row]], note: str, env: dict[str, Any]) -> str:
    """Render the results as the Markdown that goes between the markers."""
    measured, overheads, pieces = tables
    lines = ["| Case | Median (µs) | p25–p75 (µs) | Target (µs) | Result |", "|---|---:|---:|---:|---|"]
    for r in (*measured, *overheads, *pieces):
        target, result = benchlib.fmt_target(r.target_us), benchlib.markdown_status(r.status)
        lines.append(benchlib.markdown_row([r.label, fmt(r.median_us), spread(r), target, result]))
    lines += ["", note, ""]
    packages = f"canary_router {env['canary_router']}, Flask {env['flask']}, Werkzeug {env['werkzeug']}"
    lines += benchlib.environment_lines(env, packages)
    lines += [
        f"- Method: in process, no server; {env['rounds']} interleaved rounds after {env['warmup_rounds']} warm-up "
        f"rounds, {env['calls']:,} requests per sample over {N_IDS:,} distinct user ids; CPU time of the benchmark "
        "thread (`time.thread_time_ns`), so time the OS gives to other processes does not count; median of the "
        f"rounds; garbage collector {'enabled' if env['gc'] else 'disabled'} while timing. Every request includes "
        "copying its environ, iterating the body and closing it. An overhead is the median over the rounds of "
        "(case − its bare app in the same round).",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = benchlib.bench_parser(__doc__, repeats=200, warmup=5)
    parser.add_argument("--calls", type=int, default=300, help="requests per sample (default 300)")
    benchlib.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.calls < 1 or args.warmup < 0:
        parser.error("--repeats and --calls must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status reflects errors only, never timings."""
    args = parse_args(argv)
    users, visitors = make_ids(args.seed)
    namespace, cases = build(users, visitors, args.calls)
    if benchlib.report_problems(sanity_check(namespace)):
        return 2
    measure(cases, args)
    tables = summarize(cases)
    note = cost_structure(cases)
    env = environment(args, args.calls)
    print_table(tables, note, env)
    if args.write:
        benchlib.write_section(args.write, SECTION, markdown(tables, note, env), heading=HEADING)
        print(f"wrote the WSGI section of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
