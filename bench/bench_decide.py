"""Micro-benchmark of the decision hot path: ``Router.decide`` and the ``router.canary`` decorator.

Stdlib only (plus the package under test and ``mmh3``, which it depends on). Every case runs over
10,000 precomputed, distinct user ids per pass, so no cache and no repeated key can flatter a number.
The cases are interleaved (shuffled order in every round) so that a noisy neighbour slows all of them
alike, and each is reported as the MEDIAN per-call time over the rounds, after warm-up rounds.

Nothing is subtracted: every per-call time includes the ``for`` loop iteration that drives it (shown
on its own as "empty loop"), and the decorator rows include the ``with router.context(...)`` block
(also shown on its own). The only differences computed are the decorator overheads: decorated call
minus direct call, both measured the same way — once for the routing alone (a router built with
``record=False, telemetry=None``) and once with the defaults (guard recording and the telemetry API on).

Every time is also given as a ratio to the raw ``mmh3.hash(key_bytes, 0, False)`` call on the same
ids, because absolute times on a shared, noisy machine move from run to run while ratios move less.

Usage::

    python bench/bench_decide.py                               # print the table
    python bench/bench_decide.py --write docs/benchmarks.md    # also rewrite the marked section
    python bench/bench_decide.py --json results.json           # also dump the results

The exit status never depends on a timing: a case over its target is reported as "over target".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import timeit
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mmh3

import benchlib
import canary_router

SECTION = "decide"
"""The name in the markers of this script's section of docs/benchmarks.md."""

N_IDS = 10_000
"""Distinct user ids each case cycles through in one pass."""

ALLOW_LIST = [f"vip-{i:04d}" for i in range(100)]
"""The 100 allow-listed user ids of case (c); none of the benchmark's ids is among them."""

CONFIG: dict[str, Any] = {
    "rollouts": {
        "plain": {"steps": [10, 100]},
        "one_rule": {
            "steps": [10, 100],
            "rules": [
                {"when": [{"attribute": "region", "operator": "IN", "values": ["eu-west-1"]}], "percent": 50},
            ],
        },
        "allow_list": {
            "steps": [10, 100],
            "rules": [
                {"when": [{"attribute": "user_id", "operator": "IN", "values": ALLOW_LIST}], "serve": "new"},
            ],
        },
    }
}


@dataclass
class Case:
    """One timed loop: ``stmt`` runs ``N_IDS`` calls; ``setup`` binds its names as locals."""

    key: str
    label: str
    stmt: str
    setup: str
    target_us: float | None = None
    samples_ns: list[float] = field(default_factory=list)
    """Per-call nanoseconds, one entry per round."""


@dataclass
class Result:
    """The summary of one case (or of a derived difference) as printed, written and dumped."""

    key: str
    label: str
    median_us: float
    p25_us: float | None
    p75_us: float | None
    ratio_to_mmh3: float
    target_us: float | None
    status: str


class _NoOp:
    """Stands in for the router in the call-overhead piece."""

    def decide(self, name: str, context: object) -> None:
        """Do nothing, with decide's signature."""


def build(ids: Sequence[str]) -> tuple[dict[str, Any], list[Case]]:
    """Build the router, the inputs and the timed cases (all inputs precomputed outside the timing)."""
    router = canary_router.Router.from_config(CONFIG)

    def old_impl(x: str) -> str:
        """Return ``x``: the old version, trivial so that the routing is what is measured."""
        return x

    def new_impl(x: str) -> str:
        """Return ``x``: the new version, same cost as the old one."""
        return x

    decorated = router.canary("plain", old=old_impl)(new_impl)
    # the routing alone: no guard recording, no telemetry (what the decorator itself costs)
    routing_router = canary_router.Router.from_config(CONFIG, record=False, telemetry=None)
    routing_only = routing_router.canary("plain", old=old_impl)(new_impl)
    namespace: dict[str, Any] = {
        "router": router,
        "IDS": list(ids),
        "PLAIN_CTXS": [canary_router.Context(user_id=uid) for uid in ids],
        # region present but not matching: the rule is evaluated and falls through to the step percent
        "REGION_CTXS": [canary_router.Context(user_id=uid, region="us-east-1") for uid in ids],
        "KEYS": [f"plain:{uid}".encode() for uid in ids],
        "mmh3": mmh3,
        "decorated": decorated,
        "routing_only": routing_only,
        "routing_router": routing_router,
        "direct": new_impl,
        "NOOP": _NoOp(),
        "canary_router": canary_router,
    }
    cases = [
        Case(
            "a_plain",
            "(a) decide: plain 10 % split",
            "for c in ctxs:\n    decide('plain', c)",
            "decide = router.decide; ctxs = PLAIN_CTXS",
            0.7,
        ),
        Case(
            "b_one_rule",
            "(b) decide: 1 rule (region IN, no match)",
            "for c in ctxs:\n    decide('one_rule', c)",
            "decide = router.decide; ctxs = REGION_CTXS",
            1.0,
        ),
        Case(
            "c_allow_list",
            "(c) decide: 100-id allow-list (no match)",
            "for c in ctxs:\n    decide('allow_list', c)",
            "decide = router.decide; ctxs = PLAIN_CTXS",
            1.0,
        ),
        Case(
            "d_decorated",
            "(d) decorated call, in `with router.context(...)`",
            "for uid in ids:\n    with context(user_id=uid):\n        f(uid)",
            "context = router.context; ids = IDS; f = decorated",
        ),
        Case(
            "d_routing",
            "(d) decorated call, routing only (record=False, telemetry=None)",
            "for uid in ids:\n    with context(user_id=uid):\n        f(uid)",
            "context = routing_router.context; ids = IDS; f = routing_only",
        ),
        Case(
            "d_direct",
            "(d) direct call, in `with router.context(...)`",
            "for uid in ids:\n    with context(user_id=uid):\n        f(uid)",
            "context = router.context; ids = IDS; f = direct",
        ),
        Case(
            "d_block",
            "`with router.context(...)` block alone",
            "for uid in ids:\n    with context(user_id=uid):\n        pass",
            "context = router.context; ids = IDS",
        ),
        Case(
            "e_mmh3",
            "(e) mmh3.hash(key_bytes, 0, False)",
            "for k in keys:\n    h(k, 0, False)",
            "h = mmh3.hash; keys = KEYS",
        ),
        Case(
            "loop",
            "empty `for` loop (included in every row)",
            "for c in ctxs:\n    pass",
            "ctxs = PLAIN_CTXS",
        ),
        # Pieces of (a), each timed in isolation over the same ids, for the cost structure (not targets).
        Case(
            "piece_call",
            "piece: a no-op bound-method call, same arguments",
            "for c in ctxs:\n    noop('plain', c)",
            "noop = NOOP.decide; ctxs = PLAIN_CTXS",
        ),
        Case(
            "piece_bucket",
            "piece: v1 bucket inline (key, encode, mmh3, arithmetic)",
            "for u in ids:\n    h = hash_((prefix + u).encode(), 0, False)\n    b = (h % 100) * 100 + (h // 100) % 100",
            "hash_ = mmh3.hash; prefix = 'plain:'; ids = IDS",
        ),
        Case(
            "piece_decision",
            "piece: building a Decision as decide does",
            "for u in ids:\n    new_(Decision, ('old', 'split', 42, u))",
            "new_ = tuple.__new__; Decision = canary_router.Decision; ids = IDS",
        ),
    ]
    return namespace, cases


def sanity_check(namespace: dict[str, Any]) -> list[str]:
    """Check that each case exercises the path it claims to; return the problems found."""
    router = namespace["router"]
    problems: list[str] = []

    def reasons(name: str, ctxs: Sequence[Any]) -> tuple[set[str], float]:
        decisions = [router.decide(name, c) for c in ctxs]
        share = sum(d.variant == "new" for d in decisions) / len(decisions)
        return {str(d.reason) for d in decisions}, share

    for name, ctxs, expected, low, high in (
        ("plain", namespace["PLAIN_CTXS"], {"split"}, 0.08, 0.12),
        ("one_rule", namespace["REGION_CTXS"], {"split"}, 0.08, 0.12),
        ("allow_list", namespace["PLAIN_CTXS"], {"split"}, 0.08, 0.12),
    ):
        seen, share = reasons(name, ctxs)
        if seen != expected:
            problems.append(f"decide({name!r}) gave reasons {sorted(seen)}, expected {sorted(expected)}")
        if not low <= share <= high:
            problems.append(f"decide({name!r}) served 'new' to {share:.1%} of the ids, expected about 10 %")
    matched = router.decide("allow_list", canary_router.Context(user_id=ALLOW_LIST[0]))
    if matched.reason != "rule_match":
        problems.append(f"an allow-listed id got {matched!r}, expected a rule_match")
    with router.context(user_id=namespace["IDS"][0]):
        if namespace["decorated"]("x") != "x":
            problems.append("the decorated function returned a wrong value")
    return problems


def measure(namespace: dict[str, Any], cases: list[Case], args: argparse.Namespace) -> None:
    """Warm up, then run every case once per round in a shuffled order, ``args.repeats`` rounds."""
    setup_prefix = "import gc; gc.enable(); " if args.gc else ""
    timers = {
        case.key: timeit.Timer(case.stmt, setup_prefix + case.setup, timer=time.perf_counter_ns, globals=namespace)
        for case in cases
    }
    calls = args.passes * N_IDS
    benchlib.run_rounds(
        cases,
        lambda case: timers[case.key].timeit(args.passes) / calls,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        quiet=args.quiet,
    )


def summarize(cases: list[Case]) -> list[Result]:
    """Medians, quartiles and ratios; adds the derived decorator-overhead row."""
    by_key = {case.key: case for case in cases}
    base = statistics.median(by_key["e_mmh3"].samples_ns)

    def result(key: str, label: str, samples: list[float], target: float | None) -> Result:
        q1, median, q3 = benchlib.quartiles(samples)
        return Result(key, label, median / 1000, q1 / 1000, q3 / 1000, median / base, target, status(median, target))

    results = [result(c.key, c.label, c.samples_ns, c.target_us) for c in cases]
    direct = statistics.median(by_key["d_direct"].samples_ns)
    overhead = statistics.median(by_key["d_decorated"].samples_ns) - direct
    routing = statistics.median(by_key["d_routing"].samples_ns) - direct
    at = next(i for i, r in enumerate(results) if r.key == "d_direct") + 1
    results[at:at] = [
        Result(
            "d_overhead_routing",
            "(d) decorator overhead, routing only = routing-only − direct",
            routing / 1000,
            None,
            None,
            routing / base,
            1.5,
            status(routing, 1.5),
        ),
        Result(
            "d_overhead",
            "(d) decorator overhead, defaults (guard recording + telemetry API) = decorated − direct",
            overhead / 1000,
            None,
            None,
            overhead / base,
            None,
            status(overhead, None),
        ),
    ]
    return results


def status(median_ns: float, target_us: float | None) -> str:
    """Return "pass", "over target", or "—" when the row has no target."""
    return benchlib.verdict(median_ns, None if target_us is None else target_us * 1000)


