"""What the command line prints: the JSON shapes of its ``--json`` output, and its rich tables.

Private to :mod:`canary_router.cli` (it imports rich, an extra). The JSON shapes are documented in
docs/reference/cli.md and kept stable: fields are added, never renamed or removed.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .analysis import Outcome, Verdict
from .model import AuditRecord, Phase, RolloutStatus
from .observe import StepSnapshot, VariantSnapshot

__all__ = [
    "RolloutView",
    "change_dict",
    "history_table",
    "jsonable",
    "status_details",
    "status_dict",
    "status_table",
]

_OUTCOME_STYLE = {
    Outcome.PASS: "green",
    Outcome.FAIL: "bold red",
    Outcome.INCONCLUSIVE: "yellow",
    Outcome.MISMATCH: "bold magenta",
}
_PHASE_STYLE = {
    Phase.RUNNING: "cyan",
    Phase.PAUSED: "yellow",
    Phase.COMPLETED: "green",
    Phase.ROLLED_BACK: "red",
}


def jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON data: tuples as lists, enums as their values, non-finite floats as ``None``."""
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return str(value)


def utc(seconds: float) -> str:
    """Format POSIX seconds as ``2026-11-26T14:37:53Z``."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """Format a duration for people: ``42 s``, ``12 min``, ``3.5 h``, ``2.1 d``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def percent(value: float | None) -> str:
    """Format a percentage of traffic: ``5 %``, ``12.5 %``."""
    return "-" if value is None else f"{value:g} %"


def step_label(status: RolloutStatus) -> str:
    """``2/5`` for the second of five steps; ``shadow`` in the shadow step; ``-`` below the first step."""
    if status.shadow:
        return "shadow"
    if status.step_index < 0:
        return "-"
    return f"{status.step_index + 1}/{len(status.steps)}"


def where(status: RolloutStatus) -> str:
    """One phrase for a state: ``running at 5 % (step 1 of 5)``, ``rolled back``, ``completed``."""
    if status.phase is Phase.COMPLETED:
        return "completed (everyone gets new)"
    if status.phase is Phase.ROLLED_BACK:
        return "rolled back (everyone gets old)"
    phase = status.phase.value
    if status.shadow:
        return f"{phase} in the shadow step ({status.percent:g} % run new unseen)"
    if status.step_index < 0:
        return f"{phase} at {status.percent:g} % (below the first step)"
    exact = status.step == status.percent
    at = f"step {status.step_index + 1} of {len(status.steps)}"
    return f"{phase} at {status.percent:g} % ({at})" if exact else f"{phase} at {status.percent:g} % (after {at})"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if math.isinf(seconds):
        return "∞"
    return f"{seconds * 1e6:.0f} µs" if seconds < 0.001 else f"{seconds * 1000:.1f} ms"


class RolloutView:
    """One rollout as the status commands show it: its status, this step's observations and the verdict."""

    __slots__ = ("now", "observations", "status", "verdict")

    def __init__(self, status: RolloutStatus, observations: StepSnapshot | None, verdict: Verdict, now: float) -> None:
        self.status = status
        self.observations = observations
        self.verdict = verdict
        self.now = now

    def variant(self, name: str) -> VariantSnapshot:
        """The observations of variant ``name`` (``"old"`` or ``"new"``) in the current step."""
        snap = self.observations
        if snap is None:
            return VariantSnapshot.empty()
        return snap.new if name == "new" else snap.old


def _variant_dict(snap: VariantSnapshot) -> dict[str, Any]:
    return {
        "requests": snap.requests,
        "errors": snap.errors,
        "error_rate": snap.error_rate,
        "p95": snap.percentile(95),
    }


def status_dict(view: RolloutView) -> dict[str, Any]:
    """The ``status --json`` object of one rollout."""
    status = view.status
    last = status.history[-1] if status.history else None
    data: dict[str, Any] = jsonable(
        {
            "rollout": status.name,
            "phase": status.phase.value,
            "step": status.step_index + 1 if status.step_index >= 0 else None,
            "step_index": status.step_index,
            "steps": list(status.steps),
            "percent": status.percent,
            "shadow": status.shadow,
            "version": status.version,
            "epoch": status.epoch,
            "updated_at": status.updated_at,
            "step_started_at": status.step_started_at,
            "reason": status.reason,
            "last_change": last.to_dict() if last is not None else None,
            "variants": {"old": _variant_dict(view.variant("old")), "new": _variant_dict(view.variant("new"))},
            "verdict": {
                "outcome": view.verdict.outcome.value,
                "message": view.verdict.message,
                "checks": [check.to_dict() for check in view.verdict.checks],
            },
        }
    )
    return data


