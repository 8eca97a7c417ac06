"""OpenTelemetry: the feature_flag.evaluation event, routed-call spans and the two metrics, by exact name."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, Metric, NumberDataPoint, Sum
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from canary_router import Context, Router, telemetry
from canary_router.asgi import ASGIApp, CanaryMiddleware, Receive, Scope, Send
from canary_router.telemetry import DURATION_BUCKETS, Telemetry
from canary_router.testing import RecordingObserver

try:
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
except ImportError:  # pragma: no cover - SDKs before the rename
    from opentelemetry.sdk._logs.export import InMemoryLogExporter as InMemoryLogRecordExporter  # type: ignore

LEGACY = ("feature_flag.variant", "feature_flag.provider_name", "feature_flag.evaluation.reason")
METRIC_KEYS = {
    "feature_flag.key",
    "feature_flag.result.variant",
    "feature_flag.result.reason",
    "error.type",
    "canary_router.shadow",
}
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)

CONFIG: dict[str, Any] = {
    "rollouts": {
        "checkout": {
            "steps": [50, 100],
            "rules": [
                {
                    "when": [{"attribute": "email", "operator": "STR_ENDS_WITH", "values": ["@example.com"]}],
                    "serve": "new",
                }
            ],
        },
        "search": {"steps": [50, 100]},
        "dark": {"steps": [50, 100], "shadow": True},
    }
}


class PaymentDeclined(Exception):
    """A failure of the invoked version, with a message that must never reach a metric."""


@dataclass
class Otel:
    """An SDK pipeline of our own, passed explicitly so that no global provider is ever set."""

    tracer_provider: TracerProvider
    spans: InMemorySpanExporter
    meter_provider: MeterProvider
    reader: InMemoryMetricReader
    logger_provider: LoggerProvider
    logs: InMemoryLogRecordExporter

    @property
    def tracer(self) -> trace.Tracer:
        """A tracer for the test's own request spans."""
        return self.tracer_provider.get_tracer("tests")

    def telemetry(self, **options: Any) -> Telemetry:
        """A Telemetry on this pipeline."""
        return Telemetry(
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            logger_provider=self.logger_provider,
            **options,
        )

    def router(self, **options: Any) -> Router:
        """A router with CONFIG reporting to this pipeline."""
        return Router.from_config(CONFIG, clock=lambda: 1_700_000_000.0, telemetry=self.telemetry(**options))

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        """Finished spans, optionally only those called ``name``."""
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]

    def metric(self, name: str) -> Metric | None:
        """The metric ``name`` of scope canary_router, as the reader collects it now."""
        data = self.reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name != "canary_router":
                    continue
                for metric in scope_metrics.metrics:
                    if metric.name == name:
                        return metric
        return None

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        """Data points of metric ``name`` by attribute set."""
        metric = self.metric(name)
        if metric is None:
            return {}
        return {frozenset((p.attributes or {}).items()): p for p in metric.data.data_points}


