"""Plain, immutable values: decisions, reasons, phases, rollout definitions, state and audit records."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = [
    "NEW",
    "OLD",
    "AuditRecord",
    "Condition",
    "Decision",
    "GuardConfig",
    "Observation",
    "Phase",
    "Reason",
    "Rollout",
    "RolloutState",
    "RolloutStatus",
    "Rule",
    "Variant",
]

Variant = Literal["old", "new"]
OLD: Variant = "old"
NEW: Variant = "new"

DEFAULT_STEPS: tuple[float, ...] = (5.0, 10.0, 25.0, 50.0, 100.0)


class Reason(enum.StrEnum):
    """Why a decision came out the way it did. ``Decision.reason`` is one of these (a ``str``)."""

    OVERRIDE = "override"
    """A signed tester override (or ``canary_router.testing.force``) chose the variant."""
    ROLLED_BACK = "rolled_back"
    """The rollout was rolled back: everyone gets "old", rule-targeted users included."""
    COMPLETED = "completed"
    """The rollout completed: everyone gets "new"."""
    PINNED = "pinned"
    """Session affinity: a signed pin cookie kept the visitor on the variant they first got."""
    RULE_MATCH = "rule_match"
    """A targeting rule with ``serve`` matched."""
    RULE_SPLIT = "rule_split"
    """A targeting rule with ``percent`` matched; the unit's bucket decided."""
    SPLIT = "split"
    """No rule matched; the unit's bucket and the step's percentage decided."""
    SHADOW = "shadow"
    """The unit is in the shadow cohort: "old" is served and the new version runs alongside, unseen."""
    STALE = "stale_state"
    """Fail-safe: the store has not been heard from for longer than ``stale_after``, so "old" is served."""
    NO_UNIT = "no_unit"
    """The context has none of the stickiness attributes, so the unit cannot be bucketed: "old"."""
    UNKNOWN_ROLLOUT = "unknown_rollout"
    """The router has no rollout of that name: "old"."""
    ERROR = "error"
    """Something failed inside the library while deciding: "old" (the failure is logged)."""

    @property
    def openfeature(self) -> str:
        """The OpenFeature / OpenTelemetry ``feature_flag.result.reason`` value for this reason."""
        return _OPENFEATURE_REASONS[self]


_OPENFEATURE_REASONS = {
    Reason.OVERRIDE: "TARGETING_MATCH",
    Reason.ROLLED_BACK: "DISABLED",
    Reason.COMPLETED: "STATIC",
    Reason.PINNED: "TARGETING_MATCH",
    Reason.RULE_MATCH: "TARGETING_MATCH",
    Reason.RULE_SPLIT: "SPLIT",
    Reason.SPLIT: "SPLIT",
    Reason.SHADOW: "SPLIT",
    Reason.STALE: "STALE",
    Reason.NO_UNIT: "DEFAULT",
    Reason.UNKNOWN_ROLLOUT: "ERROR",
    Reason.ERROR: "ERROR",
}


class Decision(NamedTuple):
    """The answer of :meth:`Router.decide`: which variant to serve, why, and the unit's bucket."""

    variant: Variant
    """``"old"`` or ``"new"``."""
    reason: str
    """One of :class:`Reason` (a ``str``)."""
    bucket: int | None
    """The unit's v1 bucket (0..9999), or ``None`` when no bucket was computed."""
    unit: str | None = None
    """The unit id the decision was bucketed by (the stickiness attribute's value), when one was used."""

    @property
    def is_new(self) -> bool:
        """``True`` when the new version is served."""
        return self.variant == "new"


class Phase(enum.StrEnum):
    """Where a rollout is in its life."""

    RUNNING = "running"
    """Serving its current percentage; the controller may promote it."""
    PAUSED = "paused"
    """Serving its current percentage, frozen: the controller never promotes it (it still rolls it back on a
    failing verdict); a manual ``resume`` or ``promote`` sets it running again."""
    COMPLETED = "completed"
    """Everyone gets "new"."""
    ROLLED_BACK = "rolled_back"
    """Everyone gets "old"."""


@dataclass(frozen=True, slots=True)
class Condition:
    """One targeting condition, in the Unleash constraint model: ``attribute operator values``."""

    attribute: str
    operator: str
    values: tuple[Any, ...] = ()
    inverted: bool = False
    case_insensitive: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """A targeting rule: when every condition (and every named segment) holds, serve or split."""

    when: tuple[Condition, ...] = ()
    segments: tuple[str, ...] = ()
    serve: Variant | None = None
    percent: float | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Health thresholds for the new version, compared with the old one on live traffic."""

    max_error_rate_increase: float = 0.01
    """New minus old error rate, absolute, above which the new version fails (0.01 = 1 percentage point)."""
    max_error_rate_ratio: float | None = None
    """Optional relative allowance: the tolerated new error rate is ``max(old + max_error_rate_increase,
    max_error_rate_ratio × old)``. Set ``max_error_rate_increase = 0`` for a purely relative tolerance."""
    max_latency_ratio: float | None = 1.25
    """New / old latency at ``latency_percentile`` above which the new version fails (``None``: off)."""
    latency_percentile: float = 95.0
    """The percentile compared by ``max_latency_ratio``."""
    min_requests: int = 500
    """Requests per variant before any verdict but the circuit breaker."""
    alpha: float = 0.01
    """False-rollback budget of the anytime-valid tests, in (0, 0.5), split across the failing checks."""
    max_tail_increase: float | None = 0.01
    """New minus old share of requests slower than the tail threshold above which the new version fails."""
    tail_percentile: float = 99.0
    """The old version's percentile that sets the tail threshold (unless ``latency_slo`` is set)."""
    latency_slo: float | None = None
    """A latency objective in seconds; when set it is the tail threshold instead of the old percentile."""
    srm_alpha: float = 0.001
    """Level of the sample-ratio-mismatch test (a mismatch pauses the rollout)."""