def change_dict(action: str, before: RolloutStatus, after: RolloutStatus, actor: str, reason: str) -> dict[str, Any]:
    """The ``--json`` object of a state change (``promote``, ``pause``, ``set``, ...)."""

    def state(status: RolloutStatus) -> dict[str, Any]:
        return {
            "phase": status.phase.value,
            "percent": status.percent,
            "step_index": status.step_index,
            "version": status.version,
        }

    data: dict[str, Any] = jsonable(
        {
            "rollout": after.name,
            "action": action,
            "changed": after.version != before.version,
            "actor": actor,
            "reason": after.reason if after.version != before.version else reason,
            "before": state(before),
            "after": state(after),
        }
    )
    return data


def status_table(views: Sequence[RolloutView]) -> Table:
    """The ``status`` (and ``watch``) table: two rows per rollout, one per variant."""
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
    for header, justify in (
        ("rollout", "left"),
        ("phase", "left"),
        ("percent", "right"),
        ("step", "left"),
        ("variant", "left"),
        ("requests", "right"),
        ("errors", "right"),
        ("error rate", "right"),
        ("p95", "right"),
        ("verdict", "left"),
    ):
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for view in views:
        status = view.status
        outcome = view.verdict.outcome
        for index, name in enumerate(("old", "new")):
            snap = view.variant(name)
            first = index == 0
            table.add_row(
                Text(status.name, style="bold") if first else "",
                Text(status.phase.value, style=_PHASE_STYLE[status.phase]) if first else "",
                percent(status.percent) if first else "",
                step_label(status) if first else "",
                name,
                f"{snap.requests:,}",
                f"{snap.errors:,}",
                _rate(snap.error_rate),
                _ms(snap.percentile(95)),
                Text(outcome.value, style=_OUTCOME_STYLE[outcome]) if first else "",
            )
    return table


def status_details(views: Sequence[RolloutView]) -> RenderableType:
    """Below the table: per rollout, its state in words, the last change and every check of the verdict."""
    parts: list[RenderableType] = []
    for view in views:
        parts.append(Text(""))
        parts.append(_details(view))
    return Group(*parts)


def _details(view: RolloutView) -> RenderableType:
    status = view.status
    age = f" for {duration(view.now - status.step_started_at)}" if status.step_started_at else ""
    head = Text.assemble((status.name, "bold"), f": {where(status)}{age}, version {status.version}")
    lines: list[RenderableType] = [head]
    last = status.history[-1] if status.history else None
    if last is not None:
        lines.append(Text(f"  last change {utc(last.time)} by {last.actor}: {last.reason}"))
    outcome = view.verdict.outcome
    lines.append(Text.assemble("  verdict ", (outcome.value, _OUTCOME_STYLE[outcome])))
    return Group(*lines, _checks_table(view))


def _checks_table(view: RolloutView) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for check in view.verdict.checks:
        table.add_row("   ", check.name, Text(check.outcome.value, style=_OUTCOME_STYLE[check.outcome]), check.message)
    return table


def _change(record: AuditRecord) -> str:
    before = "-" if record.from_phase is None else f"{record.from_phase} {percent(record.from_percent)}"
    return f"{before} → {record.to_phase} {percent(record.to_percent)}"


def history_table(records: Iterable[AuditRecord]) -> Table:
    """The ``history`` table: one row per transition, oldest first."""
    table = Table(box=None, header_style="bold", pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("rollout", no_wrap=True)
    table.add_column("version", justify="right", no_wrap=True)
    table.add_column("actor", no_wrap=True)
    table.add_column("action", no_wrap=True)
    table.add_column("change", no_wrap=True)
    table.add_column("reason", overflow="fold", min_width=30)
    for record in records:
        table.add_row(
            utc(record.time),
            record.rollout,
            str(record.version),
            record.actor,
            record.action,
            _change(record),
            record.reason,
        )
    return table
