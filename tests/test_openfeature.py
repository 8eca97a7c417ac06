"""canary_router.openfeature: the OpenFeature provider, through the real openfeature-sdk client."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from openfeature import api
from openfeature.client import OpenFeatureClient
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason as OFReason

from canary_router import Decision, Reason, Router, bucket
from canary_router.openfeature import PROVIDER_NAME, CanaryRouterProvider

TESTERS = {"attribute": "email", "operator": "STR_ENDS_WITH", "values": ["@example.com"]}
EU = {"attribute": "region", "operator": "IN", "values": ["eu-west-1"]}
CONFIG: dict[str, Any] = {
    "rollouts": {
        "recommender": {
            "steps": [25, 50, 100],
            "rules": [{"when": [TESTERS], "serve": "new"}, {"when": [EU], "percent": 75}],
        },
        "checkout": {"steps": [50, 100], "stickiness": ["account_id", "user_id"]},
    }
}
USERS = [f"user-{i}" for i in range(300)]


@pytest.fixture
def router() -> Iterator[Router]:
    """A router with two rollouts: recommender (25 %, tester and EU rules) and checkout (50 %, by account)."""
    with Router.from_config(CONFIG, telemetry=None) as built:
        yield built


@contextlib.contextmanager
def _install(provider: CanaryRouterProvider) -> Iterator[OpenFeatureClient]:
    """Set ``provider`` as the OpenFeature default provider for one test, then reset the SDK's globals."""
    api.set_provider_and_wait(provider)
    try:
        yield api.get_client()
    finally:
        api.shutdown()  # clears providers, hooks and the global evaluation context


@pytest.fixture
def client(router: Router) -> Iterator[OpenFeatureClient]:
    """An OpenFeature client whose default provider is a CanaryRouterProvider over ``router``."""
    with _install(CanaryRouterProvider(router)) as installed:
        yield installed


def _user(key: str | None, **attributes: Any) -> EvaluationContext:
    return EvaluationContext(targeting_key=key, attributes=attributes)


def _expected_reason(decision: Decision) -> str:
    return Reason(decision.reason).openfeature


def test_provider_metadata_names_canary_router(client: OpenFeatureClient) -> None:
    """The provider reports the name "canary_router" through the SDK."""
    assert PROVIDER_NAME == "canary_router"
    assert client.get_provider_status().value == "READY"
    assert api.get_provider_metadata().name == "canary_router"
    assert client.get_metadata().domain is None


def test_boolean_details_match_router_decide(router: Router, client: OpenFeatureClient) -> None:
    """A boolean flag is True exactly for the users router.decide puts on "new", with its variant and reason."""
    seen = set()
    for user in USERS:
        decision = router.decide("recommender", {"user_id": user})
        details = client.get_boolean_details("recommender", False, _user(user))
        assert details.flag_key == "recommender"
        assert details.value is (decision.variant == "new")
        assert details.variant == decision.variant
        assert details.reason == OFReason.SPLIT == _expected_reason(decision)
        assert details.error_code is None
        assert details.flag_metadata["bucket"] == decision.bucket == bucket("recommender", user)
        assert details.flag_metadata["decisionReason"] == "split"
        seen.add(details.value)
    assert seen == {True, False}  # both sides of the cohort were exercised


def test_string_details_are_the_variant(router: Router, client: OpenFeatureClient) -> None:
    """A string flag answers the variant ("old" / "new") router.decide chooses, whatever the default."""
    seen = set()
    for user in USERS:
        decision = router.decide("recommender", {"user_id": user})
        details = client.get_string_details("recommender", "fallback", _user(user))
        assert details.flag_key == "recommender"
        assert details.value == details.variant == decision.variant
        assert details.reason == OFReason.SPLIT
        assert details.error_code is None
        seen.add(details.value)
    assert seen == {"old", "new"}


def test_in_and_out_of_the_cohort_follow_the_bucket(client: OpenFeatureClient) -> None:
    """At 25 %, a user with bucket < 2500 is on the new version and one with bucket >= 2500 is not."""
    inside = next(u for u in USERS if bucket("recommender", u) < 2500)
    outside = next(u for u in USERS if bucket("recommender", u) >= 2500)
    assert client.get_boolean_value("recommender", False, _user(inside)) is True
    assert client.get_boolean_value("recommender", True, _user(outside)) is False
    assert client.get_string_value("recommender", "old", _user(inside)) == "new"
    assert client.get_string_value("recommender", "new", _user(outside)) == "old"


