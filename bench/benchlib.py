"""Helpers shared by the benchmark scripts in ``bench/`` (standard library only).

``bench/`` is not a package: a script run as ``python bench/<script>.py`` has its own directory on
``sys.path``, so it imports this module as ``import benchlib``.

What lives here is what every script does the same way: the command-line options they share, the
interleaved timing rounds and their progress line, quartiles, the formatting of times, targets and
results, the description of the environment a run happened in, and the rewriting of a script's section
of a Markdown file between its ``<!-- bench:NAME:start -->`` / ``<!-- bench:NAME:end -->`` markers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

OVER_TARGET = "over target"
"""The status of a row whose value is above its target."""

DASH = "—"
"""What a cell shows when it has no value."""


# --- the Markdown section ---------------------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    """Return the start and end markers of the section ``name`` (``bench:NAME:start`` / ``bench:NAME:end``)."""
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def write_section(path: Path, name: str, body: str, *, heading: str | None = None) -> None:
    """Replace the text between the markers of section ``name`` in ``path`` with ``body`` (markers kept).

    When neither marker is in the file (or the file does not exist) and a ``heading`` is given, the
    heading (with any text that follows it) and the two markers are appended first; without a heading
    the markers must already be there. A file with only one of the markers, or with them in the wrong
    order, is left alone and the script stops with a message.
    """
    start_marker, end_marker = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 and end < 0 and heading is not None:
        text = f"{text.rstrip()}\n\n{heading.rstrip()}\n\n{start_marker}\n{end_marker}\n".lstrip()
        start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < 0 or end < start:
        raise SystemExit(f"{path}: needs the markers {start_marker} and {end_marker}, in that order")
    path.write_text(f"{text[: start + len(start_marker)]}\n{body}\n{text[end:]}", encoding="utf-8")


def markdown_row(cells: Iterable[str]) -> str:
    """Return one row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def markdown_escape(text: str) -> str:
    """Escape the pipes of ``text``, so that it fits in a Markdown table cell."""
    return text.replace("|", "\\|")


def write_json(path: Path, payload: Any) -> None:
    """Dump ``payload`` to ``path`` as indented UTF-8 JSON, with a final newline."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- the environment --------------------------------------------------------------------------------


def version_of(distribution: str, missing: str = "unknown") -> str:
    """Return the installed version of ``distribution``, or ``missing``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return missing


def environment(versions: Mapping[str, str]) -> dict[str, Any]:
    """Describe the interpreter, the machine, the package ``versions``, the date and the command line.

    The keys, in order: ``python``, ``implementation``, ``platform``, ``machine``, ``cpus``, then one
    per entry of ``versions`` (e.g. ``{"canary_router": canary_router.__version__, "mmh3": ...}``), then
    ``date`` and ``command``. A script adds its own settings (rounds, …) after these.
    """
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **versions,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def platform_summary(env: Mapping[str, Any]) -> str:
    """Return "CPython 3.11.7 · Linux-… · 2 CPUs" for the plain-text header of a table."""
    return f"{env['implementation']} {env['python']} · {env['platform']} · {env['cpus']} CPUs"


def environment_lines(env: Mapping[str, Any], packages: str, command_note: str = "") -> list[str]:
    """Return the "Python", "Date" and "Command" bullets of a Markdown section.

    ``packages`` follows the CPU count (e.g. "canary_router 0.1.0, mmh3 5.3.1"); ``command_note``
    follows the command (e.g. " (run by `nox -s bench`)").
    """
    return [
        f"- Python: {env['implementation']} {env['python']} on {env['platform']} ({env['machine']}, "
        f"{env['cpus']} CPUs); {packages}",
        f"- Date: {env['date']}",
        f"- Command: `{env['command']}`{command_note}",
    ]


# --- statistics and formatting ----------------------------------------------------------------------


def quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """Return the first quartile, the median and the third quartile (all the median for one sample)."""
    median = statistics.median(samples)
    if len(samples) < 2:
        return median, median, median
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return q1, median, q3


def verdict(value: float | None, target: float | None) -> str:
    """Return "pass" or "over target" for ``value`` against ``target`` (same unit), or "—" without both."""
    if value is None or target is None:
        return DASH
    return "pass" if value <= target else OVER_TARGET


def fmt_us(value: float | None, digits: int = 3) -> str:
    """Format a number of microseconds with ``digits`` decimals, or "—"."""
    return DASH if value is None else f"{value:.{digits}f}"


def fmt_range(low: float | None, high: float | None, digits: int = 3) -> str:
    """Format an interquartile range as "low–high", or "—" when a bound is missing."""
    return DASH if low is None or high is None else f"{low:.{digits}f}–{high:.{digits}f}"


