"""OpenTelemetry for decisions and routed calls: the only module that imports ``opentelemetry``.

What is emitted (names from the OpenTelemetry feature-flag semantic conventions, release-candidate
names only; none of the legacy ``feature_flag.variant`` / ``feature_flag.provider_name`` /
``feature_flag.evaluation.reason``):

* on every decision, the event ``feature_flag.evaluation`` on the current span when it records
  (or, with ``event_mode="log"``, as a log-based event through the Logs API, and no span event),
  with ``feature_flag.key``, ``feature_flag.result.variant``, ``feature_flag.result.reason``,
  ``feature_flag.provider.name``, ``feature_flag.version`` (the rollout state's version),
  ``feature_flag.set.id`` when configured, ``feature_flag.context.id`` only when opted in, and
  ``error.type`` when the decision itself failed;
* an INTERNAL span ``canary_router.invoke <rollout>`` around every routed call of the decorator (route,
  fallback and shadow runs), with ``feature_flag.key`` and ``feature_flag.result.variant``; a failure
  sets status ERROR and ``error.type`` and records the exception;
* the metrics ``canary_router.decisions`` (``{decision}``) and ``canary_router.invocation.duration``
  (``s``, the HTTP semconv buckets), whose attributes are bounded: key, variant, reason, ``error.type``,
  and ``canary_router.shadow`` on the histogram points of shadow runs.

The variant of a decision is the one **served**: a shadowed call (a rollout's shadow step, or the decorator's
``mode="shadow"``) reports ``"old"`` with the reason ``shadow``, a value of our own. Semantic conventions list
well-known reasons and ask for one of them when it applies; none describes "the old version was served while the
new one runs unseen" (``split`` would make shadowed calls indistinguishable from the ordinary "old" share of a
split), and the ``feature_flag.result.reason`` enum is open, so a custom lower-case snake_case value is allowed.

Not configured is a safe state: with no SDK installed every signal is skipped after one look at the
global provider, and nothing here ever raises into the application.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from opentelemetry import _logs, trace
from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry._logs import _internal as _logs_internal
from opentelemetry.metrics import _internal as _metrics_internal
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace import propagation as _propagation

from ._throttle import Throttled
from ._version import __version__
from .model import Reason

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext

    from .model import Decision
    from .router import Router

__all__ = ["DURATION_BUCKETS", "Telemetry"]

SCOPE = "canary_router"
"""The instrumentation scope (tracer, meter and logger name): a fixed string, never ``__name__``."""
PROVIDER_NAME = "canary_router"
"""The value of ``feature_flag.provider.name``."""
EVENT_NAME = "feature_flag.evaluation"
"""The semconv event emitted on every decision."""
DECISIONS = "canary_router.decisions"
"""Counter of decisions (unit ``{decision}``)."""
DURATION = "canary_router.invocation.duration"
"""Histogram of routed-call durations (unit ``s``)."""
DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""Explicit bucket boundaries advised for the duration histogram: those of ``http.server.request.duration``."""

KEY = "feature_flag.key"
VARIANT = "feature_flag.result.variant"
REASON = "feature_flag.result.reason"
PROVIDER = "feature_flag.provider.name"
SET_ID = "feature_flag.set.id"
VERSION = "feature_flag.version"
CONTEXT_ID = "feature_flag.context.id"
ERROR_TYPE = "error.type"
SHADOW = "canary_router.shadow"
"""``True`` on the span and the histogram points of a shadow run of the new version (absent on served calls)."""
SHADOW_REASON = "shadow"
"""``feature_flag.result.reason`` of a shadowed call: "old" served, the new version run alongside, unseen."""
OTHER = "_OTHER"
"""``error.type`` (and ``feature_flag.key``) value once a cardinality cap is reached."""

_RESULT_REASON: dict[str, str] = {
    **{r.value: r.openfeature.lower() for r in Reason},
    Reason.SHADOW.value: SHADOW_REASON,  # OpenFeature's SPLIT would hide shadowed calls among the split's "old" ones
}
"""``Decision.reason`` → ``feature_flag.result.reason``: the semconv well-known value (lower-case snake_case), or
``shadow`` for a shadowed call, which none of them describes."""
_DECISION_ERROR: dict[str, str] = {Reason.UNKNOWN_ROLLOUT.value: "flag_not_found", Reason.ERROR.value: "general"}
"""Decisions that are evaluation errors → their semconv ``error.type`` (conditionally required on the event)."""

