"""Configuration: TOML, YAML (when PyYAML is installed), JSON or plain mappings, validated at load.

Every problem is collected, not just the first, and each names the exact path, what was expected and
what was found, with a suggestion for a misspelled key::

    rollouts.checkout.steps[2]: expected a number in (0, 100] greater than the previous step (25), got 20
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from .errors import ConfigError, ConfigIssue
from .model import DEFAULT_STEPS, Condition, GuardConfig, Phase, Rollout, Rule
from .rules import MULTI_VALUE_OPERATORS, OPERATORS, ConditionValueError, compile_condition

__all__ = ["Config", "load_config", "load_file", "parse_duration"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION = re.compile(
    r"^(?:\d+(?:\.\d+)?w)?(?:\d+(?:\.\d+)?d)?(?:\d+(?:\.\d+)?h)?(?:\d+(?:\.\d+)?m(?!s))?"
    r"(?:\d+(?:\.\d+)?s)?(?:\d+(?:\.\d+)?ms)?$"
)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}

TOP_KEYS = ("rollouts", "segments", "notifications", "store")
STORE_KEYS = ("url", "stale_after", "refresh_interval", "flush_interval")
NOTIFICATION_KEYS = ("webhooks", "timeout", "retries")
ROLLOUT_KEYS = (
    "description",
    "stickiness",
    "steps",
    "bake_time",
    "max_bake_time",
    "salt",
    "start",
    "rules",
    "guard",
    "shadow",
    "require_approval",
)
GUARD_KEYS = tuple(f.name for f in fields(GuardConfig))
RULE_KEYS = ("name", "description", "when", "segments", "serve", "percent")
CONDITION_KEYS = ("attribute", "operator", "values", "value", "inverted", "case_insensitive")
SEGMENT_KEYS = ("description", "when")


@dataclass(frozen=True, slots=True)
class Config:
    """A validated configuration: rollouts by name and named segments (reusable condition lists)."""

    rollouts: Mapping[str, Rollout] = field(default_factory=dict)
    segments: Mapping[str, tuple[Condition, ...]] = field(default_factory=dict)
    webhooks: tuple[str, ...] = ()
    """URLs that receive every state transition as a JSON POST (Slack-compatible ``text``)."""
    webhook_timeout: float = 5.0
    webhook_retries: int = 3
    store_url: str | None = None
    """The ``[store] url`` (or top-level ``store = "..."``): where rollout state is shared."""
    stale_after: float | None = None
    """Fail-safe: serve "old" once the store has not been heard from for this long (``None``: never)."""
    refresh_interval: float = 5.0
    """Seconds between full re-reads of the shared state (a safety net behind change notifications)."""
    flush_interval: float = 1.0
    """Seconds between flushes of this process's observation counts to a shared store."""


class _Issues:
    """Collects every problem found while validating."""

    def __init__(self) -> None:
        self.items: list[ConfigIssue] = []

    def add(self, path: str, message: str, hint: str | None = None) -> None:
        self.items.append(ConfigIssue(path, message, hint))

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except ValueError:  # an int with more digits than str() allows
        return f"<{type(value).__name__} too large to show>"


def _describe(value: Any) -> str:
    text = _repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return text
    return f"{text} ({type(value).__name__})"


def _is_number(value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], path: str, issues: _Issues) -> None:
    for key in table:
        if key in allowed:
            continue
        where = f"{path}.{key}" if path else str(key)
        close = get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
        issues.add(where, "unknown key", hint)


def _table(value: Any, path: str, issues: _Issues) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    issues.add(path, f"expected a table (mapping), got {_describe(value)}")
    return None


def _list(value: Any, path: str, issues: _Issues, what: str = "a list") -> Sequence[Any] | None:
    if isinstance(value, (list, tuple)):
        return value
    issues.add(path, f"expected {what}, got {_describe(value)}")
    return None