def fmt_target(target: float | None, suffix: str = "") -> str:
    """Format a target as "≤ 1.5" (at most two decimals, plus ``suffix``), or "—"."""
    return DASH if target is None else f"≤ {round(target, 2):g}{suffix}"


def markdown_status(status: str) -> str:
    """Return the Result cell of a Markdown table: an over-target status in bold."""
    return f"**{status}**" if status == OVER_TARGET else status


def over_flag(status: str) -> str:
    """Return the flag that ends a plain-text row over its target (empty otherwise)."""
    return "  <-- OVER TARGET" if status == OVER_TARGET else ""


# --- ids, rounds and progress -----------------------------------------------------------------------


def distinct_user_ids(rng: random.Random, count: int) -> set[str]:
    """Return ``count`` distinct, realistic-looking user ids ("user-" and up to 12 hex digits)."""
    ids: set[str] = set()
    while len(ids) < count:
        ids.add(f"user-{rng.getrandbits(48):x}")
    return ids


def shuffled_user_ids(seed: int, count: int) -> list[str]:
    """Return ``count`` distinct user ids, sorted and then shuffled by a generator seeded with ``seed``."""
    rng = random.Random(seed)
    out = sorted(distinct_user_ids(rng, count))
    rng.shuffle(out)
    return out


def progress(done: int, total: int, label: str = "") -> None:
    """Show "round done/total" (after ``label:``) on stderr, overwriting the previous progress line."""
    prefix = f"{label}: " if label else ""
    print(f"\r  {prefix}round {done}/{total}", end="", file=sys.stderr, flush=True)


def end_progress() -> None:
    """End the progress line on stderr."""
    print(file=sys.stderr)


class Sampled(Protocol):
    """A timed case: it collects one sample per round."""

    samples_ns: list[float]


SampledT = TypeVar("SampledT", bound=Sampled)


def run_rounds(
    cases: Sequence[SampledT],
    sample: Callable[[SampledT], float],
    *,
    warmup: int,
    repeats: int,
    seed: int,
    quiet: bool,
    label: str = "",
) -> None:
    """Warm up, then run every case once per round in a shuffled order, ``repeats`` rounds.

    ``warmup`` untimed rounds run the cases in their given order; each timed round shuffles them (the
    generator is seeded with ``seed``) and appends ``sample(case)`` to ``case.samples_ns``, so that a
    noisy neighbour slows every case alike. Progress goes to stderr unless ``quiet``.
    """
    order = list(cases)
    rng = random.Random(seed)
    for _ in range(warmup):
        for case in order:
            sample(case)
    for round_no in range(repeats):
        rng.shuffle(order)
        for case in order:
            case.samples_ns.append(sample(case))
        if not quiet:
            progress(round_no + 1, repeats, label)
    if not quiet:
        end_progress()


def report_problems(problems: Sequence[str]) -> bool:
    """Print each failed sanity check on stderr; return whether there was any."""
    for problem in problems:
        print(f"sanity check failed: {problem}", file=sys.stderr)
    return bool(problems)


# --- the command line -------------------------------------------------------------------------------


def add_write_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--write MARKDOWN``: the file whose marked section the script rewrites."""
    parser.add_argument("--write", type=Path, metavar="MARKDOWN", help="rewrite the marked section of this file")


def bench_parser(
    doc: str | None, *, repeats: int, warmup: int, per_case: bool = False, json_option: bool = False
) -> argparse.ArgumentParser:
    """Return a parser with the options every timing script starts with.

    The description is the first paragraph of ``doc``; the options are ``--write``, ``--json`` (when
    ``json_option``), ``--repeats`` (timed rounds, "per case" when ``per_case``) and ``--warmup``, with
    the given defaults. A script adds its own options, then :func:`add_common_options`.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    add_write_option(parser)
    if json_option:
        parser.add_argument("--json", type=Path, metavar="PATH", help="dump the results as JSON")
    rounds = "timed rounds per case" if per_case else "timed rounds"
    parser.add_argument("--repeats", type=int, default=repeats, help=f"{rounds} (default {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed warm-up rounds (default {warmup})")
    return parser


def add_common_options(parser: argparse.ArgumentParser, *, gc_option: bool = True) -> None:
    """Add ``--gc`` (when ``gc_option``), ``--seed`` and ``--quiet``."""
    if gc_option:
        parser.add_argument("--gc", action="store_true", help="keep the garbage collector enabled while timing")
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the ids and of the round order")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
