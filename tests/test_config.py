"""Configuration loading and validation: exact paths, helpful messages, every problem at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary_router import (
    CanaryError,
    Condition,
    Config,
    ConfigError,
    ConfigIssue,
    GuardConfig,
    Phase,
    Rollout,
    Rule,
    load_config,
    load_file,
)
from canary_router.config import parse_duration
from canary_router.model import DEFAULT_STEPS

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def issues_of(data: Any) -> tuple[ConfigIssue, ...]:
    """Return the issues load_config reports for ``data`` (failing the test if it loads)."""
    with pytest.raises(ConfigError) as info:
        load_config(data)
    return info.value.issues


def only_issue(data: Any) -> ConfigIssue:
    """Return the single issue load_config reports for ``data``."""
    issues = issues_of(data)
    assert len(issues) == 1, [str(i) for i in issues]
    return issues[0]


def issue_at(issues: tuple[ConfigIssue, ...], path: str) -> ConfigIssue:
    """Return the one issue reported at ``path``."""
    found = [i for i in issues if i.path == path]
    assert len(found) == 1, (path, [str(i) for i in issues])
    return found[0]


def rollout(**fields: Any) -> dict[str, Any]:
    """Wrap the fields of one rollout named ``r`` in a full configuration."""
    return {"rollouts": {"r": fields}}


def rule_with(*conditions: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Return a config with one rollout ``r`` whose single rule has ``conditions``."""
    body: dict[str, Any] = {"when": list(conditions), **extra}
    if "percent" not in body:
        body.setdefault("serve", "new")
    return rollout(rules=[body])


OK_CONDITION = {"attribute": "region", "operator": "IN", "values": ["eu-west-1"]}

DESIGN_TOML = """
[rollouts.recommender]
description = "Recommendation engine v2"
stickiness  = "user_id"
steps       = [5, 10, 25, 50, 100]
bake_time   = "1h"

[rollouts.recommender.guard]
max_error_rate_increase = 0.01
max_latency_ratio       = 1.25
min_requests            = 500
alpha                   = 0.01

[[rollouts.recommender.rules]]
when  = [{ attribute = "email", operator = "STR_ENDS_WITH", values = ["@example.com"] }]
serve = "new"
[[rollouts.recommender.rules]]
when    = [{ attribute = "region", operator = "IN", values = ["eu-west-1"] }]
percent = 50
"""

DESIGN_YAML = """
rollouts:
  recommender:
    description: Recommendation engine v2
    stickiness: user_id
    steps: [5, 10, 25, 50, 100]
    bake_time: 1h
    guard:
      max_error_rate_increase: 0.01
      max_latency_ratio: 1.25
      min_requests: 500
      alpha: 0.01
    rules:
      - when: [{attribute: email, operator: STR_ENDS_WITH, values: ["@example.com"]}]
        serve: new
      - when:
          - attribute: region
            operator: IN
            values: [eu-west-1]
        percent: 50
"""


def _design_dict() -> dict[str, Any]:
    return {
        "rollouts": {
            "recommender": {
                "description": "Recommendation engine v2",
                "stickiness": "user_id",
                "steps": [5, 10, 25, 50, 100],
                "bake_time": "1h",
                "guard": {
                    "max_error_rate_increase": 0.01,
                    "max_latency_ratio": 1.25,
                    "min_requests": 500,
                    "alpha": 0.01,
                },
                "rules": [
                    {
                        "when": [{"attribute": "email", "operator": "STR_ENDS_WITH", "values": ["@example.com"]}],
                        "serve": "new",
                    },
                    {"when": [{"attribute": "region", "operator": "IN", "values": ["eu-west-1"]}], "percent": 50},
                ],
            }
        }
    }


# --------------------------------------------------------------------------------------------
# Valid configurations
# --------------------------------------------------------------------------------------------


def test_design_example_loads_from_toml(tmp_path: Path) -> None:
    """The example of the design brief loads from TOML into the expected typed rollout."""
    file = tmp_path / "canary.toml"
    file.write_text(DESIGN_TOML, encoding="utf-8")
    config = load_file(file)
    assert isinstance(config, Config)
    r = config.rollouts["recommender"]
    assert r.name == "recommender"
    assert r.description == "Recommendation engine v2"
    assert r.stickiness == ("user_id",)
    assert r.steps == (5.0, 10.0, 25.0, 50.0, 100.0)
    assert r.bake_time == 3600.0
    assert r.guard == GuardConfig(max_error_rate_increase=0.01, max_latency_ratio=1.25, min_requests=500, alpha=0.01)
    assert r.rules == (
        Rule(when=(Condition("email", "STR_ENDS_WITH", ("@example.com",)),), serve="new"),
        Rule(when=(Condition("region", "IN", ("eu-west-1",)),), percent=50.0),
    )


def test_toml_yaml_json_and_dict_agree(tmp_path: Path) -> None:
    """The same configuration written as TOML, YAML, JSON or a dict gives the same Config."""
    (tmp_path / "c.toml").write_text(DESIGN_TOML, encoding="utf-8")
    (tmp_path / "c.yaml").write_text(DESIGN_YAML, encoding="utf-8")
    (tmp_path / "c.yml").write_text(DESIGN_YAML, encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(_design_dict()), encoding="utf-8")
    from_dict = load_config(_design_dict())
    for name in ("c.toml", "c.yaml", "c.yml", "c.json"):
        assert load_file(tmp_path / name) == from_dict, name
    assert load_file(str(tmp_path / "c.toml")) == from_dict  # a str path works too


