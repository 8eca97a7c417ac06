"""The web middleware's cost per request in CPU instructions, counted by Valgrind's callgrind.

The timing benchmarks (``bench_asgi.py``, ``bench_wsgi.py``) measure time on a shared machine, where a busy
neighbour moves a Flask request by tens of microseconds between rounds. An instruction count does not depend
on the machine's load: it is the same on a quiet and on a busy machine, and from one run to the next. It
does follow where objects land in memory (context-variable and dict layouts follow addresses), so a change in
unrelated code can move a case by up to about 1,500 instructions per request.

Each count is one child process run under ``valgrind --tool=callgrind``: it builds the apps and requests of
``bench_asgi.py`` or ``bench_wsgi.py`` (the same cases, the same 10,000 user ids), runs one batch of every
case as a warm-up, then runs ``--batches`` batches of one case. One more child runs the warm-up only; the
difference, divided by the requests of the measured batches, is the case's instructions per request, start-up
and warm-up excluded. The garbage collector stays on, as in production (a request that leaves a reference
cycle pays for its collection), with the set-up's objects frozen so that its cost follows from what the
requests allocate. A middleware's overhead is its case minus the bare app's; the targets are the
timing targets as shares of the bare app: 3 µs where a bare Starlette request takes 9 µs (33 %), and where a
bare Flask request takes 39 µs (7.7 %). Instructions are not time (a cache miss costs more than an addition),
so this is a second measure, next to the timed one, not a replacement.

Usage::

    python bench/bench_web_instructions.py                               # print the table
    python bench/bench_web_instructions.py --write docs/benchmarks.md    # also rewrite the marked section

Needs ``valgrind`` on PATH (Debian: ``apt-get install valgrind``). Takes several minutes: a request runs
about fifty times slower under callgrind. The exit status never depends on a count.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib

SECTION = "instructions"
"""The name in the markers of this script's section of docs/benchmarks.md."""
HEADING = "## Web middleware in instructions"
"""The heading put above the markers when the file has none."""

BATCH = 200
"""Requests per batch."""
ASGI_SHARE = 3.0 / 9.0
"""The ASGI target as a share of the bare Starlette request: 3 µs where it takes 9 µs."""
WSGI_SHARE = 3.0 / 39.0
"""The WSGI target as a share of the bare Flask request: 3 µs where it takes 39 µs."""


@dataclass(frozen=True)
class Spec:
    """One counted case: which script builds it, its key there, its label, and what it is compared with."""

    module: str
    key: str
    label: str
    base: str
    share: float | None = None
    """The target, as a share of the bare app's instructions (``None``: no target)."""


SPECS = [
    Spec("asgi", "bare", "(a) bare Starlette app", "bare"),
    Spec("asgi", "pass", "(a) pass-through pure ASGI middleware", "bare"),
    Spec("asgi", "mmh3", "(a) hand-rolled split: user id header, one mmh3 hash", "bare"),
    Spec("asgi", "canary", "(a) CanaryMiddleware, decision mode, returning visitor", "bare", ASGI_SHARE),
    Spec("asgi", "canary_new", "(a) CanaryMiddleware, decision mode, new visitor", "bare"),
    Spec("asgi", "bare_decide", "(b) bare app deciding on a hand-rolled context", "bare"),
    Spec("asgi", "canary_decide", "(b) CanaryMiddleware + one ambient decision, returning visitor", "bare_decide"),
    Spec("asgi", "floor", "(b) reference: the minimal hand-written middleware, the same decision", "bare_decide"),
    Spec("wsgi", "flask_bare", "(a) bare Flask app", "flask_bare"),
    Spec("wsgi", "flask_pass", "(a) pass-through WSGI middleware", "flask_bare"),
    Spec("wsgi", "flask_split", "(a) hand-rolled split: user id header, one mmh3 hash", "flask_bare"),
    Spec("wsgi", "flask_floor", "(a) reference: the minimal ambient middleware", "flask_bare"),
    Spec("wsgi", "flask_returning", "(a) CanaryMiddleware, returning visitor", "flask_bare", WSGI_SHARE),
    Spec("wsgi", "flask_first", "(a) CanaryMiddleware, new visitor", "flask_bare"),
    Spec("wsgi", "flask_bare_decide", "(b) bare app deciding on a hand-rolled context", "flask_bare"),
    Spec("wsgi", "flask_decide", "(b) CanaryMiddleware + one ambient decision, returning visitor", "flask_bare_decide"),
]