def parse_duration(value: Any) -> float:
    """Parse a duration: seconds as a number, or a string such as ``"90s"``, ``"15m"``, ``"1h30m"``, ``"2d"``.

    Raises :class:`ValueError` with the accepted forms when it cannot.
    """
    expected = "expected a duration such as '90s', '15m', '1h' or '1h30m' (or seconds as a number)"
    if _is_number(value):
        if value < 0:
            raise ValueError(f"{expected}, got a negative number {_repr(value)}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text and len(text) <= 64 and _DURATION.match(text):
            total = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
            if math.isfinite(total):
                return total
    raise ValueError(f"{expected}, got {_repr(value)}")


def _duration(value: Any, path: str, issues: _Issues) -> float | None:
    try:
        return parse_duration(value)
    except ValueError as exc:
        issues.add(path, str(exc))
        return None


def _percent(value: Any, path: str, issues: _Issues, *, low_open: bool = False) -> float | None:
    interval = "(0, 100]" if low_open else "[0, 100]"
    if not _is_number(value) or value > 100 or value < 0 or (low_open and value == 0):
        issues.add(path, f"expected a number in {interval}, got {_describe(value)}")
        return None
    if abs(value * 100 - round(value * 100)) > 1e-6:
        issues.add(path, f"expected a percentage with at most two decimals (0.01 % steps), got {value!r}")
        return None
    return float(value)


def _steps(value: Any, path: str, issues: _Issues) -> tuple[float, ...] | None:
    items = _list(value, path, issues, "a list of percentages such as [5, 10, 25, 50, 100]")
    if items is None:
        return None
    if not items:
        issues.add(path, "expected at least one step, got an empty list")
        return None
    steps: list[float] = []
    previous: float | None = None
    for index, raw in enumerate(items):
        where = f"{path}[{index}]"
        if previous is None:
            step = _percent(raw, where, issues, low_open=True)
        elif not _is_number(raw) or raw <= previous or raw > 100:
            issues.add(
                where,
                f"expected a number in (0, 100] greater than the previous step ({previous:g}), got {_describe(raw)}",
                "steps must be strictly increasing",
            )
            return None
        else:
            step = _percent(raw, where, issues, low_open=True)
        if step is None:
            return None
        steps.append(step)
        previous = step
    return tuple(steps)


def _stickiness(value: Any, path: str, issues: _Issues) -> tuple[str, ...] | None:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names:
        issues.add(path, f"expected an attribute name or a non-empty list of them, got {_describe(value)}")
        return None
    result: list[str] = []
    for index, name in enumerate(names):
        where = path if isinstance(value, str) else f"{path}[{index}]"
        if not isinstance(name, str) or not name.strip():
            issues.add(where, f"expected a non-empty attribute name, got {_describe(name)}")
            return None
        if name in result:
            issues.add(where, f"attribute {name!r} is listed twice")
            return None
        result.append(name)
    return tuple(result)


def _number_field(value: Any, path: str, issues: _Issues, check: Any, expected: str, *, integer: bool = False) -> Any:
    ok = _is_number(value) and (not integer or isinstance(value, int)) and check(value)
    if not ok:
        issues.add(path, f"expected {expected}, got {_describe(value)}")
        return None
    return value if integer else float(value)


def _guard(value: Any, path: str, issues: _Issues) -> GuardConfig | None:
    if isinstance(value, GuardConfig):
        table: Mapping[str, Any] = {f.name: getattr(value, f.name) for f in fields(GuardConfig)}
    else:
        checked = _table(value, path, issues)
        if checked is None:
            return None
        table = checked
        _check_keys(table, GUARD_KEYS, path, issues)
    before = len(issues.items)
    out: dict[str, Any] = {}
    specs: dict[str, tuple[Any, str, bool, bool]] = {
        "max_error_rate_increase": (lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.01 for 1 point", False, False),
        "max_error_rate_ratio": (lambda v: v >= 1, "a number >= 1, or leave it out", False, True),
        "max_latency_ratio": (lambda v: v >= 1, "a number >= 1, e.g. 1.25, or leave it out", False, True),
        "latency_percentile": (lambda v: 0 < v < 100, "a percentile in (0, 100), e.g. 95", False, False),
        "min_requests": (lambda v: v >= 0, "a whole number >= 0", True, False),
        "alpha": (lambda v: 0 < v < 0.5, "a number in (0, 0.5), e.g. 0.01", False, False),
        "max_tail_increase": (lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.01, or leave it out", False, True),
        "tail_percentile": (lambda v: 0 < v < 100, "a percentile in (0, 100), e.g. 99", False, False),
        "srm_alpha": (lambda v: 0 < v < 0.5, "a number in (0, 0.5), e.g. 0.001", False, False),
    }
    if table.get("latency_slo") is not None:
        slo = _duration(table["latency_slo"], f"{path}.latency_slo", issues)
        if slo is not None and slo <= 0:
            issues.add(
                f"{path}.latency_slo",
                f"expected a positive duration such as '250ms', got {_describe(table['latency_slo'])}",
            )
        out["latency_slo"] = slo
    for key, (check, expected, integer, optional) in specs.items():
        if key not in table:
            continue
        raw = table[key]
        if raw is None and optional:
            out[key] = None
            continue
        parsed = _number_field(raw, f"{path}.{key}", issues, check, expected, integer=integer)
        if parsed is not None:
            out[key] = parsed
    if len(issues.items) != before:
        return None
    return GuardConfig(**out)


def _condition(value: Any, path: str, issues: _Issues) -> Condition | None:
    if isinstance(value, Condition):
        cond = value
        used_value_key = False
    else:
        table = _table(value, path, issues)
        if table is None:
            return None
        before = len(issues.items)
        _check_keys(table, CONDITION_KEYS, path, issues)
        attribute = table.get("attribute")
        if not isinstance(attribute, str) or not attribute:
            issues.add(f"{path}.attribute", f"expected a non-empty attribute name, got {_describe(attribute)}")
        operator = table.get("operator")
        if not isinstance(operator, str) or operator not in OPERATORS:
            hint: str | None = None
            if isinstance(operator, str):
                if operator.upper() in OPERATORS:
                    hint = f"operators are upper case: {operator.upper()!r}"
                else:
                    close = get_close_matches(operator.upper(), sorted(OPERATORS), n=1, cutoff=0.6)
                    hint = f"did you mean {close[0]!r}?" if close else None
            issues.add(
                f"{path}.operator",
                f"expected one of {', '.join(sorted(OPERATORS))}, got {_describe(operator)}",
                hint,
            )
        flags: dict[str, bool] = {}
        for flag in ("inverted", "case_insensitive"):
            raw_flag = table.get(flag, False)
            if not isinstance(raw_flag, bool):
                issues.add(f"{path}.{flag}", f"expected true or false, got {_describe(raw_flag)}")
            flags[flag] = bool(raw_flag)
        has_values, has_value = "values" in table, "value" in table
        values: tuple[Any, ...] = ()
        used_value_key = has_value
        if has_values and has_value:
            issues.add(path, "expected either 'values' (a list) or 'value', got both")
        elif not has_values and not has_value:
            issues.add(path, "expected 'values' (a list) or 'value'")
        elif has_values:
            raw_values = _list(table["values"], f"{path}.values", issues)
            values = tuple(raw_values) if raw_values is not None else ()
        else:
            raw_value = table["value"]
            if isinstance(raw_value, (list, tuple, Mapping)):
                issues.add(
                    f"{path}.value", f"expected a single value, got {_describe(raw_value)}", "use 'values' for a list"
                )
            values = (raw_value,)
        if len(issues.items) != before or not isinstance(attribute, str) or not isinstance(operator, str):
            return None
        cond = Condition(attribute, operator, values, flags["inverted"], flags["case_insensitive"])
    try:
        compile_condition(cond)
    except ConditionValueError as exc:
        where = exc.field
        if used_value_key and where.startswith("values"):
            where = "value"
        if where == "value" and not used_value_key and cond.operator not in MULTI_VALUE_OPERATORS:
            where = "values"
        issues.add(f"{path}.{where}", exc.message)
        return None
    return cond


def _conditions(value: Any, path: str, issues: _Issues) -> tuple[Condition, ...] | None:
    items = _list(value, path, issues, "a list of conditions")
    if items is None:
        return None
    result = [_condition(item, f"{path}[{i}]", issues) for i, item in enumerate(items)]
    if any(c is None for c in result):
        return None
    return tuple(c for c in result if c is not None)


def _rule(value: Any, path: str, issues: _Issues, segments: Mapping[str, Any] | None) -> Rule | None:
    before = len(issues.items)
    if isinstance(value, Rule):
        table: Mapping[str, Any] = {
            "name": value.name,
            "when": value.when,
            "segments": value.segments,
            "serve": value.serve,
            "percent": value.percent,
        }
        table = {k: v for k, v in table.items() if v is not None}
    else:
        checked = _table(value, path, issues)
        if checked is None:
            return None
        table = checked
        _check_keys(table, RULE_KEYS, path, issues)
    name = table.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        issues.add(f"{path}.name", f"expected a non-empty string, got {_describe(name)}")
    when: tuple[Condition, ...] = ()
    if "when" in table:
        when = _conditions(table["when"], f"{path}.when", issues) or ()
    names: tuple[str, ...] = ()
    if "segments" in table:
        raw = table["segments"]
        raw_list = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw_list, (list, tuple)) or not all(isinstance(s, str) for s in raw_list):
            issues.add(f"{path}.segments", f"expected a list of segment names, got {_describe(raw)}")
        else:
            names = tuple(raw_list)
            for index, seg in enumerate(names):
                if segments is not None and seg not in segments:
                    close = get_close_matches(seg, list(segments), n=1)
                    hint = (
                        f"did you mean {close[0]!r}?"
                        if close
                        else (f"defined segments: {', '.join(segments) or 'none'}")
                    )
                    issues.add(f"{path}.segments[{index}]", f"unknown segment {seg!r}", hint)
    if "when" not in table and "segments" not in table:
        issues.add(path, "expected 'when' (a list of conditions) or 'segments' (segment names)")
    elif not when and not names and len(issues.items) == before:
        issues.add(
            path,
            "expected at least one condition or segment; a rule that matches everyone "
            "is what the rollout's steps are for",
        )
    has_serve, has_percent = table.get("serve") is not None, table.get("percent") is not None
    serve: Any = None
    percent: float | None = None
    if has_serve and has_percent:
        issues.add(path, "expected exactly one of 'serve' or 'percent', got both")
    elif not has_serve and not has_percent:
        issues.add(path, "expected exactly one of 'serve' (\"new\" or \"old\") or 'percent' (0..100)")
    elif has_serve:
        serve = table["serve"]
        if serve not in ("new", "old"):
            issues.add(f"{path}.serve", f'expected "new" or "old", got {_describe(serve)}')
    else:
        percent = _percent(table["percent"], f"{path}.percent", issues)
    if len(issues.items) != before:
        return None
    return Rule(when=when, segments=names, serve=serve, percent=percent, name=name)


def _rules(value: Any, path: str, issues: _Issues, segments: Mapping[str, Any] | None) -> tuple[Rule, ...] | None:
    items = _list(value, path, issues, "a list of rules")
    if items is None:
        return None
    rules = [_rule(item, f"{path}[{i}]", issues, segments) for i, item in enumerate(items)]
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if rule is not None and rule.name is not None:
            if rule.name in seen:
                issues.add(
                    f"{path}[{index}].name", f"duplicate rule name {rule.name!r} (also rules[{seen[rule.name]}])"
                )
            seen[rule.name] = index
    if any(r is None for r in rules):
        return None
    return tuple(r for r in rules if r is not None)


def _check_name(name: Any, path: str, issues: _Issues, what: str = "rollout") -> bool:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        issues.add(
            path,
            f"expected a {what} name of letters, digits, '_', '.' or '-' (at most 128, starting with a "
            f"letter or digit), got {_describe(name)}",
        )
        return False
    return True


def _rollout_fields(
    name: str, table: Mapping[str, Any], path: str, issues: _Issues, segments: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Validate one rollout's fields (raw or already typed) into Rollout keyword arguments."""
    before = len(issues.items)
    out: dict[str, Any] = {"name": name}
    if "description" in table:
        desc = table["description"]
        if not isinstance(desc, str):
            issues.add(f"{path}.description", f"expected a string, got {_describe(desc)}")
        out["description"] = desc
    if "steps" in table:
        out["steps"] = _steps(table["steps"], f"{path}.steps", issues)
    if "stickiness" in table:
        out["stickiness"] = _stickiness(table["stickiness"], f"{path}.stickiness", issues)
    if table.get("salt") is not None:
        salt = table["salt"]
        if not isinstance(salt, str) or not salt:
            issues.add(f"{path}.salt", f"expected a non-empty string, got {_describe(salt)}")
        out["salt"] = salt
    if "bake_time" in table:
        out["bake_time"] = _duration(table["bake_time"], f"{path}.bake_time", issues)
    if table.get("max_bake_time") is not None:
        out["max_bake_time"] = _duration(table["max_bake_time"], f"{path}.max_bake_time", issues)
    if "start" in table:
        start = table["start"]
        if start not in ("running", "paused"):
            issues.add(f"{path}.start", f'expected "running" or "paused", got {_describe(start)}')
        else:
            out["start"] = Phase(start)
    if "guard" in table:
        out["guard"] = _guard(table["guard"], f"{path}.guard", issues)
    if "rules" in table:
        out["rules"] = _rules(table["rules"], f"{path}.rules", issues, segments)
    if "shadow" in table:
        shadow = table["shadow"]
        if not isinstance(shadow, bool):
            issues.add(f"{path}.shadow", f"expected true or false, got {_describe(shadow)}")
        out["shadow"] = bool(shadow)
    if table.get("require_approval"):
        gates = _list(table["require_approval"], f"{path}.require_approval", issues, "a list of step percentages")
        steps = out.get("steps") or (DEFAULT_STEPS if "steps" not in table else None)
        if gates is not None and steps is not None:
            for index, gate in enumerate(gates):
                if not _is_number(gate) or not any(abs(gate - s) < 1e-9 for s in steps):
                    issues.add(
                        f"{path}.require_approval[{index}]",
                        f"expected one of the steps ({', '.join(f'{s:g}' for s in steps)}), got {_describe(gate)}",
                    )
            out["require_approval"] = tuple(float(g) for g in gates if _is_number(g))
    bake, max_bake = out.get("bake_time"), out.get("max_bake_time")
    if bake is not None and max_bake is not None and bake > max_bake:
        issues.add(
            f"{path}.max_bake_time",
            f"expected at least bake_time ({bake:g} s), got {max_bake:g} s",
        )
    if len(issues.items) != before:
        return None
    return out


def _check_rollout_object(rollout: Rollout) -> None:
    """Validate and normalise a :class:`Rollout` built in Python (called from its ``__post_init__``)."""
    issues = _Issues()
    path = f"rollouts.{rollout.name}" if isinstance(rollout.name, str) else "rollouts.?"
    if not _check_name(rollout.name, path, issues):
        issues.raise_if_any()
    table = {
        "description": rollout.description,
        "steps": rollout.steps,
        "stickiness": rollout.stickiness,
        "salt": rollout.salt,
        "bake_time": rollout.bake_time,
        "max_bake_time": rollout.max_bake_time,
        "start": rollout.start.value if isinstance(rollout.start, Phase) else rollout.start,
        "guard": rollout.guard,
        "rules": rollout.rules,
        "shadow": rollout.shadow,
        "require_approval": rollout.require_approval,
    }
    out = _rollout_fields(rollout.name, table, path, issues, None)
    issues.raise_if_any()
    for key, value in (out or {}).items():
        object.__setattr__(rollout, key, value)


def load_config(data: Mapping[str, Any], *, source: str | None = None) -> Config:
    """Validate a configuration mapping (as parsed from TOML, YAML or JSON) into a :class:`Config`.

    Raises :class:`~canary_router.ConfigError` listing every problem.
    """
    issues = _Issues()
    if not isinstance(data, Mapping):
        issues.add(  # type: ignore[unreachable]  # callers may pass anything parsed from a file
            source or "", f"expected a table (mapping) at the top level, got {_describe(data)}"
        )
        issues.raise_if_any()
    _check_keys(data, TOP_KEYS, "", issues)

    segments: dict[str, tuple[Condition, ...]] = {}
    raw_segments = data.get("segments", {})
    seg_table = _table(raw_segments, "segments", issues)
    if seg_table is not None:
        for seg_name, seg in seg_table.items():
            path = f"segments.{seg_name}"
            if not _check_name(seg_name, path, issues, "segment"):
                continue
            body = _table(seg, path, issues)
            if body is None:
                continue
            _check_keys(body, SEGMENT_KEYS, path, issues)
            if "when" not in body:
                issues.add(path, "expected 'when' (a list of conditions)")
                continue
            conds = _conditions(body["when"], f"{path}.when", issues)
            if conds is not None:
                if not conds:
                    issues.add(f"{path}.when", "expected at least one condition")
                segments[seg_name] = conds

    rollouts: dict[str, Rollout] = {}
    raw_rollouts = data.get("rollouts", {})
    table = _table(raw_rollouts, "rollouts", issues)
    known_segments: Mapping[str, Any] = seg_table if seg_table is not None else {}
    if table is not None:
        for name, body in table.items():
            path = f"rollouts.{name}"
            if not _check_name(name, path, issues):
                continue
            fields_table = _table(body, path, issues)
            if fields_table is None:
                continue
            _check_keys(fields_table, ROLLOUT_KEYS, path, issues)
            out = _rollout_fields(name, fields_table, path, issues, known_segments)
            if out is not None and not issues.items:
                rollouts[name] = Rollout(**out)
    webhooks: list[str] = []
    webhook_options: dict[str, Any] = {}
    if "notifications" in data:
        notes = _table(data["notifications"], "notifications", issues)
        if notes is not None:
            _check_keys(notes, NOTIFICATION_KEYS, "notifications", issues)
            urls = _list(notes.get("webhooks", []), "notifications.webhooks", issues, "a list of URLs")
            for index, url in enumerate(urls or []):
                if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                    issues.add(f"notifications.webhooks[{index}]", f"expected an http(s) URL, got {_describe(url)}")
                else:
                    webhooks.append(url)
            if "timeout" in notes:
                timeout = _duration(notes["timeout"], "notifications.timeout", issues)
                if timeout is not None:
                    webhook_options["webhook_timeout"] = timeout
            if "retries" in notes:
                retries = notes["retries"]
                if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= 10:
                    issues.add("notifications.retries", f"expected a whole number in [0, 10], got {_describe(retries)}")
                else:
                    webhook_options["webhook_retries"] = retries
    store_options = _store_options(data.get("store"), issues) if "store" in data else {}
    issues.raise_if_any()
    return Config(rollouts=rollouts, segments=segments, webhooks=tuple(webhooks), **webhook_options, **store_options)


def _store_options(raw: Any, issues: _Issues) -> dict[str, Any]:
    """Validate ``store = "URL"`` or the ``[store]`` table."""
    if isinstance(raw, str):
        raw = {"url": raw}
    table = _table(raw, "store", issues)
    if table is None:
        return {}
    _check_keys(table, STORE_KEYS, "store", issues)
    out: dict[str, Any] = {}
    if "url" in table:
        url = table["url"]
        if not isinstance(url, str) or "://" not in url:
            issues.add(
                "store.url", f"expected a store URL such as 'redis://host:6379/0?prefix=app', got {_describe(url)}"
            )
        elif url.split("://", 1)[0].lower() not in ("memory", "sqlite", "redis", "rediss", "unix"):
            issues.add("store.url", f"expected a memory://, sqlite:/// or redis:// URL, got {url!r}")
        else:
            out["store_url"] = url
    if "stale_after" in table:
        stale = _duration(table["stale_after"], "store.stale_after", issues)
        if stale is not None:
            out["stale_after"] = stale
    for key, floor in (("refresh_interval", 0.05), ("flush_interval", 0.05)):
        if key in table:
            seconds = _duration(table[key], f"store.{key}", issues)
            if seconds is not None and seconds < floor:
                issues.add(f"store.{key}", f"expected at least {floor} s, got {seconds:g} s")
            elif seconds is not None:
                out[key] = seconds
    return out


class _UniqueKeyLoader:
    """Builds a PyYAML SafeLoader that rejects duplicate keys (PyYAML silently keeps the last)."""

    @staticmethod
    def load(text: str, source: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = loader.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader reports it as a YAML error below
                    continue
                if duplicate:
                    line = key_node.start_mark.line + 1
                    raise ConfigError(ConfigIssue(source, f"line {line}: duplicate key {key!r}"))
                seen.add(key)
            return loader.construct_mapping(node, deep=deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
        try:
            return yaml.load(text, Loader=Loader)  # noqa: S506  # a SafeLoader subclass
        except ConfigError:
            raise
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer too long to convert
            raise ConfigError(ConfigIssue(source, f"invalid YAML: {exc}")) from None


def load_file(path: str | Path) -> Config:
    """Load and validate a config file: ``.toml``, ``.yaml`` / ``.yml`` (needs PyYAML) or ``.json``."""
    file = Path(path)
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(ConfigIssue(source, f"cannot read the file: {exc.strerror or exc}")) from None
    except UnicodeDecodeError:
        raise ConfigError(ConfigIssue(source, "expected UTF-8 text")) from None
    suffix = file.suffix.lower()
    data: Any
    if suffix in (".yaml", ".yml"):
        try:
            import yaml  # noqa: F401
        except ImportError:
            raise ConfigError(ConfigIssue(source, "YAML needs PyYAML: pip install 'canary-router[yaml]'")) from None
        data = _UniqueKeyLoader.load(text, source)
    elif suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_json_unique(source))
        except ConfigError:
            raise
        except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
            raise ConfigError(ConfigIssue(source, f"invalid JSON: {exc}")) from None
    elif suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except ValueError as exc:  # TOMLDecodeError, or an integer too long to convert
            raise ConfigError(ConfigIssue(source, f"invalid TOML: {exc}")) from None
    else:
        raise ConfigError(
            ConfigIssue(source, f"expected a .toml, .yaml, .yml or .json file, got {suffix or 'no suffix'!r}")
        )
    if data is None:
        data = {}
    return load_config(data, source=source)


def _json_unique(source: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(ConfigIssue(source, f"duplicate key {key!r}"))
            out[key] = value
        return out

    return hook