def test_defaults() -> None:
    """An empty rollout table gets the documented defaults: salt = name, user_id stickiness, running."""
    r = load_config(rollout()).rollouts["r"]
    assert r.steps == DEFAULT_STEPS == (5.0, 10.0, 25.0, 50.0, 100.0)
    assert r.stickiness == ("user_id",)
    assert r.salt is None
    assert r.effective_salt == "r"
    assert r.bake_time == 3600.0
    assert r.max_bake_time is None
    assert r.start is Phase.RUNNING
    assert r.rules == ()
    assert r.description == ""
    assert r.guard == GuardConfig()
    assert GuardConfig().alpha == 0.01
    assert GuardConfig().min_requests == 500


def test_empty_configuration() -> None:
    """An empty mapping is a valid configuration with no rollouts and no segments."""
    config = load_config({})
    assert dict(config.rollouts) == {}
    assert dict(config.segments) == {}


@pytest.mark.parametrize(
    ("stickiness", "expected"),
    [
        ("account_id", ("account_id",)),
        (["user_id", "session_id"], ("user_id", "session_id")),
        (("tenant",), ("tenant",)),
    ],
)
def test_stickiness_string_or_list(stickiness: Any, expected: tuple[str, ...]) -> None:
    """Stickiness is one attribute name or an ordered list of them, kept in order."""
    assert load_config(rollout(stickiness=stickiness)).rollouts["r"].stickiness == expected


def test_salt_and_start() -> None:
    """A rollout may set its own salt (used for bucketing instead of its name) and start paused."""
    r = load_config(rollout(salt="shared-2026", start="paused")).rollouts["r"]
    assert r.salt == "shared-2026"
    assert r.effective_salt == "shared-2026"
    assert r.start is Phase.PAUSED


def test_segments_referenced_from_rules() -> None:
    """Named segments are validated into condition tuples, and rules refer to them by name."""
    config = load_config(
        {
            "segments": {
                "internal": {
                    "description": "staff",
                    "when": [{"attribute": "email", "operator": "STR_ENDS_WITH", "value": "@corp.example"}],
                }
            },
            "rollouts": {
                "r": {"rules": [{"segments": ["internal"], "serve": "new"}, {"segments": "internal", "percent": 20}]}
            },
        }
    )
    assert config.segments["internal"] == (Condition("email", "STR_ENDS_WITH", ("@corp.example",)),)
    rules = config.rollouts["r"].rules
    assert rules[0].segments == ("internal",)
    assert rules[0].serve == "new"
    assert rules[0].when == ()
    assert rules[1].segments == ("internal",)
    assert rules[1].percent == 20.0


def test_condition_fields_are_read() -> None:
    """A condition's value/values, inverted and case_insensitive are carried into the Condition."""
    config = load_config(
        rule_with(
            {"attribute": "plan", "operator": "IN", "values": ["pro", "team"], "inverted": True},
            {"attribute": "email", "operator": "REGEX", "value": "@corp", "case_insensitive": True},
            name="not-pro",
        )
    )
    rule = config.rollouts["r"].rules[0]
    assert rule.name == "not-pro"
    assert rule.when == (
        Condition("plan", "IN", ("pro", "team"), inverted=True),
        Condition("email", "REGEX", ("@corp",), case_insensitive=True),
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (0, 0.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h", 3_600.0),
        ("1h30m", 5_400.0),
        ("1.5h", 5_400.0),
        ("500ms", 0.5),
        ("2d", 172_800.0),
        ("1w", 604_800.0),
        ("1h 30m", 5_400.0),
        ("1H30M", 5_400.0),
        ("1m30s250ms", 90.25),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    """Durations are seconds as a number or strings of number+unit parts (ms, s, m, h, d, w)."""
    assert parse_duration(text) == pytest.approx(seconds)
    r = load_config(rollout(bake_time=text, max_bake_time="30d")).rollouts["r"]
    assert r.bake_time == pytest.approx(seconds)
    assert r.max_bake_time == 30 * 86_400


@settings(max_examples=100, derandomize=True)
@given(h=st.integers(0, 48), m=st.integers(0, 59), s=st.integers(0, 59))
def test_duration_parts_add_up(h: int, m: int, s: int) -> None:
    """A duration "{h}h{m}m{s}s" is h hours plus m minutes plus s seconds."""
    assert parse_duration(f"{h}h{m}m{s}s") == h * 3_600 + m * 60 + s


@settings(max_examples=150, derandomize=True)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=8, unique=True))
def test_any_strictly_increasing_steps_load(hundredths: list[int]) -> None:
    """Any strictly increasing list of percentages in (0, 100] with two decimals loads unchanged."""
    steps = [h / 100 for h in sorted(hundredths)]
    assert load_config(rollout(steps=steps)).rollouts["r"].steps == tuple(steps)


@settings(max_examples=150, derandomize=True)
@given(st.lists(st.integers(1, 100), min_size=2, max_size=8))
def test_first_non_increasing_step_is_reported(steps: list[int]) -> None:
    """A step list is rejected at exactly the first step that does not exceed the previous one."""
    bad = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    if bad is None:
        assert load_config(rollout(steps=steps)).rollouts["r"].steps == tuple(map(float, steps))
        return
    issue = only_issue(rollout(steps=steps))
    assert issue.path == f"rollouts.r.steps[{bad}]"
    assert f"greater than the previous step ({steps[bad - 1]})" in issue.message