# --- the child: run under callgrind -----------------------------------------------------------------


def settle() -> None:
    """Collect, then freeze what the set-up and warm-up left (``gc.freeze``).

    The garbage collector stays on for the measured requests, but its full collections no longer walk the
    benchmark's own objects (10,000 prepared requests): what it costs then follows from what the requests
    allocate, not from where in the run a collection happens to fall.
    """
    gc.collect()
    gc.freeze()


def child(module: str, key: str, batches: int) -> None:
    """Build every case of ``module``, warm each up with one batch, then run ``batches`` batches of ``key``."""
    if module == "asgi":
        import bench_asgi

        _, _, cases = bench_asgi.build(bench_asgi.make_ids(20240601))

        async def drive() -> None:
            by_key = {case.key: case for case in cases}
            for case in cases:
                if case.key != "base_http":  # not counted: a hundred times the others under callgrind
                    await bench_asgi._drive(case, 0, BATCH)
            settle()
            for number in range(batches):
                await bench_asgi._drive(by_key[key], (number + 1) * BATCH, BATCH)

        asyncio.run(drive())
    else:
        import bench_wsgi

        users, visitors = bench_wsgi.make_ids(20240601)
        _, wsgi_cases = bench_wsgi.build(users, visitors, BATCH)
        runs = {case.key: case.run for case in wsgi_cases if not case.key.startswith("p_")}
        for run in runs.values():
            run()
        settle()
        for _ in range(batches):
            runs[key]()


# --- the parent ---------------------------------------------------------------------------------------


