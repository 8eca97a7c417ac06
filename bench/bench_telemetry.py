"""Micro-benchmark of the OpenTelemetry cost on the hot path: ``decide`` and the decorator, with and without an SDK.

Two processes, one run:

* a child process that never configures OpenTelemetry (the global providers stay unset, as in an
  application without an SDK) times ``decide`` and a decorated call with ``telemetry=None`` and with
  the default telemetry: the difference is what the instrumentation costs when nobody listens;
* this process then installs the SDK (``TracerProvider`` with an in-memory exporter behind a
  ``SimpleSpanProcessor``, ``MeterProvider`` with an ``InMemoryMetricReader``) as the global providers
  and times the same calls with ``telemetry=None`` and with the default telemetry, outside and inside
  a recording span, plus the SDK primitives the instrumentation is built from, for reference.

Each process interleaves its cases (shuffled order every round) after warm-up rounds and reports the
median per-call time; every row is also given as a ratio to, and a difference from, the bare
``decide`` (``telemetry=None``) measured in the same process and the same rounds. Every case cycles
through 10,000 distinct user ids.

Usage::

    python bench/bench_telemetry.py                               # print the table
    python bench/bench_telemetry.py --write docs/benchmarks.md    # also rewrite the marked section

The exit status never depends on a timing: a case over its target is reported as "over target".
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

import benchlib
import canary_router
from canary_router import telemetry

SECTION = "telemetry"
"""The name in the markers of this script's section of docs/benchmarks.md."""

SECTION_INTRO = """## Telemetry

`bench/bench_telemetry.py` measures what the OpenTelemetry instrumentation (`canary_router.telemetry`)
adds to `decide()` and to a decorated call, in one run: a child process that never configures
OpenTelemetry (the default `Router` telemetry on unset global providers), and the parent process with
the SDK installed as the global providers (`TracerProvider` with an in-memory exporter behind a
`SimpleSpanProcessor`, `MeterProvider` with an `InMemoryMetricReader`). Each row is compared with the
bare `decide()` (`telemetry=None`) measured in the same process and rounds. Targets: without an SDK,
the default telemetry adds at most 0.2 µs to a decision; with the SDK, inside a recording span, at
most 5 µs.

The section below is written by the script; do not edit it by hand.
"""

N_IDS = 10_000
"""Distinct user ids each case cycles through in one pass."""

CONFIG: dict[str, Any] = {"rollouts": {"plain": {"steps": [10, 100]}}}

NO_SDK_TARGET_US = 0.2
"""Default telemetry, no SDK: at most this much above the bare decision."""
SDK_TARGET_US = 5.0
"""Default telemetry, SDK installed, inside a recording span: at most this much above the bare decision."""


@dataclass
class Case:
    """One timed loop: ``stmt`` runs ``N_IDS`` calls; ``setup`` binds its names as locals."""

    key: str
    label: str
    stmt: str
    setup: str
    baseline: str | None = None
    """Key of the case this one is compared with (the difference is reported), if any."""
    target_us: float | None = None
    """Target for the difference from ``baseline``."""
    samples_ns: list[float] = field(default_factory=list)


def _impl(x: str) -> str:
    """Return ``x``: both versions are trivial so that the routing is what is measured."""
    return x


def routers_namespace(ids: Sequence[str]) -> dict[str, Any]:
    """The two routers (no telemetry, default telemetry), their decorated functions and the inputs."""
    bare = canary_router.Router.from_config(CONFIG, telemetry=None)
    default = canary_router.Router.from_config(CONFIG)

    def old_impl(x: str) -> str:
        """Old version."""
        return x

    return {
        "bare": bare,
        "default": default,
        "bare_f": bare.canary("plain", old=old_impl)(_impl),
        "default_f": default.canary("plain", old=old_impl)(_impl),
        "IDS": list(ids),
        "CTXS": [canary_router.Context(user_id=uid) for uid in ids],
        "trace": trace,
    }