# --------------------------------------------------------------------------------------------
# Rollouts built in Python
# --------------------------------------------------------------------------------------------


def test_rollout_built_in_python_is_normalised() -> None:
    """Rollout(...) accepts the config forms (list steps, str stickiness, duration strings) and normalises them."""
    r = Rollout(
        "checkout",
        steps=[1, 50, 100],  # type: ignore[arg-type]
        stickiness="account_id",  # type: ignore[arg-type]
        bake_time="1h30m",  # type: ignore[arg-type]
        start="paused",  # type: ignore[arg-type]
        rules=(Rule(when=(Condition("region", "IN", ("eu",)),), serve="new"),),
    )
    assert r.steps == (1.0, 50.0, 100.0)
    assert r.stickiness == ("account_id",)
    assert r.bake_time == 5_400.0
    assert r.start is Phase.PAUSED
    assert r.effective_salt == "checkout"


@pytest.mark.parametrize(
    ("kwargs", "path", "phrase"),
    [
        ({"steps": (10.0, 5.0)}, "rollouts.r.steps[1]", "greater than the previous step (10)"),
        ({"steps": ()}, "rollouts.r.steps", "at least one step"),
        ({"stickiness": ()}, "rollouts.r.stickiness", "non-empty list"),
        ({"bake_time": -1.0}, "rollouts.r.bake_time", "negative"),
        ({"bake_time": 7200.0, "max_bake_time": 60.0}, "rollouts.r.max_bake_time", "at least bake_time (7200 s)"),
        ({"guard": GuardConfig(alpha=0.7)}, "rollouts.r.guard.alpha", "(0, 0.5)"),
        ({"start": "stopped"}, "rollouts.r.start", '"running" or "paused"'),
        ({"salt": ""}, "rollouts.r.salt", "non-empty string"),
        (
            {"rules": (Rule(when=(Condition("v", "SEMVER_GT", ("1.0",)),), serve="new"),)},
            "rollouts.r.rules[0].when[0].values",
            "semantic version",
        ),
        (
            {"rules": (Rule(when=(Condition("v", "REGEX", ("(",)),), serve="new"),)},
            "rollouts.r.rules[0].when[0].values",
            "invalid regular expression",
        ),
        (
            {"rules": (Rule(when=(Condition("ip", "IN_CIDR", ("10.0.0.0/8", "x")),), serve="new"),)},
            "rollouts.r.rules[0].when[0].values[1]",
            "CIDR",
        ),
        ({"rules": (Rule(when=(Condition("a", "IN", ("x",)),)),)}, "rollouts.r.rules[0]", "exactly one of"),
        ({"rules": (Rule(serve="new"),)}, "rollouts.r.rules[0]", "at least one condition or segment"),
    ],
)
def test_rollout_built_in_python_is_validated(kwargs: dict[str, Any], path: str, phrase: str) -> None:
    """Rollout(...) validates like the loader and raises ConfigError naming the field's path."""
    with pytest.raises(ConfigError) as info:
        Rollout("r", **kwargs)
    issue = issue_at(info.value.issues, path)
    assert phrase in issue.message


def test_rollout_name_is_checked() -> None:
    """A rollout name with spaces is rejected, in Python and in a config."""
    with pytest.raises(ConfigError) as info:
        Rollout("my rollout")
    assert info.value.issues[0].path == "rollouts.my rollout"
    issue = only_issue({"rollouts": {"my rollout": {}}})
    assert issue.path == "rollouts.my rollout"
    assert "rollout name" in issue.message


# --------------------------------------------------------------------------------------------
# Unknown keys, with "did you mean"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "path", "suggestion"),
    [
        ({"rollout": {}}, "rollout", "rollouts"),
        ({"segmets": {}}, "segmets", "segments"),
        (rollout(stikiness="user_id"), "rollouts.r.stikiness", "stickiness"),
        (rollout(bake_tme="1h"), "rollouts.r.bake_tme", "bake_time"),
        (rollout(step=[5]), "rollouts.r.step", "steps"),
        (rollout(guard={"alpah": 0.01}), "rollouts.r.guard.alpah", "alpha"),
        (rollout(guard={"min_request": 10}), "rollouts.r.guard.min_request", "min_requests"),
        (rollout(rules=[{"when": [OK_CONDITION], "serv": "new", "serve": "new"}]), "rollouts.r.rules[0].serv", "serve"),
        (
            rule_with({"attribute": "a", "operater": "IN", "operator": "IN", "values": ["x"]}),
            "rollouts.r.rules[0].when[0].operater",
            "operator",
        ),
        (
            rule_with({"attribute": "a", "operator": "IN", "values": ["x"], "invertd": True}),
            "rollouts.r.rules[0].when[0].invertd",
            "inverted",
        ),
        (
            {"segments": {"s": {"when": [OK_CONDITION], "descripton": "x"}}},
            "segments.s.descripton",
            "description",
        ),
    ],
)
def test_unknown_key_with_suggestion(data: dict[str, Any], path: str, suggestion: str) -> None:
    """An unknown key at any level is reported at its path with a "did you mean" hint."""
    issue = issue_at(issues_of(data), path)
    assert issue.message == "unknown key"
    assert issue.hint == f"did you mean {suggestion!r}?"
    assert str(issue) == f"{path}: unknown key (did you mean {suggestion!r}?)"