def test_rule_targeted_users_are_a_targeting_match(client: OpenFeatureClient) -> None:
    """A rule with ``serve = "new"`` (the testers) answers True / "new" with reason TARGETING_MATCH, no bucket."""
    outside = next(u for u in USERS if bucket("recommender", u) >= 7500)
    context = _user(outside, email="ada@example.com")
    details = client.get_boolean_details("recommender", False, context)
    assert (details.value, details.variant, details.reason) == (True, "new", OFReason.TARGETING_MATCH)
    assert "bucket" not in details.flag_metadata
    assert details.flag_metadata["decisionReason"] == "rule_match"
    assert client.get_string_details("recommender", "x", context).reason == OFReason.TARGETING_MATCH


def test_attributes_reach_percentage_rules(router: Router, client: OpenFeatureClient) -> None:
    """Context attributes feed the rules: an EU user between 25 % and 75 % is "new" by the rule's split."""
    user = next(u for u in USERS if 2500 <= bucket("recommender", u) < 7500)
    details = client.get_boolean_details("recommender", False, _user(user, region="eu-west-1"))
    decision = router.decide("recommender", {"user_id": user, "region": "eu-west-1"})
    assert decision.reason == Reason.RULE_SPLIT
    assert (details.value, details.variant, details.reason) == (True, "new", OFReason.SPLIT)
    assert details.flag_metadata["decisionReason"] == "rule_split"
    assert client.get_boolean_value("recommender", False, _user(user, region="us-east-1")) is False


def test_rollback_is_disabled_and_false(router: Router, client: OpenFeatureClient) -> None:
    """After a rollback every user, rule-targeted ones included, gets False / "old" with reason DISABLED."""
    router.rollback("recommender", reason="error rate up")
    for context in (_user(USERS[0]), _user(USERS[1], email="ada@example.com")):
        details = client.get_boolean_details("recommender", True, context)
        assert (details.value, details.variant, details.reason) == (False, "old", OFReason.DISABLED)
        assert details.error_code is None
        version = details.flag_metadata["version"]
        assert isinstance(version, int)
        assert version >= 1
        string = client.get_string_details("recommender", "new", context)
        assert (string.value, string.reason) == ("old", OFReason.DISABLED)


def test_completed_rollout_is_static_and_true(router: Router, client: OpenFeatureClient) -> None:
    """A completed rollout serves True / "new" to everyone with reason STATIC."""
    router.set_percent("recommender", 100)
    router.promote("recommender")
    assert router.status("recommender").phase == "completed"
    details = client.get_boolean_details("recommender", False, _user(USERS[0]))
    assert (details.value, details.variant, details.reason) == (True, "new", OFReason.STATIC)


def test_unknown_flag_is_flag_not_found_with_the_default(client: OpenFeatureClient) -> None:
    """A flag key naming no rollout returns the caller's default with error code FLAG_NOT_FOUND."""
    details = client.get_boolean_details("no-such-rollout", True, _user("u-1"))
    assert (details.value, details.reason, details.error_code) == (True, OFReason.ERROR, ErrorCode.FLAG_NOT_FOUND)
    assert "no-such-rollout" in (details.error_message or "")
    assert details.variant is None
    string = client.get_string_details("no-such-rollout", "fallback", _user("u-1"))
    assert (string.value, string.error_code) == ("fallback", ErrorCode.FLAG_NOT_FOUND)
    assert client.get_integer_details("no-such-rollout", 3).error_code == ErrorCode.FLAG_NOT_FOUND


def test_other_types_are_a_type_mismatch_with_the_default(client: OpenFeatureClient) -> None:
    """Integer, float and object flags return the default with error code TYPE_MISMATCH."""
    context = _user("u-1")
    integer = client.get_integer_details("recommender", 7, context)
    floating = client.get_float_details("recommender", 0.5, context)
    obj = client.get_object_details("recommender", {"k": "v"}, context)
    assert (integer.value, floating.value, obj.value) == (7, 0.5, {"k": "v"})
    for details in (integer, floating, obj):
        assert details.error_code == ErrorCode.TYPE_MISMATCH
        assert details.reason == OFReason.ERROR
        assert "boolean or string" in (details.error_message or "")


def test_missing_targeting_key_is_old_with_reason_default(client: OpenFeatureClient) -> None:
    """Without a targeting key a partial rollout cannot bucket the unit: False / "old", reason DEFAULT, no error."""
    for context in (None, EvaluationContext(), _user(None, region="us-east-1"), _user("")):
        details = client.get_boolean_details("recommender", True, context)
        assert (details.value, details.variant, details.reason) == (False, "old", OFReason.DEFAULT)
        assert details.error_code is None
        assert "bucket" not in details.flag_metadata
        assert details.flag_metadata["decisionReason"] == "no_unit"
        assert client.get_string_value("recommender", "new", context) == "old"


def test_stickiness_attribute_among_the_attributes_still_buckets(client: OpenFeatureClient) -> None:
    """Without a targeting key, a stickiness attribute passed as an attribute is the unit (as in router.decide)."""
    details = client.get_boolean_details("recommender", False, _user(None, user_id="user-7"))
    assert details.reason == OFReason.SPLIT
    assert details.flag_metadata["bucket"] == bucket("recommender", "user-7")


