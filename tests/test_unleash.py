"""Unleash import: every user keeps the version Unleash gave them, and what cannot be carried over is said."""

from __future__ import annotations

import ipaddress
import json
import random
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mmh3
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from canary_router import ConfigError, Router, load_config
from canary_router.cli import cli
from canary_router.unleash import Conversion, convert, to_toml

# --------------------------------------------------------------------------- Unleash's own algorithm, restated


def normalized_hash(group_id: str, identifier: str) -> int:
    """Unleash's normalizedHash for strategies: murmur3_32 of ``groupId:id``, seed 0, modulo 100, plus 1."""
    return mmh3.hash(f"{group_id}:{identifier}", 0, signed=False) % 100 + 1


UNLEASH_FIELDS = {"userId": "user_id", "sessionId": "session_id", "remoteAddress": "client_ip"}


def unleash_value(context: Mapping[str, Any], name: str) -> Any:
    """The value of an Unleash context field in a canary_router context."""
    return context.get(UNLEASH_FIELDS.get(name, name))


def unleash_constraint(constraint: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
    """Unleash's constraint semantics for the operators these tests use."""
    value = unleash_value(context, constraint["contextName"])
    op = constraint["operator"]
    values = constraint.get("values", [])
    if op == "IN":
        result = value is not None and str(value) in values
    elif op == "NOT_IN":
        result = value is None or str(value) not in values
    elif op == "STR_ENDS_WITH":
        if value is None:
            result = False
        elif constraint.get("caseInsensitive"):
            result = any(str(value).lower().endswith(v.lower()) for v in values)
        else:
            result = any(str(value).endswith(v) for v in values)
    elif op == "NUM_GT":
        result = value is not None and float(value) > float(constraint["value"])
    else:  # pragma: no cover - the tests use only the operators above
        raise AssertionError(op)
    return result != bool(constraint.get("inverted"))


def unleash_strategy(strategy: Mapping[str, Any], feature: str, context: Mapping[str, Any]) -> bool:
    """Whether one Unleash strategy enables the feature for ``context`` (deterministic stickiness only)."""
    if not all(unleash_constraint(c, context) for c in strategy.get("constraints", [])):
        return False
    params = strategy.get("parameters", {})
    kind = strategy["name"]
    if kind == "default":
        return True
    if kind == "userWithId":
        ids = [i.strip() for i in params["userIds"].split(",")]
        return context.get("user_id") in ids
    if kind == "remoteAddress":
        ip = context.get("client_ip")
        return ip is not None and any(
            ipaddress.ip_address(ip) in ipaddress.ip_network(n.strip(), strict=False) for n in params["IPs"].split(",")
        )
    assert kind == "flexibleRollout"
    rollout = int(params["rollout"])
    stickiness = params.get("stickiness", "default")
    if stickiness == "default":
        unit = context.get("user_id") or context.get("session_id")
    else:
        unit = unleash_value(context, stickiness)
    if unit is None:
        return rollout >= 100  # 0 < random draw <= 100 with no unit: only certain at 100 %
    return normalized_hash(params.get("groupId") or feature, str(unit)) <= rollout


def unleash_enabled(feature: str, strategies: list[Mapping[str, Any]], context: Mapping[str, Any]) -> bool:
    """An enabled Unleash feature is on when any of its strategies is (and always when it has none)."""
    return not strategies or any(unleash_strategy(s, feature, context) for s in strategies)


# --------------------------------------------------------------------------- helpers


def export_of(
    strategies: dict[str, list[dict[str, Any]]], *, environment: str = "production", **extra: Any
) -> dict[str, Any]:
    """A v4.22+ export/import document with these strategies per feature, all enabled."""
    return {
        "features": [{"name": name, "project": "default", "type": "release"} for name in strategies],
        "featureStrategies": [
            {"featureName": name, "environment": environment, "constraints": [], **s}
            for name, items in strategies.items()
            for s in items
        ],
        "featureEnvironments": [
            {"featureName": name, "environment": environment, "enabled": True, "variants": []} for name in strategies
        ],
        "tagTypes": [],
        **extra,
    }


def flexible(rollout: int, *, group: str | None = None, stickiness: str = "default", **extra: Any) -> dict[str, Any]:
    """A flexibleRollout strategy as Unleash exports it (the rollout as a string)."""
    params: dict[str, Any] = {"rollout": str(rollout), "stickiness": stickiness}
    if group is not None:
        params["groupId"] = group
    return {"name": "flexibleRollout", "parameters": params, **extra}


def router_for(conversion: Conversion) -> Router:
    """A router for a converted config (checked by the loader first)."""
    load_config(conversion.config)  # the converted config is valid as it is
    return Router.from_config(conversion.config, telemetry=None)


def users(count: int = 10_000, seed: int = 11) -> list[dict[str, Any]]:
    """Users with a region, an email and a plan level, drawn from a fixed seed."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        ctx: dict[str, Any] = {"user_id": f"user-{i}"}
        ctx["region"] = rng.choice(["eu-west-1", "us-east-1", "ap-south-1"])
        ctx["email"] = f"u{i}@" + rng.choice(["example.com", "EXAMPLE.COM", "mail.test"])
        ctx["plan_level"] = str(rng.randint(0, 5))
        out.append(ctx)
    return out


def assert_same_cohort(feature: str, strategies: list[dict[str, Any]], conversion: Conversion, rollout: str) -> int:
    """Every one of 10,000 users gets "new" from the imported router exactly when Unleash enables them."""
    router = router_for(conversion)
    enabled = 0
    for ctx in users():
        expected = unleash_enabled(feature, strategies, ctx)
        enabled += expected
        assert router.decide(rollout, ctx).variant == ("new" if expected else "old"), ctx
    return enabled


# --------------------------------------------------------------------------- cohort preservation


@pytest.mark.parametrize("percent", [1, 5, 10, 33, 50, 99, 100])
def test_flexible_rollout_keeps_every_user_in_the_same_cohort(percent: int) -> None:
    """A flexibleRollout at p % imports as a rollout whose bucketing picks the same users as Unleash."""
    strategies = [flexible(percent, group="checkout-group")]
    conversion = convert(export_of({"new-checkout": strategies}))
    body = conversion.config["rollouts"]["new-checkout"]
    assert body["salt"] == "checkout-group"
    assert body["start"] == "paused"
    enabled = assert_same_cohort("new-checkout", strategies, conversion, "new-checkout")
    assert abs(enabled - percent * 100) < 400  # and that is about p % of the users


@pytest.mark.parametrize(
    ("base", "eu", "staff"), [(0, 50, 100), (5, 50, 100), (10, 25, 60), (50, 30, 100), (99, 100, 0)]
)
def test_strategies_with_constraints_keep_every_user_in_the_same_cohort(base: int, eu: int, staff: int) -> None:
    """Constrained strategies, userWithId and a base rollout give each user what Unleash's "any strategy" gives."""
    strategies: list[dict[str, Any]] = []
    if base:
        strategies.append(flexible(base))
    strategies += [
        flexible(eu, constraints=[{"contextName": "region", "operator": "IN", "values": ["eu-west-1"]}]),
        flexible(
            staff,
            constraints=[
                {
                    "contextName": "email",
                    "operator": "STR_ENDS_WITH",
                    "values": ["@example.com"],
                    "caseInsensitive": True,
                },
                {"contextName": "plan_level", "operator": "NUM_GT", "value": "2"},
            ],
        ),
        {"name": "userWithId", "parameters": {"userIds": "user-1, user-2,user-3"}},
        flexible(
            80,
            constraints=[{"contextName": "region", "operator": "NOT_IN", "values": ["us-east-1"], "inverted": True}],
        ),
    ]
    conversion = convert(export_of({"recs": strategies}))
    body = conversion.config["rollouts"]["recs"]
    percents = [r["percent"] if "percent" in r else (100 if r["serve"] == "new" else 0) for r in body.get("rules", [])]
    assert percents[: len(percents) - (base == 0)] == sorted(percents[: len(percents) - (base == 0)], reverse=True)
    assert_same_cohort("recs", strategies, conversion, "recs")


def test_a_feature_only_for_targeted_users_keeps_everyone_else_on_old() -> None:
    """Without a strategy for everyone, a last rule serves "old" to everyone else, and the warning says how to start."""
    strategies = [
        {"name": "userWithId", "parameters": {"userIds": "user-7"}},
        flexible(40, constraints=[{"contextName": "region", "operator": "IN", "values": ["ap-south-1"]}]),
    ]
    conversion = convert(export_of({"beta": strategies}))
    rules = conversion.config["rollouts"]["beta"]["rules"]
    assert rules[-1]["name"] == "everyone else"
    assert rules[-1]["serve"] == "old"
    assert any("'everyone else'" in w and "delete it" in w for w in conversion.warnings)
    enabled = assert_same_cohort("beta", strategies, conversion, "beta")
    assert 0 < enabled < 2000


def test_session_and_custom_stickiness_map_to_attributes() -> None:
    """Stickiness sessionId buckets by session_id, a custom field by that attribute, with the same cohort."""
    for stickiness, attribute in (("sessionId", "session_id"), ("tenantId", "tenantId"), ("userId", "user_id")):
        strategies = [flexible(30, stickiness=stickiness)]
        conversion = convert(export_of({"f": strategies}))
        assert conversion.config["rollouts"]["f"]["stickiness"] == [attribute]
        router = router_for(conversion)
        for i in range(2000):
            ctx = {"user_id": f"u{i}", "session_id": f"s{i}", "tenantId": f"t{i}"}
            expected = "new" if unleash_enabled("f", strategies, ctx) else "old"
            assert router.decide("f", ctx).variant == expected


def test_default_stickiness_falls_back_to_the_session() -> None:
    """Default stickiness is user_id then session_id, as in Unleash; the salt defaults to the feature name."""
    strategies = [flexible(50)]
    conversion = convert(export_of({"feat": strategies}))
    body = conversion.config["rollouts"]["feat"]
    assert body["stickiness"] == ["user_id", "session_id"]
    assert "salt" not in body  # the rollout name is the default salt, and Unleash's default groupId
    router = router_for(conversion)
    for i in range(2000):
        ctx = {"session_id": f"anon-{i}"}
        assert router.decide("feat", ctx).variant == ("new" if unleash_enabled("feat", strategies, ctx) else "old")


def test_remote_address_maps_to_client_ip() -> None:
    """The remoteAddress strategy becomes an IN_CIDR rule on client_ip (single addresses and blocks)."""
    strategies = [flexible(10), {"name": "remoteAddress", "parameters": {"IPs": "10.0.0.0/8, 192.168.1.7"}}]
    conversion = convert(export_of({"ipf": strategies}))
    rule = conversion.config["rollouts"]["ipf"]["rules"][0]
    assert rule["when"] == [{"attribute": "client_ip", "operator": "IN_CIDR", "values": ["10.0.0.0/8", "192.168.1.7"]}]
    router = router_for(conversion)
    for ip, user in (("10.2.3.4", "x"), ("192.168.1.7", "y"), ("192.168.1.8", "z"), ("8.8.8.8", "w")):
        ctx = {"client_ip": ip, "user_id": user}
        assert router.decide("ipf", ctx).variant == ("new" if unleash_enabled("ipf", strategies, ctx) else "old")


def test_a_renamed_feature_keeps_its_cohort() -> None:
    """A feature name canary_router cannot use is renamed, and the salt keeps the Unleash name."""
    strategies = [flexible(20)]
    conversion = convert(export_of({"checkout~v2": strategies}))
    assert list(conversion.config["rollouts"]) == ["checkout-v2"]
    assert conversion.config["rollouts"]["checkout-v2"]["salt"] == "checkout~v2"
    assert any("renamed 'checkout-v2'" in w for w in conversion.warnings)
    assert_same_cohort("checkout~v2", strategies, conversion, "checkout-v2")


# --------------------------------------------------------------------------- steps, states, warnings


@pytest.mark.parametrize(
    ("percent", "steps"),
    [(10, [10, 25, 50, 100]), (7, [7, 10, 25, 50, 100]), (1, [1, 5, 10, 25, 50, 100]), (100, [100]), (50, [50, 100])],
)
def test_steps_start_at_the_unleash_percentage_then_follow_the_default_ladder(percent: int, steps: list[int]) -> None:
    """The first step is the Unleash percentage (so the rollout serves it), then the default steps above it."""
    conversion = convert(export_of({"f": [flexible(percent)]}))
    assert conversion.config["rollouts"]["f"]["steps"] == steps
    status = router_for(conversion).status("f")
    assert (status.phase.value, status.percent) == ("paused", float(percent))


def test_an_enabled_feature_without_strategies_is_on_for_everyone() -> None:
    """Unleash serves an enabled feature with no strategy to everyone: the rollout starts at 100 %."""
    conversion = convert(export_of({"f": []}))
    assert conversion.config["rollouts"]["f"]["steps"] == [100]
    assert router_for(conversion).decide("f", {"user_id": "u"}).variant == "new"


def test_disabled_and_archived_features_are_skipped_with_a_warning() -> None:
    """A disabled feature serves "old" to everyone in Unleash; an unknown rollout does too, so it is left out."""
    export = export_of({"on": [flexible(10)], "off": [flexible(10)], "gone": [flexible(10)]})
    export["featureEnvironments"][1]["enabled"] = False
    export["features"][2]["archived"] = True
    conversion = convert(export)
    assert list(conversion.config["rollouts"]) == ["on"]
    assert any(w.startswith("off: disabled in 'production': not imported") for w in conversion.warnings)
    assert any(w.startswith("gone: archived") for w in conversion.warnings)
    router = router_for(conversion)
    assert router.decide("off", {"user_id": "u"}).variant == "old"


def test_what_cannot_be_expressed_is_warned_about() -> None:
    """Random stickiness, custom strategies, variants, hostnames and mixed bucketing keys each get a warning."""
    export = export_of(
        {
            "rand": [flexible(30, stickiness="random"), flexible(10)],
            "custom": [{"name": "betaTesters", "parameters": {}}, flexible(20)],
            "host": [{"name": "applicationHostname", "parameters": {"hostNames": "a"}}],
            "mixed": [
                flexible(30, group="a"),
                flexible(
                    60, group="b", constraints=[{"contextName": "region", "operator": "IN", "values": ["eu-west-1"]}]
                ),
            ],
            "legacy": [{"name": "gradualRolloutRandom", "parameters": {"percentage": "20"}}],
        }
    )
    export["featureEnvironments"][1]["variants"] = [{"name": "blue"}, {"name": "green"}]
    warnings = "\n".join(convert(export).warnings)
    assert "rand: strategy not imported" in warnings
    assert "random stickiness is not deterministic" in warnings
    assert "custom strategy 'betaTesters' has no equivalent" in warnings
    assert "custom: variants (blue, green) are not imported" in warnings
    assert "host: no strategy could be imported: not imported" in warnings
    assert "mixed: strategies bucket users by different keys" in warnings
    assert "legacy: strategy not imported" in warnings


def test_unknown_operators_and_sdk_fields() -> None:
    """A constraint on an unknown operator drops its strategy; appName constraints warn that the context needs it."""
    export = export_of(
        {
            "f": [
                flexible(10),
                flexible(90, constraints=[{"contextName": "x", "operator": "FANCY_OP", "values": ["1"]}]),
                flexible(100, constraints=[{"contextName": "appName", "operator": "IN", "values": ["web"]}]),
            ]
        }
    )
    conversion = convert(export)
    text = "\n".join(conversion.warnings)
    assert "operator 'FANCY_OP' has no equivalent" in text
    assert "conditions on 'appName'" in text
    rules = conversion.config["rollouts"]["f"]["rules"]
    assert [r["when"][0]["attribute"] for r in rules] == ["appName"]


def test_empty_value_lists_follow_unleash() -> None:
    """IN with no values matches no one (the strategy is dropped); NOT_IN with none matches everyone (dropped)."""
    export = export_of(
        {
            "f": [
                flexible(10),
                flexible(90, constraints=[{"contextName": "region", "operator": "IN", "values": []}]),
                flexible(
                    70,
                    constraints=[
                        {"contextName": "region", "operator": "NOT_IN", "values": []},
                        {"contextName": "region", "operator": "IN", "values": ["eu-west-1"]},
                    ],
                ),
            ]
        }
    )
    rules = convert(export).config["rollouts"]["f"]["rules"]
    assert rules == [
        {
            "name": "flexibleRollout",
            "when": [{"attribute": "region", "operator": "IN", "values": ["eu-west-1"]}],
            "percent": 70,
        }
    ]


# --------------------------------------------------------------------------- export shapes and environments


def test_segments_with_conditions_become_named_segments() -> None:
    """The older state export lists segments with their conditions: they import as named segments."""
    state = {
        "version": 1,
        "features": [{"name": "seg-feature", "enabled": True}],
        "environments": [{"name": "production"}],
        "featureStrategies": [
            {
                "id": "s-1",
                "featureName": "seg-feature",
                "environment": "production",
                "strategyName": "flexibleRollout",
                "parameters": {"rollout": "100", "stickiness": "default", "groupId": "seg-feature"},
                "constraints": [],
            },
        ],
        "featureEnvironments": [{"featureName": "seg-feature", "environment": "production", "enabled": True}],
        "segments": [
            {
                "id": 3,
                "name": "EU customers",
                "description": "Customers in the EU",
                "constraints": [{"contextName": "region", "operator": "IN", "values": ["eu-west-1"]}],
            }
        ],
        "featureStrategySegments": [{"featureStrategyId": "s-1", "segmentId": 3}],
    }
    conversion = convert(state)
    assert conversion.config["segments"] == {
        "EU-customers": {
            "description": "Customers in the EU",
            "when": [{"attribute": "region", "operator": "IN", "values": ["eu-west-1"]}],
        }
    }
    rules = conversion.config["rollouts"]["seg-feature"]["rules"]
    assert rules[0] == {"name": "flexibleRollout", "segments": ["EU-customers"], "serve": "new"}
    router = router_for(conversion)
    assert router.decide("seg-feature", {"user_id": "a", "region": "eu-west-1"}).variant == "new"
    assert router.decide("seg-feature", {"user_id": "a", "region": "us-east-1"}).variant == "old"


def test_segments_listed_without_conditions_drop_their_strategies() -> None:
    """The export/import format names segments without their conditions: those strategies are not imported."""
    export = export_of({"f": [flexible(10), flexible(50, segments=[1])]}, segments=[{"id": 1, "name": "beta users"}])
    conversion = convert(export)
    assert "rules" not in conversion.config["rollouts"]["f"]
    assert any("segment 'beta users': the export does not include its conditions" in w for w in conversion.warnings)


def test_legacy_feature_strategies_and_client_api_shape() -> None:
    """``features[].strategies`` (old state export, client API) import the same way, segments included."""
    payload = {
        "version": 2,
        "features": [
            {
                "name": "legacy",
                "enabled": True,
                "strategies": [
                    {"name": "gradualRolloutUserId", "parameters": {"percentage": "15", "groupId": "legacy"}},
                    {"name": "default", "constraints": [], "segments": [9]},
                ],
            },
            {"name": "legacy-off", "enabled": False, "strategies": [{"name": "default"}]},
        ],
        "segments": [
            {"id": 9, "name": "staff", "constraints": [{"contextName": "userId", "operator": "IN", "values": ["u1"]}]}
        ],
    }
    conversion = convert(payload)
    body = conversion.config["rollouts"]["legacy"]
    assert body["stickiness"] == ["user_id"]
    assert body["steps"][0] == 15
    assert body["rules"] == [{"name": "default", "segments": ["staff"], "serve": "new"}]
    assert conversion.config["segments"]["staff"]["when"][0]["attribute"] == "user_id"
    assert "legacy-off" not in conversion.config["rollouts"]
    router = router_for(conversion)
    for i in range(3000):
        expected = normalized_hash("legacy", f"u{i}") <= 15 or f"u{i}" == "u1"
        assert router.decide("legacy", {"user_id": f"u{i}"}).variant == ("new" if expected else "old")


def test_feature_environments_in_the_admin_features_shape() -> None:
    """``features[].environments[]`` with their strategies (the admin features API) are read per environment."""
    payload = {
        "features": [
            {
                "name": "f",
                "environments": [
                    {"name": "dev", "enabled": True, "strategies": [{"name": "default"}]},
                    {"name": "prod", "enabled": True, "strategies": [flexible(20)]},
                ],
            }
        ]
    }
    assert convert(payload, environment="prod").config["rollouts"]["f"]["steps"][0] == 20
    assert convert(payload, environment="dev").config["rollouts"]["f"]["steps"] == [100]


def test_an_export_without_environments_ignores_the_choice() -> None:
    """A client API payload is one environment's already: naming the environment changes nothing."""
    payload = {"features": [{"name": "f", "enabled": True, "strategies": [flexible(30)]}]}
    assert convert(payload, environment="production").config == convert(payload).config


def test_environments_must_be_chosen_when_there_are_several() -> None:
    """Several environments need a choice; an unknown one is named with the known ones."""
    export = export_of({"f": [flexible(10)]})
    export["featureStrategies"].append({**flexible(60), "featureName": "f", "environment": "staging"})
    export["featureEnvironments"].append({"featureName": "f", "environment": "staging", "enabled": True})
    with pytest.raises(ConfigError, match="several environments"):
        convert(export)
    with pytest.raises(ConfigError, match=r"unknown environment 'qa' \(the export has: production, staging\)"):
        convert(export, environment="qa")
    assert convert(export, environment="staging").config["rollouts"]["f"]["steps"][0] == 60
    assert convert(export, environment="production").config["rollouts"]["f"]["steps"][0] == 10


def test_features_filter_and_missing_names() -> None:
    """``features=`` imports only those; a name the export lacks is an error naming it."""
    export = export_of({"a": [flexible(10)], "b": [flexible(20)]})
    assert list(convert(export, features=["b"]).config["rollouts"]) == ["b"]
    with pytest.raises(ConfigError, match="not in the export: zzz"):
        convert(export, features=["zzz"])


@pytest.mark.parametrize("bad", [[], {"flags": []}, {"features": "x"}, {"features": [{"name": 3}]}])
def test_not_an_export_is_a_clear_error(bad: Any) -> None:
    """Something that is not an Unleash export raises ConfigError, not a KeyError or TypeError."""
    with pytest.raises(ConfigError):
        convert(bad)


# --------------------------------------------------------------------------- TOML


def test_toml_round_trips_a_converted_config() -> None:
    """``to_toml`` writes what tomllib reads back unchanged, and the loader accepts it."""
    export = export_of(
        {
            "a.b": [flexible(10, group='g "quoted"\\'), {"name": "userWithId", "parameters": {"userIds": "é, ü"}}],
            "c": [flexible(100, constraints=[{"contextName": "k", "operator": "NUM_GT", "value": "1.5"}])],
        }
    )
    config = convert(export).config
    text = to_toml(config)
    assert tomllib.loads(text) == config
    load_config(tomllib.loads(text))
    assert '[rollouts."a.b"]' in text
    assert "[[rollouts.c.rules]]" in text


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
_scalar = st.one_of(
    _text, st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False)
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        _text,
        st.dictionaries(
            _text,
            st.dictionaries(
                _text,
                st.one_of(
                    _scalar,
                    st.lists(_scalar, max_size=3),
                    st.lists(
                        st.dictionaries(_text, st.one_of(_scalar, st.lists(_text, max_size=2)), max_size=3), max_size=2
                    ),
                ),
                max_size=4,
            ),
            max_size=3,
        ),
        max_size=3,
    )
)
def test_toml_round_trips_any_text_and_numbers(config: dict[str, Any]) -> None:
    """Any key or string (quotes, backslashes, control characters, non-ASCII) and any number survive."""
    assert tomllib.loads(to_toml(config)) == config