def test_unknown_key_without_a_close_match_lists_the_keys() -> None:
    """An unknown key that resembles nothing gets the list of allowed keys as its hint."""
    issue = only_issue(rollout(zzz=1))
    assert issue.path == "rollouts.r.zzz"
    assert issue.hint is not None
    assert issue.hint.startswith("expected one of: ")
    assert "stickiness" in issue.hint
    assert "bake_time" in issue.hint


# --------------------------------------------------------------------------------------------
# Steps, durations, guard
# --------------------------------------------------------------------------------------------


def test_steps_not_strictly_increasing_message() -> None:
    """A step not above the previous one is reported at its index with the previous step and the bad value."""
    issue = only_issue({"rollouts": {"checkout": {"steps": [5, 25, 20, 50]}}})
    assert issue.path == "rollouts.checkout.steps[2]"
    assert issue.message.startswith("expected a number in (0, 100] greater than the previous step (25), got 20")
    assert issue.hint == "steps must be strictly increasing"
    assert str(issue).startswith(
        "rollouts.checkout.steps[2]: expected a number in (0, 100] greater than the previous step (25), got 20"
    )


@pytest.mark.parametrize(
    ("steps", "path", "phrase"),
    [
        ([5, 5], "rollouts.r.steps[1]", "greater than the previous step (5)"),
        ([0], "rollouts.r.steps[0]", "(0, 100]"),
        ([0, 10], "rollouts.r.steps[0]", "(0, 100]"),
        ([-5], "rollouts.r.steps[0]", "(0, 100]"),
        ([150], "rollouts.r.steps[0]", "(0, 100]"),
        ([5, 150], "rollouts.r.steps[1]", "(0, 100]"),
        ([5, 100.5], "rollouts.r.steps[1]", "greater than the previous step (5)"),
        (["5"], "rollouts.r.steps[0]", "(0, 100]"),
        ([True], "rollouts.r.steps[0]", "(0, 100]"),
        ([float("nan")], "rollouts.r.steps[0]", "(0, 100]"),
        ([5, float("inf")], "rollouts.r.steps[1]", "(0, 100]"),
        ([12.125], "rollouts.r.steps[0]", "at most two decimals"),
        ([5, 10.001], "rollouts.r.steps[1]", "at most two decimals"),
        ([], "rollouts.r.steps", "expected at least one step, got an empty list"),
        ("5,10,25", "rollouts.r.steps", "expected a list of percentages"),
        (5, "rollouts.r.steps", "expected a list of percentages"),
    ],
)
def test_bad_steps(steps: Any, path: str, phrase: str) -> None:
    """Steps must be a non-empty, strictly increasing list of percentages in (0, 100] with two decimals."""
    issue = only_issue(rollout(steps=steps))
    assert issue.path == path
    assert phrase in issue.message


@pytest.mark.parametrize("bad", ["1x", "-5m", -5, "", "   ", "90", "1h30", "h", "1.h", True, None, [60], "1e3s"])
def test_bad_durations(bad: Any) -> None:
    """A duration that is not seconds or number+unit parts is reported with the accepted forms."""
    issue = only_issue(rollout(bake_time=bad))
    assert issue.path == "rollouts.r.bake_time"
    assert "expected a duration such as '90s', '15m', '1h' or '1h30m'" in issue.message
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(bad)


def test_bad_max_bake_time_duration() -> None:
    """max_bake_time is parsed like bake_time and reported at its own path."""
    issue = only_issue(rollout(max_bake_time="soon"))
    assert issue.path == "rollouts.r.max_bake_time"
    assert "expected a duration" in issue.message


def test_bake_time_above_max_bake_time() -> None:
    """bake_time greater than max_bake_time is reported at max_bake_time with both values in seconds."""
    issue = only_issue(rollout(bake_time="2h", max_bake_time="90m"))
    assert issue.path == "rollouts.r.max_bake_time"
    assert issue.message == "expected at least bake_time (7200 s), got 5400 s"
    r = load_config(rollout(bake_time="90m", max_bake_time="90m")).rollouts["r"]
    assert r.bake_time == r.max_bake_time == 5_400.0


@pytest.mark.parametrize(
    ("guard", "key", "phrase"),
    [
        ({"alpha": 0.5}, "alpha", "a number in (0, 0.5)"),
        ({"alpha": 0.7}, "alpha", "a number in (0, 0.5)"),
        ({"alpha": 0}, "alpha", "a number in (0, 0.5)"),
        ({"alpha": -0.01}, "alpha", "a number in (0, 0.5)"),
        ({"alpha": "0.01"}, "alpha", "a number in (0, 0.5)"),
        ({"max_error_rate_increase": -0.01}, "max_error_rate_increase", "a number in [0, 1)"),
        ({"max_error_rate_increase": 1}, "max_error_rate_increase", "a number in [0, 1)"),
        ({"max_latency_ratio": 0.9}, "max_latency_ratio", "a number >= 1"),
        ({"max_error_rate_ratio": 0.5}, "max_error_rate_ratio", "a number >= 1"),
        ({"latency_percentile": 100}, "latency_percentile", "a percentile in (0, 100)"),
        ({"min_requests": -1}, "min_requests", "a whole number >= 0"),
        ({"min_requests": 10.5}, "min_requests", "a whole number >= 0"),
        ({"min_requests": True}, "min_requests", "a whole number >= 0"),
    ],
)
def test_bad_guard_values(guard: dict[str, Any], key: str, phrase: str) -> None:
    """Out-of-range guard settings (alpha outside (0, 0.5), negative tolerance, ...) name the guard key."""
    issue = only_issue(rollout(guard=guard))
    assert issue.path == f"rollouts.r.guard.{key}"
    assert issue.message.startswith(f"expected {phrase}")