@pytest.fixture
def otel() -> Iterator[Otel]:
    """A fresh in-memory SDK pipeline for traces, metrics and logs."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    logs = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    yield Otel(tracer_provider, spans, meter_provider, reader, logger_provider, logs)
    tracer_provider.shutdown()
    meter_provider.shutdown()
    logger_provider.shutdown()


def user_with(router: Router, name: str, variant: str) -> str:
    """A user id that rollout ``name`` splits to ``variant``."""
    for i in range(1000):
        user = f"user-{i}"
        decision = router.decide(name, {"user_id": user})
        if decision.variant == variant and decision.reason == "split":
            return user
    raise AssertionError(f"no user gets {variant!r}")  # pragma: no cover


def user_for(name: str, variant: str, reason: str = "split") -> str:
    """A user id that rollout ``name`` decides ``variant`` with ``reason`` for (found without any telemetry)."""
    probe = Router.from_config(CONFIG, telemetry=None)
    for i in range(1000):
        user = f"user-{i}"
        decision = probe.decide(name, {"user_id": user})
        if decision.variant == variant and decision.reason == reason:
            return user
    raise AssertionError(f"no user gets {variant!r} / {reason!r}")  # pragma: no cover


def durations(otel: Otel) -> dict[tuple[str, str, str | None, bool], int]:
    """Duration histogram counts by (rollout, variant, error.type, canary_router.shadow)."""
    counts = {}
    for key, point in otel.points("canary_router.invocation.duration").items():
        attributes = dict(key)
        assert set(attributes) <= {
            "feature_flag.key",
            "feature_flag.result.variant",
            "error.type",
            "canary_router.shadow",
        }
        assert attributes.get("canary_router.shadow", True) is True  # present only on shadow runs, and then true
        shadow = attributes.get("canary_router.shadow", False)
        counts[
            (
                attributes["feature_flag.key"],
                attributes["feature_flag.result.variant"],
                attributes.get("error.type"),
                shadow,
            )
        ] = point.count
    return counts


def decisions(otel: Otel) -> dict[tuple[str, str, str], int]:
    """Decision counts by (rollout, variant, reason)."""
    return {
        (a["feature_flag.key"], a["feature_flag.result.variant"], a["feature_flag.result.reason"]): point.value
        for a, point in ((dict(k), p) for k, p in otel.points("canary_router.decisions").items())
    }


def evaluation_events(span: ReadableSpan) -> list[dict[str, Any]]:
    """Attributes of the feature_flag.evaluation events of ``span``."""
    return [dict(e.attributes or {}) for e in span.events if e.name == "feature_flag.evaluation"]


def all_attribute_keys(otel: Otel) -> set[str]:
    """Every attribute key on every span, span event, log record and metric point recorded so far."""
    keys: set[str] = set()
    for span in otel.finished():
        keys.update(span.attributes or {})
        for event in span.events:
            keys.update(event.attributes or {})
    for record in otel.logs.get_finished_logs():
        keys.update(record.log_record.attributes or {})
    for name in ("canary_router.decisions", "canary_router.invocation.duration"):
        for attributes in otel.points(name):
            keys.update(k for k, _ in attributes)
    return keys


# ---------------------------------------------------------------------------------------------- the event


def test_decision_adds_the_semconv_evaluation_event_to_the_recording_span(otel: Otel) -> None:
    """A decision inside a recording span adds feature_flag.evaluation with exactly the semconv attributes."""
    router = otel.router()
    user = user_with(router, "checkout", "new")
    with otel.tracer.start_as_current_span("request"):
        router.decide("checkout", {"user_id": user})
    (request,) = otel.finished("request")
    assert evaluation_events(request) == [
        {
            "feature_flag.key": "checkout",
            "feature_flag.result.variant": "new",
            "feature_flag.result.reason": "split",
            "feature_flag.provider.name": "canary_router",
            "feature_flag.version": str(router.status("checkout").version),
        }
    ]


@pytest.mark.parametrize(
    ("setup", "context", "variant", "reason", "error_type"),
    [
        ("none", {"user_id": "u", "email": "a@example.com"}, "new", "targeting_match", None),
        ("none", {"region": "eu"}, "old", "default", None),
        ("rollback", {"user_id": "u"}, "old", "disabled", None),
        ("complete", {"user_id": "u"}, "new", "static", None),
        ("override", None, "new", "targeting_match", None),
        ("unknown", {"user_id": "u"}, "old", "error", "flag_not_found"),
    ],
)
def test_result_reason_is_the_well_known_lower_case_value(
    otel: Otel, setup: str, context: Mapping[str, Any] | None, variant: str, reason: str, error_type: str | None
) -> None:
    """Every kind of decision reports its OpenFeature reason lower-cased; an unknown rollout also gets error.type."""
    router = otel.router()
    name = "nope" if setup == "unknown" else "checkout"
    if setup == "rollback":
        router.rollback("checkout", reason="test")
    elif setup == "complete":
        router.set_percent("checkout", 100)
        router.promote("checkout")
    if setup == "override":
        context = Context({"user_id": "u"}, overrides={"checkout": "new"})
    with otel.tracer.start_as_current_span("request"):
        decision = router.decide(name, context)
    assert decision.variant == variant
    (event,) = evaluation_events(otel.finished("request")[0])
    assert event["feature_flag.result.variant"] == variant
    assert event["feature_flag.result.reason"] == reason
    assert event.get("error.type") == error_type
    assert ("feature_flag.version" in event) is (setup != "unknown")


def test_event_version_follows_the_rollout_state(otel: Otel) -> None:
    """feature_flag.version is the version of the state the decision was made from, and moves with it."""
    router = otel.router()
    with otel.tracer.start_as_current_span("request"):
        router.decide("search", {"user_id": "u1"})
        router.set_percent("search", 60)
        router.decide("search", {"user_id": "u1"})
    first, second = evaluation_events(otel.finished("request")[0])
    assert int(first["feature_flag.version"]) + 1 == int(second["feature_flag.version"])
    assert second["feature_flag.version"] == str(router.status("search").version)


def test_set_id_is_reported_when_configured(otel: Otel) -> None:
    """``set_id`` becomes feature_flag.set.id on the event (and never a metric attribute)."""
    router = otel.router(set_id="shop")
    with otel.tracer.start_as_current_span("request"):
        router.decide("search", {"user_id": "u1"})
    (event,) = evaluation_events(otel.finished("request")[0])
    assert event["feature_flag.set.id"] == "shop"
    assert all("feature_flag.set.id" not in dict(a) for a in otel.points("canary_router.decisions"))


def test_context_id_is_absent_unless_opted_in(otel: Otel) -> None:
    """feature_flag.context.id (a user id) is on the event only with ``context_id=True``."""
    plain = otel.router()
    opted = otel.router(context_id=True)
    with otel.tracer.start_as_current_span("request"):
        plain.decide("search", {"user_id": "user-42"})
        opted.decide("search", {"user_id": "user-42"})
    without, with_id = evaluation_events(otel.finished("request")[0])
    assert "feature_flag.context.id" not in without
    assert with_id["feature_flag.context.id"] == "user-42"


def test_no_event_when_no_span_records(otel: Otel) -> None:
    """Outside a recording span a decision adds no event, and no span is created for it."""
    router = otel.router()
    router.decide("search", {"user_id": "u1"})
    assert otel.finished() == []


def test_log_mode_emits_a_log_based_event_and_no_span_event(otel: Otel) -> None:
    """``event_mode="log"`` emits feature_flag.evaluation via the Logs API, in the span's trace; no span event."""
    router = otel.router(event_mode="log")
    user = user_with(router, "search", "old")
    otel.logs.clear()
    with otel.tracer.start_as_current_span("request") as request:
        router.decide("search", {"user_id": user})
    (record,) = [r.log_record for r in otel.logs.get_finished_logs()]
    assert record.event_name == "feature_flag.evaluation"
    assert dict(record.attributes or {}) == {
        "feature_flag.key": "search",
        "feature_flag.result.variant": "old",
        "feature_flag.result.reason": "split",
        "feature_flag.provider.name": "canary_router",
        "feature_flag.version": str(router.status("search").version),
    }
    assert record.trace_id == request.get_span_context().trace_id
    assert evaluation_events(otel.finished("request")[0]) == []