_MAX_SERIES = 2000
"""Distinct (rollout, variant, reason) series kept by the decision counter; more fold into ``_OTHER``."""
_MAX_CACHE = 4096
"""Entries of a per-instance attribute cache before it is cleared (only unknown names can grow it)."""
_MAX_ERROR_TYPES = 256
"""Distinct exception classes named on the duration histogram; more are counted as ``_OTHER``."""

_log = logging.getLogger("canary_router")

# "Is a global provider set?" is asked on every decision, so it reads the API's own module globals
# (what its proxies read) instead of calling get_*_provider(), which also reads os.environ: about
# 12 ns instead of about 600 ns. Should a future API drop them, global mode does the work
# unconditionally (correct, since the API proxies are no-ops; only slower without an SDK).
_GLOBALS_READABLE = (
    hasattr(trace, "_TRACER_PROVIDER")
    and hasattr(_metrics_internal, "_METER_PROVIDER")
    and hasattr(_logs_internal, "_LOGGER_PROVIDER")
)

_get_current_span = trace.get_current_span
_get_current = otel_context.get_current


def _readable_span_key() -> str | None:
    """The context key the trace API keeps the current span under, if it can be read directly.

    ``trace.get_current_span()`` is ``get_current().get(key)`` behind three Python calls and an ``isinstance``
    check against an ABC: about 0.2 µs, on every decision inside a recording span. Reading the key ourselves
    (through the public ``context.get_current()``, so a replaced runtime context is still followed) costs about
    0.07 µs. The key (``opentelemetry.trace.propagation._SPAN_KEY``) is private, so it is used only if
    ``set_span_in_context`` is seen to store the span under it; else decisions use ``get_current_span()``.
    """
    key = getattr(_propagation, "_SPAN_KEY", None)
    probe = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    try:
        stored = trace.set_span_in_context(probe, otel_context.Context()).get(key) if isinstance(key, str) else None
    except Exception:  # pragma: no cover - an API that works differently: the public lookup
        stored = None
    return key if stored is probe else None


_SPAN_KEY = _readable_span_key()
_set_span_in_context = trace.set_span_in_context
_attach = otel_context.attach
_detach = otel_context.detach
_INTERNAL = SpanKind.INTERNAL

SpanHandle: TypeAlias = "tuple[trace.Span, object]"
"""A started routed-call span and the context token that made it current."""
ParentContext: TypeAlias = "OtelContext"
"""An OpenTelemetry context captured on one thread to parent a span started on another."""


def error_type(error: BaseException) -> str:
    """The ``error.type`` of an exception: its qualified class name, as the SDK writes ``exception.type``."""
    cls = type(error)
    module = cls.__module__
    return f"{module}.{cls.__qualname__}" if module and module != "builtins" else cls.__qualname__


_ERROR_TYPES: dict[type[BaseException], str] = {}


def _metric_error_type(error: BaseException | None) -> str:
    """``error.type`` for a metric: cached per class, ``_OTHER`` beyond a bounded number of classes."""
    if error is None:
        return OTHER
    cls = type(error)
    name = _ERROR_TYPES.get(cls)
    if name is None:
        if len(_ERROR_TYPES) >= _MAX_ERROR_TYPES:
            return OTHER
        name = _ERROR_TYPES[cls] = error_type(error)
    return name


class _Instruments:
    """The instruments of one meter provider, shared by every :class:`Telemetry` that uses it.

    OpenTelemetry registers an instrument name once per meter, so two routers on one provider must
    share the instruments (a second registration would only log a warning and drop its callback).

    Decisions are counted here and reported by an asynchronous counter when the reader collects: a
    synchronous ``Counter.add`` costs several microseconds in the Python SDK on every decision (see
    ``bench/bench_telemetry.py``), this costs a dict lookup and an ``itertools.count`` step.
    """

    def __init__(self, meter: otel_metrics.Meter) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, str, str], itertools.count[int]] = {}
        """Per series, an ``itertools.count`` advanced once per decision (``next`` is atomic: no lock)."""
        self.reads: dict[tuple[str, str, str], int] = {}
        """Per series, how often the callback advanced the counter itself to read it."""
        self.attributes: dict[tuple[str, str, str], dict[str, str]] = {}
        try:
            self.duration = meter.create_histogram(
                DURATION,
                unit="s",
                description="Duration of calls routed by canary_router, per rollout and served variant.",
                explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
            )
        except TypeError:  # an API older than the bucket advice: the SDK's default buckets
            self.duration = meter.create_histogram(
                DURATION, unit="s", description="Duration of calls routed by canary_router."
            )
        meter.create_observable_counter(
            DECISIONS,
            callbacks=[self.observe],
            unit="{decision}",
            description="Decisions made by canary_router, per rollout, variant and reason.",
        )

    def counter(self, key: tuple[str, str, str]) -> itertools.count[int]:
        """The counter of a series seen for the first time (``_OTHER`` once there are too many series)."""
        with self.lock:
            found = self.counters.get(key)
            if found is not None:
                return found
            if len(self.counters) >= _MAX_SERIES:
                key = (OTHER, key[1], key[2])
                found = self.counters.get(key)
                if found is not None:
                    return found
            found = self.counters[key] = itertools.count()
            return found

    def observe(self, options: otel_metrics.CallbackOptions) -> Iterable[otel_metrics.Observation]:
        """The asynchronous counter's callback: the cumulative count of every series."""
        observations = []
        with self.lock:  # one reader at a time: ``reads`` must match the callback's own ``next`` calls
            for key, counter in self.counters.copy().items():
                reads = self.reads.get(key, 0)
                value = next(counter) - reads  # next() returns decisions + earlier reads, then advances
                self.reads[key] = reads + 1
                attributes = self.attributes.get(key)
                if attributes is None:
                    name, variant, reason = key
                    attributes = {KEY: name, VARIANT: variant, REASON: _RESULT_REASON.get(reason, "unknown")}
                    failure = _DECISION_ERROR.get(reason)
                    if failure is not None:
                        attributes[ERROR_TYPE] = failure
                    self.attributes[key] = attributes
                observations.append(otel_metrics.Observation(value, attributes))
        return observations

    def reset_after_fork(self) -> None:
        """Start a forked child at zero, with a fresh lock (the parent's may have been held)."""
        self.lock = threading.Lock()
        self.counters = {}
        self.reads = {}


_REGISTRY_LOCK = threading.Lock()
_GLOBAL_INSTRUMENTS: list[_Instruments] = []
_PROVIDER_INSTRUMENTS: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()


def _instruments_for(meter_provider: otel_metrics.MeterProvider | None) -> _Instruments:
    """The shared instruments of ``meter_provider`` (``None``: the global provider), created once."""
    with _REGISTRY_LOCK:
        if meter_provider is None:
            if not _GLOBAL_INSTRUMENTS:
                _GLOBAL_INSTRUMENTS.append(_Instruments(otel_metrics.get_meter(SCOPE, __version__)))
            return _GLOBAL_INSTRUMENTS[0]
        try:
            found = _PROVIDER_INSTRUMENTS.get(meter_provider)
        except TypeError:  # a provider that cannot be weakly referenced: instruments of its own
            return _Instruments(otel_metrics.get_meter(SCOPE, __version__, meter_provider))
        if found is None:
            found = _Instruments(otel_metrics.get_meter(SCOPE, __version__, meter_provider))
            _PROVIDER_INSTRUMENTS[meter_provider] = found
        return found


def _after_fork_in_child() -> None:
    for instruments in [*_GLOBAL_INSTRUMENTS, *_PROVIDER_INSTRUMENTS.values()]:
        instruments.reset_after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _emit_accepts_event_name() -> bool:
    try:
        return "event_name" in inspect.signature(_logs.Logger.emit).parameters
    except (TypeError, ValueError):  # pragma: no cover - an unintrospectable API
        return False