def test_guard_optional_ratios_may_be_switched_off() -> None:
    """The optional ratio checks accept None (off); the others keep their defaults."""
    guard = load_config(rollout(guard={"max_latency_ratio": None, "min_requests": 0})).rollouts["r"].guard
    assert guard.max_latency_ratio is None
    assert guard.min_requests == 0
    assert guard.alpha == GuardConfig().alpha


def test_guard_must_be_a_table() -> None:
    """A guard that is not a table is reported as such."""
    issue = only_issue(rollout(guard=0.01))
    assert issue.path == "rollouts.r.guard"
    assert "expected a table" in issue.message


@pytest.mark.parametrize(
    ("stickiness", "path", "phrase"),
    [
        ([], "rollouts.r.stickiness", "non-empty list"),
        ("", "rollouts.r.stickiness", "non-empty attribute name"),
        (["user_id", ""], "rollouts.r.stickiness[1]", "non-empty attribute name"),
        (["user_id", "user_id"], "rollouts.r.stickiness[1]", "listed twice"),
        (42, "rollouts.r.stickiness", "attribute name"),
    ],
)
def test_bad_stickiness(stickiness: Any, path: str, phrase: str) -> None:
    """Stickiness must be a non-empty name or a non-empty list of distinct names."""
    issue = only_issue(rollout(stickiness=stickiness))
    assert issue.path == path
    assert phrase in issue.message


# --------------------------------------------------------------------------------------------
# Rules and conditions
# --------------------------------------------------------------------------------------------


def test_lowercase_operator_hint() -> None:
    """A lower-case operator is rejected with a hint to write it in upper case."""
    issue = only_issue(rule_with({"attribute": "region", "operator": "in", "values": ["eu"]}))
    assert issue.path == "rollouts.r.rules[0].when[0].operator"
    assert "got 'in'" in issue.message
    assert "STR_ENDS_WITH" in issue.message  # the message lists the operators
    assert issue.hint == "operators are upper case: 'IN'"


@pytest.mark.parametrize(
    ("operator", "hint"),
    [
        ("STR_CONTAIN", "did you mean 'STR_CONTAINS'?"),
        ("NUM_GTEE", "did you mean 'NUM_GTE'?"),
        ("semver_gt", "operators are upper case: 'SEMVER_GT'"),
        ("IN_CDIR", "did you mean 'IN_CIDR'?"),
        ("XYZZY", None),
        (5, None),
    ],
)
def test_unknown_operator(operator: Any, hint: str | None) -> None:
    """An unknown operator is reported at its path, with a spelling hint when one is close."""
    issue = only_issue(rule_with({"attribute": "a", "operator": operator, "value": "1"}))
    assert issue.path == "rollouts.r.rules[0].when[0].operator"
    assert issue.message.startswith("expected one of DATE_AFTER, DATE_BEFORE, IN, IN_CIDR,")
    assert issue.hint == hint


@pytest.mark.parametrize(
    ("condition", "suffix", "phrase"),
    [
        ({"attribute": "e", "operator": "REGEX", "value": "("}, "value", "invalid regular expression"),
        ({"attribute": "e", "operator": "REGEX", "values": ["("]}, "values", "invalid regular expression"),
        ({"attribute": "v", "operator": "SEMVER_GTE", "value": "1.0"}, "value", "expected a semantic version"),
        ({"attribute": "v", "operator": "SEMVER_LT", "value": "v1.2.3-"}, "value", "expected a semantic version"),
        ({"attribute": "ip", "operator": "IN_CIDR", "value": "10.0.0.0/40"}, "value", "expected a CIDR block"),
        (
            {"attribute": "ip", "operator": "IN_CIDR", "values": ["10.0.0.0/8", "fe80::/129"]},
            "values[1]",
            "expected a CIDR block",
        ),
        ({"attribute": "d", "operator": "DATE_AFTER", "value": "next tuesday"}, "value", "ISO-8601"),
        ({"attribute": "d", "operator": "DATE_BEFORE", "value": "2026-02-30"}, "value", "ISO-8601"),
        ({"attribute": "n", "operator": "NUM_GT", "value": "ten"}, "value", "expected a number"),
        ({"attribute": "v", "operator": "SEMVER_EQ", "values": ["1.0.0", "2.0.0"]}, "values", "exactly one value"),
        ({"attribute": "n", "operator": "NUM_EQ", "values": []}, "values", "exactly one value"),
        ({"attribute": "r", "operator": "IN", "values": []}, "values", "at least one value"),
        ({"attribute": "r", "operator": "IN", "values": ["a", None]}, "values[1]", "expected a string"),
        ({"attribute": "r", "operator": "IN", "values": "eu-west-1"}, "values", "expected a list"),
        ({"attribute": "n", "operator": "NUM_EQ", "value": [1, 2]}, "value", "expected a single value"),
        ({"attribute": "r", "operator": "IN", "values": ["x"], "inverted": "yes"}, "inverted", "true or false"),
        ({"attribute": "r", "operator": "IN", "values": ["x"], "case_insensitive": 1}, "case_insensitive", "true or"),
        ({"attribute": "", "operator": "IN", "values": ["x"]}, "attribute", "non-empty attribute name"),
        ({"operator": "IN", "values": ["x"]}, "attribute", "non-empty attribute name"),
    ],
)
def test_bad_condition_literal_path(condition: dict[str, Any], suffix: str, phrase: str) -> None:
    """A bad literal (regex, semver, CIDR, date, number, arity, type) is reported at the exact key that holds it."""
    issue = only_issue(rule_with(OK_CONDITION, condition))
    assert issue.path == f"rollouts.r.rules[0].when[1].{suffix}"
    assert phrase in issue.message


