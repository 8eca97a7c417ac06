"""Turn an Unleash feature export into canary_router configuration, keeping every user in the same cohort.

Unleash's ``flexibleRollout`` enables a user when ``murmur3_32(f"{groupId}:{userId}") % 100 + 1 <= rollout``.
The v1 bucketing spec hashes the same key, ``f"{salt}:{unit_id}"``, with the same function, and its bucket
is below ``percent * 100`` exactly when ``h % 100 < percent``: for the whole percentages Unleash has, the
same users are in. So a rollout whose ``salt`` is the strategy's ``groupId`` and whose stickiness is the
strategy's serves "new" to exactly the users Unleash enabled.

How a feature maps (see the migration guide for the whole table):

* the strategies that apply to everyone (``default``, ``flexibleRollout`` and the ``gradualRollout*``
  strategies without constraints) set the rollout's starting percentage: the highest of them;
* strategies with constraints or segments become targeting rules: ``serve = "new"`` at 100 %, else
  ``percent``; they are ordered highest percentage first, so the first rule that matches gives a user the
  highest percentage any of their strategies gives (Unleash enables a user when any strategy does);
* ``userWithId`` becomes an ``IN`` rule on ``user_id``; ``remoteAddress`` an ``IN_CIDR`` rule on ``client_ip``;
* steps start at that percentage and follow the default ladder above it (10 → ``[10, 25, 50, 100]``);
* every imported rollout starts ``paused``: it serves the Unleash percentage, and the controller expands it
  only once someone resumes it;
* a feature that serves no one but targeted users gets a last rule, ``everyone else``, serving "old" (delete
  it to start expanding); a disabled or archived feature is not imported (a rollout the router does not
  know serves "old" to everyone, as Unleash does for a disabled feature).

Whatever cannot be carried over exactly (variants, custom strategies, ``gradualRolloutRandom``, strategies
that bucket by different keys, constraints on unknown operators, segments whose conditions the export does
not include) is reported in :attr:`Conversion.warnings`, naming the feature and what changes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError, ConfigIssue
from .model import DEFAULT_STEPS, Condition
from .rules import MULTI_VALUE_OPERATORS, OPERATORS, ConditionValueError, compile_condition

__all__ = ["CONTEXT_FIELDS", "STICKINESS", "Conversion", "convert", "load_export", "to_toml"]

CONTEXT_FIELDS: Mapping[str, str] = {
    "userId": "user_id",
    "sessionId": "session_id",
    "remoteAddress": "client_ip",
    "currentTime": "current_time",
}
"""Unleash context field → canary_router attribute. Any other field (``appName``, custom properties) keeps its name."""

STICKINESS: Mapping[str, tuple[str, ...]] = {
    "default": ("user_id", "session_id"),
    "userId": ("user_id",),
    "sessionId": ("session_id",),
}
"""Unleash stickiness → canary_router stickiness. A custom field is kept (mapped as in :data:`CONTEXT_FIELDS`)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_SDK_FIELDS = ("appName", "environment")
_EVERYONE_ELSE = "everyone else"
_NEVER = "\x00never"
# a condition that holds for every request: the router's clock is always after 1970
_ALWAYS = {"attribute": "current_time", "operator": "DATE_AFTER", "value": "1970-01-01T00:00:00Z"}


@dataclass(frozen=True)
class Conversion:
    """The result of :func:`convert`: a configuration and what could not be carried over exactly."""

    config: dict[str, Any]
    """A mapping in the configuration's shape (``{"rollouts": {...}, "segments": {...}}``), ready for
    :meth:`Router.from_config <canary_router.Router.from_config>` or :func:`to_toml`."""
    warnings: tuple[str, ...] = ()
    """One sentence per difference, each naming the feature (or segment) it is about."""