def no_sdk_cases() -> list[Case]:
    """The cases of the child process: global providers never set."""
    return [
        Case("decide_bare", "decide, telemetry=None", "for c in ctxs:\n    decide('plain', c)", _d("bare")),
        Case(
            "decide_default",
            "decide, default telemetry, no SDK",
            "for c in ctxs:\n    decide('plain', c)",
            _d("default"),
            "decide_bare",
            NO_SDK_TARGET_US,
        ),
        Case("call_bare", "decorated call, telemetry=None", _CALL, _c("bare")),
        Case("call_default", "decorated call, default telemetry, no SDK", _CALL, _c("default"), "call_bare"),
        # How to decide whether to start a routed-call span, without an SDK (the decorator uses the third):
        Case(
            "ref_is_recording",
            "reference: trace.get_current_span().is_recording()",
            "for c in ctxs:\n    current().is_recording()",
            "current = trace.get_current_span; ctxs = CTXS",
        ),
        Case(
            "ref_noop_span",
            "reference: `with tracer.start_as_current_span(...)` on the no-op provider",
            "for c in ctxs:\n    with start('canary_router.invoke plain'):\n        pass",
            "start = trace.get_tracer('bench').start_as_current_span; ctxs = CTXS",
        ),
        Case(
            "ref_gate",
            "reference: Telemetry._span_start when no provider is set (returns None)",
            "for c in ctxs:\n    span_start('plain', 'old')",
            "span_start = default.telemetry._span_start; ctxs = CTXS",
        ),
    ]


_CALL = "for uid in ids:\n    with context(user_id=uid):\n        f(uid)"


def _d(router: str) -> str:
    return f"decide = {router}.decide; ctxs = CTXS"


def _c(router: str) -> str:
    return f"context = {router}.context; f = {router}_f; ids = IDS"


_IN_SPAN = "with use_span(outer):\n"


def sdk_cases() -> list[Case]:
    """The cases of this process, once the SDK is the global provider."""
    span_setup = "; outer = tracer.start_span('request'); exporter.clear()"
    return [
        Case("decide_bare", "decide, telemetry=None", "for c in ctxs:\n    decide('plain', c)", _d("bare")),
        Case(
            "decide_sdk",
            "decide, SDK, no current span (metrics only)",
            "for c in ctxs:\n    decide('plain', c)",
            _d("default"),
            "decide_bare",
        ),
        Case(
            "decide_sdk_span",
            "decide, SDK, inside a recording span (event + metrics)",
            _IN_SPAN + "    for c in ctxs:\n        decide('plain', c)",
            _d("default") + span_setup,
            "decide_bare",
            SDK_TARGET_US,
        ),
        Case(
            "call_bare",
            "decorated call, telemetry=None, inside a recording span",
            _IN_SPAN + "    for uid in ids:\n        with context(user_id=uid):\n            f(uid)",
            _c("bare") + span_setup,
        ),
        Case(
            "call_sdk_span",
            "decorated call, SDK, inside a recording span (child span + event + metrics)",
            _IN_SPAN + "    for uid in ids:\n        with context(user_id=uid):\n            f(uid)",
            _c("default") + span_setup,
            "call_bare",
        ),
        Case(
            "ref_current_span",
            "reference: trace.get_current_span().is_recording(), in a recording span",
            _IN_SPAN + "    for c in ctxs:\n        current().is_recording()",
            "ctxs = CTXS; current = trace.get_current_span" + span_setup,
        ),
        Case(
            "ref_span_key",
            "reference: the current span read by its context key (what decide does), .is_recording()",
            _IN_SPAN + "    for c in ctxs:\n        get_current().get(SPAN_KEY).is_recording()",
            "ctxs = CTXS; get_current = otel_context.get_current" + span_setup,
        ),
        Case(
            "ref_event",
            "reference: SDK span.add_event (the same 5 attributes)",
            _IN_SPAN + "    for c in ctxs:\n        add_event('feature_flag.evaluation', EVENT_ATTRS)",
            "ctxs = CTXS" + span_setup + "; add_event = outer.add_event",
        ),
        Case(
            "ref_counter",
            "reference: SDK synchronous Counter.add (3 attributes), not used",
            "for c in ctxs:\n    add(1, METRIC_ATTRS)",
            "ctxs = CTXS; add = REF_COUNTER.add",
        ),
        Case(
            "ref_histogram",
            "reference: SDK Histogram.record (2 attributes)",
            "for c in ctxs:\n    record(0.001, DURATION_ATTRS)",
            "ctxs = CTXS; record = REF_HISTOGRAM.record",
        ),
    ]