def test_legacy_attribute_names_are_never_emitted(otel: Otel) -> None:
    """None of the pre-v1.32 names appear on any span, event, log record or metric."""
    router = otel.router(context_id=True, set_id="shop")
    log_router = otel.router(event_mode="log")

    def old(x: int) -> int:
        return x

    @router.canary("search", old=old, context_from={"user_id": "x"})
    def new(x: int) -> int:
        return x

    with otel.tracer.start_as_current_span("request"):
        for i in range(20):
            new(i)
            router.decide("nope", {"user_id": i})
            log_router.decide("checkout", {"user_id": i})
    keys = all_attribute_keys(otel)
    assert "feature_flag.result.variant" in keys
    assert not keys & set(LEGACY)


# ---------------------------------------------------------------------------------------------- metrics


def test_decisions_counter_counts_by_key_variant_and_reason(otel: Otel) -> None:
    """canary_router.decisions is a monotonic {decision} sum with exactly key, variant and reason."""
    router = otel.router()
    old_user = user_with(router, "search", "old")
    new_user = user_with(router, "search", "new")
    otel.reader.get_metrics_data()  # the lookups above counted too: measure from here
    before = {k: p.value for k, p in otel.points("canary_router.decisions").items()}
    for _ in range(3):
        router.decide("search", {"user_id": old_user})
    router.decide("search", {"user_id": new_user})
    router.decide("nope", {"user_id": new_user})
    metric = otel.metric("canary_router.decisions")
    assert metric is not None
    assert metric.unit == "{decision}"
    assert isinstance(metric.data, Sum)
    assert metric.data.is_monotonic
    points = otel.points("canary_router.decisions")
    base = {"feature_flag.key": "search", "feature_flag.result.reason": "split"}
    old_key = frozenset({**base, "feature_flag.result.variant": "old"}.items())
    new_key = frozenset({**base, "feature_flag.result.variant": "new"}.items())
    unknown_key = frozenset(
        {
            "feature_flag.key": "nope",
            "feature_flag.result.variant": "old",
            "feature_flag.result.reason": "error",
            "error.type": "flag_not_found",
        }.items()
    )
    assert points[old_key].value - before.get(old_key, 0) == 3
    assert points[new_key].value - before.get(new_key, 0) == 1
    assert points[unknown_key].value == 1
    assert all(isinstance(p, NumberDataPoint) for p in points.values())


def test_decisions_counter_is_cumulative_across_collections(otel: Otel) -> None:
    """Reading the counter twice reports the running total, not the reads in between."""
    router = otel.router()
    key = frozenset(
        {
            "feature_flag.key": "nope",
            "feature_flag.result.variant": "old",
            "feature_flag.result.reason": "error",
        }.items()
        | {("error.type", "flag_not_found")}
    )
    router.decide("nope", {})
    assert otel.points("canary_router.decisions")[key].value == 1
    assert otel.points("canary_router.decisions")[key].value == 1
    router.decide("nope", {})
    router.decide("nope", {})
    assert otel.points("canary_router.decisions")[key].value == 3


def test_duration_histogram_has_seconds_and_the_http_buckets(otel: Otel) -> None:
    """canary_router.invocation.duration is in seconds, with the HTTP semconv boundaries and key + variant."""
    router = otel.router()
    user = user_with(router, "search", "new")

    def old() -> str:
        return "old"

    @router.canary("search", old=old)
    def new() -> str:
        return "new"

    with router.context(user_id=user):
        assert new() == "new"
    metric = otel.metric("canary_router.invocation.duration")
    assert metric is not None
    assert metric.unit == "s"
    assert tuple(DURATION_BUCKETS) == HTTP_BUCKETS
    (point,) = metric.data.data_points
    assert isinstance(point, HistogramDataPoint)
    assert tuple(point.explicit_bounds) == HTTP_BUCKETS
    assert dict(point.attributes or {}) == {"feature_flag.key": "search", "feature_flag.result.variant": "new"}
    assert point.count == 1


def test_observe_records_the_duration_for_request_level_rollouts(otel: Otel) -> None:
    """Router._observe (what split-mode middleware calls) records the histogram, with error.type on failure."""
    router = otel.router()
    decision = router.decide("checkout", {"user_id": "u1"})
    router._observe("checkout", decision, True, 0.2)
    router._observe("checkout", decision, False, 0.3, ValueError("boom"))
    router._observe("checkout", decision, False, 0.4)
    points = otel.points("canary_router.invocation.duration")
    base = {"feature_flag.key": "checkout", "feature_flag.result.variant": decision.variant}
    assert points[frozenset(base.items())].sum == pytest.approx(0.2)
    assert points[frozenset({**base, "error.type": "ValueError"}.items())].sum == pytest.approx(0.3)
    assert points[frozenset({**base, "error.type": "_OTHER"}.items())].sum == pytest.approx(0.4)


def test_metrics_carry_no_high_cardinality_attribute(otel: Otel) -> None:
    """No user id, unit, set id or exception message ever reaches a metric, even with context_id on."""
    router = otel.router(context_id=True, set_id="shop")

    def old(user_id: str) -> None:
        raise PaymentDeclined(f"card of {user_id} declined")

    @router.canary("search", old=old, context_from="user_id")
    def new(user_id: str) -> None:
        raise PaymentDeclined(f"card of {user_id} declined")

    with otel.tracer.start_as_current_span("request"):
        for i in range(30):
            with pytest.raises(PaymentDeclined):
                new(f"user-{i}")
    for name in ("canary_router.decisions", "canary_router.invocation.duration"):
        points = otel.points(name)
        assert points, name
        for attributes in points:
            assert {k for k, _ in attributes} <= METRIC_KEYS
            for _, value in attributes:
                assert "user-" not in str(value)
                assert "declined" not in str(value)
    assert len(otel.points("canary_router.invocation.duration")) == 2  # old and new, one error.type each