def test_targeting_key_goes_under_the_first_stickiness_attribute(client: OpenFeatureClient) -> None:
    """For a rollout sticky by account, the targeting key is the account id and replaces an account_id attribute."""
    details = client.get_boolean_details("checkout", False, _user("acct-9", account_id="acct-other", user_id="u-1"))
    assert details.flag_metadata["bucket"] == bucket("checkout", "acct-9")


def test_unit_attribute_overrides_where_the_targeting_key_goes(router: Router) -> None:
    """With ``unit_attribute="user_id"`` the targeting key is the user id, even for a rollout sticky by account."""
    provider = CanaryRouterProvider(router, unit_attribute="user_id")
    assert provider.unit_attribute == "user_id"
    assert provider.router is router
    with _install(provider) as client:
        details = client.get_boolean_details("checkout", False, _user("u-5"))
        assert details.flag_metadata["bucket"] == bucket("checkout", "u-5")
        with_account = client.get_boolean_details("checkout", False, _user("u-5", account_id="acct-1"))
        assert with_account.flag_metadata["bucket"] == bucket("checkout", "acct-1")


def test_unit_attribute_must_be_a_non_empty_string(router: Router) -> None:
    """A bad ``unit_attribute`` is refused at construction."""
    with pytest.raises(ValueError, match="unit_attribute"):
        CanaryRouterProvider(router, unit_attribute="")


def test_provider_never_raises(router: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure inside the router becomes a GENERAL error with the default value, never an exception."""

    def broken(name: str, context: object = None) -> Decision:
        raise RuntimeError("store exploded")

    monkeypatch.setattr(router, "decide", broken)
    provider = CanaryRouterProvider(router)
    details = provider.resolve_boolean_details("recommender", True, _user("u-1"))
    assert (details.value, details.reason, details.error_code) == (True, OFReason.ERROR, ErrorCode.GENERAL)
    assert "store exploded" in (details.error_message or "")
    string = provider.resolve_string_details("recommender", "fallback", _user("u-1"))
    assert (string.value, string.error_code) == ("fallback", ErrorCode.GENERAL)


def test_decision_error_is_a_general_error(router: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decision with reason "error" (the router failed while deciding) answers the default with GENERAL."""
    monkeypatch.setattr(router, "decide", lambda name, context=None: Decision("old", Reason.ERROR, None))
    details = CanaryRouterProvider(router).resolve_boolean_details("recommender", True)
    assert (details.value, details.error_code) == (True, ErrorCode.GENERAL)


def test_direct_resolution_without_the_client(router: Router) -> None:
    """The resolve_* methods answer directly, with the SDK's parameter names."""
    provider = CanaryRouterProvider(router)
    user = USERS[0]
    details = provider.resolve_string_details(flag_key="recommender", default_value="x", evaluation_context=_user(user))
    assert details.variant == router.decide("recommender", {"user_id": user}).variant
    missing = provider.resolve_object_details("nope", [1, 2])
    assert (missing.value, missing.error_code) == ([1, 2], ErrorCode.FLAG_NOT_FOUND)
    assert repr(provider).startswith("CanaryRouterProvider(rollouts=['checkout', 'recommender']")


def test_async_evaluation_matches_sync(router: Router, client: OpenFeatureClient) -> None:
    """The async client API gives the same details as the sync one."""

    async def evaluate() -> list[Any]:
        return [
            await client.get_boolean_details_async("recommender", False, _user(USERS[3])),
            await client.get_string_details_async("recommender", "x", _user(USERS[3])),
            await client.get_integer_details_async("recommender", 1, _user(USERS[3])),
            await client.get_float_details_async("recommender", 1.5, _user(USERS[3])),
            await client.get_object_details_async("recommender", {}, _user(USERS[3])),
        ]

    boolean, string, integer, floating, obj = asyncio.run(evaluate())
    assert boolean == client.get_boolean_details("recommender", False, _user(USERS[3]))
    assert string == client.get_string_details("recommender", "x", _user(USERS[3]))
    assert integer.error_code == floating.error_code == obj.error_code == ErrorCode.TYPE_MISMATCH
    assert (integer.value, floating.value, obj.value) == (1, 1.5, {})


def test_no_provider_leaks_between_tests() -> None:
    """Outside the fixture the SDK's default provider is its no-op provider again."""
    assert api.get_provider_metadata().name != "canary_router"


def test_importing_canary_router_does_not_import_openfeature() -> None:
    """The core never imports the adapter or the SDK; only canary_router.openfeature does."""
    code = (
        "import sys, canary_router, canary_router.testing\n"
        "print(sorted(m for m in sys.modules if m == 'openfeature' or m.startswith(('openfeature.', "
        "'canary_router.openfeature'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