def test_bad_regex_example_path() -> None:
    """The brief's example: a bad regex in the second condition of the first rule is at ...when[1].value."""
    issue = only_issue(rule_with(OK_CONDITION, {"attribute": "email", "operator": "REGEX", "value": "[a-"}))
    assert str(issue).startswith("rollouts.r.rules[0].when[1].value: invalid regular expression '[a-'")


def test_value_and_values_together_or_neither() -> None:
    """A condition needs exactly one of 'value' and 'values'."""
    both = only_issue(rule_with({"attribute": "a", "operator": "IN", "value": "x", "values": ["x"]}))
    assert both.path == "rollouts.r.rules[0].when[0]"
    assert both.message == "expected either 'values' (a list) or 'value', got both"
    neither = only_issue(rule_with({"attribute": "a", "operator": "IN"}))
    assert neither.path == "rollouts.r.rules[0].when[0]"
    assert neither.message == "expected 'values' (a list) or 'value'"


def test_rule_with_neither_serve_nor_percent() -> None:
    """A rule must say what to do: serve or percent."""
    issue = only_issue(rollout(rules=[{"when": [OK_CONDITION]}]))
    assert issue.path == "rollouts.r.rules[0]"
    assert issue.message.startswith("expected exactly one of 'serve'")
    assert "'percent'" in issue.message


def test_rule_with_both_serve_and_percent() -> None:
    """A rule cannot both serve a variant and split by percent."""
    issue = only_issue(rollout(rules=[{"when": [OK_CONDITION], "serve": "new", "percent": 10}]))
    assert issue.path == "rollouts.r.rules[0]"
    assert issue.message == "expected exactly one of 'serve' or 'percent', got both"


@pytest.mark.parametrize(
    ("rule", "path", "phrase"),
    [
        ({"when": [OK_CONDITION], "serve": "canary"}, "rollouts.r.rules[0].serve", 'expected "new" or "old"'),
        ({"when": [OK_CONDITION], "percent": 150}, "rollouts.r.rules[0].percent", "[0, 100]"),
        ({"when": [OK_CONDITION], "percent": "50%"}, "rollouts.r.rules[0].percent", "[0, 100]"),
        ({"serve": "new"}, "rollouts.r.rules[0]", "expected 'when'"),
        ({"when": [], "serve": "new"}, "rollouts.r.rules[0]", "at least one condition or segment"),
        ({"when": OK_CONDITION, "serve": "new"}, "rollouts.r.rules[0].when", "a list of conditions"),
        ({"when": [OK_CONDITION], "serve": "new", "name": ""}, "rollouts.r.rules[0].name", "non-empty string"),
        ("serve new", "rollouts.r.rules[0]", "expected a table"),
    ],
)
def test_bad_rules(rule: Any, path: str, phrase: str) -> None:
    """Malformed rules are reported at the rule or the offending key."""
    issue = only_issue(rollout(rules=[rule]))
    assert issue.path == path
    assert phrase in issue.message


def test_duplicate_rule_names() -> None:
    """Two rules with the same name are reported at the second, pointing at the first."""
    rules = [{"name": "staff", "when": [OK_CONDITION], "serve": "new"}] * 2
    issue = only_issue(rollout(rules=rules))
    assert issue.path == "rollouts.r.rules[1].name"
    assert "duplicate rule name 'staff' (also rules[0])" in issue.message


def test_unknown_segment_with_suggestion() -> None:
    """A rule naming an undefined segment is reported at segments[i] with the closest defined name."""
    data = {
        "segments": {"internal": {"when": [OK_CONDITION]}, "beta": {"when": [OK_CONDITION]}},
        "rollouts": {"r": {"rules": [{"segments": ["beta", "internl"], "serve": "new"}]}},
    }
    issue = only_issue(data)
    assert issue.path == "rollouts.r.rules[0].segments[1]"
    assert issue.message == "unknown segment 'internl'"
    assert issue.hint == "did you mean 'internal'?"


def test_unknown_segment_without_any_segments() -> None:
    """Naming a segment when none are defined says so."""
    issue = only_issue(rollout(rules=[{"segments": ["staff"], "serve": "new"}]))
    assert issue.path == "rollouts.r.rules[0].segments[0]"
    assert issue.hint == "defined segments: none"


def test_bad_segments() -> None:
    """Segments need a valid name and a non-empty list of valid conditions."""
    issues = issues_of(
        {
            "segments": {
                "no-when": {"description": "x"},
                "empty": {"when": []},
                "bad op": {"when": [OK_CONDITION]},
                "bad-cond": {"when": [{"attribute": "v", "operator": "SEMVER_EQ", "value": "one"}]},
            }
        }
    )
    assert issue_at(issues, "segments.no-when").message == "expected 'when' (a list of conditions)"
    assert issue_at(issues, "segments.empty.when").message == "expected at least one condition"
    assert "segment name" in issue_at(issues, "segments.bad op").message
    assert "semantic version" in issue_at(issues, "segments.bad-cond.when[0].value").message
    assert len(issues) == 4