class Telemetry:
    """OpenTelemetry spans, events and metrics for a :class:`~canary_router.Router`.

    ``Router(..., telemetry=Telemetry(...))``; the router's default is ``Telemetry()`` on the global
    providers, so an SDK configured later (``trace.set_tracer_provider(...)``) is used from then on,
    and ``telemetry=None`` turns it off. Pass ``tracer_provider`` / ``meter_provider`` /
    ``logger_provider`` to use those instead of the global ones (tests, several pipelines).

    ``event_mode`` is ``"span"`` (the ``feature_flag.evaluation`` event on the current span, when it
    records) or ``"log"`` (a log-based event through the Logs API on every decision; no span event).
    ``context_id=True`` adds ``feature_flag.context.id`` (the unit id the decision was bucketed by,
    usually a user id) to the event; it never goes on a metric. ``set_id`` fills ``feature_flag.set.id``.

    A bad argument raises at construction; at run time every failure is logged (at most once a minute
    per kind) and swallowed.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: otel_metrics.MeterProvider | None = None,
        logger_provider: _logs.LoggerProvider | None = None,
        event_mode: Literal["span", "log"] = "span",
        context_id: bool = False,
        set_id: str | None = None,
    ) -> None:
        if event_mode not in ("span", "log"):
            raise ValueError(f"event_mode must be 'span' or 'log', got {event_mode!r}")
        if set_id is not None and (not isinstance(set_id, str) or not set_id):
            raise ValueError(f"set_id must be a non-empty string or None, got {set_id!r}")
        if not isinstance(context_id, bool):
            raise TypeError(f"context_id must be True or False, got {context_id!r}")
        if event_mode == "log" and not _emit_accepts_event_name():
            raise ValueError(
                "event_mode='log' needs an opentelemetry-api whose Logger.emit accepts event_name; "
                "upgrade opentelemetry-api or use event_mode='span'"
            )
        self.event_mode = event_mode
        self.context_id = context_id
        self.set_id = set_id
        self._log_mode = event_mode == "log"
        # True: do the work without asking whether a global provider is set (explicit provider given,
        # or the API's globals are unreadable).
        self._traced = tracer_provider is not None or not _GLOBALS_READABLE
        self._metered = meter_provider is not None or not _GLOBALS_READABLE
        self._logged = logger_provider is not None or not _GLOBALS_READABLE
        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
        self._logger = _logs.get_logger(SCOPE, __version__, logger_provider)
        self._instruments: _Instruments | None
        try:
            self._instruments = _instruments_for(meter_provider)
        except Exception as exc:  # a broken meter provider: no metrics, never an exception
            _log.warning("canary_router: cannot create the OpenTelemetry instruments (%r); metrics are off", exc)
            self._instruments = None
        self._event_attrs: dict[tuple[str, str, str], tuple[object, dict[str, str]]] = {}
        self._span_attrs: dict[tuple[str, str, bool], dict[str, Any]] = {}
        self._span_names: dict[str, str] = {}
        self._duration_attrs: dict[tuple[str, str, str | None, bool], dict[str, Any]] = {}
        self._warn = Throttled(_log, "canary_router: telemetry: ")
        """Logs a problem at most once a minute per kind."""

    def __repr__(self) -> str:
        return f"Telemetry(event_mode={self.event_mode!r}, context_id={self.context_id!r}, set_id={self.set_id!r})"

    # ------------------------------------------------------------------ state of the providers

    def _tracing(self) -> bool:
        """Whether routed-call spans are created: an explicit or a global tracer provider is set."""
        return self._traced or trace._TRACER_PROVIDER is not None

    # ------------------------------------------------------------------ decisions (Router.decide)

    def _decided(self, name: str, decision: Decision, router: Router) -> None:
        """Count one decision and emit its ``feature_flag.evaluation`` event. Never raises.

        ``decision`` is the one served: in shadow mode the decorator calls this itself (not :meth:`Router.decide`)
        with a shadowed call's decision turned into a shadow decision ("old", reason ``shadow``).
        """
        try:
            key = (name, decision[0], decision[1])
            if self._metered or _metrics_internal._METER_PROVIDER is not None:
                instruments = self._instruments
                if instruments is not None:
                    counter = instruments.counters.get(key)
                    if counter is None:
                        counter = instruments.counter(key)
                    next(counter)
            if self._log_mode:
                if self._logged or _logs_internal._LOGGER_PROVIDER is not None:
                    attributes = self._event_attributes(key, decision, router)
                    self._logger.emit(event_name=EVENT_NAME, attributes=attributes)
            elif self._traced or trace._TRACER_PROVIDER is not None:
                span: trace.Span | None = (
                    _get_current().get(_SPAN_KEY)  # type: ignore[assignment]  # what set_span_in_context stored
                    if _SPAN_KEY is not None
                    else _get_current_span()
                )
                if span is not None and span.is_recording():
                    # the cached attributes as they are (no copy) while the rollout's state is the one they were
                    # built from; the SDK copies them into the event anyway
                    cached = self._event_attrs.get(key)
                    compiled = router._compiled.get(name)
                    if cached is None or compiled is None or cached[0] is not compiled.live or self.context_id:
                        span.add_event(EVENT_NAME, self._event_attributes(key, decision, router))
                    else:
                        span.add_event(EVENT_NAME, cached[1])
        except Exception as exc:
            self._warn("decision", f"cannot record the decision of {name!r}: {exc!r}")

    def _event_attributes(self, key: tuple[str, str, str], decision: Decision, router: Router) -> dict[str, str]:
        """The event's attributes for ``key`` = (rollout, variant, reason), cached until the rollout's state changes.

        The cache entry holds the router's state object it was built from (swapped whole on every change), so a
        hit is an identity check; its ``version`` becomes ``feature_flag.version``.
        """
        name, variant, reason = key
        compiled = router._compiled.get(name)
        live = None if compiled is None else compiled.live  # the state decisions are made from
        cached = self._event_attrs.get(key)
        if cached is not None and cached[0] is live:
            attributes = cached[1]
        else:
            version = None if live is None else live.version
            attributes = {
                KEY: name,
                VARIANT: variant,
                REASON: _RESULT_REASON.get(reason, "unknown"),
                PROVIDER: PROVIDER_NAME,
            }
            failure = _DECISION_ERROR.get(reason)
            if failure is not None:
                attributes[ERROR_TYPE] = failure
            if self.set_id is not None:
                attributes[SET_ID] = self.set_id
            if version:
                attributes[VERSION] = str(version)
            if len(self._event_attrs) >= _MAX_CACHE:
                self._event_attrs.clear()
            self._event_attrs[key] = (live, attributes)
        if self.context_id:
            unit = decision[3]
            if unit is not None:
                return {**attributes, CONTEXT_ID: unit}
        return attributes

    # ------------------------------------------------------------------ routed calls (the decorator)

    def _span_start(
        self, name: str, variant: str, shadow: bool = False, parent: ParentContext | None = None
    ) -> SpanHandle | None:
        """Start the routed call's INTERNAL span and make it current; ``None`` when tracing is off."""
        if not (self._traced or trace._TRACER_PROVIDER is not None):
            return None
        try:
            span_name = self._span_names.get(name)
            if span_name is None:
                span_name = f"canary_router.invoke {name}"
                if len(self._span_names) < _MAX_CACHE:
                    self._span_names[name] = span_name
            key = (name, variant, shadow)
            attributes = self._span_attrs.get(key)
            if attributes is None:
                attributes = {KEY: name, VARIANT: variant}
                if shadow:
                    attributes[SHADOW] = True
                if len(self._span_attrs) >= _MAX_CACHE:
                    self._span_attrs.clear()
                self._span_attrs[key] = attributes
            span = self._tracer.start_span(span_name, context=parent, kind=_INTERNAL, attributes=attributes)
            try:
                token = _attach(_set_span_in_context(span, parent))
            except Exception:
                span.end()
                raise
            return (span, token)
        except Exception as exc:
            self._warn("span", f"cannot start the span of {name!r}: {exc!r}")
            return None

    def _span_end(self, handle: SpanHandle, error: BaseException | None) -> None:
        """End a span from :meth:`_span_start`; a failure sets ERROR, ``error.type`` and records it.

        The span is ended and the context restored even when one of the steps fails.
        """
        span, token = handle
        try:
            _detach(token)  # type: ignore[arg-type]
            if error is not None:
                span.set_attribute(ERROR_TYPE, error_type(error))
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                span.record_exception(error)
        except Exception as exc:
            self._warn("span", f"cannot complete a span: {exc!r}")
        finally:
            try:
                span.end()
            except Exception as exc:
                self._warn("span", f"cannot end a span: {exc!r}")

    def _parent(self) -> ParentContext | None:
        """The current OpenTelemetry context, to parent a span started on another thread (``None``: off)."""
        if not (self._traced or trace._TRACER_PROVIDER is not None):
            return None
        try:
            return otel_context.get_current()
        except Exception as exc:  # pragma: no cover - the API's context itself failed
            self._warn("span", f"cannot read the OpenTelemetry context: {exc!r}")
            return None

    # ------------------------------------------------------------------ observations (Router._observe)

    def _observed(
        self,
        name: str,
        variant: str,
        duration: float,
        ok: bool,
        error: BaseException | None,
        shadow: bool = False,
        error_type: str | None = None,
    ) -> None:
        """Record a routed call's duration, with ``error.type`` when it failed. Never raises.

        ``variant`` is the version that ran; ``shadow=True`` marks a shadow run of the new version (its result was
        not served), which gets ``canary_router.shadow = true`` so it never mixes with served calls.
        """
        if not (self._metered or _metrics_internal._METER_PROVIDER is not None):
            return
        try:
            instruments = self._instruments
            if instruments is None:
                return
            failure = None if ok else (error_type if error is None and error_type else _metric_error_type(error))
            key = (name, variant, failure, shadow)
            attributes = self._duration_attrs.get(key)
            if attributes is None:
                attributes = {KEY: name, VARIANT: variant}
                if shadow:
                    attributes[SHADOW] = True
                if failure is not None:
                    attributes[ERROR_TYPE] = failure
                if len(self._duration_attrs) >= _MAX_CACHE:
                    self._duration_attrs.clear()
                self._duration_attrs[key] = attributes
            if math.isfinite(duration) and duration >= 0:
                instruments.duration.record(duration, attributes)
        except Exception as exc:
            self._warn("duration", f"cannot record the duration of a {name!r} call: {exc!r}")