def test_decisions_from_many_threads_are_all_counted(otel: Otel) -> None:
    """The lock-free decision count loses no increment when threads decide at once."""
    router = otel.router()
    threads = [threading.Thread(target=lambda: [router.decide("nope", {}) for _ in range(2000)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ((_, point),) = otel.points("canary_router.decisions").items()
    assert point.value == 8000


# ---------------------------------------------------------------------------------------------- spans


def _decorated(router: Router, name: str = "search") -> Any:
    def old(x: int) -> tuple[str, int]:
        return ("old", x)

    @router.canary(name, old=old)
    def new(x: int) -> tuple[str, int]:
        return ("new", x)

    return new


def test_decorated_call_gets_an_internal_child_span_of_the_request_span(otel: Otel) -> None:
    """A routed call runs in an INTERNAL span canary_router.invoke <rollout>, child of the request span."""
    router = otel.router()
    new = _decorated(router)
    user = user_with(router, "search", "new")
    with otel.tracer.start_as_current_span("request") as request, router.context(user_id=user):
        assert new(1) == ("new", 1)
    (child,) = otel.finished("canary_router.invoke search")
    assert child.kind is SpanKind.INTERNAL
    assert child.parent is not None
    assert child.parent.span_id == request.get_span_context().span_id
    assert child.context is not None
    assert child.context.trace_id == request.get_span_context().trace_id
    assert dict(child.attributes or {}) == {"feature_flag.key": "search", "feature_flag.result.variant": "new"}
    assert child.status.status_code is StatusCode.UNSET
    (event,) = evaluation_events(otel.finished("request")[0])  # the decision is reported on the request span
    assert event["feature_flag.result.variant"] == "new"


def test_spans_started_by_the_invoked_version_nest_under_the_routed_span(otel: Otel) -> None:
    """The routed span is current while the version runs, so the version's own spans are its children."""
    router = otel.router()

    def old() -> None:
        with otel.tracer.start_as_current_span("db.query"):
            pass

    @router.canary("search", old=old)
    def new() -> None:
        with otel.tracer.start_as_current_span("db.query"):
            pass

    with otel.tracer.start_as_current_span("request"), router.context(user_id="u1"):
        new()
    (inner,) = otel.finished("db.query")
    (routed,) = otel.finished("canary_router.invoke search")
    assert inner.parent is not None
    assert routed.context is not None
    assert inner.parent.span_id == routed.context.span_id


def test_async_decorated_call_nests_under_the_request_span(otel: Otel) -> None:
    """An async routed call gets the same child span, and the request span is current again afterwards."""
    router = otel.router()

    async def old() -> str:
        await asyncio.sleep(0)
        return "old"

    @router.canary("search", old=old)
    async def new() -> str:
        await asyncio.sleep(0)
        return "new"

    async def handler() -> str:
        with otel.tracer.start_as_current_span("request") as request, router.context(user_id="u1"):
            result = await new()
            assert trace.get_current_span() is request
        return result

    assert asyncio.run(handler()) in ("old", "new")
    (child,) = otel.finished("canary_router.invoke search")
    (request,) = otel.finished("request")
    assert child.parent is not None
    assert request.context is not None
    assert child.parent.span_id == request.context.span_id


def test_failing_routed_call_sets_error_status_type_and_exception(otel: Otel) -> None:
    """A failure of the invoked version: span ERROR, error.type = qualified class name, an exception event."""
    router = otel.router()

    def old() -> None:
        raise PaymentDeclined("card declined")

    @router.canary("search", old=old)
    def new() -> None:
        raise PaymentDeclined("card declined")

    with (
        otel.tracer.start_as_current_span("request"),
        router.context(user_id="u1"),
        pytest.raises(PaymentDeclined, match="card declined"),
    ):
        new()
    (child,) = otel.finished("canary_router.invoke search")
    qualified = f"{PaymentDeclined.__module__}.PaymentDeclined"
    assert child.status.status_code is StatusCode.ERROR
    assert child.attributes is not None
    assert child.attributes["error.type"] == qualified
    (exception,) = [e for e in child.events if e.name == "exception"]
    assert exception.attributes is not None
    assert exception.attributes["exception.type"] == qualified
    assert exception.attributes["exception.message"] == "card declined"
    ((attributes, point),) = otel.points("canary_router.invocation.duration").items()
    assert dict(attributes)["error.type"] == qualified
    assert point.count == 1


def test_builtin_exception_error_type_is_the_bare_class_name(otel: Otel) -> None:
    """A builtin exception is named without its module, as the SDK names exception.type."""
    router = otel.router()

    def old() -> None:
        raise KeyError("x")

    @router.canary("search", old=old)
    def new() -> None:
        raise KeyError("x")

    with router.context(user_id="u1"), pytest.raises(KeyError):
        new()
    (child,) = otel.finished("canary_router.invoke search")
    assert child.attributes is not None
    assert child.attributes["error.type"] == "KeyError"


class _Unprintable(Exception):
    """An exception whose message cannot even be rendered."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


def test_an_unprintable_exception_still_ends_the_span(otel: Otel) -> None:
    """An exception whose ``str()`` raises propagates unchanged, and its span is still ended and exported."""
    router = otel.router()

    def old() -> None:
        raise _Unprintable

    @router.canary("search", old=old)
    def new() -> None:
        raise _Unprintable

    with router.context(user_id="u1"), pytest.raises(_Unprintable):
        new()
    (child,) = otel.finished("canary_router.invoke search")
    assert (child.attributes or {})["error.type"].endswith("_Unprintable")
    assert trace.get_current_span() is trace.INVALID_SPAN  # the context was restored


def test_fallback_runs_old_in_a_span_of_its_own(otel: Otel) -> None:
    """With fallback_on_error the failed new run is an ERROR span and the old run a second, healthy span."""
    router = otel.router()
    user = user_with(router, "search", "new")

    def old() -> str:
        return "old"

    @router.canary("search", old=old, fallback_on_error=True)
    def new() -> str:
        raise PaymentDeclined("no")

    with otel.tracer.start_as_current_span("request"), router.context(user_id=user):
        assert new() == "old"
    failed, recovered = otel.finished("canary_router.invoke search")
    assert (failed.attributes or {})["feature_flag.result.variant"] == "new"
    assert failed.status.status_code is StatusCode.ERROR
    assert (recovered.attributes or {})["feature_flag.result.variant"] == "old"
    assert recovered.status.status_code is StatusCode.UNSET


def test_sync_shadow_run_is_a_sibling_span_under_the_request(otel: Otel) -> None:
    """In shadow mode the served old run and the pooled new run are both children of the request span."""
    router = otel.router()
    user = user_with(router, "search", "new")
    new = _decorated(Router.from_config(CONFIG, telemetry=None))  # a plain function pair
    shadowed = router.canary("search", old=new.__canary_old__, mode="shadow")(new.__canary_new__)
    with otel.tracer.start_as_current_span("request") as request, router.context(user_id=user):
        assert shadowed(7) == ("old", 7)
    router.shadow_pool.shutdown(wait=True)
    spans = otel.finished("canary_router.invoke search")
    assert sorted((s.attributes or {})["feature_flag.result.variant"] for s in spans) == ["new", "old"]
    for span in spans:
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id
    (shadow,) = [s for s in spans if (s.attributes or {}).get("canary_router.shadow")]
    assert (shadow.attributes or {})["feature_flag.result.variant"] == "new"


def test_async_shadow_run_is_a_sibling_span_under_the_request(otel: Otel) -> None:
    """In async shadow mode the background task's span also has the request span as parent."""
    router = otel.router()
    user = user_with(router, "search", "new")

    async def old() -> str:
        return "old"

    @router.canary("search", old=old, mode="shadow")
    async def new() -> str:
        return "new"

    async def handler() -> str:
        with otel.tracer.start_as_current_span("request"), router.context(user_id=user):
            result = await new()
        for _ in range(100):
            if len(otel.finished("canary_router.invoke search")) == 2:
                break
            await asyncio.sleep(0.01)
        return result

    assert asyncio.run(handler()) == "old"
    (request,) = otel.finished("request")
    spans = otel.finished("canary_router.invoke search")
    assert len(spans) == 2
    assert request.context is not None
    assert all(s.parent is not None and s.parent.span_id == request.context.span_id for s in spans)


# ---------------------------------------------------------------------------------------------- shadow runs, fallback


def _shadowed_pair(router: Router, name: str, mode: str) -> Any:
    """A sync decorated function of rollout ``name``: old returns "old", new returns "new"."""

    def old() -> str:
        return "old"

    @router.canary(name, old=old, mode=mode)
    def new() -> str:
        return "new"

    return new


def _assert_shadow_telemetry(otel: Otel, router: Router, name: str) -> None:
    """One shadowed call then one plain "old" call were made in span "request": what each signal must say."""
    (request,) = otel.finished("request")
    shadowed, plain = evaluation_events(request)
    assert shadowed == {
        "feature_flag.key": name,
        "feature_flag.result.variant": "old",  # what was served
        "feature_flag.result.reason": "shadow",  # not "split": shadowed calls stay apart from the split's "old" ones
        "feature_flag.provider.name": "canary_router",
        "feature_flag.version": str(router.status(name).version),
    }
    assert (plain["feature_flag.result.variant"], plain["feature_flag.result.reason"]) == ("old", "split")
    assert decisions(otel) == {(name, "old", "shadow"): 1, (name, "old", "split"): 1}
    # served calls and the shadow run of the new version are separate series of the histogram
    assert durations(otel) == {(name, "old", None, False): 2, (name, "new", None, True): 1}
    spans = otel.finished(f"canary_router.invoke {name}")
    assert sorted(
        ((s.attributes or {})["feature_flag.result.variant"], "canary_router.shadow" in (s.attributes or {}))
        for s in spans
    ) == [
        ("new", True),
        ("old", False),
        ("old", False),
    ]


def test_sync_shadow_mode_reports_the_served_variant_and_marks_the_shadow_run(otel: Otel) -> None:
    """mode="shadow": the event and counter say "old"/shadow; the shadow run's histogram point has shadow=true."""
    router = otel.router()
    new = _shadowed_pair(router, "search", "shadow")
    with otel.tracer.start_as_current_span("request"):
        for user in (user_for("search", "new"), user_for("search", "old")):
            with router.context(user_id=user):
                assert new() == "old"
    router.shadow_pool.shutdown(wait=True)
    _assert_shadow_telemetry(otel, router, "search")


def test_async_shadow_mode_reports_the_served_variant_and_marks_the_shadow_run(otel: Otel) -> None:
    """The same in async code, where the shadow run is a background task."""
    router = otel.router()

    async def old() -> str:
        return "old"

    @router.canary("search", old=old, mode="shadow")
    async def new() -> str:
        return "new"

    async def handler() -> None:
        with otel.tracer.start_as_current_span("request"):
            for user in (user_for("search", "new"), user_for("search", "old")):
                with router.context(user_id=user):
                    assert await new() == "old"
        for _ in range(500):
            if len(otel.finished("canary_router.invoke search")) == 3:
                break
            await asyncio.sleep(0.002)

    asyncio.run(handler())
    _assert_shadow_telemetry(otel, router, "search")


def test_shadow_step_of_a_rollout_reports_reason_shadow(otel: Otel) -> None:
    """In a rollout's shadow step, decide and the route-mode decorator report "old"/shadow, and mark the shadow run."""
    router = otel.router()
    new = _shadowed_pair(router, "dark", "route")
    with otel.tracer.start_as_current_span("request"):
        for user in (user_for("dark", "old", "shadow"), user_for("dark", "old")):
            with router.context(user_id=user):
                assert new() == "old"
    router.shadow_pool.shutdown(wait=True)
    _assert_shadow_telemetry(otel, router, "dark")


def test_shadow_mode_still_calls_a_decide_replaced_on_the_instance(otel: Otel) -> None:
    """A spy set on ``router.decide`` before decorating sees the shadow-mode decorator's decisions."""
    router = otel.router()
    seen: list[str] = []

    def spy(name: str, context: Any = None) -> Any:
        seen.append(name)
        return Router.decide(router, name, context)

    router.decide = spy  # type: ignore[method-assign]
    new = _shadowed_pair(router, "search", "shadow")
    with router.context(user_id="u1"):
        assert new() == "old"
    router.shadow_pool.shutdown(wait=True)
    assert seen == ["search"]


@pytest.mark.parametrize("old_fails", [False, True])
def test_fallback_run_of_old_records_its_duration(otel: Otel, old_fails: bool) -> None:
    """fallback_on_error: the failed new run and the old run that replaced it are both on the histogram."""
    router = otel.router()
    recorder = RecordingObserver()
    router.add_observer(recorder)

    def old() -> str:
        if old_fails:
            raise KeyError("old too")
        return "old"

    @router.canary("search", old=old, fallback_on_error=True)
    def new() -> str:
        raise PaymentDeclined("no")

    with otel.tracer.start_as_current_span("request"), router.context(user_id=user_for("search", "new")):
        if old_fails:
            with pytest.raises(KeyError):
                new()
        else:
            assert new() == "old"
    qualified = f"{PaymentDeclined.__module__}.PaymentDeclined"
    assert durations(otel) == {
        ("search", "new", qualified, False): 1,
        ("search", "old", "KeyError" if old_fails else None, False): 1,
    }
    # the guard and the observers still see one observation of the call: "new", failed, fell back
    assert [(o.variant, o.ok, o.fell_back) for o in recorder.observations] == [("new", False, True)]


def test_async_fallback_run_of_old_records_its_duration(otel: Otel) -> None:
    """The same for an async function."""
    router = otel.router()

    async def old() -> str:
        return "old"

    @router.canary("search", old=old, fallback_on_error=True)
    async def new() -> str:
        raise PaymentDeclined("no")

    async def handler() -> str:
        with router.context(user_id=user_for("search", "new")):
            return await new()

    assert asyncio.run(handler()) == "old"
    qualified = f"{PaymentDeclined.__module__}.PaymentDeclined"
    assert durations(otel) == {("search", "new", qualified, False): 1, ("search", "old", None, False): 1}
    spans = otel.finished("canary_router.invoke search")
    assert [(s.attributes or {})["feature_flag.result.variant"] for s in spans] == ["new", "old"]


# ---------------------------------------------------------------------------------------------- web middleware


class RequestSpanMiddleware:
    """A request-span middleware, as OpenTelemetry's ASGI instrumentation makes one, cut to the bone.

    A SERVER span around each HTTP request, current while the application handles it.
    """

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # pragma: no cover - the tests send HTTP requests only
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span(f"{scope['method']} {scope['path']}", kind=SpanKind.SERVER):
            await self.app(scope, receive, send)


def serve(app: ASGIApp, *requests: tuple[str, str]) -> list[httpx.Response]:
    """GET each ``(path, user id)`` through ``app``, as forwarded by a trusted proxy with the user in a header."""

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return [await client.get(path, headers={"x-user-id": user}) for path, user in requests]

    return asyncio.run(main())


def test_asgi_request_span_holds_the_events_and_parents_the_invocation_spans(otel: Otel) -> None:
    """Request span → CanaryMiddleware → route → decorated function: events and invocation spans nest right.

    Each event lands on the span current when the decision was made, and each INTERNAL invocation span is a child
    of the request span, for an async route and for a sync one (run on a worker thread).
    """
    router = otel.router()
    user = user_for("search", "new")
    checkout = Router.from_config(CONFIG, telemetry=None).decide("checkout", {"user_id": user}).variant

    async def old_async() -> str:
        return "old"

    @router.canary("search", old=old_async)
    async def search_async() -> str:
        return "new"

    def old_sync() -> str:
        return "old"

    @router.canary("search", old=old_sync)
    def search_sync() -> str:
        return "new"

    async def async_endpoint(request: Request) -> Response:
        served = await search_async()  # decided while the request span is current
        with otel.tracer.start_as_current_span("render"):
            variant = request.state.canary["checkout"].variant  # the middleware's decisions are lazy: decided now
        return PlainTextResponse(f"{served} {variant}")

    def sync_endpoint(request: Request) -> Response:  # Starlette runs it on a worker thread
        return PlainTextResponse(search_sync())

    inner = Starlette(routes=[Route("/async", async_endpoint), Route("/sync", sync_endpoint)])
    canary = CanaryMiddleware(inner, router=router, trusted_proxies=["10.0.0.0/8"], user_header="x-user-id")
    responses = serve(RequestSpanMiddleware(canary, otel.tracer), ("/async", user), ("/sync", user))
    assert [r.text for r in responses] == [f"new {checkout}", "new"]

    (render,) = otel.finished("render")
    invocations = otel.finished("canary_router.invoke search")
    assert len(invocations) == 2
    for path in ("/async", "/sync"):
        (request,) = otel.finished(f"GET {path}")
        assert request.kind is SpanKind.SERVER
        assert request.context is not None
        (invocation,) = [
            s for s in invocations if s.context is not None and s.context.trace_id == request.context.trace_id
        ]
        assert invocation.kind is SpanKind.INTERNAL
        assert invocation.parent is not None
        assert invocation.parent.span_id == request.context.span_id
        assert (invocation.attributes or {})["feature_flag.result.variant"] == "new"
        # the decorator decided before its span started: the event is on the request span, not the invocation's
        assert [(e["feature_flag.key"], e["feature_flag.result.variant"]) for e in evaluation_events(request)] == [
            ("search", "new")
        ]
        assert evaluation_events(invocation) == []
    assert render.parent is not None
    assert render.parent.span_id == otel.finished("GET /async")[0].context.span_id
    assert [(e["feature_flag.key"], e["feature_flag.result.variant"]) for e in evaluation_events(render)] == [
        ("checkout", checkout)
    ]


def test_asgi_split_mode_records_the_duration_of_request_level_rollouts(otel: Otel) -> None:
    """Split-mode middleware records one histogram point per request, by served variant, error.type on a 5xx.

    The split's decision is reported on the request span.
    """
    router = otel.router()
    new_user, old_user = user_for("checkout", "new"), user_for("checkout", "old")

    async def new_home(request: Request) -> Response:
        return PlainTextResponse("new")

    async def new_down(request: Request) -> Response:
        return PlainTextResponse("down", status_code=503)

    async def old_home(request: Request) -> Response:
        return PlainTextResponse("old")

    old_app = Starlette(routes=[Route("/", old_home), Route("/down", old_home)])
    new_app = Starlette(routes=[Route("/", new_home), Route("/down", new_down)])
    split = CanaryMiddleware(
        old_app,
        router=router,
        rollout="checkout",
        new_app=new_app,
        trusted_proxies=["10.0.0.0/8"],
        user_header="x-user-id",
    )
    responses = serve(RequestSpanMiddleware(split, otel.tracer), ("/", new_user), ("/", old_user), ("/down", new_user))
    assert [(r.status_code, r.text) for r in responses] == [(200, "new"), (200, "old"), (503, "down")]

    counts = durations(otel)
    assert {(variant, error) for _, variant, error, _ in counts} == {
        ("new", None),
        ("old", None),
        ("new", "503"),  # HTTP semantic conventions: a 5xx without an exception is typed by its status code
    }
    assert all(name == "checkout" and not shadow and n == 1 for (name, _, _, shadow), n in counts.items())
    for path, variant in (("/", "new"), ("/", "old"), ("/down", "new")):
        assert any(
            [(e["feature_flag.key"], e["feature_flag.result.variant"]) for e in evaluation_events(span)]
            == [("checkout", variant)]
            for span in otel.finished(f"GET {path}")
        )
    assert all(s.kind is SpanKind.SERVER for s in otel.finished() if s.name.startswith("GET "))
    assert len(otel.finished()) == 3  # the split itself starts no span of its own


# ---------------------------------------------------------------------------------------------- safety and wiring


class _Broken:
    """Any OpenTelemetry object whose every method raises."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"broken {name}")

        return fail


class _BrokenInstrumentsMeter:
    """A meter that hands out instruments whose every call raises."""

    def create_histogram(self, *args: Any, **kwargs: Any) -> _Broken:
        return _Broken()

    def create_observable_counter(self, *args: Any, **kwargs: Any) -> _Broken:
        return _Broken()


class _BrokenMeterProvider:
    """A meter provider whose meter's instruments raise."""

    def get_meter(self, *args: Any, **kwargs: Any) -> _BrokenInstrumentsMeter:
        return _BrokenInstrumentsMeter()


class _BrokenTracerProvider:
    """A tracer provider whose tracer raises on every call."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> _Broken:
        return _Broken()


def test_a_telemetry_failure_never_reaches_the_application(otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    """Instruments and a tracer that raise: decisions and routed calls still work; the failure is logged."""
    telemetry = Telemetry(
        tracer_provider=_BrokenTracerProvider(),  # type: ignore[arg-type]
        meter_provider=_BrokenMeterProvider(),  # type: ignore[arg-type]
        context_id=True,
    )
    router = Router.from_config(CONFIG, telemetry=telemetry)

    def old(x: int) -> int:
        return -x

    @router.canary("search", old=old, context_from={"user_id": "x"})
    def new(x: int) -> int:
        return x

    with otel.tracer.start_as_current_span("request"):  # another provider's span: the event path runs too
        results = [new(i) for i in range(1, 41)]
        decision = router.decide("search", {"user_id": "u1"})
    assert all(r in (i, -i) for i, r in enumerate(results, start=1))
    assert {r > 0 for r in results} == {True, False}  # both versions ran
    assert decision.variant in ("old", "new")
    assert any("telemetry" in r.getMessage() for r in caplog.records)


def test_a_meter_provider_that_fails_at_once_leaves_metrics_off() -> None:
    """A meter provider that cannot even create instruments turns metrics off instead of failing the router."""
    router = Router.from_config(CONFIG, telemetry=Telemetry(meter_provider=_Broken()))  # type: ignore[arg-type]
    assert router.decide("search", {"user_id": "u1"}).variant in ("old", "new")


def test_telemetry_none_records_nothing(otel: Otel) -> None:
    """``telemetry=None`` turns every signal off."""
    router = Router.from_config(CONFIG, telemetry=None)
    assert router.telemetry is None
    new = _decorated(router)
    with otel.tracer.start_as_current_span("request"), router.context(user_id="u1"):
        new(1)
    assert evaluation_events(otel.finished("request")[0]) == []
    assert otel.finished("canary_router.invoke search") == []


def test_default_telemetry_is_on_the_global_providers() -> None:
    """A router built without ``telemetry`` gets a Telemetry on the global providers."""
    router = Router.from_config(CONFIG)
    assert isinstance(router.telemetry, Telemetry)
    assert router.telemetry._tracing() is (trace._TRACER_PROVIDER is not None)  # type: ignore[attr-defined]


def test_bad_arguments_fail_at_construction() -> None:
    """A wrong event mode, set id or telemetry value raises at once, not on the hot path."""
    with pytest.raises(ValueError, match="event_mode"):
        Telemetry(event_mode="trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="set_id"):
        Telemetry(set_id="")
    with pytest.raises(TypeError, match="context_id"):
        Telemetry(context_id="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="telemetry"):
        Router.from_config(CONFIG, telemetry="otel")  # type: ignore[arg-type]


def test_decision_series_are_capped(otel: Otel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arbitrary unknown rollout names cannot grow the counter's series without bound: the excess is _OTHER."""
    monkeypatch.setattr(telemetry, "_MAX_SERIES", 3)
    router = otel.router()
    for i in range(10):
        router.decide(f"unknown-{i}", {})
    keys = {dict(a)["feature_flag.key"] for a in otel.points("canary_router.decisions")}
    assert keys == {"unknown-0", "unknown-1", "unknown-2", "_OTHER"}
    (other,) = [p for a, p in otel.points("canary_router.decisions").items() if dict(a)["feature_flag.key"] == "_OTHER"]
    assert other.value == 7


def test_the_current_span_is_read_by_the_trace_apis_context_key(otel: Otel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast lookup of the current span is in use with this API; without it the public lookup does the same."""
    assert telemetry._SPAN_KEY is not None  # an API that changed its key would silently cost about 0.15 µs a decision
    router = otel.router()
    with otel.tracer.start_as_current_span("request"):
        router.decide("search", {"user_id": "u1"})
        monkeypatch.setattr(telemetry, "_SPAN_KEY", None)
        router.decide("search", {"user_id": "u1"})
    first, second = evaluation_events(otel.finished("request")[0])
    assert first == second


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_canary_router_does_not_import_the_sdk() -> None:
    """The core depends on opentelemetry-api only: importing it (and building a router) loads no SDK."""
    out = _run(
        """
        import sys, canary_router
        canary_router.Router.from_config({"rollouts": {"a": {}}}).decide("a", {"user_id": "u"})
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")))
        """
    )
    assert out == "[]"


def test_an_sdk_installed_after_the_router_is_used() -> None:
    """Global providers set after the router was built receive its events, spans and metrics."""
    out = _run(
        """
        import canary_router
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        router = canary_router.Router.from_config({"rollouts": {"a": {}}})
        f = router.canary("a", old=lambda: "old")(lambda: "new")
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        with trace.get_tracer("app").start_as_current_span("request"), router.context(user_id="u"):
            f()
        spans = {s.name: s for s in exporter.get_finished_spans()}
        data = reader.get_metrics_data()
        names = sorted(m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics)
        print([e.name for e in spans["request"].events], "canary_router.invoke a" in spans, names)
        """
    )
    assert out == ("['feature_flag.evaluation'] True ['canary_router.decisions', 'canary_router.invocation.duration']")


def test_no_sdk_decision_overhead_is_small() -> None:
    """Without an SDK the default telemetry adds little to a decision (a loose bound: timing on shared machines)."""
    out = _run(
        """
        import time, canary_router
        config = {"rollouts": {"a": {"steps": [10, 100]}}}
        bare = canary_router.Router.from_config(config, telemetry=None)
        default = canary_router.Router.from_config(config)
        ctxs = [canary_router.Context(user_id=f"u{i}") for i in range(5000)]

        def run(router):
            decide = router.decide
            start = time.perf_counter()
            for c in ctxs:
                decide("a", c)
            return time.perf_counter() - start

        samples = [(run(bare), run(default)) for _ in range(15)]
        bare_t = sorted(s[0] for s in samples)[7]
        default_t = sorted(s[1] for s in samples)[7]
        print(default_t / bare_t)
        """
    )
    assert float(out) < 2.0


def test_span_start_is_cheap_when_no_provider_is_set() -> None:
    """The decorator's "is tracing on?" check costs far less than a no-op span would."""
    telemetry = Telemetry()
    if trace._TRACER_PROVIDER is not None:  # type: ignore[attr-defined]  # pragma: no cover
        pytest.skip("a global tracer provider is set in this process")
    start = time.perf_counter()
    for _ in range(1000):
        assert telemetry._span_start("a", "old") is None
    assert time.perf_counter() - start < 0.05