def install_sdk(namespace: dict[str, Any]) -> None:
    """Make the SDK the global tracer and meter provider, and add its pieces to ``namespace``."""
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    reference = meter_provider.get_meter("bench_reference")
    namespace.update(
        tracer=trace.get_tracer("bench"),
        use_span=trace.use_span,
        otel_context=otel_context,
        SPAN_KEY=telemetry._SPAN_KEY,
        exporter=exporter,
        reader=reader,
        REF_COUNTER=reference.create_counter("bench.reference.decisions", unit="{decision}"),
        REF_HISTOGRAM=reference.create_histogram("bench.reference.duration", unit="s"),
        EVENT_ATTRS={
            "feature_flag.key": "plain",
            "feature_flag.result.variant": "old",
            "feature_flag.result.reason": "split",
            "feature_flag.provider.name": "canary_router",
            "feature_flag.version": "1",
        },
        METRIC_ATTRS={
            "feature_flag.key": "plain",
            "feature_flag.result.variant": "old",
            "feature_flag.result.reason": "split",
        },
        DURATION_ATTRS={"feature_flag.key": "plain", "feature_flag.result.variant": "old"},
    )


def sdk_sanity(namespace: dict[str, Any]) -> list[str]:
    """Check that the SDK cases really record: an event, a child span and the metrics."""
    problems: list[str] = []
    tracer, use_span, exporter, reader = (namespace[k] for k in ("tracer", "use_span", "exporter", "reader"))
    outer = tracer.start_span("sanity")
    with use_span(outer, end_on_exit=True):
        namespace["default"].decide("plain", namespace["CTXS"][0])
        with namespace["default"].context(user_id="someone"):
            namespace["default_f"]("x")
    if not any(e.name == "feature_flag.evaluation" for e in outer.events):
        problems.append("decide inside a recording span added no feature_flag.evaluation event")
    spans = [s for s in exporter.get_finished_spans() if s.name == "canary_router.invoke plain"]
    if not spans or spans[0].parent is None or spans[0].parent.span_id != outer.context.span_id:
        problems.append("the decorated call made no child span of the recording span")
    data = reader.get_metrics_data()
    names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    for name in ("canary_router.decisions", "canary_router.invocation.duration"):
        if name not in names:
            problems.append(f"no {name} metric was recorded")
    exporter.clear()
    return problems


def measure(namespace: dict[str, Any], cases: list[Case], args: argparse.Namespace) -> None:
    """Warm up, then run every case once per round in a shuffled order."""
    timers = {
        case.key: timeit.Timer(case.stmt, case.setup, timer=time.perf_counter_ns, globals=namespace) for case in cases
    }
    benchlib.run_rounds(
        cases,
        lambda case: timers[case.key].timeit(1) / N_IDS,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        quiet=args.quiet,
        label=args.mode,
    )