@dataclass
class _Piece:
    """One Unleash strategy, translated: who it applies to, at which percentage, bucketed by which key."""

    label: str
    when: list[dict[str, Any]]
    segments: list[str]
    percent: int
    key: tuple[str, tuple[str, ...]] | None
    """``(salt, stickiness)`` of a percentage strategy, else ``None``."""

    @property
    def targeted(self) -> bool:
        return bool(self.when or self.segments)

    @property
    def hashes(self) -> bool:
        """Whether the strategy picks users by their hash (below 100 %, the key decides who is in)."""
        return self.key is not None and 0 < self.percent < 100


@dataclass
class _Feature:
    name: str
    path: str
    description: str
    enabled: bool
    archived: bool
    strategies: list[tuple[str, Mapping[str, Any]]]
    """(path in the export, strategy) pairs, in the export's order."""
    variants: list[str] = field(default_factory=list)


def _fail(path: str, message: str, hint: str | None = None) -> ConfigError:
    return ConfigError(ConfigIssue(path, message, hint))


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(path, f"expected a list, got {type(value).__name__}")
    return value


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"expected an object, got {type(value).__name__}")
    return value


def _variant_names(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [str(v.get("name", "?")) for v in value if isinstance(v, Mapping)]


def _environments(export: Mapping[str, Any]) -> list[str]:
    """Every environment the export mentions, in first-seen order."""
    seen: dict[str, None] = {}
    for key in ("featureStrategies", "featureEnvironments"):
        for item in export.get(key) or []:
            if isinstance(item, Mapping) and isinstance(item.get("environment"), str):
                seen[item["environment"]] = None
    for item in export.get("environments") or []:
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            seen[item["name"]] = None
    for feature in export.get("features") or []:
        if isinstance(feature, Mapping):
            for env in feature.get("environments") or []:
                if isinstance(env, Mapping) and isinstance(env.get("name"), str):
                    seen[env["name"]] = None
    return list(seen)


def _choose_environment(export: Mapping[str, Any], environment: str | None) -> str | None:
    known = _environments(export)
    if environment is not None:
        if not known:  # a client API payload is already one environment's, and does not say which
            return None
        if environment not in known:
            raise _fail("environment", f"unknown environment {environment!r}", f"the export has: {', '.join(known)}")
        return environment
    if len(known) > 1:
        raise _fail(
            "environment",
            f"the export has several environments ({', '.join(known)}): choose one",
            "pass environment=... (--environment on the command line)",
        )
    return known[0] if known else None


def _features(export: Mapping[str, Any], env: str | None) -> list[_Feature]:
    """Read every feature with its strategies for ``env``, from any of the supported export shapes."""
    raw_features = _list(export.get("features"), "features")
    feature_envs: dict[str, Mapping[str, Any]] = {}
    for index, item in enumerate(_list(export.get("featureEnvironments"), "featureEnvironments")):
        fe = _mapping(item, f"featureEnvironments[{index}]")
        if fe.get("environment", env) == env and isinstance(fe.get("featureName"), str):
            feature_envs[fe["featureName"]] = fe
    by_feature: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    flat = _list(export.get("featureStrategies"), "featureStrategies")
    indexed = sorted(enumerate(flat), key=lambda p: (_sort_order(p[1]), p[0]))
    for index, item in indexed:
        strategy = _mapping(item, f"featureStrategies[{index}]")
        if strategy.get("environment", env) != env:
            continue
        name = strategy.get("featureName")
        if not isinstance(name, str):
            raise _fail(f"featureStrategies[{index}].featureName", "expected the feature's name")
        by_feature.setdefault(name, []).append((f"featureStrategies[{index}]", strategy))
    out: list[_Feature] = []
    for index, item in enumerate(raw_features):
        path = f"features[{index}]"
        raw = _mapping(item, path)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(f"{path}.name", "expected the feature's name (a non-empty string)")
        description = raw.get("description") if isinstance(raw.get("description"), str) else ""
        enabled = raw.get("enabled", True) is not False
        variants = _variant_names(raw.get("variants"))
        strategies: list[tuple[str, Mapping[str, Any]]]
        per_env = [
            (i, e)
            for i, e in enumerate(raw.get("environments") or [])
            if isinstance(e, Mapping) and e.get("name") == env and env is not None
        ]
        if name in by_feature or flat:
            strategies = by_feature.get(name, [])
        elif per_env:
            env_index, env_table = per_env[0]
            enabled = env_table.get("enabled", True) is not False
            strategies = [
                (f"{path}.environments[{env_index}].strategies[{i}]", _mapping(s, f"{path}.environments[{env_index}]"))
                for i, s in enumerate(
                    _list(env_table.get("strategies"), f"{path}.environments[{env_index}].strategies")
                )
            ]
            variants = variants or _variant_names(env_table.get("variants"))
        else:
            strategies = [
                (f"{path}.strategies[{i}]", _mapping(s, f"{path}.strategies[{i}]"))
                for i, s in enumerate(_list(raw.get("strategies"), f"{path}.strategies"))
            ]
        env_entry = feature_envs.get(name)
        if env_entry is not None:
            enabled = env_entry.get("enabled", True) is not False
            variants = variants or _variant_names(env_entry.get("variants"))
        out.append(
            _Feature(
                name=name,
                path=path,
                description=description or "",
                enabled=enabled,
                archived=raw.get("archived") is True,
                strategies=strategies,
                variants=variants,
            )
        )
    return out


def _sort_order(strategy: Any) -> float:
    if isinstance(strategy, Mapping):
        order = strategy.get("sortOrder")
        if isinstance(order, (int, float)) and not isinstance(order, bool):
            return float(order)
    return 0.0


class _Names:
    """Gives every Unleash name a valid, unique canary_router name (letters, digits, ``_``, ``.``, ``-``)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def make(self, original: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.\-]+", "-", original).strip("-_.")[:120] or "unnamed"
        if not base[0].isalnum():
            base = "x" + base
        name, counter = base, 2
        while name in self.used:
            name, counter = f"{base}-{counter}", counter + 1
        self.used.add(name)
        return name


class _Converter:
    def __init__(self, export: Mapping[str, Any]) -> None:
        self.export = export
        self.warnings: list[str] = []
        self.segment_names = _Names()
        self.segments: dict[str, dict[str, Any]] = {}
        self.segment_by_id: dict[Any, str] = {}
        """Segment id → segment name; ``""`` for a segment that matches everyone, ``_NEVER`` for no one."""
        self.segment_titles: dict[Any, str] = {}
        self.sdk_fields_warned: set[str] = set()
        self.strategy_segments: dict[Any, list[Any]] = {}

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    # -------------------------------------------------------------- constraints and segments

    def condition(self, raw: Any, where: str) -> dict[str, Any] | bool | str:
        """Translate one constraint: a condition, ``True``/``False`` when it always / never holds, or why not."""
        if not isinstance(raw, Mapping):
            return f"{where}: expected an object"
        context_name = raw.get("contextName")
        operator = raw.get("operator")
        if not isinstance(context_name, str) or not context_name:
            return f"{where}: no contextName"
        if not isinstance(operator, str) or operator not in OPERATORS:
            return f"{where}: operator {operator!r} has no equivalent"
        attribute = CONTEXT_FIELDS.get(context_name, context_name)
        inverted = raw.get("inverted") is True
        out: dict[str, Any] = {"attribute": attribute, "operator": operator}
        if operator in MULTI_VALUE_OPERATORS:
            raw_values = raw.get("values") or []
            if not isinstance(raw_values, list):
                return f"{where}: values is not a list"
            values = [str(v) for v in raw_values if v is not None]
            if not values and isinstance(raw.get("value"), str) and raw["value"]:
                values = [raw["value"]]
            if not values:  # Unleash: an empty list matches no one (NOT_IN: everyone), before inverting
                return (operator == "NOT_IN") != inverted
            out["values"] = values
        else:
            value = raw.get("value")
            if value is None and isinstance(raw.get("values"), list) and len(raw["values"]) == 1:
                value = raw["values"][0]
            if value is None:
                return f"{where}: {operator} without a value"
            out["value"] = str(value)
        if inverted:
            out["inverted"] = True
        # Unleash applies caseInsensitive to the string operators only
        if raw.get("caseInsensitive") is True and (operator.startswith("STR_") or operator == "REGEX"):
            out["case_insensitive"] = True
        try:
            compile_condition(
                Condition(
                    attribute,
                    operator,
                    tuple(out.get("values", [out.get("value")])),
                    inverted,
                    bool(out.get("case_insensitive")),
                )
            )
        except ConditionValueError as exc:
            return f"{where}: {exc.message}"
        if context_name in _SDK_FIELDS and context_name not in self.sdk_fields_warned:
            self.sdk_fields_warned.add(context_name)
            self.warn(
                f"conditions on {context_name!r}: Unleash SDKs fill it from their own settings; put it in the "
                f"context (for example with the middleware's attributes callable), or those conditions never hold"
            )
        return out

    def conditions(self, raw: Any, where: str) -> list[dict[str, Any]] | Literal[False] | str:
        """Translate a constraint list: conditions, ``False`` when it never holds, or why it cannot be."""
        out: list[dict[str, Any]] = []
        for index, item in enumerate(raw or []):
            result = self.condition(item, f"{where}[{index}]")
            if isinstance(result, str):
                return result
            if result is False:
                return False
            if result is not True:
                out.append(result)
        return out

    def load_segments(self) -> None:
        for index, item in enumerate(_list(self.export.get("segments"), "segments")):
            raw = _mapping(item, f"segments[{index}]")
            seg_id = raw.get("id")
            title = raw["name"] if isinstance(raw.get("name"), str) and raw["name"] else f"segment-{seg_id}"
            self.segment_titles[seg_id] = title
            if "constraints" not in raw:
                continue  # listed by id and name only (the export/import format): its conditions are not here
            conds = self.conditions(raw.get("constraints"), f"segments[{index}].constraints")
            if isinstance(conds, str):
                self.warn(f"segment {title!r}: not imported ({conds}); strategies that use it are not imported")
                continue
            if conds is False:
                self.segment_by_id[seg_id] = _NEVER
                continue
            if not conds:  # no condition: the segment matches everyone
                self.segment_by_id[seg_id] = ""
                continue
            name = self.segment_names.make(title)
            if name != title:
                self.warn(f"segment {title!r}: renamed {name!r} (names are letters, digits, '_', '.' or '-')")
            body: dict[str, Any] = {}
            if isinstance(raw.get("description"), str) and raw["description"]:
                body["description"] = raw["description"]
            body["when"] = conds
            self.segments[name] = body
            self.segment_by_id[seg_id] = name
        for index, item in enumerate(_list(self.export.get("featureStrategySegments"), "featureStrategySegments")):
            pair = _mapping(item, f"featureStrategySegments[{index}]")
            self.strategy_segments.setdefault(pair.get("featureStrategyId"), []).append(pair.get("segmentId"))

    # -------------------------------------------------------------- strategies

    def piece(self, feature: _Feature, where: str, strategy: Mapping[str, Any]) -> _Piece | str | None:
        """Translate one strategy: a piece, ``None`` when it enables no one, or why it cannot be."""
        kind = strategy.get("name", strategy.get("strategyName"))
        raw_params = strategy.get("parameters")
        params: Mapping[str, Any] = raw_params if isinstance(raw_params, Mapping) else {}
        title = strategy.get("title") if isinstance(strategy.get("title"), str) and strategy.get("title") else kind
        label = str(title)
        when: list[dict[str, Any]] = []
        percent = 100
        stickiness = "default"
        group = feature.name
        if kind == "default":
            pass
        elif kind in ("flexibleRollout", "gradualRolloutUserId", "gradualRolloutSessionId", "gradualRolloutRandom"):
            raw_percent = params.get("rollout" if kind == "flexibleRollout" else "percentage", 100)
            try:
                number = float(str(raw_percent).strip())
            except ValueError:
                return f"{kind}: rollout {raw_percent!r} is not a number"
            if not math.isfinite(number) or not 0 <= number <= 100:
                return f"{kind}: rollout {raw_percent!r} is not a percentage"
            percent = math.floor(number)  # Unleash compares a whole normalized hash with it
            stickiness = {
                "gradualRolloutUserId": "userId",
                "gradualRolloutSessionId": "sessionId",
                "gradualRolloutRandom": "random",
            }.get(str(kind), str(params.get("stickiness") or "default"))
            if isinstance(params.get("groupId"), str) and params["groupId"]:
                group = params["groupId"]
        elif kind == "userWithId":
            ids = [part.strip() for part in str(params.get("userIds", "")).split(",") if part.strip()]
            if not ids:
                return None
            when.append({"attribute": "user_id", "operator": "IN", "values": ids})
        elif kind == "remoteAddress":
            ips = [part.strip() for part in str(params.get("IPs", "")).split(",") if part.strip()]
            if not ips:
                return None
            condition = self.condition({"contextName": "remoteAddress", "operator": "IN_CIDR", "values": ips}, "IPs")
            if not isinstance(condition, dict):
                return f"remoteAddress: {str(condition).split(': ', 1)[-1]}"
            when.append(condition)
        elif kind == "applicationHostname":
            return "applicationHostname: canary_router has no host name attribute"
        else:
            return f"custom strategy {kind!r} has no equivalent"
        conds = self.conditions(strategy.get("constraints"), f"{where}.constraints")
        if isinstance(conds, str):
            return conds
        if conds is False:
            return None
        when.extend(conds)
        segments: list[str] = []
        seg_ids = list(strategy.get("segments") or []) + self.strategy_segments.get(strategy.get("id"), [])
        for seg_id in seg_ids:
            name = self.segment_by_id.get(seg_id)
            if name is None:
                title = self.segment_titles.get(seg_id, seg_id)
                return f"segment {title!r}: the export does not include its conditions"
            if name == _NEVER:
                return None
            if name and name not in segments:
                segments.append(name)
        if percent <= 0:
            return None
        key: tuple[str, tuple[str, ...]] | None = None
        if stickiness == "random":
            if percent < 100:
                return f"{label}: random stickiness is not deterministic (every request draws again)"
        elif kind not in ("default", "userWithId", "remoteAddress"):
            key = (group, STICKINESS.get(stickiness, (CONTEXT_FIELDS.get(stickiness, stickiness),)))
        return _Piece(label, when, segments, percent, key)

    # -------------------------------------------------------------- features

    def feature(self, feature: _Feature, name: str, env: str | None) -> dict[str, Any] | None:
        where = f" in {env!r}" if env else ""
        if feature.archived:
            self.warn(f"{feature.name}: archived: not imported")
            return None
        if not feature.enabled:
            self.warn(f"{feature.name}: disabled{where}: not imported (an unknown rollout serves 'old' to everyone)")
            return None
        if feature.variants:
            self.warn(
                f"{feature.name}: variants ({', '.join(feature.variants)}) are not imported: a rollout serves "
                "'old' or 'new'"
            )
        pieces: list[_Piece] = []
        active = [(p, s) for p, s in feature.strategies if s.get("disabled") is not True]
        for path, strategy in active:
            result = self.piece(feature, path, strategy)
            if isinstance(result, str):
                self.warn(f"{feature.name}: strategy not imported ({result}); the users only it enabled get 'old'")
            elif result is not None:
                pieces.append(result)
        if active and not pieces:
            self.warn(f"{feature.name}: no strategy could be imported: not imported")
            return None
        if not active:  # Unleash: an enabled feature without strategies is on for everyone
            pieces.append(_Piece("everyone", [], [], 100, None))
        everyone = [p for p in pieces if not p.targeted]
        base = max(everyone, key=lambda p: p.percent) if everyone else None
        base_percent = base.percent if base is not None else 0
        rules = sorted((p for p in pieces if p.targeted and p.percent > base_percent), key=lambda p: -p.percent)
        kept = ([base] if base is not None else []) + rules
        used = [p for p in kept if p.hashes]
        keyed = used or [p for p in kept if p.key is not None] or [p for p in pieces if p.key is not None]
        key = keyed[0].key if keyed else None
        salt, stickiness = key if key is not None else (feature.name, STICKINESS["default"])
        others = {p.key for p in used if p.key != key}
        if others:
            chosen = f"groupId {salt!r}, stickiness {list(stickiness)}"
            other_text = "; ".join(f"groupId {k[0]!r}, stickiness {list(k[1])}" for k in others if k)
            self.warn(
                f"{feature.name}: strategies bucket users by different keys ({other_text}); a rollout buckets one "
                f"way ({chosen}), so some users of the other strategies change version"
            )
        body: dict[str, Any] = {}
        description = feature.description or f"Imported from Unleash feature {feature.name!r}"
        body["description"] = description
        body["stickiness"] = list(stickiness)
        if salt != name:
            body["salt"] = salt
        first = base_percent if base_percent > 0 else None
        steps = [float(first)] if first is not None else []
        steps += [s for s in DEFAULT_STEPS if first is None or s > first]
        body["steps"] = [_number(s) for s in steps]
        body["start"] = "paused"
        out_rules: list[dict[str, Any]] = []
        labels: set[str] = set()
        for piece in rules:
            label, counter = piece.label, 2
            while label in labels or label == _EVERYONE_ELSE:
                label, counter = f"{piece.label} ({counter})", counter + 1
            labels.add(label)
            rule: dict[str, Any] = {"name": label}
            if piece.when:
                rule["when"] = piece.when
            if piece.segments:
                rule["segments"] = piece.segments
            if piece.percent >= 100:
                rule["serve"] = "new"
            else:
                rule["percent"] = piece.percent
            out_rules.append(rule)
        if base is None:
            out_rules.append({"name": _EVERYONE_ELSE, "when": [dict(_ALWAYS)], "serve": "old"})
            self.warn(
                f"{feature.name}: Unleash serves it only to targeted users; the rule {_EVERYONE_ELSE!r} keeps "
                "everyone else on 'old' (delete it to start the rollout)"
            )
        if out_rules:
            body["rules"] = out_rules
        return body


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def convert(
    export: Mapping[str, Any],
    *,
    environment: str | None = None,
    features: Collection[str] | None = None,
) -> Conversion:
    """Convert a parsed Unleash feature export into a canary_router configuration.

    Reads the export/import format of Unleash 4.22 and later (``features``, ``featureStrategies``,
    ``featureEnvironments``, ``segments``, ``contextFields``), the older state export
    (``/api/admin/state/export``: ``features[].strategies`` or ``featureStrategies`` with ``environments``)
    and the client API's ``features`` payload (``/api/client/features``, whose ``segments`` carry their
    conditions). ``environment`` picks one environment when the export has several; ``features`` limits the
    conversion to those feature names.

    Raises :class:`~canary_router.ConfigError` when the export is not one of these shapes, the environment
    is unknown or not given when it must be, or a requested feature is not in the export. The returned
    config is valid: :func:`~canary_router.load_config` accepts it.
    """
    if not isinstance(export, Mapping):
        raise _fail("", f"expected an Unleash export (a JSON object), got {type(export).__name__}")
    if "features" not in export:
        raise _fail(
            "features", "not an Unleash feature export: no 'features' list", "export features from Unleash as JSON"
        )
    env = _choose_environment(export, environment)
    converter = _Converter(export)
    converter.load_segments()
    all_features = _features(export, env)
    wanted: set[str] | None = None
    if features is not None:
        wanted = set(features)
        missing = sorted(wanted - {f.name for f in all_features})
        if missing:
            known = ", ".join(f.name for f in all_features) or "none"
            raise _fail("features", f"not in the export: {', '.join(missing)}", f"the export has: {known}")
    names = _Names()
    rollouts: dict[str, Any] = {}
    for feature in all_features:
        if wanted is not None and feature.name not in wanted:
            continue
        name = names.make(feature.name)
        body = converter.feature(feature, name, env)
        if body is None:
            names.used.discard(name)
            continue
        if name != feature.name:
            converter.warn(
                f"{feature.name}: renamed {name!r} (names are letters, digits, '_', '.' or '-'); "
                "its salt keeps the Unleash name, so the cohort is the same"
            )
            body.setdefault("salt", feature.name)
        rollouts[name] = body
    used_segments = {
        seg for body in rollouts.values() for rule in body.get("rules", []) for seg in rule.get("segments", [])
    }
    segments = {name: body for name, body in converter.segments.items() if name in used_segments}
    config: dict[str, Any] = {"rollouts": rollouts}
    if segments:
        config["segments"] = segments
    return Conversion(config=config, warnings=tuple(converter.warnings))


# ------------------------------------------------------------------ TOML

_BARE_KEY = re.compile(r"[A-Za-z0-9_\-]+")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    out: list[str] = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: Any, path: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: TOML has no {value!r} in this configuration")
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(str(k))} = {_value(v, f'{path}.{k}')}" for k, v in value.items() if v is not None)
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, f"{path}[{i}]") for i, v in enumerate(value)) + "]"
    raise ValueError(f"{path}: cannot write a {type(value).__name__} as TOML")


def _is_table_array(key: str, value: Any) -> bool:
    """A list of tables written as ``[[...]]`` blocks: ``rules``, or any whose tables hold tables."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, Mapping) for v in value):
        return False
    if key == "rules":
        return True
    return any(
        isinstance(x, Mapping) or (isinstance(x, (list, tuple)) and any(isinstance(y, Mapping) for y in x))
        for v in value
        for x in v.values()
    )