def test_wrong_types_at_the_top() -> None:
    """Non-table rollouts, segments and rollout bodies are reported at their paths."""
    assert only_issue({"rollouts": ["r"]}).path == "rollouts"
    assert only_issue({"segments": "internal"}).path == "segments"
    issue = only_issue({"rollouts": {"r": [5, 10]}})
    assert issue.path == "rollouts.r"
    assert issue.message.startswith("expected a table (mapping), got [5, 10] (list)")
    issue = only_issue(rollout(start="later"))
    assert issue.path == "rollouts.r.start"
    issue = only_issue(rollout(description=5))
    assert issue.path == "rollouts.r.description"


def test_huge_integers_in_a_mapping_are_config_errors() -> None:
    """Integers too large for a float (or for str()) give ConfigErrors at their paths, not OverflowError."""
    huge = 10**5000
    issues = issues_of(
        {
            "rollouts": {
                "r": {
                    "steps": [huge],
                    "bake_time": huge,
                    "guard": {"alpha": huge},
                    "rules": [{"when": [OK_CONDITION], "percent": huge}],
                }
            }
        }
    )
    assert {i.path for i in issues} == {
        "rollouts.r.steps[0]",
        "rollouts.r.bake_time",
        "rollouts.r.guard.alpha",
        "rollouts.r.rules[0].percent",
    }
    assert all("too large to show" in i.message for i in issues)


# --------------------------------------------------------------------------------------------
# Many errors at once
# --------------------------------------------------------------------------------------------


def test_many_errors_are_collected_at_once() -> None:
    """Every problem in the configuration is reported together, each at its own path, not just the first."""
    data = {
        "rolouts": {},
        "segments": {"staff": {"wen": []}},
        "rollouts": {
            "checkout": {
                "stikiness": "user_id",
                "steps": [5, 25, 20],
                "bake_time": "forever",
                "guard": {"alpha": 0.9, "max_error_rate_increase": -1},
                "rules": [
                    {"when": [{"attribute": "v", "operator": "SEMVER_GT", "value": "1.0"}], "serve": "new"},
                    {"segments": ["stafff"]},
                ],
            },
            "recommender": {
                "steps": [],
                "bake_time": "2h",
                "max_bake_time": "1h",
                "rules": [
                    {"when": [{"attribute": "ip", "operator": "in_cidr", "values": ["10.0.0.0/8"]}], "percent": 5}
                ],
            },
        },
    }
    with pytest.raises(ConfigError) as info:
        load_config(data)
    paths = [issue.path for issue in info.value.issues]
    expected = {
        "rolouts",
        "segments.staff.wen",
        "segments.staff",
        "rollouts.checkout.stikiness",
        "rollouts.checkout.steps[2]",
        "rollouts.checkout.bake_time",
        "rollouts.checkout.guard.alpha",
        "rollouts.checkout.guard.max_error_rate_increase",
        "rollouts.checkout.rules[0].when[0].value",
        "rollouts.checkout.rules[1].segments[0]",
        "rollouts.checkout.rules[1]",
        "rollouts.recommender.steps",
        "rollouts.recommender.max_bake_time",
        "rollouts.recommender.rules[0].when[0].operator",
    }
    assert set(paths) == expected
    assert len(paths) == len(expected)
    message = str(info.value)
    assert message.startswith(f"{len(expected)} problems in the configuration:\n")
    for issue in info.value.issues:
        assert f"  - {issue}" in message
    assert issue_at(info.value.issues, "rolouts").hint == "did you mean 'rollouts'?"
    assert issue_at(info.value.issues, "rollouts.checkout.rules[1].segments[0]").hint == "did you mean 'staff'?"


def test_config_error_shape() -> None:
    """ConfigError is a CanaryError and a ValueError; a single issue renders as "path: message (hint)"."""
    error = ConfigError(ConfigIssue("rollouts.r.steps", "bad", "try this"))
    assert isinstance(error, CanaryError)
    assert isinstance(error, ValueError)
    assert str(error) == "rollouts.r.steps: bad (try this)"
    assert str(ConfigError("plain")) == "plain"
    assert ConfigError("plain").issues == (ConfigIssue("", "plain"),)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _only_file_issue(path: Path) -> ConfigIssue:
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert len(info.value.issues) == 1, [str(i) for i in info.value.issues]
    return info.value.issues[0]


def test_yaml_duplicate_keys(tmp_path: Path) -> None:
    """A key repeated in a YAML mapping is an error naming the file, the line and the key (not last-wins)."""
    file = tmp_path / "c.yaml"
    file.write_text("rollouts:\n  r:\n    steps: [5, 50]\n    bake_time: 1h\n    steps: [10, 100]\n", encoding="utf-8")
    issue = _only_file_issue(file)
    assert issue.path == str(file)
    assert issue.message == "line 5: duplicate key 'steps'"

    file.write_text("rollouts: {}\nsegments: {}\nrollouts: {}\n", encoding="utf-8")
    assert _only_file_issue(file).message == "line 3: duplicate key 'rollouts'"


def test_json_duplicate_keys(tmp_path: Path) -> None:
    """A key repeated in a JSON object is an error naming the file and the key (not last-wins)."""
    file = tmp_path / "c.json"
    file.write_text('{"rollouts": {"r": {"steps": [5, 50], "steps": [10]}}}', encoding="utf-8")
    issue = _only_file_issue(file)
    assert issue.path == str(file)
    assert issue.message == "duplicate key 'steps'"


