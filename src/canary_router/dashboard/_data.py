"""The dashboard's JSON documents, read through the router (so they work the same over a shared store).

Every function here is synchronous and may do store I/O: the ASGI app calls them on a worker thread.
Non-finite numbers (an overflowing latency bucket, say) become ``null``, so the output is strict JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..model import RolloutStatus

if TYPE_CHECKING:
    from ..analysis import Verdict
    from ..observe import VariantSnapshot
    from ..router import Router

__all__ = ["clean", "overview", "rollout_detail", "series"]

VARIANTS = ("old", "new")


def _document(value: dict[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = clean(value)
    return cleaned


def clean(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` and tuples made lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def _variant(snapshot: VariantSnapshot | None) -> dict[str, Any]:
    if snapshot is None:
        return {"requests": 0, "errors": 0, "error_rate": None, "p50": None, "p95": None, "p99": None, "units": 0}
    return {
        "requests": snapshot.requests,
        "errors": snapshot.errors,
        "error_rate": snapshot.error_rate,
        "p50": snapshot.percentile(50),
        "p95": snapshot.percentile(95),
        "p99": snapshot.percentile(99),
        "units": snapshot.units,
    }


def _verdict(router: Router, name: str) -> tuple[Verdict | None, str | None]:
    try:
        return router.verdict(name), None
    except Exception as exc:  # the page still shows state and history when the guard cannot be evaluated
        return None, f"the guard could not be evaluated: {exc}"


def _status_fields(status: RolloutStatus) -> dict[str, Any]:
    return {
        "name": status.name,
        "phase": status.phase.value,
        "percent": status.percent,
        "step_index": status.step_index,
        "steps": list(status.steps),
        "version": status.version,
        "updated_at": status.updated_at,
        "reason": status.reason,
        "epoch": status.epoch,
        "step_started_at": status.step_started_at,
        "shadow": status.shadow,
    }


def overview(router: Router) -> dict[str, Any]:
    """``GET api/rollouts``: every rollout's state, verdict outcome and request counts of the current step."""
    definitions = router.rollouts
    items: list[dict[str, Any]] = []
    for status in router.statuses():
        snapshot = router.observations(status.name)
        verdict, error = _verdict(router, status.name)
        item = _status_fields(status)
        item["description"] = definitions[status.name].description
        item["verdict"] = (
            {"outcome": verdict.outcome.value, "message": verdict.message}
            if verdict is not None
            else {"outcome": None, "message": error}
        )
        item["requests"] = {
            "old": snapshot.old.requests if snapshot else 0,
            "new": snapshot.new.requests if snapshot else 0,
        }
        items.append(item)
    return _document({"now": router.clock(), "rollouts": items})


def rollout_detail(router: Router, name: str, *, history: int = 200) -> dict[str, Any]:
    """``GET api/rollouts/{name}``: state, steps, guard settings, current-step numbers, verdict, audit log."""
    rollout = router._require(name)  # UnknownRolloutError names the known ones
    status = router.status(name, history=history)
    snapshot = router.observations(name)
    verdict, error = _verdict(router, name)
    guard = rollout.guard
    document = _status_fields(status)
    document.update(
        {
            "now": router.clock(),
            "description": rollout.description,
            "bake_time": rollout.bake_time,
            "max_bake_time": rollout.max_bake_time,
            "require_approval": list(rollout.require_approval),
            "guard": {
                "max_error_rate_increase": guard.max_error_rate_increase,
                "max_error_rate_ratio": guard.max_error_rate_ratio,
                "max_latency_ratio": guard.max_latency_ratio,
                "latency_percentile": guard.latency_percentile,
                "min_requests": guard.min_requests,
                "alpha": guard.alpha,
            },
            "observations": {
                "old": _variant(snapshot.old if snapshot else None),
                "new": _variant(snapshot.new if snapshot else None),
                "started_at": snapshot.started_at if snapshot else None,
            },
            "verdict": verdict.to_dict() if verdict is not None else None,
            "verdict_error": error,
            "history": [record.to_dict() for record in status.history],
        }
    )
    return _document(document)


def series(router: Router, name: str, since: float = 0.0) -> dict[str, Any]:
    """``GET api/rollouts/{name}/series``: per time slot and variant, requests, errors, error rate and p95."""
    aggregator = router.aggregator
    slots = []
    for slot in router.observation_history(name, since):
        requests = {v: slot.requests.get(v, 0) for v in VARIANTS}
        errors = {v: slot.errors.get(v, 0) for v in VARIANTS}
        slots.append(
            {
                "start": slot.start,
                "requests": requests,
                "errors": errors,
                "error_rate": {v: errors[v] / requests[v] if requests[v] else None for v in VARIANTS},
                "p95": {v: slot.percentile(v, 95) for v in VARIANTS},
            }
        )
    return _document(
        {
            "rollout": name,
            "now": router.clock(),
            "slot_seconds": aggregator.slot_seconds if aggregator is not None else None,
            "slots": slots,
        }
    )