# --------------------------------------------------------------------------- command line

EXPORT = export_of(
    {
        "new-checkout": [
            flexible(10),
            flexible(50, constraints=[{"contextName": "region", "operator": "IN", "values": ["eu-west-1"]}]),
        ],
        "old-thing": [flexible(10)],
    }
)
EXPORT["featureEnvironments"][1]["enabled"] = False


def test_cli_writes_toml_to_stdout_and_warnings_to_stderr(tmp_path: Path) -> None:
    """The command prints the config on stdout (valid TOML), the warnings on stderr, and exits 0."""
    path = tmp_path / "export.json"
    path.write_text(json.dumps(EXPORT))
    result = CliRunner().invoke(cli, ["import-unleash", str(path)])
    assert result.exit_code == 0, result.output
    config = tomllib.loads(result.stdout)
    assert list(config["rollouts"]) == ["new-checkout"]
    assert "warning: old-thing: disabled in 'production'" in result.stderr
    router = Router.from_config(config, telemetry=None)
    for i in range(1000):
        ctx = {"user_id": f"u{i}", "region": "eu-west-1"}
        assert router.decide("new-checkout", ctx).is_new == (normalized_hash("new-checkout", f"u{i}") <= 50)


def test_cli_output_file_format_and_filters(tmp_path: Path) -> None:
    """--output picks JSON from the suffix (or --format), --feature filters, and the file validates."""
    path = tmp_path / "export.json"
    path.write_text(json.dumps(EXPORT))
    out = tmp_path / "canary.json"
    result = CliRunner().invoke(cli, ["import-unleash", str(path), "--output", str(out), "--feature", "new-checkout"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 rollout(s)" in result.stderr
    assert load_config(json.loads(out.read_text())).rollouts["new-checkout"].steps == (10.0, 25.0, 50.0, 100.0)
    toml_out = tmp_path / "canary.toml"
    result = CliRunner().invoke(cli, ["import-unleash", str(path), "-o", str(toml_out), "--environment", "production"])
    assert result.exit_code == 0, result.output
    assert "new-checkout" in tomllib.loads(toml_out.read_text())["rollouts"]
    result = CliRunner().invoke(cli, ["import-unleash", str(path), "--format", "json"])
    assert json.loads(result.stdout)["rollouts"]["new-checkout"]["start"] == "paused"


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("{not json", [], "invalid JSON"),
        ("[]", [], "expected an Unleash export"),
        (json.dumps(EXPORT), ["--environment", "qa"], "unknown environment 'qa'"),
        (json.dumps(EXPORT), ["--feature", "nope"], "not in the export: nope"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_1(tmp_path: Path, content: str, args: list[str], message: str) -> None:
    """A bad export, environment or feature name: one clear line on stderr, exit code 1, no traceback."""
    path = tmp_path / "export.json"
    path.write_text(content)
    result = CliRunner().invoke(cli, ["import-unleash", str(path), *args])
    assert result.exit_code == 1
    assert result.stderr.startswith("canary-router: import-unleash: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_cli_reads_standard_input() -> None:
    """``-`` reads the export from standard input."""
    result = CliRunner().invoke(cli, ["import-unleash", "-"], input=json.dumps(EXPORT))
    assert result.exit_code == 0, result.output
    assert "new-checkout" in tomllib.loads(result.stdout)["rollouts"]


def test_cli_missing_file_is_one_line(tmp_path: Path) -> None:
    """A missing export file is a one-line error with exit code 1."""
    result = CliRunner().invoke(cli, ["import-unleash", str(tmp_path / "nope.json")])
    assert result.exit_code == 1
    assert "cannot read" in result.stderr


def test_cli_runs_as_a_real_process(tmp_path: Path) -> None:
    """The installed canary-router runs import-unleash end to end; validate accepts what it wrote."""
    exe = shutil.which("canary-router", path=str(Path(sys.executable).parent))
    assert exe is not None
    path = tmp_path / "export.json"
    path.write_text(json.dumps(EXPORT))
    out = tmp_path / "canary.toml"
    result = subprocess.run(
        [exe, "import-unleash", str(path), "-o", str(out)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "warning: old-thing" in result.stderr
    assert "Traceback" not in result.stderr
    check = subprocess.run([exe, "validate", str(out)], capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    bad = subprocess.run(
        [exe, "import-unleash", str(tmp_path / "missing.json")], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr
