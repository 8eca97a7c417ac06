"""Router.decide: the decision order, the reasons, and never raising."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canary_router import (
    Context,
    Decision,
    Reason,
    Rollout,
    Router,
    Rule,
    bucket,
    use_context,
)
from canary_router.model import Condition

TESTERS = {"attribute": "email", "operator": "STR_ENDS_WITH", "values": ["@example.com"]}


def make_router(**rollout: Any) -> Router:
    """Build a router with one rollout ``r`` from config-style keyword arguments."""
    return Router.from_config({"rollouts": {"r": {"steps": [10, 50, 100], **rollout}}})


def test_split_matches_the_bucketing_spec() -> None:
    """Every split decision serves "new" exactly when bucket(salt, unit) < percent * 100."""
    router = make_router()
    for i in range(3000):
        decision = router.decide("r", {"user_id": f"u{i}"})
        expected_bucket = bucket("r", f"u{i}")
        assert decision.bucket == expected_bucket
        assert decision.variant == ("new" if expected_bucket < 1000 else "old")
        assert decision.reason == Reason.SPLIT
        assert decision.unit == f"u{i}"


def test_custom_salt_changes_the_cohort() -> None:
    """A rollout's own salt replaces its name in the bucketing key."""
    router = make_router(salt="shared-salt")
    decision = router.decide("r", {"user_id": "u-1"})
    assert decision.bucket == bucket("shared-salt", "u-1")


def test_same_answer_every_time() -> None:
    """Deciding twice for the same unit gives the same answer (sticky)."""
    router = make_router()
    first = [router.decide("r", {"user_id": f"u{i}"}) for i in range(500)]
    again = [router.decide("r", {"user_id": f"u{i}"}) for i in range(500)]
    assert first == again


def test_unknown_rollout_serves_old_with_reason() -> None:
    """An unknown rollout name never raises; it serves "old" with reason unknown_rollout."""
    router = make_router()
    assert router.decide("nope", {"user_id": "u"}) == Decision("old", Reason.UNKNOWN_ROLLOUT, None)


def test_missing_unit_serves_old_with_reason() -> None:
    """Without the stickiness attribute the unit cannot be bucketed: "old", reason no_unit."""
    router = make_router()
    assert router.decide("r", {"region": "eu"}) == Decision("old", Reason.NO_UNIT, None)
    assert router.decide("r", {"user_id": None}).reason == Reason.NO_UNIT
    assert router.decide("r", {"user_id": ""}).reason == Reason.NO_UNIT


def test_stickiness_list_falls_back_in_order() -> None:
    """With stickiness [user_id, session_id], session_id buckets only when user_id is absent."""
    router = make_router(stickiness=["user_id", "session_id"])
    by_user = router.decide("r", {"user_id": "u-9", "session_id": "s-1"})
    by_session = router.decide("r", {"session_id": "s-1"})
    assert by_user.bucket == bucket("r", "u-9")
    assert by_session.bucket == bucket("r", "s-1")
    assert by_session.unit == "s-1"


def test_account_stickiness_keeps_an_account_together() -> None:
    """With stickiness account_id, every user of one account gets the same variant."""
    router = make_router(stickiness="account_id")
    for account in range(200):
        variants = {router.decide("r", {"account_id": account, "user_id": f"u{n}"}).variant for n in range(5)}
        assert len(variants) == 1


def test_unit_ids_are_normalised_with_str() -> None:
    """An integer id buckets like its str(): 42 and "42" are the same unit."""
    router = make_router()
    assert router.decide("r", {"user_id": 42}) == router.decide("r", {"user_id": "42"})


@pytest.mark.parametrize(
    "value",
    [
        None,
        0,
        -1,
        10**30,
        3.5,
        float("nan"),
        b"\xff\xfe",
        b"bytes",
        ["a", "b"],
        {"k": 1},
        "x" * 1_000_000,
        "\ud800",
        object(),
    ],
)
def test_odd_attribute_values_get_an_answer(value: object) -> None:
    """decide() answers for any attribute value, including lone surrogates and megabyte strings."""
    router = make_router(rules=[{"when": [TESTERS], "serve": "new"}])
    decision = router.decide("r", {"user_id": value, "email": value})
    assert decision.variant in ("old", "new")
    assert decision.reason in set(Reason)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=12),
        st.one_of(st.none(), st.integers(), st.floats(), st.text(), st.binary(), st.lists(st.text(), max_size=3)),
        max_size=6,
    )
)
def test_decide_never_raises(attributes: dict[str, Any]) -> None:
    """Any mapping of attributes gets a decision, never an exception."""
    router = _ROUTER_WITH_RULES
    for name in ("r", "missing"):
        decision = router.decide(name, attributes)
        assert decision.variant in ("old", "new")


