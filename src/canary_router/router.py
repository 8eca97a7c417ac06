"""The Router: the one place a decision is made, and the control methods over rollout state."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import mmh3

from ._flush import Outbox
from ._throttle import Throttled
from .bucketing import threshold
from .config import Config, _conditions, _Issues, load_config, load_file
from .context import _DEFERRED, IDENTITY_ATTRIBUTES, Context, _current, use_context
from .errors import CanaryError, ConflictError, StoreError, TransitionError, UnknownRolloutError
from .model import (
    NEW,
    OLD,
    AuditRecord,
    Condition,
    Decision,
    Observation,
    Phase,
    Reason,
    Rollout,
    RolloutState,
    RolloutStatus,
    Variant,
)
from .notify import Notifier, Webhook
from .observe import Aggregator, HistorySlot, StepSnapshot
from .rules import CURRENT_TIME, Predicate, compile_condition
from .shadow import ShadowPool, ShadowStats
from .stores._url import open_store
from .stores.base import Lease, SharedStore, Store, Versioned
from .stores.memory import MemoryStore
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .analysis import Check, Verdict
    from .controller import Controller
    from .decorators import ContextSource

__all__ = ["Router"]

_log = logging.getLogger("canary_router")

P = ParamSpec("P")
R = TypeVar("R")

Observer = Callable[[Observation], None]

_ROLLED_BACK = Decision(OLD, Reason.ROLLED_BACK, None)
_COMPLETED = Decision(NEW, Reason.COMPLETED, None)
_STALE = Decision(OLD, Reason.STALE, None)
STATE_LOST = "state lost"
"""The reason prefix of a state restored after the store lost it."""
_UNKNOWN = Decision(OLD, Reason.UNKNOWN_ROLLOUT, None)
_ERROR = Decision(OLD, Reason.ERROR, None)
_NO_UNIT = Decision(OLD, Reason.NO_UNIT, None)
_OVERRIDE = {NEW: Decision(NEW, Reason.OVERRIDE, None), OLD: Decision(OLD, Reason.OVERRIDE, None)}
_FULL = {
    Reason.SPLIT: (Decision(OLD, Reason.SPLIT, None), Decision(NEW, Reason.SPLIT, None)),
    Reason.RULE_SPLIT: (Decision(OLD, Reason.RULE_SPLIT, None), Decision(NEW, Reason.RULE_SPLIT, None)),
}
_SPLIT = Reason.SPLIT
_SHADOW = Reason.SHADOW
_RULE_SPLIT = Reason.RULE_SPLIT
_hash = mmh3.hash
_new_decision = tuple.__new__


class _Rule:
    """A rule compiled for the hot path."""

    __slots__ = ("decision", "predicates", "threshold")

    def __init__(self, predicates: tuple[Predicate, ...], serve: Variant | None, percent: float | None):
        self.predicates = predicates
        self.decision = Decision(serve, Reason.RULE_MATCH, None) if serve is not None else None
        self.threshold = threshold(percent) if percent is not None else 0


class _Live:
    """The locally known state of a rollout, swapped whole on every change (never mutated)."""

    __slots__ = ("epoch", "fixed", "shadow", "state", "threshold", "version")

    def __init__(self, state: RolloutState, version: int, stale: bool = False):
        self.fixed = (
            _STALE if stale else {Phase.ROLLED_BACK: _ROLLED_BACK, Phase.COMPLETED: _COMPLETED}.get(state.phase)
        )
        self.threshold = threshold(state.percent)
        self.shadow = state.shadow
        self.epoch = state.epoch
        self.state = state
        self.version = version


class _Compiled:
    """A rollout compiled for the hot path, with its locally known state (``live``, swapped atomically)."""

    __slots__ = ("identity_only", "live", "prefix", "rollout", "rules", "stickiness")

    def __init__(self, rollout: Rollout, rules: tuple[_Rule, ...], attributes: frozenset[str]):
        self.rollout = rollout
        self.prefix = rollout.effective_salt + ":"
        self.stickiness = rollout.stickiness
        self.rules = rules
        self.identity_only = attributes <= IDENTITY_ATTRIBUTES
        """Whether the rollout reads no attribute but ``user_id`` and ``session_id`` (a lazy web request then
        decides on its identity alone, without working out its other attributes)."""
        self.live: _Live


def _attributes_of(conditions: Iterable[Condition]) -> frozenset[str]:
    """The context attributes ``conditions`` read (``current_time`` is the clock's, not the context's)."""
    return frozenset(cond.attribute for cond in conditions if cond.attribute != CURRENT_TIME)


def _step_index_for(steps: Sequence[float], percent: float) -> int:
    """Index of the last step at or below ``percent`` (-1 when below the first step)."""
    index = -1
    for i, step in enumerate(steps):
        if step <= percent + 1e-9:
            index = i
    return index


class Router:
    """Decides, per rollout and context, whether to serve the old or the new version.

    ``Router(rollouts=[...], store=MemoryStore(), clock=time.time)``; usually built with
    :meth:`from_file` or :meth:`from_config`. :meth:`decide` never raises; the control methods
    (:meth:`promote`, :meth:`rollback`, ...) change the shared state with compare-and-set and an audit record.
    ``telemetry`` is a :class:`~canary_router.telemetry.Telemetry`; the default (``"global"``) reports to
    the global OpenTelemetry providers (a no-op until an SDK is configured), ``None`` turns it off.
    """

    def __init__(
        self,
        rollouts: Iterable[Rollout] | Mapping[str, Rollout | Mapping[str, Any]] = (),
        *,
        store: Store | None = None,
        segments: Mapping[str, Sequence[Condition | Mapping[str, Any]]] | None = None,
        clock: Callable[[], float] | None = None,
        record: bool = True,
        webhooks: Sequence[str | Webhook] = (),
        telemetry: Telemetry | Literal["global"] | None = "global",
        share_observations: bool | None = None,
        flush_interval: float = 1.0,
        refresh_interval: float = 5.0,
        stale_after: float | None = None,
    ) -> None:
        self._clock: Callable[[], float] = clock or time.time
        if telemetry == "global":
            telemetry = Telemetry()
        elif telemetry is not None and not isinstance(telemetry, Telemetry):
            raise TypeError(f"telemetry must be a Telemetry, None or 'global', got {telemetry!r}")
        self._telemetry: Telemetry | None = telemetry
        self._aggregator: Aggregator | None = Aggregator() if record else None
        self._checks: dict[str, tuple[Check, ...]] = {}
        self._notifier = Notifier()
        self._controller: Controller | None = None
        self._shadow: dict[str, ShadowStats] = {}
        self._shadow_pool: ShadowPool | None = None
        self._shadow_max_pending = 64
        for hook in webhooks:
            self._notifier.subscribe(hook if isinstance(hook, Webhook) else Webhook(hook))
        self._store: Store = store if store is not None else open_store(None)
        if share_observations is None:
            share_observations = isinstance(self._store, SharedStore) and not isinstance(self._store, MemoryStore)
        if share_observations and not isinstance(self._store, SharedStore):
            raise TypeError(f"share_observations needs a SharedStore, got {type(self._store).__name__}")
        if flush_interval <= 0 or refresh_interval <= 0 or (stale_after is not None and stale_after <= 0):
            raise ValueError("flush_interval, refresh_interval and stale_after must be > 0")
        self._shared: SharedStore | None = self._store if share_observations else None  # type: ignore[assignment]
        self._outbox = Outbox(self._aggregator) if self._shared is not None and self._aggregator is not None else None
        self._flush_lock = threading.Lock()
        self._flush_interval = flush_interval
        self._refresh_interval = refresh_interval
        self._stale_after = stale_after
        self._stale = False
        self._last_contact = self._clock()
        self._store_errors = 0
        self._last_error = ""
        self._restored = 0
        self._sync_thread: threading.Thread | None = None
        self._sync_stop = threading.Event()
        self._rollouts = self._collect(rollouts, segments)
        self._segments, self._segment_attributes = self._compile_segments(segments)
        self._compiled: dict[str, _Compiled] = {
            name: _Compiled(rollout, self._compile_rules(rollout), self._attributes_read(rollout))
            for name, rollout in self._rollouts.items()
        }
        self._observers: tuple[Observer, ...] = ()
        self._forced: dict[str, Variant] = {}
        self._lock = threading.RLock()
        self._warn = Throttled(_log, "canary_router: ")
        """Logs a problem at most once a minute per kind."""
        for compiled in self._compiled.values():
            compiled.live = self._initial_live(compiled.rollout)
        self._unsubscribe = self._store.subscribe(self._on_store_change)
        self._needs_sync = (
            self._shared is not None or stale_after is not None or not isinstance(self._store, MemoryStore)
        )
        _ROUTERS.add(self)
        if self._needs_sync:
            self._start_sync()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | Config,
        *,
        store: Store | None = None,
        clock: Callable[[], float] | None = None,
        telemetry: Telemetry | Literal["global"] | None = "global",
        record: bool = True,
        **options: Any,
    ) -> Router:
        """Build a router from a configuration mapping (the shape of the TOML file) or a loaded :class:`Config`.

        The keywords are those of :class:`Router`. The store is ``store`` when given, else the one the
        configuration's ``[store] url`` names, else the ``CANARY_ROUTER_STORE`` environment variable's,
        else a :class:`~canary_router.MemoryStore`; ``[store]`` also sets ``stale_after``,
        ``refresh_interval`` and ``flush_interval`` unless passed here.
        """
        loaded = config if isinstance(config, Config) else load_config(config)
        if store is None:
            store = open_store(loaded.store_url)
        options.setdefault("stale_after", loaded.stale_after)
        options.setdefault("refresh_interval", loaded.refresh_interval)
        options.setdefault("flush_interval", loaded.flush_interval)
        hooks = [
            Webhook(url, timeout=loaded.webhook_timeout, retries=loaded.webhook_retries) for url in loaded.webhooks
        ]
        return cls(
            loaded.rollouts.values(),
            store=store,
            segments=loaded.segments,
            clock=clock,
            webhooks=hooks,
            telemetry=telemetry,
            record=record,
            **options,
        )

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        store: Store | None = None,
        clock: Callable[[], float] | None = None,
        telemetry: Telemetry | Literal["global"] | None = "global",
        record: bool = True,
        **options: Any,
    ) -> Router:
        """Build a router from a TOML file (YAML when PyYAML is installed, or JSON); as :meth:`from_config`."""
        return cls.from_config(load_file(path), store=store, clock=clock, telemetry=telemetry, record=record, **options)

    @staticmethod
    def _collect(
        rollouts: Iterable[Rollout] | Mapping[str, Rollout | Mapping[str, Any]],
        segments: Mapping[str, Any] | None,
    ) -> dict[str, Rollout]:
        if isinstance(rollouts, Mapping):
            if all(isinstance(v, Rollout) for v in rollouts.values()):
                items: list[Any] = list(rollouts.values())
            else:
                data: dict[str, Any] = {"rollouts": dict(rollouts)}
                if segments:
                    data["segments"] = {
                        name: {"when": [_condition_mapping(c) for c in conds]} for name, conds in segments.items()
                    }
                return dict(load_config(data).rollouts)
        else:
            items = list(rollouts)
        issues = _Issues()
        out: dict[str, Rollout] = {}
        for index, rollout in enumerate(items):
            if not isinstance(rollout, Rollout):
                issues.add(f"rollouts[{index}]", f"expected a Rollout, got {type(rollout).__name__}")
            elif rollout.name in out:
                issues.add(f"rollouts.{rollout.name}", f"duplicate rollout name {rollout.name!r}")
            else:
                out[rollout.name] = rollout
        for name, rollout in out.items():
            for r_index, rule in enumerate(rollout.rules):
                for s_index, seg in enumerate(rule.segments):
                    if not segments or seg not in segments:
                        issues.add(
                            f"rollouts.{name}.rules[{r_index}].segments[{s_index}]",
                            f"unknown segment {seg!r}",
                            f"defined segments: {', '.join(segments or {}) or 'none'}",
                        )
        issues.raise_if_any()
        return out

    @staticmethod
    def _compile_segments(
        segments: Mapping[str, Sequence[Condition | Mapping[str, Any]]] | None,
    ) -> tuple[dict[str, tuple[Predicate, ...]], dict[str, frozenset[str]]]:
        """Each segment's compiled conditions, and the context attributes they read."""
        compiled: dict[str, tuple[Predicate, ...]] = {}
        attributes: dict[str, frozenset[str]] = {}
        issues = _Issues()
        for name, conds in (segments or {}).items():
            checked = _conditions(list(conds), f"segments.{name}.when", issues)
            if checked is not None:
                compiled[name] = tuple(compile_condition(c) for c in checked)
                attributes[name] = _attributes_of(checked)
        issues.raise_if_any()
        return compiled, attributes

    def _attributes_read(self, rollout: Rollout) -> frozenset[str]:
        """The context attributes a rollout's decision reads: its stickiness and its rules' (segments included)."""
        names = set(rollout.stickiness)
        for rule in rollout.rules:
            names.update(_attributes_of(rule.when))
            for seg in rule.segments:
                names.update(self._segment_attributes[seg])
        return frozenset(names)

    def _compile_rules(self, rollout: Rollout) -> tuple[_Rule, ...]:
        out: list[_Rule] = []
        for rule in rollout.rules:
            predicates: list[Predicate] = []
            for seg in rule.segments:
                predicates.extend(self._segments[seg])
            predicates.extend(compile_condition(c) for c in rule.when)
            out.append(_Rule(tuple(predicates), rule.serve, rule.percent))
        return tuple(out)

    def _initial_state(self, rollout: Rollout) -> RolloutState:
        if rollout.start is Phase.PAUSED:
            reason = "configured to start paused"
        elif rollout.shadow:
            reason = "first seen: starting with the shadow step"
        else:
            reason = "first seen: starting at the first step"
        now = self._clock()
        return RolloutState(
            phase=rollout.start,
            step_index=-1 if rollout.shadow else 0,
            percent=rollout.steps[0],
            updated_at=now,
            reason=reason,
            actor="router",
            epoch=1,
            step_started_at=now,
            shadow=rollout.shadow,
        )

    def _initial_live(self, rollout: Rollout) -> _Live:
        """Read the rollout's state from the store, creating it (CAS) when the store has none."""
        name = rollout.name
        try:
            current = self._store.get(name)
            if current is None:
                state = self._initial_state(rollout)
                record = self._record(name, "start", None, state, "router", state.reason, {})
                try:
                    version = self._store.compare_and_set(name, None, state, record)
                    self._notifier.publish(replace(record, version=version))
                    return _Live(state, version)
                except Exception:
                    current = self._store.get(name)
                    if current is None:
                        raise
            return _Live(current.state, current.version)
        except Exception as exc:
            _log.warning(
                "canary_router: cannot read the state of rollout %r from the store (%s); serving its "
                "configured start state until the store answers",
                name,
                exc,
            )
            return _Live(self._initial_state(rollout), 0)

    # ------------------------------------------------------------------ the hot path

    def decide(self, name: str, context: Context | Mapping[str, Any] | None = None) -> Decision:
        """Decide which variant of rollout ``name`` to serve for ``context`` (default: the ambient context).

        Order: signed override, then rollout state (rolled back / completed), then targeting rules (first
        match wins), then the step's percentage. Never raises: an unknown rollout, a missing unit or an
        odd attribute value all get ``"old"`` (or the rule's answer) with a reason saying why. With
        telemetry on, the decision is counted and reported as a ``feature_flag.evaluation`` event.
        """
        decision = self._decide(name, context)
        telemetry = self._telemetry
        if telemetry is not None:
            telemetry._decided(name, decision, self)
        return decision

    def _decide(self, name: str, context: Context | Mapping[str, Any] | None) -> Decision:
        """The decision itself (:meth:`decide` without the telemetry)."""
        try:
            compiled = self._compiled.get(name)
            if compiled is None:
                return _UNKNOWN
            if context is None:
                context = _current.get()
            if self._forced:
                forced = self._forced.get(name)
                if forced is not None:
                    return _OVERRIDE[forced]
            kind = type(context)
            pins = None
            if kind is dict:
                attrs: Mapping[str, Any] = context
            elif kind is Context:
                attrs = context._attrs  # type: ignore[attr-defined]
                overrides = context._overrides  # type: ignore[attr-defined]
                if overrides:
                    chosen = overrides.get(name)
                    if chosen is not None:
                        return _OVERRIDE[chosen]
                pins = context._pins or None  # type: ignore[attr-defined]
            elif kind in _DEFERRED:  # a web request's context, resolved on first use
                resolved: Context | None = context._resolved  # type: ignore[attr-defined]
                if resolved is None:
                    # the request's identity is enough for most rollouts, and much cheaper than all of it
                    resolved = context._identity() if compiled.identity_only else context._get()  # type: ignore[attr-defined]
                attrs = resolved._attrs
                overrides = resolved._overrides
                if overrides:
                    chosen = overrides.get(name)
                    if chosen is not None:
                        return _OVERRIDE[chosen]
                pins = resolved._pins or None
            elif isinstance(context, Mapping):
                attrs = context
            else:  # defensive: callers may ignore the annotation
                self._warn(  # type: ignore[unreachable]
                    "context", f"decide({name!r}): context must be a mapping, got {kind.__name__}"
                )
                return _ERROR
            live = compiled.live
            if live.fixed is not None:
                return live.fixed
            if pins is not None:
                pinned = pins.get(name)
                if pinned is not None:
                    # decide as if unpinned (a plain mapping carries no pins), then keep the pinned variant
                    natural = self._decide(name, dict(attrs))
                    if natural[0] == pinned:
                        return natural
                    return _new_decision(Decision, (pinned, Reason.PINNED, natural[2], natural[3]))
            limit = live.threshold
            reason = _SPLIT
            for rule in compiled.rules:
                for predicate in rule.predicates:
                    if not predicate(attrs, self._clock):
                        break
                else:
                    if rule.decision is not None:
                        return rule.decision
                    limit = rule.threshold
                    reason = _RULE_SPLIT
                    break
            unit: Any = None
            for attribute in compiled.stickiness:
                unit = attrs.get(attribute)
                if unit is not None and unit != "":
                    break
            else:
                unit = None
            if unit is None:
                if limit <= 0 or live.shadow:
                    return _FULL[reason][0]
                if limit >= 10000:
                    return _FULL[reason][1]
                return _NO_UNIT
            if type(unit) is not str:
                unit = str(unit)
            # the v1 bucket (bucketing.bucket), inlined to save a call on the hot path
            h = _hash((compiled.prefix + unit).encode(), 0, False)
            b = (h % 100) * 100 + (h // 100) % 100
            if b < limit:
                if live.shadow:
                    return _new_decision(Decision, (OLD, _SHADOW, b, unit))
                return _new_decision(Decision, (NEW, reason, b, unit))
            return _new_decision(Decision, (OLD, reason, b, unit))
        except Exception as exc:  # the hot path never raises because of us
            self._warn("decide", f"decide({name!r}) failed, serving 'old': {exc!r}")
            return _ERROR

    @property
    def telemetry(self) -> Telemetry | None:
        """The OpenTelemetry instrumentation of this router (``None`` when built with ``telemetry=None``)."""
        return self._telemetry

    # ------------------------------------------------------------------ context and observation

    def context(self, attributes: Mapping[str, Any] | None = None, /, **kwargs: Any) -> AbstractContextManager[Context]:
        """Make these attributes the ambient context for a ``with`` block (laid over the enclosing one)."""
        return use_context(attributes, **kwargs)

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        """Deliver every routed call's :class:`Observation` to ``observer``; returns a function that removes it.

        Observers run on the calling thread, so they must be quick; an observer that raises is logged and
        skipped, never propagated to the application.
        """
        with self._lock:
            self._observers = (*self._observers, observer)

        def remove() -> None:
            with self._lock:
                self._observers = tuple(o for o in self._observers if o is not observer)

        return remove

    def _observe(
        self,
        name: str,
        decision: Decision,
        ok: bool,
        duration: float,
        error: BaseException | None = None,
        fell_back: bool = False,
        variant: Variant | None = None,
        error_type: str | None = None,
    ) -> None:
        """Record one routed call: into the guard's aggregates, then to the observers (never raises).

        ``error_type`` names a failure that raised nothing (the HTTP status of a 5xx response in split mode).
        """
        try:
            compiled = self._compiled.get(name)
            if compiled is None:
                return
            now = self._clock()
            served = variant or decision[0]
            reason = decision[1]
            telemetry = self._telemetry
            if telemetry is not None:  # a shadow run ("new" run for a call served by "old") is marked as one
                telemetry._observed(
                    name, served, duration, ok, error, reason is _SHADOW and served != decision[0], error_type
                )
            if self._aggregator is not None:
                self._aggregator.record(
                    name,
                    compiled.live.epoch,
                    served,
                    ok,
                    duration,
                    decision[3],
                    # units count for the sample-ratio check by cohort: a split unit in its variant, a shadowed
                    # unit in "new" (it is in the new cohort, though "old" was served)
                    True if reason is _SPLIT else ("new" if reason is _SHADOW else False),
                    now,
                )
            observers = self._observers
            if not observers:
                return
            observation = Observation(name, served, ok, duration, now, decision[3], reason, error, fell_back)
        except Exception as exc:
            self._warn("observe", f"cannot record an observation: {exc!r}")
            return
        for observer in observers:
            try:
                observer(observation)
            except Exception as exc:
                self._warn("observer", f"observer {observer!r} failed: {exc!r}")

    def canary(
        self,
        name: str,
        *,
        old: Callable[P, R],
        context_from: ContextSource | None = None,
        fallback_on_error: bool = False,
        mode: str = "route",
        compare: Callable[[Any, Any], bool] | None = None,
        shadow_timeout: float = 5.0,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate the NEW implementation; calls run new or old per :meth:`decide`.

        ``old`` is the old implementation, with the same signature. The context is the ambient one,
        with attributes taken from the call's arguments laid over it when ``context_from`` is given:
        a parameter name (``"user_id"``), several, a mapping of attribute → parameter name, or a
        callable receiving the call's arguments and returning a mapping. With ``fallback_on_error=True``
        a failure of the new version is recorded against "new" and the old version is run instead;
        otherwise the application's exception propagates unchanged.

        ``mode="shadow"`` never serves the new version: for units the rollout would give "new", the old
        result is served and the new version runs alongside (a background task for async code, a bounded
        thread pool for sync code, cut off after ``shadow_timeout`` seconds); results are compared with
        ``compare(old, new) -> bool`` (default ``==``) and the new version's errors and latency are
        recorded for the guard. In a rollout's shadow step every decorated call behaves like this.
        """
        from .decorators import make_canary

        return make_canary(
            self,
            name,
            old=old,
            context_from=context_from,
            fallback_on_error=fallback_on_error,
            mode=mode,
            compare=compare,
            shadow_timeout=shadow_timeout,
        )

    @property
    def shadow_max_pending(self) -> int:
        """At most this many shadow runs wait or run at once (sync pool; async tasks per function).

        Beyond it shadow runs are skipped, and counted in :meth:`shadow_stats`.
        """
        return self._shadow_max_pending

    @shadow_max_pending.setter
    def shadow_max_pending(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"shadow_max_pending must be >= 0, got {value!r}")
        self._shadow_max_pending = value
        if self._shadow_pool is not None:
            self._shadow_pool.max_pending = value

    @property
    def shadow_pool(self) -> ShadowPool:
        """The bounded thread pool that runs sync shadow calls."""
        pool = self._shadow_pool
        if pool is None:
            with self._lock:
                if self._shadow_pool is None:
                    self._shadow_pool = ShadowPool(max_pending=self._shadow_max_pending)
                pool = self._shadow_pool
        return pool

    # ------------------------------------------------------------------ state

    @property
    def rollouts(self) -> Mapping[str, Rollout]:
        """The rollout definitions, by name."""
        return dict(self._rollouts)

    @property
    def store(self) -> Store:
        """The store holding the shared rollout state."""
        return self._store

    @property
    def clock(self) -> Callable[[], float]:
        """The injected clock (POSIX seconds)."""
        return self._clock

    def _require(self, name: str) -> Rollout:
        rollout = self._rollouts.get(name)
        if rollout is None:
            raise UnknownRolloutError(name, tuple(self._rollouts))
        return rollout

    def _on_store_change(self, name: str, versioned: Versioned) -> None:
        self._contact()
        if name in self._rollouts:
            self._apply(name, versioned.state, versioned.version)

    def _apply(self, name: str, state: RolloutState, version: int) -> None:
        compiled = self._compiled.get(name)
        if compiled is None:
            return
        with self._lock:
            current = compiled.live
            if (
                version > current.version
                or current.version == 0
                or (  # the store lost its state and another instance restored it (versions restart, so
                    # the restored version may equal the one this instance knew from before the loss)
                    version <= current.version
                    and state.reason.startswith(STATE_LOST)
                    and state.updated_at > current.state.updated_at
                )
            ):
                compiled.live = _Live(state, version, self._stale)

    def refresh(self) -> None:
        """Re-read every rollout's state from the store (the store's change notifications normally suffice).

        Also detects a store that lost its state (restarted empty, or re-created from the start by an
        instance that never saw the rollout): the last known state is written back, paused if it was
        running, with a reason starting ``"state lost"`` — never silently restarted.
        """
        try:
            everything = self._store.get_all()
        except Exception as exc:
            self._store_failed(exc)
            raise StoreError(f"cannot read rollout state from the store: {exc}") from exc
        self._contact()
        for name, compiled in self._compiled.items():
            stored = everything.get(name)
            live = compiled.live
            if stored is None:
                if live.version > 0:
                    self._restore(name, live, None)
                else:  # the store was unreachable when this router started: create it now
                    current = self._read(name)
                    self._apply(name, current.state, current.version)
            elif stored.version < live.version and not (
                stored.state.reason.startswith(STATE_LOST) and stored.state.updated_at > live.state.updated_at
            ):
                self._restore(name, live, stored.version)
            else:
                self._apply(name, stored.state, stored.version)

    def _restore(self, name: str, live: _Live, found: int | None) -> None:
        """Write the last known state back after the store lost it (paused when it was running)."""
        before = live.state
        paused = before.phase is Phase.RUNNING
        lost = "no state" if found is None else f"version {found}"
        reason = (
            f"{STATE_LOST}: the store had {lost} where this instance knew version {live.version}; "
            f"restored the last known state ({before.phase.value} at {before.percent:g} %)"
            + (" and paused it" if paused else "")
        )
        state = replace(
            before,
            phase=Phase.PAUSED if paused else before.phase,
            updated_at=max(self._clock(), before.updated_at + 1e-3),
            reason=reason,
            actor="router",
        )
        record = self._record(name, "restore", None, state, "router", reason, {"lost_version": live.version})
        try:
            version = self._store.compare_and_set(name, found, state, record)
        except ConflictError:  # another instance restored (or changed) it first: take theirs
            current = self._store.get(name)
            if current is not None:
                self._apply(name, current.state, current.version)
            return
        _log.warning("canary_router: rollout %r: %s", name, reason)
        self._restored += 1
        compiled = self._compiled[name]
        with self._lock:
            compiled.live = _Live(state, version, self._stale)
        self._notifier.publish(replace(record, version=version))

    # ------------------------------------------------------------------ shared store: sync, flush, fail-safe

    def _contact(self) -> None:
        """The store answered: note it, and leave the stale fail-safe if it was on."""
        self._last_contact = self._clock()
        if self._stale:
            self._set_stale(False)

    def _store_failed(self, exc: BaseException) -> None:
        self._store_errors += 1
        self._last_error = f"{type(exc).__name__}: {exc}"

    def _set_stale(self, stale: bool) -> None:
        with self._lock:
            if self._stale == stale:
                return
            self._stale = stale
            for compiled in self._compiled.values():
                live = compiled.live
                compiled.live = _Live(live.state, live.version, stale)
        if stale:
            _log.warning(
                "canary_router: no answer from the store for over %gs (stale_after): serving 'old' until it answers",
                self._stale_after,
            )
        else:
            _log.warning("canary_router: the store answers again: serving the shared state")

    def flush(self) -> int:
        """Send this process's new observation counts to the shared store now; returns the batches sent.

        The background sync thread does this every ``flush_interval`` seconds. Does nothing (returns 0)
        unless the router shares observations. Raises :class:`~canary_router.StoreError` when the store
        cannot take them; nothing is lost then, the next flush sends them.
        """
        outbox, shared = self._outbox, self._shared
        if outbox is None or shared is None:
            return 0
        sent = 0
        with self._flush_lock:
            for batch, commit in outbox.collect():
                try:
                    shared.add_observations(batch)
                except Exception as exc:
                    self._store_failed(exc)
                    raise StoreError(f"cannot send observations to the store: {exc}") from exc
                commit()
                sent += 1
        if sent:
            self._contact()
        return sent

    def sync(self) -> None:
        """One round of the background sync: flush observations, re-read the state, check staleness.

        Never raises; problems are counted in :meth:`health` and logged (at most once a minute).
        """
        try:
            self.flush()
        except Exception as exc:
            self._warn("flush", f"observations not sent yet (kept for the next flush): {exc}")
        try:
            self.refresh()
        except Exception as exc:
            self._warn("refresh", f"cannot refresh the shared state, serving the last known state: {exc}")
        self._check_stale()

    def _check_stale(self) -> None:
        stale_after = self._stale_after
        if stale_after is not None and not self._stale and self._clock() - self._last_contact > stale_after:
            self._set_stale(True)

    def _start_sync(self) -> None:
        self._sync_stop = threading.Event()
        stop = self._sync_stop
        ref = weakref.ref(self)
        tick = min(self._flush_interval, self._refresh_interval, 0.5)

        def loop() -> None:  # holds only a weak reference: a dropped router ends its thread
            last_flush = last_refresh = time.monotonic()
            while not stop.wait(tick):
                router = ref()
                if router is None:
                    return
                try:
                    now = time.monotonic()
                    if now - last_flush >= router._flush_interval:
                        last_flush = now
                        try:
                            router.flush()
                        except Exception as exc:
                            router._warn("flush", f"observations not sent yet (kept for the next flush): {exc}")
                    quiet = router._stale_after is not None and (
                        router._clock() - router._last_contact > router._stale_after / 3
                    )
                    if now - last_refresh >= router._refresh_interval or quiet:
                        last_refresh = now
                        try:
                            router.refresh()
                        except Exception as exc:
                            router._warn("refresh", f"cannot refresh the shared state, serving the last known: {exc}")
                    router._check_stale()
                except Exception:  # pragma: no cover - the loop must survive anything
                    _log.exception("canary_router: sync round failed")
                del router

        thread = threading.Thread(target=loop, name="canary-router-sync", daemon=True)
        self._sync_thread = thread
        thread.start()

    def _after_fork(self) -> None:
        """In a forked child the parent's threads are gone: new locks, and the sync thread started again."""
        self._lock = threading.RLock()
        self._flush_lock = threading.Lock()
        self._sync_thread = None
        if self._needs_sync and not self._sync_stop.is_set():
            self._start_sync()

    def health(self) -> SyncHealth:
        """How this router's link to the store is doing: last contact, staleness, errors, dropped counts."""
        now = self._clock()
        outbox = self._outbox
        return SyncHealth(
            store=type(self._store).__name__,
            shared_observations=self._shared is not None,
            last_contact=self._last_contact,
            seconds_since_contact=max(0.0, now - self._last_contact),
            stale=self._stale,
            stale_after=self._stale_after,
            store_errors=self._store_errors,
            last_error=self._last_error,
            dropped_observations=outbox.dropped if outbox is not None else 0,
            dropped_history=outbox.dropped_history if outbox is not None else 0,
            restored=self._restored,
        )

    def _read(self, name: str) -> Versioned:
        rollout = self._require(name)
        try:
            current = self._store.get(name)
            live = self._compiled[name].live
            if current is None and live.version > 0:
                self._restore(name, live, None)
                current = self._store.get(name)
            if current is None:
                state = self._initial_state(rollout)
                record = self._record(name, "start", None, state, "router", state.reason, {})
                try:
                    version = self._store.compare_and_set(name, None, state, record)
                    self._notifier.publish(replace(record, version=version))
                except ConflictError:  # another process created it first: use theirs
                    pass
                current = self._store.get(name)
        except CanaryError:
            raise
        except Exception as exc:
            self._store_failed(exc)
            raise StoreError(f"cannot read the state of rollout {name!r}: {exc}") from exc
        self._contact()
        if current is None:  # pragma: no cover - a store that loses a write at once
            raise StoreError(f"the store has no state for rollout {name!r}")
        return current

    def _record(
        self,
        name: str,
        action: str,
        before: RolloutState | None,
        after: RolloutState,
        actor: str,
        reason: str,
        details: Mapping[str, Any],
    ) -> AuditRecord:
        return AuditRecord(
            time=after.updated_at,
            rollout=name,
            actor=actor,
            action=action,
            from_phase=None if before is None else before.phase.value,
            to_phase=after.phase.value,
            from_percent=None if before is None else before.percent,
            to_percent=after.percent,
            reason=reason,
            details=dict(details),
        )

    def transition(
        self,
        name: str,
        action: str,
        change: Callable[[RolloutState, Rollout], RolloutState | None],
        *,
        actor: str,
        reason: str = "",
        details: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
        fence: Lease | None = None,
    ) -> RolloutStatus:
        """Apply ``change`` to the rollout's state with compare-and-set and an audit record.

        ``change(state, rollout)`` returns the new state, or ``None`` for "nothing to do". When
        ``expected_version`` is given and the stored version differs, nothing is applied and
        :class:`~canary_router.ConflictError` is raised; so is it when another writer wins the race.
        This is the building block of every control method and of the controller. ``fence`` (a lease of a
        :class:`~canary_router.stores.SharedStore`) makes the write conditional on that lease still being held.
        """
        rollout = self._require(name)
        current = self._read(name)
        if expected_version is not None and current.version != expected_version:
            raise ConflictError(
                f"rollout {name!r} is at version {current.version}, not {expected_version}: it changed "
                "since you looked; nothing was applied"
            )
        new_state = change(current.state, rollout)
        if new_state is not None:
            _check_state(name, new_state, rollout)
        if new_state is None:
            self._apply(name, current.state, current.version)
            return self.status(name)
        record = self._record(name, action, current.state, new_state, actor, reason or new_state.reason, details or {})
        try:
            if fence is not None and self._shared is not None:
                version = self._shared.compare_and_set(name, current.version, new_state, record, fence=fence)
            else:
                version = self._store.compare_and_set(name, current.version, new_state, record)
        except ConflictError:
            raise
        except Exception as exc:
            self._store_failed(exc)
            raise StoreError(f"cannot write the state of rollout {name!r}: {exc}") from exc
        self._contact()
        self._apply(name, new_state, version)
        self._notifier.publish(replace(record, version=version))
        return self.status(name)

    def _state(self, before: RolloutState, **changes: Any) -> RolloutState:
        return replace(before, updated_at=self._clock(), **changes)

    def _new_step(self, before: RolloutState, **changes: Any) -> RolloutState:
        """A state that starts a new step: a new epoch (statistics restart) and a new bake clock."""
        now = self._clock()
        changes.setdefault("shadow", False)
        return replace(before, updated_at=now, epoch=before.epoch + 1, step_started_at=now, **changes)

    def set_percent(
        self, name: str, percent: float, *, actor: str = "api", reason: str = "", expected_version: int | None = None
    ) -> RolloutStatus:
        """Serve the new version to ``percent`` % (0..100) of units. Paused stays paused; otherwise running."""
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not math.isfinite(percent):
            raise ValueError(f"percent must be a number in [0, 100], got {percent!r}")
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be in [0, 100], got {percent!r}")
        if abs(percent * 100 - round(percent * 100)) > 1e-6:
            raise ValueError(f"percent has a resolution of 0.01, got {percent!r}")
        pct = float(percent)
        why = reason or f"percentage set to {pct:g} %"

        def change(state: RolloutState, rollout: Rollout) -> RolloutState | None:
            phase = Phase.PAUSED if state.phase is Phase.PAUSED else Phase.RUNNING
            if state.percent == pct and state.phase is phase:
                return None
            return self._new_step(
                state, phase=phase, percent=pct, step_index=_step_index_for(rollout.steps, pct), reason=why, actor=actor
            )

        return self.transition(name, "set_percent", change, actor=actor, reason=why, expected_version=expected_version)

    def promote(
        self, name: str, *, actor: str = "api", reason: str = "", expected_version: int | None = None
    ) -> RolloutStatus:
        """Move to the next step; at the last step, complete the rollout (everyone gets "new")."""

        def change(state: RolloutState, rollout: Rollout) -> RolloutState:
            if state.phase is Phase.COMPLETED:
                raise TransitionError(f"rollout {name!r} is already completed")
            if state.phase is Phase.ROLLED_BACK:
                raise TransitionError(f"rollout {name!r} is rolled back; use restart to begin again")
            nxt = state.step_index + 1
            if nxt >= len(rollout.steps):
                why = reason or "promoted past the last step: completed"
                return self._new_step(state, phase=Phase.COMPLETED, percent=100.0, reason=why, actor=actor)
            pct = rollout.steps[nxt]
            why = reason or f"promoted to step {nxt + 1} of {len(rollout.steps)} ({pct:g} %)"
            return self._new_step(state, phase=Phase.RUNNING, step_index=nxt, percent=pct, reason=why, actor=actor)

        return self.transition(name, "promote", change, actor=actor, reason=reason, expected_version=expected_version)

    def pause(
        self, name: str, *, actor: str = "api", reason: str = "", expected_version: int | None = None
    ) -> RolloutStatus:
        """Freeze the rollout at its current percentage. Pausing a paused rollout changes nothing."""
        why = reason or "paused"

        def change(state: RolloutState, rollout: Rollout) -> RolloutState | None:
            if state.phase is Phase.PAUSED:
                return None
            if state.phase is not Phase.RUNNING:
                raise TransitionError(f"rollout {name!r} is {state.phase.value}; only a running rollout can pause")
            return self._state(state, phase=Phase.PAUSED, reason=why, actor=actor)

        return self.transition(name, "pause", change, actor=actor, reason=why, expected_version=expected_version)

    def resume(
        self, name: str, *, actor: str = "api", reason: str = "", expected_version: int | None = None
    ) -> RolloutStatus:
        """Resume a paused rollout. Resuming a running rollout changes nothing."""
        why = reason or "resumed"

        def change(state: RolloutState, rollout: Rollout) -> RolloutState | None:
            if state.phase is Phase.RUNNING:
                return None
            if state.phase is not Phase.PAUSED:
                raise TransitionError(
                    f"rollout {name!r} is {state.phase.value}; only a paused rollout can resume (use restart)"
                )
            return self._state(state, phase=Phase.RUNNING, reason=why, actor=actor, resumed_at=self._clock())

        return self.transition(name, "resume", change, actor=actor, reason=why, expected_version=expected_version)

    def rollback(
        self,
        name: str,
        reason: str = "",
        *,
        actor: str = "api",
        details: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> RolloutStatus:
        """Send everyone to "old", rule-targeted users included. Rolling back twice changes nothing."""
        why = reason or "rolled back"

        def change(state: RolloutState, rollout: Rollout) -> RolloutState | None:
            if state.phase is Phase.ROLLED_BACK:
                return None
            return self._state(state, phase=Phase.ROLLED_BACK, percent=0.0, shadow=False, reason=why, actor=actor)

        return self.transition(
            name, "rollback", change, actor=actor, reason=why, details=details, expected_version=expected_version
        )

    def restart(
        self, name: str, *, actor: str = "api", reason: str = "", expected_version: int | None = None
    ) -> RolloutStatus:
        """Start again at the first step, running (after a rollback, a completion or at any time)."""
        why = reason or "restarted at the first step"

        def change(state: RolloutState, rollout: Rollout) -> RolloutState:
            return self._new_step(
                state,
                phase=Phase.RUNNING,
                step_index=-1 if rollout.shadow else 0,
                percent=rollout.steps[0],
                shadow=rollout.shadow,
                reason=why,
                actor=actor,
            )

        return self.transition(name, "restart", change, actor=actor, reason=why, expected_version=expected_version)

    def status(self, name: str, *, history: int | None = 100) -> RolloutStatus:
        """Return the rollout's phase, step, percentage and its latest ``history`` transitions (oldest first)."""
        rollout = self._require(name)
        current = self._read(name)
        try:
            records = tuple(self._store.history(name, history))
        except Exception as exc:
            raise StoreError(f"cannot read the audit log of rollout {name!r}: {exc}") from exc
        state = current.state
        return RolloutStatus(
            name=name,
            phase=state.phase,
            step_index=state.step_index,
            percent=state.percent,
            steps=rollout.steps,
            version=current.version,
            updated_at=state.updated_at,
            reason=state.reason,
            history=records,
            epoch=state.epoch,
            step_started_at=state.step_started_at,
            shadow=state.shadow,
        )

    def statuses(self) -> Iterator[RolloutStatus]:
        """Yield :meth:`status` for every rollout, in configuration order."""
        for name in self._rollouts:
            yield self.status(name)

    # ------------------------------------------------------------------ guard, controller, notifications

    @property
    def aggregator(self) -> Aggregator | None:
        """The observation aggregates the guard reads (``None`` when built with ``record=False``)."""
        return self._aggregator

    def observations(self, name: str, epoch: int | None = None) -> StepSnapshot | None:
        """Counts of rollout ``name``'s current step (or step ``epoch``) per variant, across every instance.

        With a :class:`~canary_router.stores.SharedStore` these are the totals of every process sharing
        the store (this process's latest counts are flushed first); otherwise this process's own counts.
        ``None`` when nothing was observed.
        """
        self._require(name)
        if epoch is None:
            epoch = self._read(name).state.epoch
        shared = self._shared
        if shared is not None:
            try:
                self.flush()
                return shared.observations(name, epoch)
            except Exception as exc:
                self._store_failed(exc)
                self._warn(
                    "observations", f"cannot read observation totals from the store, using this process's: {exc}"
                )
        aggregator = self._aggregator
        return aggregator.snapshot(name, epoch) if aggregator is not None else None

    def observation_history(self, name: str, since: float = 0.0) -> list[HistorySlot]:
        """Time slots of rollout ``name`` (requests, errors, latency per variant) from ``since`` on, oldest first.

        Summed across instances with a shared store, like :meth:`observations`.
        """
        self._require(name)
        shared = self._shared
        if shared is not None:
            try:
                self.flush()
                return shared.observation_history(name, since)
            except Exception as exc:
                self._store_failed(exc)
                self._warn("history", f"cannot read observation history from the store, using this process's: {exc}")
        aggregator = self._aggregator
        if aggregator is None:
            return []
        return [slot for slot in aggregator.history(name) if slot.start >= since]

    def verdict(self, name: str) -> Verdict:
        """Evaluate the guard of rollout ``name`` on its current step now, without acting."""
        return self.controller().verdict(name)

    def add_check(self, name: str, check: Check) -> Callable[[], None]:
        """Add a custom guard check to rollout ``name``: ``check(snapshot, percent) -> CheckResult``.

        A custom check takes part in every verdict like the built-in ones (a FAIL rolls back). Returns a
        function that removes it.
        """
        self._require(name)
        with self._lock:
            self._checks[name] = (*self._checks.get(name, ()), check)

        def remove() -> None:
            with self._lock:
                self._checks[name] = tuple(c for c in self._checks.get(name, ()) if c is not check)

        return remove

    def checks(self, name: str) -> tuple[Check, ...]:
        """The custom checks of rollout ``name``."""
        return self._checks.get(name, ())

    def on_transition(self, callback: Callable[[AuditRecord], None]) -> Callable[[], None]:
        """Call ``callback(record)`` after every state transition, on a background thread.

        Pass a :class:`~canary_router.notify.Webhook` to POST transitions to a URL. Returns a function that
        unsubscribes.
        """
        return self._notifier.subscribe(callback)

    @property
    def notifier(self) -> Notifier:
        """The notification dispatcher (``flush()`` waits for pending deliveries)."""
        return self._notifier

    def controller(self) -> Controller:
        """Return this router's :class:`~canary_router.Controller` (created on first use)."""
        with self._lock:
            if self._controller is None:
                from .controller import Controller

                self._controller = Controller(self)
            return self._controller

    def start_controller(self, interval: float = 1.0) -> Controller:
        """Run the controller on a background thread, one tick every ``interval`` seconds."""
        controller = self.controller()
        controller.start(interval)
        return controller

    def stop_controller(self) -> None:
        """Stop the background controller, if it runs."""
        if self._controller is not None:
            self._controller.stop()

    def shadow_stats(self, name: str) -> ShadowStats:
        """Comparison counts and mismatch samples of rollout ``name``'s shadow runs."""
        self._require(name)
        with self._lock:
            stats = self._shadow.get(name)
            if stats is None:
                stats = self._shadow[name] = ShadowStats()
            return stats

    def close(self) -> None:
        """Stop the controller and notifications, stop listening to the store and release it."""
        try:
            self.stop_controller()
            self._sync_stop.set()
            self._notifier.close()
            if self._aggregator is not None:
                self._aggregator.close()
            if self._outbox is not None:
                try:
                    self.flush()
                except Exception as exc:
                    self._warn("flush", f"the last observations could not be sent on close: {exc}")
            if self._shadow_pool is not None:
                self._shadow_pool.shutdown(wait=False)
            self._unsubscribe()
        finally:
            self._store.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Router(rollouts={list(self._rollouts)!r}, store={type(self._store).__name__})"


@dataclass(frozen=True, slots=True)
class SyncHealth:
    """The state of a router's link to its store (see :meth:`Router.health`)."""

    store: str
    """The store's class name."""
    shared_observations: bool
    """Whether observation counts are flushed to the store and read back summed across instances."""
    last_contact: float
    """When the store last answered (router clock)."""
    seconds_since_contact: float
    stale: bool
    """Whether the ``stale_after`` fail-safe is serving "old" right now."""
    stale_after: float | None
    store_errors: int
    """Store operations that failed since the router started."""
    last_error: str
    dropped_observations: int
    """Requests observed here whose counts can no longer reach the store (0 unless a long outage)."""
    dropped_history: int
    """Requests whose chart time slot left this process's ring before the store took it."""
    restored: int
    """How many times this router restored a rollout's state after the store lost it."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__slots__}


_ROUTERS: weakref.WeakSet[Router] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for router in list(_ROUTERS):
        try:
            router._after_fork()
        except Exception:  # pragma: no cover - a child must start whatever happens
            _log.exception("canary_router: restarting a router after fork failed")


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_reinit_after_fork)


def _check_state(name: str, state: RolloutState, rollout: Rollout) -> None:
    """Refuse to write a state that the hot path could not serve."""
    if not isinstance(state.phase, Phase):
        raise TransitionError(f"rollout {name!r}: invalid phase {state.phase!r}")
    if not (isinstance(state.percent, (int, float)) and 0.0 <= state.percent <= 100.0):
        raise TransitionError(f"rollout {name!r}: percent must be in [0, 100], got {state.percent!r}")
    if not -1 <= state.step_index < len(rollout.steps):
        raise TransitionError(f"rollout {name!r}: step index {state.step_index} is outside the steps")


def _condition_mapping(cond: Condition | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(cond, Mapping):
        return cond
    return {
        "attribute": cond.attribute,
        "operator": cond.operator,
        "values": list(cond.values),
        "inverted": cond.inverted,
        "case_insensitive": cond.case_insensitive,
    }