@dataclass(frozen=True, slots=True)
class Rollout:
    """A validated rollout definition. Built by the config loader, or directly in Python.

    Constructing one validates it: a bad value raises :class:`~canary_router.ConfigError` naming the field.
    """

    name: str
    steps: tuple[float, ...] = DEFAULT_STEPS
    stickiness: tuple[str, ...] = ("user_id",)
    salt: str | None = None
    bake_time: float = 3600.0
    """Seconds a step must last, with a passing verdict, before the controller promotes it."""
    max_bake_time: float | None = None
    """Seconds after which a step still without a passing verdict is paused (``None``: wait forever)."""
    start: Phase = Phase.RUNNING
    description: str = ""
    rules: tuple[Rule, ...] = ()
    guard: GuardConfig = field(default_factory=GuardConfig)
    shadow: bool = False
    """Start with a shadow step: the first step's cohort is served "old" while "new" runs alongside."""
    require_approval: tuple[float, ...] = ()
    """Step percentages the controller will not enter on its own: it pauses and waits for a manual promote."""

    def __post_init__(self) -> None:
        from .config import _check_rollout_object

        _check_rollout_object(self)

    @property
    def effective_salt(self) -> str:
        """The salt used for bucketing: ``salt`` when set, else the rollout's name."""
        return self.name if self.salt is None else self.salt


@dataclass(frozen=True, slots=True)
class RolloutState:
    """The mutable part of a rollout, as kept in a :class:`~canary_router.Store`."""

    phase: Phase
    step_index: int
    """Index into the rollout's steps; -1 when the percentage is below the first step."""
    percent: float
    """The percentage being served (0..100). Authoritative: it may sit between steps after ``set_percent``."""
    updated_at: float
    reason: str = ""
    actor: str = ""
    epoch: int = 0
    """Grows by one whenever the served cohort changes (a new step); statistics restart with it."""
    step_started_at: float = 0.0
    """When the current step began (bake times count from here)."""
    shadow: bool = False
    """In the shadow step: everyone is served "old"; the ``percent`` cohort also runs "new" unseen."""
    resumed_at: float = 0.0
    """When the rollout was last resumed (``max_bake_time`` counts from here or the step start, the later)."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "phase": self.phase.value,
            "step_index": self.step_index,
            "percent": self.percent,
            "updated_at": self.updated_at,
            "reason": self.reason,
            "actor": self.actor,
            "epoch": self.epoch,
            "step_started_at": self.step_started_at,
            "shadow": self.shadow,
            "resumed_at": self.resumed_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        """Rebuild a state written by :meth:`to_dict`."""
        return cls(
            phase=Phase(data["phase"]),
            step_index=int(data["step_index"]),
            percent=float(data["percent"]),
            updated_at=float(data["updated_at"]),
            reason=str(data.get("reason", "")),
            actor=str(data.get("actor", "")),
            epoch=int(data.get("epoch", 0)),
            step_started_at=float(data.get("step_started_at", 0.0)),
            shadow=bool(data.get("shadow", False)),
            resumed_at=float(data.get("resumed_at", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One state transition: when, who, what changed, and why (with the numbers behind it)."""

    time: float
    rollout: str
    actor: str
    action: str
    from_phase: str | None
    to_phase: str
    from_percent: float | None
    to_percent: float
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    version: int = 0
    """The state version this transition produced."""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "time": self.time,
            "rollout": self.rollout,
            "actor": self.actor,
            "action": self.action,
            "from_phase": self.from_phase,
            "to_phase": self.to_phase,
            "from_percent": self.from_percent,
            "to_percent": self.to_percent,
            "reason": self.reason,
            "details": dict(self.details),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditRecord:
        """Rebuild a record written by :meth:`to_dict`."""
        return cls(
            time=float(data["time"]),
            rollout=str(data["rollout"]),
            actor=str(data["actor"]),
            action=str(data["action"]),
            from_phase=data.get("from_phase"),
            to_phase=str(data["to_phase"]),
            from_percent=None if data.get("from_percent") is None else float(data["from_percent"]),
            to_percent=float(data["to_percent"]),
            reason=str(data.get("reason", "")),
            details=dict(data.get("details") or {}),
            version=int(data.get("version", 0)),
        )


@dataclass(frozen=True, slots=True)
class RolloutStatus:
    """What :meth:`Router.status` returns: the rollout's phase, step, percentage and history."""

    name: str
    phase: Phase
    step_index: int
    percent: float
    steps: tuple[float, ...]
    version: int
    updated_at: float
    reason: str
    history: tuple[AuditRecord, ...]
    """Transitions, oldest first (bounded by the store)."""
    epoch: int = 0
    step_started_at: float = 0.0
    shadow: bool = False

    @property
    def step(self) -> float | None:
        """The percentage of the current step, or ``None`` below the first step."""
        return self.steps[self.step_index] if 0 <= self.step_index < len(self.steps) else None


class Observation(NamedTuple):
    """One routed call, as delivered to observers: which variant ran, whether it failed, how long it took."""

    rollout: str
    variant: Variant
    ok: bool
    duration: float
    """Seconds, from a monotonic clock."""
    time: float
    """When the call finished, from the router's clock (POSIX seconds)."""
    unit: str | None
    """The unit id the decision was bucketed by, if any."""
    reason: str
    error: BaseException | None = None
    fell_back: bool = False
    """``True`` when the new version failed and the old one was run instead (``fallback_on_error``)."""