def spread(r: Result) -> str:
    """Format the interquartile range of a row."""
    return benchlib.fmt_range(r.p25_us, r.p75_us)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Describe where and how the numbers were produced."""
    return {
        **benchlib.environment({"canary_router": canary_router.__version__, "mmh3": benchlib.version_of("mmh3")}),
        "nox_session": os.environ.get("NOX_CURRENT_SESSION"),
        "rounds": args.repeats,
        "warmup_rounds": args.warmup,
        "calls_per_sample": args.passes * N_IDS,
        "distinct_ids": N_IDS,
        "gc_enabled_while_timing": bool(args.gc),
    }


def target_note(env: dict[str, Any]) -> str | None:
    """Say so when the interpreter is not the one the targets are defined for."""
    if env["implementation"] != "CPython" or not env["python"].startswith("3.11."):
        return f"Targets are defined for CPython 3.11; this run used {env['implementation']} {env['python']}."
    return None


def cost_structure(results: list[Result]) -> str:
    """Describe how (a) splits into the separately timed pieces (an estimate, stated as one)."""
    by_key = {r.key: r for r in results}
    total = by_key["a_plain"].median_us
    call, bucket_, decision = (by_key[k].median_us for k in ("piece_call", "piece_bucket", "piece_decision"))
    rest = total - call - bucket_ - decision
    return (
        f"Cost structure of (a), {total:.3f} µs: method call ≈ {call:.3f}, v1 bucket ≈ {bucket_:.3f}, "
        f"Decision allocation ≈ {decision:.3f}, rest (lookups and checks inside decide) ≈ {rest:.3f} µs. "
        "Estimate: the pieces are timed separately, each with its own loop iteration."
    )


def print_table(results: list[Result], env: dict[str, Any]) -> None:
    """Print the results as a plain-text table."""
    width = max(len(r.label) for r in results)
    head = f"{'case':<{width}}  {'median µs':>9}  {'p25–p75 µs':>13}  {'× mmh3':>7}  {'target µs':>9}  result"
    print(f"canary_router {env['canary_router']} · {benchlib.platform_summary(env)} · mmh3 {env['mmh3']}")
    print(
        f"{env['rounds']} rounds × {env['calls_per_sample']} calls over {env['distinct_ids']} distinct ids, "
        f"{env['warmup_rounds']} warm-up rounds, gc {'on' if env['gc_enabled_while_timing'] else 'off'} while timing"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.label:<{width}}  {benchlib.fmt_us(r.median_us):>9}  {spread(r):>13}  {r.ratio_to_mmh3:>7.2f}  "
            f"{benchlib.fmt_target(r.target_us):>9}  {r.status}{benchlib.over_flag(r.status)}"
        )
    print()
    print(cost_structure(results))
    over = [r.label for r in results if r.status == "over target"]
    if over:
        print(f"\nOVER TARGET: {', '.join(over)} (reported, not asserted; the exit status ignores timings)")
    else:
        print("\nall targets met")
    note = target_note(env)
    if note:
        print(note)


def markdown(results: list[Result], env: dict[str, Any]) -> str:
    """Render the results as the Markdown that goes between the markers."""
    lines = [
        "| Case | Median per call (µs) | p25–p75 (µs) | × mmh3 | Target (µs) | Result |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        cells = [benchlib.markdown_escape(r.label), benchlib.fmt_us(r.median_us), spread(r), f"{r.ratio_to_mmh3:.2f}"]
        cells += [benchlib.fmt_target(r.target_us), benchlib.markdown_status(r.status)]
        lines.append(benchlib.markdown_row(cells))
    lines += ["", cost_structure(results), ""]
    via = f" (run by `nox -s {env['nox_session']}`)" if env["nox_session"] else ""
    packages = f"canary_router {env['canary_router']}, mmh3 {env['mmh3']}"
    lines += benchlib.environment_lines(env, packages, via)
    lines += [
        f"- Method: {env['rounds']} interleaved rounds after {env['warmup_rounds']} warm-up rounds; each sample is "
        f"{env['calls_per_sample']:,} calls over {env['distinct_ids']:,} distinct user ids; median of the rounds; "
        f"garbage collector {'enabled' if env['gc_enabled_while_timing'] else 'disabled (timeit default)'} "
        "while timing. Nothing is subtracted, except in the two overhead rows (decorated − direct) and in the "
        "cost-structure estimate above.",
    ]
    note = target_note(env)
    if note:
        lines.append(f"- Note: {note}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = benchlib.bench_parser(__doc__, repeats=31, warmup=3, per_case=True, json_option=True)
    parser.add_argument("--passes", type=int, default=3, help=f"passes over the {N_IDS} ids per sample (default 3)")
    benchlib.add_common_options(parser)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.passes < 1 or args.warmup < 0:
        parser.error("--repeats and --passes must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status reflects errors only, never timings."""
    args = parse_args(argv)
    namespace, cases = build(benchlib.shuffled_user_ids(args.seed, N_IDS))
    if benchlib.report_problems(sanity_check(namespace)):
        print("the cases do not exercise the paths they claim to; not timing them", file=sys.stderr)
        return 2
    measure(namespace, cases, args)
    results = summarize(cases)
    env = environment(args)
    print_table(results, env)
    if args.write:
        benchlib.write_section(args.write, SECTION, markdown(results, env))
        print(f"wrote the results section of {args.write}")
    if args.json:
        benchlib.write_json(args.json, {"environment": env, "results": [asdict(r) for r in results]})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