def _table(lines: list[str], path: list[str], table: Mapping[str, Any], header: str | None) -> None:
    if header is not None:
        if lines:
            lines.append("")
        lines.append(header)
    nested: list[tuple[str, Any]] = []
    for key, value in table.items():
        if value is None:
            continue
        where = ".".join([*path, str(key)])
        if isinstance(value, Mapping) or _is_table_array(str(key), value):
            nested.append((str(key), value))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            lines.append(f"{_key(str(key))} = [")
            lines.extend(f"    {_value(v, f'{where}[{i}]')}," for i, v in enumerate(value))
            lines.append("]")
        else:
            lines.append(f"{_key(str(key))} = {_value(value, where)}")
    for key, value in nested:
        sub = [*path, key]
        dotted = ".".join(_key(p) for p in sub)
        if isinstance(value, Mapping):
            _table(lines, sub, value, f"[{dotted}]")
        else:
            for item in value:
                _table(lines, sub, item, f"[[{dotted}]]")


def to_toml(config: Mapping[str, Any]) -> str:
    """Write a configuration mapping (such as :attr:`Conversion.config`) as TOML text.

    Tables become ``[section]`` headers, ``rules`` become ``[[...rules]]`` blocks, conditions stay inline
    tables (one per line); ``tomllib.loads(to_toml(config)) == config`` for any configuration made of
    tables, lists, strings, numbers and booleans (``None`` values are left out).
    """
    lines: list[str] = []
    scalars = {k: v for k, v in config.items() if not isinstance(v, Mapping)}
    _table(lines, [], scalars, None)
    for key, value in config.items():
        if not isinstance(value, Mapping):
            continue
        simple = {k: v for k, v in value.items() if not isinstance(v, Mapping)}
        if simple or not value:
            _table(lines, [key], simple, f"[{_key(key)}]")
        for sub, body in value.items():
            if isinstance(body, Mapping):
                _table(lines, [key, sub], body, f"[{_key(key)}.{_key(sub)}]")
    return "\n".join(lines) + "\n"


def load_export(text: str, *, source: str = "export") -> Mapping[str, Any]:
    """Parse the JSON text of an Unleash export; raises :class:`~canary_router.ConfigError` when it is not JSON."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _fail(source, f"invalid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise _fail(source, f"expected an Unleash export (a JSON object), got {type(data).__name__}")
    return data