_ROUTER_WITH_RULES = Router.from_config(
    {
        "rollouts": {
            "r": {
                "steps": [10, 100],
                "rules": [
                    {"when": [TESTERS], "serve": "new"},
                    {"when": [{"attribute": "version", "operator": "SEMVER_GTE", "value": "2.0.0"}], "percent": 50},
                    {"when": [{"attribute": "age", "operator": "NUM_GT", "value": 30}], "serve": "old"},
                ],
            }
        }
    }
)


def test_non_mapping_context_serves_old_with_error_reason() -> None:
    """A context that is not a mapping is a caller bug: "old", reason error, no exception."""
    router = make_router()
    assert router.decide("r", 42).reason == Reason.ERROR  # type: ignore[arg-type]


def test_zero_and_hundred_percent_need_no_unit() -> None:
    """At 100 % everyone gets "new" and at 0 % everyone "old", unit or not."""
    router = make_router()
    router.set_percent("r", 100)
    assert router.decide("r", {}).variant == "new"
    assert all(router.decide("r", {"user_id": f"u{i}"}).variant == "new" for i in range(1000))
    router.set_percent("r", 0)
    assert router.decide("r", {}).variant == "old"
    assert all(router.decide("r", {"user_id": f"u{i}"}).variant == "old" for i in range(1000))


def test_rule_serve_beats_percentage() -> None:
    """A matching serve="new" rule gives testers the new version at any percentage."""
    router = make_router(rules=[{"when": [TESTERS], "serve": "new"}])
    router.set_percent("r", 0)
    decision = router.decide("r", {"user_id": "u", "email": "dev@example.com"})
    assert decision == Decision("new", Reason.RULE_MATCH, None)
    assert router.decide("r", {"user_id": "u", "email": "dev@other.com"}).variant == "old"


def test_first_matching_rule_wins() -> None:
    """Rules are tried in order; the first that matches decides."""
    router = make_router(
        rules=[
            {"when": [{"attribute": "region", "operator": "IN", "values": ["eu"]}], "serve": "old"},
            {"when": [TESTERS], "serve": "new"},
        ]
    )
    both = {"user_id": "u", "region": "eu", "email": "a@example.com"}
    assert router.decide("r", both).variant == "old"
    assert router.decide("r", {**both, "region": "us"}).variant == "new"


def test_all_conditions_of_a_rule_must_hold() -> None:
    """A rule with two conditions matches only when both hold."""
    region = {"attribute": "region", "operator": "IN", "values": ["eu"]}
    router = make_router(rules=[{"when": [region, TESTERS], "serve": "new"}])
    router.set_percent("r", 0)
    assert router.decide("r", {"user_id": "u", "region": "eu", "email": "a@example.com"}).variant == "new"
    assert router.decide("r", {"user_id": "u", "region": "us", "email": "a@example.com"}).variant == "old"
    assert router.decide("r", {"user_id": "u", "region": "eu", "email": "a@b.com"}).variant == "old"


def test_rule_percent_uses_the_rollout_bucket_and_ramps_monotonically() -> None:
    """A percent rule splits by the same bucket as the rollout, so its segment ramps without reshuffling."""
    eu = {"attribute": "region", "operator": "IN", "values": ["eu"]}
    small = make_router(rules=[{"when": [eu], "percent": 30}])
    large = make_router(rules=[{"when": [eu], "percent": 60}])
    for i in range(3000):
        ctx = {"user_id": f"u{i}", "region": "eu"}
        d30, d60 = small.decide("r", ctx), large.decide("r", ctx)
        assert d30.reason == Reason.RULE_SPLIT
        assert d30.bucket == bucket("r", f"u{i}")
        assert d30.variant == ("new" if d30.bucket is not None and d30.bucket < 3000 else "old")
        if d30.variant == "new":
            assert d60.variant == "new"


def test_segments_are_reusable_condition_lists() -> None:
    """A rule referencing a named segment matches when the segment's conditions hold."""
    router = Router.from_config(
        {
            "segments": {"internal": {"when": [TESTERS]}},
            "rollouts": {"r": {"steps": [1, 100], "rules": [{"segments": ["internal"], "serve": "new"}]}},
        }
    )
    assert router.decide("r", {"user_id": "u", "email": "x@example.com"}).reason == Reason.RULE_MATCH
    assert router.decide("r", {"user_id": "u", "email": "x@else.com"}).reason == Reason.SPLIT