def summarize(cases: list[Case], process: str) -> list[dict[str, Any]]:
    """Medians, quartiles, ratio to and difference from the bare decision (and from the row's baseline)."""
    medians = {c.key: statistics.median(c.samples_ns) for c in cases}
    bare = medians["decide_bare"]
    rows = []
    for case in cases:
        q1, median, q3 = benchlib.quartiles(case.samples_ns)
        above = None if case.baseline is None else (median - medians[case.baseline]) / 1000
        rows.append(
            {
                "process": process,
                "key": case.key,
                "label": case.label,
                "median_us": median / 1000,
                "p25_us": q1 / 1000,
                "p75_us": q3 / 1000,
                "ratio_to_bare_decide": median / bare,
                "baseline": case.baseline,
                "above_baseline_us": above,
                "target_us": case.target_us,
                "status": benchlib.verdict(above, case.target_us),
            }
        )
    return rows


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Describe where and how the numbers were produced."""
    versions = {
        "canary_router": canary_router.__version__,
        "opentelemetry_api": benchlib.version_of("opentelemetry-api", "not installed"),
        "opentelemetry_sdk": benchlib.version_of("opentelemetry-sdk", "not installed"),
    }
    return {
        **benchlib.environment(versions),
        "rounds": args.repeats,
        "warmup_rounds": args.warmup,
        "calls_per_sample": N_IDS,
    }


def run_child(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the no-SDK cases in a fresh interpreter (its global providers are never set)."""
    command = [
        sys.executable,
        __file__,
        "--mode",
        "no-sdk",
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
    ]
    if args.quiet:
        command.append("--quiet")
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603 - our own script
    if done.returncode != 0:
        raise SystemExit(f"the no-SDK child process failed:\n{done.stderr}")
    if not args.quiet and done.stderr:
        print(done.stderr, end="", file=sys.stderr)
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The printed and written table: one list of cells per row."""
    out = []
    for r in rows:
        out.append(
            [
                "no SDK" if r["process"] == "no-sdk" else "SDK",
                r["label"],
                benchlib.fmt_us(r["median_us"]),
                benchlib.fmt_range(r["p25_us"], r["p75_us"]),
                f"{r['ratio_to_bare_decide']:.2f}",
                benchlib.DASH if r["above_baseline_us"] is None else f"{r['above_baseline_us']:+.3f}",
                benchlib.fmt_target(r["target_us"], " above"),
                r["status"],
            ]
        )
    return out


HEADERS = [
    "Process",
    "Case",
    "Median (µs)",
    "p25–p75 (µs)",
    "× bare decide",
    "Δ vs baseline (µs)",
    "Target",
    "Result",
]


def notes() -> list[str]:
    """How to read the table."""
    return [
        "Baselines: decide rows are compared with `decide, telemetry=None`, decorated-call rows with the "
        "decorated call without telemetry, in the same process; reference rows time one primitive alone.",
        "Routed-call spans are started only when a tracer provider is set (explicit, or the global one): "
        "that check is the `Telemetry._span_start` reference row; asking the current span "
        "(`is_recording()`) or entering a no-op `start_as_current_span` costs more (their rows) and "
        "cannot give a recorded child anyway, since canary_router's tracer is a no-op until a provider is set.",
        "Inside a recording span almost all of a decision's cost is the SDK's own span.add_event (reference row): "
        "it copies and validates the attributes into a new event. canary_router passes its cached attribute dict "
        "as it is and reads the current span from the OpenTelemetry context by the trace API's key, which costs "
        "less than trace.get_current_span() (the two reference rows).",
        "Decisions are counted in memory per series and reported by an asynchronous counter at collection time, "
        "because the SDK's synchronous Counter.add (reference row) would cost more than the whole budget "
        "on every decision; the duration histogram stays synchronous (exemplars link it to traces).",
    ]


def print_table(rows: list[dict[str, Any]], env: dict[str, Any]) -> None:
    """Print the results as a plain-text table."""
    print(
        f"canary_router {env['canary_router']} · {benchlib.platform_summary(env)} · "
        f"opentelemetry-api {env['opentelemetry_api']}, -sdk {env['opentelemetry_sdk']}"
    )
    print(f"{env['rounds']} rounds × {env['calls_per_sample']} calls, {env['warmup_rounds']} warm-up rounds")
    cells = table_rows(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
    line = "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + benchlib.over_flag(c[-1]))
    print()
    for note in notes():
        print(f"- {note}")


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    """Render the results as the Markdown that goes between the markers."""
    lines = [benchlib.markdown_row(HEADERS), "|---|---|---:|---:|---:|---:|---|---|"]
    for c in table_rows(rows):
        c[-1] = benchlib.markdown_status(c[-1])
        lines.append(benchlib.markdown_row(benchlib.markdown_escape(v) for v in c))
    lines.append("")
    lines += [f"- {note}" for note in notes()]
    packages = (
        f"canary_router {env['canary_router']}, opentelemetry-api {env['opentelemetry_api']}, "
        f"opentelemetry-sdk {env['opentelemetry_sdk']}"
    )
    lines += benchlib.environment_lines(env, packages)
    lines += [
        f"- Method: {env['rounds']} interleaved rounds after {env['warmup_rounds']} warm-up rounds in each process; "
        f"each sample is {env['calls_per_sample']:,} calls over as many distinct user ids; median of the rounds; "
        "garbage collector disabled while timing (timeit default).",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = benchlib.bench_parser(__doc__, repeats=21, warmup=2, per_case=True, json_option=True)
    benchlib.add_common_options(parser, gc_option=False)
    parser.add_argument("--mode", choices=("all", "no-sdk"), default="all", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 2 or args.warmup < 0:
        parser.error("--repeats must be >= 2, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status reflects errors only, never timings."""
    args = parse_args(argv)
    namespace = routers_namespace(benchlib.shuffled_user_ids(args.seed, N_IDS))
    if args.mode == "no-sdk":
        if "opentelemetry.sdk" in sys.modules:
            raise SystemExit("the no-SDK process imported opentelemetry.sdk")
        cases = no_sdk_cases()
        measure(namespace, cases, args)
        print(json.dumps(summarize(cases, "no-sdk")))
        return 0
    child_rows = run_child(args)
    install_sdk(namespace)
    if benchlib.report_problems(sdk_sanity(namespace)):
        return 2
    cases = sdk_cases()
    measure(namespace, cases, args)
    rows = child_rows + summarize(cases, "sdk")
    env = environment(args)
    print_table(rows, env)
    if args.write:
        benchlib.write_section(args.write, SECTION, markdown(rows, env), heading=SECTION_INTRO)
        print(f"\nwrote the telemetry section of {args.write}")
    if args.json:
        benchlib.write_json(args.json, {"environment": env, "results": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