def test_invalid_toml(tmp_path: Path) -> None:
    """TOML syntax errors become a ConfigError naming the file."""
    file = tmp_path / "c.toml"
    file.write_text("[rollouts.r]\nsteps = [5, 10\n", encoding="utf-8")
    issue = _only_file_issue(file)
    assert issue.path == str(file)
    assert issue.message.startswith("invalid TOML: ")


def test_toml_duplicate_keys_are_syntax_errors(tmp_path: Path) -> None:
    """TOML itself forbids a repeated key, so it is reported as invalid TOML."""
    file = tmp_path / "c.toml"
    file.write_text("[rollouts.r]\nsteps = [5]\nsteps = [10]\n", encoding="utf-8")
    assert _only_file_issue(file).message.startswith("invalid TOML: ")


def test_invalid_yaml_and_json(tmp_path: Path) -> None:
    """YAML and JSON syntax errors become a ConfigError naming the file."""
    yaml_file = tmp_path / "c.yml"
    yaml_file.write_text("rollouts:\n  r: [1, 2\n", encoding="utf-8")
    assert _only_file_issue(yaml_file).message.startswith("invalid YAML: ")
    json_file = tmp_path / "c.json"
    json_file.write_text('{"rollouts": ', encoding="utf-8")
    assert _only_file_issue(json_file).message.startswith("invalid JSON: ")


def test_yaml_unhashable_key(tmp_path: Path) -> None:
    """A YAML mapping with a list as a key is a ConfigError, not a TypeError."""
    file = tmp_path / "c.yaml"
    file.write_text("rollouts:\n  ? [a, b]\n  : {}\n", encoding="utf-8")
    issue = _only_file_issue(file)
    assert issue.path == str(file)
    assert issue.message.startswith("invalid YAML: ")


def test_number_too_long_to_parse(tmp_path: Path) -> None:
    """A 5,000-digit number in a JSON, YAML or TOML file is a ConfigError naming the file, not a bare ValueError."""
    digits = "1" + "0" * 5_000
    json_file = tmp_path / "c.json"
    json_file.write_text(f'{{"rollouts": {{"r": {{"steps": [{digits}]}}}}}}', encoding="utf-8")
    assert _only_file_issue(json_file).path == str(json_file)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"rollouts:\n  r:\n    steps: [{digits}]\n", encoding="utf-8")
    assert _only_file_issue(yaml_file).path == str(yaml_file)
    toml_file = tmp_path / "c.toml"
    toml_file.write_text(f"[rollouts.r]\nsteps = [{digits}]\n", encoding="utf-8")
    assert _only_file_issue(toml_file).message.startswith("invalid TOML: ")


def test_unreadable_files(tmp_path: Path) -> None:
    """A missing file, a directory and non-UTF-8 bytes are ConfigErrors naming the path."""
    missing = tmp_path / "missing.toml"
    issue = _only_file_issue(missing)
    assert issue.path == str(missing)
    assert issue.message.startswith("cannot read the file: ")

    directory = tmp_path / "dir.toml"
    directory.mkdir()
    assert _only_file_issue(directory).message.startswith("cannot read the file: ")

    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[rollouts.r]\ndescription = "caf\xe9"\n')
    assert _only_file_issue(latin1).message == "expected UTF-8 text"


@pytest.mark.parametrize(("name", "shown"), [("c.ini", "'.ini'"), ("c.TXT", "'.txt'"), ("canary", "'no suffix'")])
def test_unknown_suffix(tmp_path: Path, name: str, shown: str) -> None:
    """A file whose suffix is not .toml/.yaml/.yml/.json is rejected, saying which suffix it had."""
    file = tmp_path / name
    file.write_text("[rollouts.r]\n", encoding="utf-8")
    issue = _only_file_issue(file)
    assert issue.path == str(file)
    assert issue.message == f"expected a .toml, .yaml, .yml or .json file, got {shown}"


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    """An upper-case suffix (.TOML, .YAML) is accepted."""
    (tmp_path / "c.TOML").write_text("[rollouts.r]\nsteps = [50, 100]\n", encoding="utf-8")
    (tmp_path / "c.YAML").write_text("rollouts:\n  r:\n    steps: [50, 100]\n", encoding="utf-8")
    assert load_file(tmp_path / "c.TOML").rollouts["r"].steps == (50.0, 100.0)
    assert load_file(tmp_path / "c.YAML").rollouts["r"].steps == (50.0, 100.0)


def test_empty_yaml_and_non_mapping_top_level(tmp_path: Path) -> None:
    """An empty YAML file is an empty config; a top-level list is an error naming the file."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    assert load_file(empty) == Config()
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]", encoding="utf-8")
    issue = _only_file_issue(listing)
    assert issue.path == str(listing)
    assert issue.message.startswith("expected a table (mapping) at the top level")


def test_validation_errors_from_a_file_keep_their_paths(tmp_path: Path) -> None:
    """Errors inside a valid TOML file are reported at config paths, all at once."""
    file = tmp_path / "c.toml"
    file.write_text(
        "[rollouts.checkout]\nstikiness = 'user_id'\nsteps = [5, 25, 20]\n"
        "[[rollouts.checkout.rules]]\nwhen = [{ attribute = 'e', operator = 'REGEX', value = '(' }]\nserve = 'new'\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_file(file)
    assert [i.path for i in info.value.issues] == [
        "rollouts.checkout.stikiness",
        "rollouts.checkout.steps[2]",
        "rollouts.checkout.rules[0].when[0].value",
    ]