def test_rollback_sends_rule_targeted_users_to_old() -> None:
    """After a rollback everyone gets "old", testers matched by a serve="new" rule included."""
    router = make_router(rules=[{"when": [TESTERS], "serve": "new"}])
    router.rollback("r", reason="error rate up")
    assert router.decide("r", {"user_id": "u", "email": "a@example.com"}) == Decision("old", Reason.ROLLED_BACK, None)
    assert all(router.decide("r", {"user_id": f"u{i}"}).variant == "old" for i in range(1000))


def test_completed_serves_everyone_new() -> None:
    """A completed rollout serves "new" to everyone, with reason completed."""
    router = make_router(rules=[{"when": [TESTERS], "serve": "old"}])
    for _ in range(3):
        router.promote("r")
    assert router.status("r").phase == "completed"
    assert router.decide("r", {"email": "a@example.com"}) == Decision("new", Reason.COMPLETED, None)


def test_paused_keeps_serving_its_percentage() -> None:
    """Pausing freezes the rollout: the same users keep the new version."""
    router = make_router()
    before = [router.decide("r", {"user_id": f"u{i}"}).variant for i in range(1000)]
    router.pause("r")
    after = [router.decide("r", {"user_id": f"u{i}"}).variant for i in range(1000)]
    assert before == after
    assert "new" in after


def test_signed_override_beats_state_and_rules() -> None:
    """A context override (set only by trusted code) wins over rollback and rules."""
    router = make_router(rules=[{"when": [TESTERS], "serve": "old"}])
    router.rollback("r")
    ctx = Context({"user_id": "u", "email": "a@example.com"}, overrides={"r": "new"})
    assert router.decide("r", ctx) == Decision("new", Reason.OVERRIDE, None)


def test_override_is_not_an_attribute() -> None:
    """An attribute named like a rollout or 'overrides' cannot force a variant."""
    router = make_router()
    router.set_percent("r", 0)
    assert router.decide("r", {"user_id": "u", "overrides": {"r": "new"}, "r": "new"}).variant == "old"


def test_context_rejects_bad_override_variants() -> None:
    """Only "old" and "new" are valid override values."""
    with pytest.raises(ValueError, match="must be 'old' or 'new'"):
        Context(overrides={"r": "newer"})  # type: ignore[dict-item]


def test_ambient_context_is_used_when_none_is_passed() -> None:
    """decide(name) without a context reads the ambient context set by use_context / router.context."""
    router = make_router()
    with router.context(user_id="u-5"):
        assert router.decide("r").bucket == bucket("r", "u-5")
    with use_context({"user_id": "u-6"}):
        assert router.decide("r").bucket == bucket("r", "u-6")
    assert router.decide("r").reason == Reason.NO_UNIT


def test_python_built_rollouts_and_segments() -> None:
    """Rollout and Rule values built in Python route like config-built ones."""
    cond = Condition("email", "STR_ENDS_WITH", ("@example.com",))
    router = Router(
        [Rollout("r", steps=(10, 100), rules=(Rule(segments=("internal",), serve="new"),))],
        segments={"internal": [cond]},
    )
    assert router.decide("r", {"email": "a@example.com"}).reason == Reason.RULE_MATCH


def test_mapping_of_rollouts_is_validated_like_config() -> None:
    """Router(rollouts={name: mapping}) goes through the same validation as a config file."""
    from canary_router import ConfigError

    with pytest.raises(ConfigError, match=r"rollouts\.r\.steps\[1\]"):
        Router({"r": {"steps": [10, 5]}})


def test_eight_threads_decide_like_one() -> None:
    """8 threads × 100k decisions give exactly the single-threaded answers."""
    router = make_router(rules=[{"when": [{"attribute": "region", "operator": "IN", "values": ["eu"]}], "percent": 50}])
    ids = [f"user-{i}" for i in range(100_000)]

    def run(offset: int) -> list[str]:
        return [
            router.decide("r", {"user_id": uid, "region": "eu" if (n + offset) % 3 == 0 else "us"}).variant
            for n, uid in enumerate(ids)
        ]

    single = [run(k) for k in range(8)]
    start = threading.Barrier(8)

    def threaded(k: int) -> list[str]:
        start.wait()
        return run(k)

    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(threaded, range(8)))
    assert parallel == single