def count(module: str, key: str, batches: int) -> int:
    """The instructions callgrind collects for one child process."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        module,
        key,
        str(batches),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)  # noqa: S603
    found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"callgrind failed for {module}/{key}:\n{done.stderr[-2000:]}")
    return int(found.group(1))


@dataclass
class Row:
    """One counted case."""

    spec: Spec
    per_request: float
    overhead: float | None
    share: float | None
    target: float | None

    @property
    def status(self) -> str:
        """Return "pass", "over target", or "—" without a target."""
        return benchlib.verdict(self.share, self.target)


def measure(batches: int, jobs: int, quiet: bool, only: set[str] | None = None) -> list[Row]:
    """Count the cases (and one warm-up-only baseline per script), ``jobs`` children at a time.

    ``only``: the keys of the cases to count (their bases are counted too); default all.
    """
    bare_keys = {"asgi": "bare", "wsgi": "flask_bare"}
    wanted = {spec.key for spec in SPECS} if only is None else set(only)
    chosen = [spec for spec in SPECS if spec.key in wanted]
    needed = wanted | {spec.base for spec in chosen} | {bare_keys[spec.module] for spec in chosen}
    specs = [spec for spec in SPECS if spec.key in needed]
    modules = sorted({spec.module for spec in specs})
    work = [(module, bare_keys[module], 0) for module in modules]
    work += [(spec.module, spec.key, batches) for spec in specs]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        counts = dict(zip(work, pool.map(lambda item: count(*item), work), strict=True))
    if not quiet:
        print(f"counted {len(work)} processes", file=sys.stderr)
    baseline = {item[0]: counts[item] for item in counts if item[2] == 0}
    per_request = {
        spec.key: (counts[(spec.module, spec.key, batches)] - baseline[spec.module]) / (batches * BATCH)
        for spec in specs
    }
    bare = {module: per_request[key] for module, key in bare_keys.items() if key in per_request}
    rows = []
    for spec in specs:
        value = per_request[spec.key]
        overhead = None if spec.key == spec.base else value - per_request[spec.base]
        share = None if overhead is None else overhead / bare[spec.module]
        rows.append(Row(spec, value, overhead, share, spec.share))
    return rows


def fmt_count(value: float | None) -> str:
    """Format an instruction count with thousands separators ("—" for none)."""
    return benchlib.DASH if value is None else f"{value:,.0f}"


def fmt_share(value: float | None) -> str:
    """Format a share of the bare app as a percentage ("—" for none)."""
    return benchlib.DASH if value is None else f"{value * 100:.2f} %"


def table(rows: list[Row]) -> list[str]:
    """The Markdown table."""
    lines = [
        "| Server | Case | Instructions per request | Overhead over its base | Share of the bare app "
        "| Target | Result |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        target = benchlib.DASH if row.target is None else f"≤ {row.target * 100:.1f} %"
        cells = [
            row.spec.module.upper(),
            row.spec.label,
            fmt_count(row.per_request),
            fmt_count(row.overhead),
            fmt_share(row.share),
            target,
            benchlib.markdown_status(row.status),
        ]
        lines.append(benchlib.markdown_row(cells))
    return lines


def markdown(rows: list[Row], env: dict[str, Any]) -> str:
    """The Markdown that goes between the markers."""
    lines = [
        "`bench/bench_web_instructions.py` counts the CPU instructions of a request with Valgrind's callgrind, "
        "in the cases of the two timing scripts above (the same apps, requests and user ids). A count does not "
        "depend on the machine's load, so it separates differences that the timed rows cannot on a busy machine; "
        "it does follow where objects land in memory, so a change in unrelated code can move a case by up to "
        "about 1,500 instructions per request. "
        f"Each case is {env['batches'] * BATCH:,} requests after a warm-up, start-up and warm-up subtracted; the "
        "garbage collector is on. The (b) overheads are over the bare app deciding on a hand-rolled context; the "
        "share is the overhead as a share of the bare app's request (the plain one, in every row). Targets: "
        f"{ASGI_SHARE * 100:.0f} % (ASGI: 3 µs of 9) and {WSGI_SHARE * 100:.1f} % (WSGI: 3 µs of 39).",
        "",
        *table(rows),
        "",
    ]
    versions = (
        f"canary_router {env['canary_router']}, Starlette {env['starlette']}, Flask {env['flask']}, "
        f"valgrind {env['valgrind']}"
    )
    lines += benchlib.environment_lines(env, versions)
    return "\n".join(lines)


def print_table(rows: list[Row]) -> None:
    """Print the results as plain text."""
    width = max(len(r.spec.label) for r in rows)
    print(f"{'':4}  {'case':<{width}}  {'instr/request':>13}  {'overhead':>9}  {'share':>8}  {'target':>8}  result")
    for r in rows:
        target = benchlib.DASH if r.target is None else f"≤ {r.target * 100:.1f} %"
        print(
            f"{r.spec.module:4}  {r.spec.label:<{width}}  {fmt_count(r.per_request):>13}  {fmt_count(r.overhead):>9}  "
            f"{fmt_share(r.share):>8}  {target:>8}  {r.status}{benchlib.over_flag(r.status)}"
        )


def valgrind_version() -> str:
    """The version Valgrind reports ("valgrind-3.19.0" becomes "3.19.0")."""
    done = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False)  # noqa: S607
    return done.stdout.strip().removeprefix("valgrind-")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    benchlib.add_write_option(parser)
    parser.add_argument("--batches", type=int, default=3, help=f"measured batches of {BATCH} requests (default 3)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="children at a time (default: CPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--cases", help="comma-separated case keys to count (with their bases; default all)")
    parser.add_argument("--child", nargs=3, metavar=("MODULE", "CASE", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batches < 1 or args.jobs < 1:
        parser.error("--batches and --jobs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Count every case; the exit status reflects errors only, never counts."""
    args = parse_args(argv)
    if args.child:
        module, key, batches = args.child
        child(module, key, int(batches))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not on PATH (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    only = set(args.cases.split(",")) if args.cases else None
    unknown = (only or set()) - {spec.key for spec in SPECS}
    if unknown:
        print(f"unknown cases: {', '.join(sorted(unknown))}; known: {', '.join(s.key for s in SPECS)}", file=sys.stderr)
        return 2
    if args.write and only is not None:
        print("--write needs every case (no --cases)", file=sys.stderr)
        return 2
    rows = measure(args.batches, args.jobs, args.quiet, only)
    print_table(rows)
    if args.write:
        versions = {
            "canary_router": benchlib.version_of("canary_router"),
            "starlette": benchlib.version_of("starlette"),
            "flask": benchlib.version_of("flask"),
            "valgrind": valgrind_version(),
        }
        env = {**benchlib.environment(versions), "batches": args.batches}
        benchlib.write_section(Path(args.write), SECTION, markdown(rows, env), heading=HEADING)
        print(f"wrote the instructions section of {args.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
