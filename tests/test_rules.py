"""Targeting conditions: every operator, with the Unleash semantics documented in ``canary_router.rules``."""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary_router.model import Condition
from canary_router.rules import (
    MULTI_VALUE_OPERATORS,
    OPERATORS,
    SINGLE_VALUE_OPERATORS,
    ConditionValueError,
    Predicate,
    compile_condition,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
"""2026-01-01T00:00:00Z as POSIX seconds, computed by the standard library."""
T0_ISO = "2026-01-01T00:00:00Z"


def compile_(
    operator: str,
    values: tuple[Any, ...] | list[Any],
    *,
    attribute: str = "a",
    inverted: bool = False,
    case_insensitive: bool = False,
) -> Predicate:
    """Compile one condition on ``attribute`` (``"a"`` unless told)."""
    return compile_condition(Condition(attribute, operator, tuple(values), inverted, case_insensitive))


def fixed(now: float) -> Callable[[], float]:
    """Return a clock stuck at ``now``."""
    return lambda: now


def evaluate(
    operator: str,
    values: tuple[Any, ...] | list[Any],
    value: Any,
    *,
    inverted: bool = False,
    case_insensitive: bool = False,
    now: float = T0,
) -> bool:
    """Evaluate one condition on attribute ``a`` = ``value``."""
    predicate = compile_(operator, values, inverted=inverted, case_insensitive=case_insensitive)
    return predicate({"a": value}, fixed(now))


# A valid literal for every operator; used where the literal itself is not the point.
VALID_LITERALS: dict[str, tuple[Any, ...]] = {
    "IN": ("a", "b"),
    "NOT_IN": ("a", "b"),
    "STR_CONTAINS": ("mid",),
    "STR_STARTS_WITH": ("pre",),
    "STR_ENDS_WITH": ("@example.com",),
    "NUM_EQ": (5,),
    "NUM_GT": (5,),
    "NUM_GTE": (5,),
    "NUM_LT": (5,),
    "NUM_LTE": (5,),
    "DATE_AFTER": (T0_ISO,),
    "DATE_BEFORE": (T0_ISO,),
    "SEMVER_EQ": ("1.2.3",),
    "SEMVER_GT": ("1.2.3",),
    "SEMVER_GTE": ("1.2.3",),
    "SEMVER_LT": ("1.2.3",),
    "SEMVER_LTE": ("1.2.3",),
    "REGEX": (r"^a+\d$",),
    "IN_CIDR": ("10.0.0.0/8", "2001:db8::/32"),
}


def test_operator_sets_are_complete_and_disjoint() -> None:
    """OPERATORS is exactly the 19 documented operators, split into multi- and single-value ones."""
    documented = {
        "IN",
        "NOT_IN",
        "STR_CONTAINS",
        "STR_STARTS_WITH",
        "STR_ENDS_WITH",
        "NUM_EQ",
        "NUM_GT",
        "NUM_GTE",
        "NUM_LT",
        "NUM_LTE",
        "DATE_AFTER",
        "DATE_BEFORE",
        "SEMVER_EQ",
        "SEMVER_GT",
        "SEMVER_GTE",
        "SEMVER_LT",
        "SEMVER_LTE",
        "REGEX",
        "IN_CIDR",
    }
    assert set(OPERATORS) == documented == set(VALID_LITERALS)
    assert not MULTI_VALUE_OPERATORS & SINGLE_VALUE_OPERATORS


# --------------------------------------------------------------------------------------------
# Truth table: every operator, true and false
# --------------------------------------------------------------------------------------------

TRUTH_TABLE: list[tuple[str, tuple[Any, ...], Any, bool]] = [
    ("IN", ("eu-west-1", "eu-central-1"), "eu-west-1", True),
    ("IN", ("eu-west-1", "eu-central-1"), "us-east-1", False),
    ("IN", ("eu-west-1",), "EU-WEST-1", False),
    ("IN", ("eu-west-1",), "eu-west-1 ", False),
    ("IN", ("42",), 42, True),
    ("IN", (42,), "42", True),
    ("IN", ("",), "", True),
    ("NOT_IN", ("eu-west-1",), "us-east-1", True),
    ("NOT_IN", ("eu-west-1",), "eu-west-1", False),
    ("STR_CONTAINS", ("beta", "canary"), "my-canary-build", True),
    ("STR_CONTAINS", ("beta",), "stable", False),
    ("STR_CONTAINS", ("Beta",), "beta", False),
    ("STR_STARTS_WITH", ("admin", "root"), "root@host", True),
    ("STR_STARTS_WITH", ("admin",), "superadmin", False),
    ("STR_ENDS_WITH", ("@example.com", "@example.org"), "ann@example.org", True),
    ("STR_ENDS_WITH", ("@example.com",), "ann@example.com.evil", False),
    ("NUM_EQ", (5,), 5, True),
    ("NUM_EQ", (5,), "5.0", True),
    ("NUM_EQ", ("5",), 5.0, True),
    ("NUM_EQ", (5,), 5.000001, False),
    ("NUM_GT", (5,), 6, True),
    ("NUM_GT", (5,), 5, False),
    ("NUM_GT", (5,), " 7 ", True),
    ("NUM_GT", (-1.5,), -2, False),
    ("NUM_GTE", (5,), 5, True),
    ("NUM_GTE", (5,), 4.999, False),
    ("NUM_LT", (5,), 4, True),
    ("NUM_LT", (5,), 5, False),
    ("NUM_LT", (5,), "1e3", False),
    ("NUM_LTE", (5,), 5, True),
    ("NUM_LTE", (5,), 6, False),
    ("DATE_AFTER", (T0_ISO,), "2026-01-01T00:00:01Z", True),
    ("DATE_AFTER", (T0_ISO,), T0_ISO, False),
    ("DATE_AFTER", (T0_ISO,), "2025-12-31T23:59:59Z", False),
    ("DATE_BEFORE", (T0_ISO,), "2025-12-31T23:59:59Z", True),
    ("DATE_BEFORE", (T0_ISO,), T0_ISO, False),
    ("DATE_BEFORE", (T0_ISO,), "2026-06-01T00:00:00Z", False),
    ("SEMVER_EQ", ("1.2.3",), "1.2.3", True),
    ("SEMVER_EQ", ("1.2.3",), "1.2.4", False),
    ("SEMVER_GT", ("1.2.3",), "1.10.0", True),
    ("SEMVER_GT", ("1.2.3",), "1.2.3", False),
    ("SEMVER_GTE", ("1.2.3",), "1.2.3", True),
    ("SEMVER_GTE", ("1.2.3",), "1.2.3-rc.1", False),
    ("SEMVER_LT", ("1.10.0",), "1.9.9", True),
    ("SEMVER_LT", ("1.2.3",), "2.0.0", False),
    ("SEMVER_LTE", ("1.2.3",), "1.2.3", True),
    ("SEMVER_LTE", ("1.2.3",), "1.2.4-alpha", False),
    ("REGEX", (r"\d{3}",), "ab123cd", True),  # search, not full match (like JavaScript's RegExp.test)
    ("REGEX", (r"^a+\d$",), "aaa7", True),
    ("REGEX", (r"^a+\d$",), "aaa77", False),
    ("REGEX", ("^admin",), "ADMIN", False),
    ("IN_CIDR", ("10.0.0.0/8",), "10.255.0.1", True),
    ("IN_CIDR", ("10.0.0.0/8",), "11.0.0.1", False),
    ("IN_CIDR", ("10.0.0.0/8", "192.168.1.0/24"), "192.168.1.77", True),
    ("IN_CIDR", ("10.0.0.0/8", "192.168.1.0/24"), "192.168.2.1", False),
    ("IN_CIDR", ("10.0.0.1",), "10.0.0.1", True),
    ("IN_CIDR", ("10.0.0.1",), "10.0.0.2", False),
    ("IN_CIDR", ("2001:db8::/32",), "2001:db8:ffff::1", True),
    ("IN_CIDR", ("2001:db8::/32",), "2001:db9::1", False),
    ("IN_CIDR", ("10.0.0.0/8",), " 10.0.0.1 ", True),
    ("IN_CIDR", ("2001:db8::/32",), "10.0.0.1", False),
    ("IN_CIDR", ("0.0.0.0/0",), "::1", False),
]


@pytest.mark.parametrize(("operator", "values", "value", "expected"), TRUTH_TABLE)
def test_operator_truth_table(operator: str, values: tuple[Any, ...], value: Any, expected: bool) -> None:
    """Each operator gives the documented answer, and inverted gives the opposite one for a well-formed value."""
    assert evaluate(operator, values, value) is expected
    assert evaluate(operator, values, value, inverted=True) is (not expected)


def test_truth_table_covers_every_operator_both_ways() -> None:
    """The truth table has a true and a false case for every operator in OPERATORS."""
    outcomes = {(op, expected) for op, _, _, expected in TRUTH_TABLE}
    assert outcomes == {(op, b) for op in OPERATORS for b in (True, False)}


# --------------------------------------------------------------------------------------------
# Missing attributes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operator", sorted(OPERATORS))
@pytest.mark.parametrize("context", [{}, {"a": None}, {"other": "a"}], ids=["absent", "none", "other-key"])
def test_missing_attribute(operator: str, context: dict[str, Any]) -> None:
    """A missing (absent or None) attribute is false for every operator but NOT_IN, and inverted negates that."""
    plain = compile_(operator, VALID_LITERALS[operator])
    inverted = compile_(operator, VALID_LITERALS[operator], inverted=True)
    expected = operator == "NOT_IN"
    assert plain(context, fixed(T0)) is expected
    assert inverted(context, fixed(T0)) is (not expected)


def test_missing_attribute_does_not_consult_the_clock() -> None:
    """Only current_time falls back to now(); another missing date attribute stays missing (false)."""
    calls: list[int] = []

    def now() -> float:
        calls.append(1)
        return T0 + 10**6

    predicate = compile_("DATE_AFTER", (T0_ISO,), attribute="signed_up_at")
    assert predicate({}, now) is False
    assert calls == []


# --------------------------------------------------------------------------------------------
# Malformed values: false whatever inverted says, never an exception
# --------------------------------------------------------------------------------------------


class NoText:
    """An object without a sensible textual form whose dunders all fail."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    def __hash__(self) -> int:
        raise RuntimeError("no hash")

    def __bool__(self) -> bool:
        raise RuntimeError("no bool")

    def __float__(self) -> float:
        raise RuntimeError("no float")


class ExplodingList(list[Any]):
    """A list whose iteration fails."""

    def __iter__(self) -> Iterator[Any]:
        raise RuntimeError("no iteration")


class ExplodingDatetime(datetime):
    """A datetime whose timestamp() fails."""

    def timestamp(self) -> float:
        raise OverflowError("no timestamp")


MEGABYTE = 1_000_000
GARBAGE: list[Any] = [
    b"\xff\xfe\xfd",
    bytearray(b"\xc3\x28"),
    object(),
    NoText(),
    {"a": 1},
    ExplodingList(["a"]),
    [None, object()],
    [[1, 2]],
]
HUGE_INT = 10**5000
"""Too many digits for str(): no textual form (but a number: NUM operators compare it as infinite)."""
NO_TEXT = [*GARBAGE, HUGE_INT]
NOT_A_NUMBER: list[Any] = [
    *GARBAGE,
    "abc",
    "",
    "nan",
    "NaN",
    math.nan,
    "5 apples",
    "1" * MEGABYTE,
    True,
    False,
    b"5",
]
NOT_A_DATE: list[Any] = [
    *NO_TEXT,
    "not a date",
    "2026-13-01",
    "2026-02-30T00:00:00Z",
    "2026-01-01T00:00:00+25:00",
    "",
    "   ",
    "2" * MEGABYTE,
    True,
    math.nan,
    b"2026-01-01",
    ExplodingDatetime(2026, 1, 1),
]
NOT_A_SEMVER: list[Any] = [
    *NO_TEXT,
    "1.0",
    "1",
    "01.0.0",
    "1.00.0",
    "1.0.0-",
    "1.0.0+",
    "1.0.0-01",
    "1.0.0-a..b",
    "a.b.c",
    "",
    "1.2.3 4",
    "1" * MEGABYTE,
    "1.2.3-" + "a" * MEGABYTE,
    "1\u0661.0.0",  # ARABIC-INDIC DIGIT ONE: SemVer digits are ASCII
    "\u0661.\u0660.\u0660",
    "1.2.\u0663",
    1,
    1.5,
    True,
]
NOT_AN_IP: list[Any] = [
    *NO_TEXT,
    "999.1.1.1",
    "10.0.0.0/8",
    "10.0.0",
    "",
    "not-an-ip",
    167772161,
    "1" * MEGABYTE,
    True,
    "10.0.0.1" + " " * 100,
]

MALFORMED_BY_OPERATOR: dict[str, list[Any]] = {
    **dict.fromkeys(["IN", "NOT_IN", "STR_CONTAINS", "STR_STARTS_WITH", "STR_ENDS_WITH", "REGEX"], NO_TEXT),
    **dict.fromkeys(["NUM_EQ", "NUM_GT", "NUM_GTE", "NUM_LT", "NUM_LTE"], NOT_A_NUMBER),
    **dict.fromkeys(["DATE_AFTER", "DATE_BEFORE"], NOT_A_DATE),
    **dict.fromkeys(["SEMVER_EQ", "SEMVER_GT", "SEMVER_GTE", "SEMVER_LT", "SEMVER_LTE"], NOT_A_SEMVER),
    "IN_CIDR": NOT_AN_IP,
}


def _malformed_cases() -> Iterator[Any]:
    for operator in sorted(OPERATORS):
        for index, value in enumerate(MALFORMED_BY_OPERATOR[operator]):
            yield pytest.param(operator, value, id=f"{operator}-{index}")


@pytest.mark.parametrize(("operator", "value"), list(_malformed_cases()))
def test_malformed_value_is_false_even_when_inverted(operator: str, value: Any) -> None:
    """A malformed context value makes the condition false, inverted or not, and never raises."""
    for inverted, case_insensitive in itertools.product((False, True), repeat=2):
        predicate = compile_(operator, VALID_LITERALS[operator], inverted=inverted, case_insensitive=case_insensitive)
        assert predicate({"a": value}, fixed(T0)) is False
        assert predicate({"a": [value]}, fixed(T0)) is False


def test_megabyte_strings_are_still_text_for_string_operators() -> None:
    """A megabyte-long string is a valid string: the text operators match it normally and quickly."""
    big = "x" * MEGABYTE
    assert evaluate("STR_CONTAINS", ("mid",), big + "mid") is True
    assert evaluate("STR_STARTS_WITH", ("pre",), "pre" + big) is True
    assert evaluate("STR_ENDS_WITH", ("@example.com",), big) is False
    assert evaluate("IN", ("a",), big) is False
    assert evaluate("NOT_IN", ("a",), big) is True
    assert evaluate("REGEX", ("y",), big) is False


def test_hostile_attribute_mapping_is_false() -> None:
    """An attributes mapping whose get() raises makes every condition false instead of raising."""

    class Hostile(Mapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise RuntimeError("boom")

        def __iter__(self) -> Iterator[str]:
            raise RuntimeError("boom")

        def __len__(self) -> int:
            raise RuntimeError("boom")

        def get(self, key: str, default: Any = None) -> Any:
            raise RuntimeError("boom")

    for operator in OPERATORS:
        for inverted in (False, True):
            assert compile_(operator, VALID_LITERALS[operator], inverted=inverted)(Hostile(), fixed(T0)) is False


def test_string_subclass_is_read_by_its_content() -> None:
    """A str subclass is matched by its actual characters, whatever its __str__ or __eq__ pretend."""

    class Sneaky(str):
        __slots__ = ()

        def __str__(self) -> str:
            return "admin"

        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    assert evaluate("IN", ("guest",), Sneaky("guest")) is True
    assert evaluate("IN", ("admin",), Sneaky("guest")) is False
    assert evaluate("STR_STARTS_WITH", ("gu",), Sneaky("guest")) is True


def test_clock_failure_is_false() -> None:
    """A now() that raises or returns NaN makes a current_time condition false, never an exception."""

    def broken() -> float:
        raise RuntimeError("clock down")

    predicate = compile_("DATE_AFTER", (T0_ISO,), attribute="current_time")
    inverted = compile_("DATE_AFTER", (T0_ISO,), attribute="current_time", inverted=True)
    for now in (broken, fixed(math.nan)):
        assert predicate({}, now) is False
        assert inverted({}, now) is False


# --------------------------------------------------------------------------------------------
# inverted, case_insensitive, list attributes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "values", "value"),
    [
        ("IN", ("Eu-West-1",), "eU-wEST-1"),
        ("NOT_IN", ("Eu-West-1",), "EU-WEST-2"),
        ("STR_CONTAINS", ("CANARY",), "my-canary-build"),
        ("STR_STARTS_WITH", ("Admin",), "ADMINISTRATOR"),
        ("STR_ENDS_WITH", ("@Example.COM",), "ann@example.com"),
        ("REGEX", ("^admin-[a-z]+$",), "ADMIN-Ann"),
    ],
)
def test_case_insensitive(operator: str, values: tuple[str, ...], value: str) -> None:
    """case_insensitive makes the string operators and REGEX ignore case; without it case matters."""
    assert evaluate(operator, values, value, case_insensitive=True) is True
    assert evaluate(operator, values, value, case_insensitive=True, inverted=True) is False
    expected_without = operator == "NOT_IN"
    assert evaluate(operator, values, value) is expected_without


def test_case_insensitive_does_not_affect_other_operators() -> None:
    """case_insensitive leaves numbers, semvers and CIDRs alone (they have no case to fold)."""
    assert evaluate("NUM_EQ", (5,), "5", case_insensitive=True) is True
    assert evaluate("SEMVER_EQ", ("1.0.0-RC.1",), "1.0.0-rc.1", case_insensitive=True) is False
    assert evaluate("IN_CIDR", ("2001:DB8::/32",), "2001:db8::1", case_insensitive=True) is True


@pytest.mark.parametrize("container", [list, tuple, set, frozenset])
def test_list_attribute_holds_when_any_element_matches(container: Callable[[list[Any]], Any]) -> None:
    """A list/tuple/set attribute matches when any element does; NOT_IN when none is in the list."""
    roles = container(["viewer", "beta-tester"])
    assert evaluate("IN", ("beta-tester",), roles) is True
    assert evaluate("IN", ("admin",), roles) is False
    assert evaluate("NOT_IN", ("admin",), roles) is True
    assert evaluate("NOT_IN", ("beta-tester",), roles) is False
    assert evaluate("IN", ("beta-tester",), roles, inverted=True) is False
    assert evaluate("STR_STARTS_WITH", ("beta",), roles) is True
    assert evaluate("NUM_GT", (5,), container([1, 10])) is True
    assert evaluate("NUM_GT", (50,), container([1, 10])) is False
    assert evaluate("IN_CIDR", ("10.0.0.0/8",), container(["192.168.0.1", "10.0.0.1"])) is True
    assert evaluate("SEMVER_GTE", ("2.0.0",), container(["1.0.0", "2.0.0"])) is True


def test_list_attribute_skips_malformed_elements() -> None:
    """Malformed elements are skipped when another element is well formed; an all-malformed list is false."""
    assert evaluate("NUM_GT", (5,), ["abc", 10]) is True
    assert evaluate("NUM_GT", (5,), ["abc", 1]) is False
    assert evaluate("NUM_GT", (5,), ["abc", 1], inverted=True) is True
    assert evaluate("NUM_GT", (5,), ["abc", b"\xff"]) is False
    assert evaluate("NUM_GT", (5,), ["abc", b"\xff"], inverted=True) is False


def test_empty_list_attribute() -> None:
    """An empty list attribute matches nothing: IN is false, NOT_IN true, and inverted negates (it is not malformed)."""
    assert evaluate("IN", ("a",), []) is False
    assert evaluate("IN", ("a",), [], inverted=True) is True
    assert evaluate("NUM_GT", (5,), set()) is False
    assert evaluate("NOT_IN", ("a",), []) is True
    assert evaluate("STR_CONTAINS", ("a",), ()) is False


# --------------------------------------------------------------------------------------------
# current_time
# --------------------------------------------------------------------------------------------


def test_current_time_uses_now_when_the_context_has_none() -> None:
    """current_time is now() when the context does not set it, so a scheduled rule switches on by itself."""
    after = compile_("DATE_AFTER", (T0_ISO,), attribute="current_time")
    before = compile_("DATE_BEFORE", (T0_ISO,), attribute="current_time")
    assert after({}, fixed(T0 - 1)) is False
    assert after({}, fixed(T0 + 1)) is True
    assert before({}, fixed(T0 - 1)) is True
    assert before({}, fixed(T0 + 1)) is False
    assert after({"current_time": None}, fixed(T0 + 1)) is True


def test_current_time_from_the_context_overrides_now() -> None:
    """A current_time in the context wins over now(), which is then not even called."""
    calls: list[int] = []

    def now() -> float:
        calls.append(1)
        return T0 - 10**6

    after = compile_("DATE_AFTER", (T0_ISO,), attribute="current_time")
    assert after({"current_time": "2030-01-01T00:00:00Z"}, now) is True
    assert after({"current_time": datetime(2030, 1, 1, tzinfo=UTC)}, now) is True
    assert after({"current_time": T0 + 5}, now) is True
    assert calls == []
    assert after({}, now) is False
    assert calls == [1]


# --------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------

PLUS_ONE = timezone(timedelta(hours=1))


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run with a local time zone far from UTC, so "naive means UTC" cannot pass by accident."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset() is not available on this platform")
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14, no DST
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("value", "relation"),
    [
        ("2026-01-01T00:00:01Z", "after"),
        ("2026-01-01T00:00:01z", "after"),
        ("2026-01-01T00:00:01+00:00", "after"),
        ("2026-01-01T01:00:00+01:00", "equal"),
        ("2026-01-01T00:59:59+01:00", "before"),
        ("2025-12-31T23:00:00-01:00", "equal"),
        ("2025-12-31T23:00:01-01:00", "after"),
        ("2026-01-01T00:00:00", "equal"),  # naive: UTC
        ("2026-01-01T00:00:00.000001", "after"),
        ("2026-01-01 00:00:01", "after"),
        ("2026-01-02", "after"),
        ("2025-12-31", "before"),
        ("2026-01-01", "equal"),
        (datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC), "after"),
        (datetime(2026, 1, 1, 0, 0, 1), "after"),  # naive: UTC
        (datetime(2026, 1, 1, 0, 30, tzinfo=PLUS_ONE), "before"),
        (date(2026, 1, 2), "after"),
        (date(2025, 12, 31), "before"),
        (int(T0) + 1, "after"),
        (T0 - 0.5, "before"),
        (T0, "equal"),
    ],
)
@pytest.mark.usefixtures("far_from_utc")
def test_date_formats_in_the_context(value: Any, relation: str) -> None:
    """ISO strings (Z, offsets, naive = UTC, date only), datetime/date objects and epoch numbers compare by instant."""
    assert evaluate("DATE_AFTER", (T0_ISO,), value) is (relation == "after")
    assert evaluate("DATE_BEFORE", (T0_ISO,), value) is (relation == "before")


@pytest.mark.parametrize(
    "literal",
    [
        T0_ISO,
        "2026-01-01T01:00:00+01:00",
        "2026-01-01T00:00:00",
        "2026-01-01",
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 1, 1),
        date(2026, 1, 1),
    ],
)
@pytest.mark.usefixtures("far_from_utc")
def test_date_literal_forms(literal: Any) -> None:
    """A date literal may be an ISO string (with Z, an offset or naive = UTC) or a datetime/date object."""
    assert evaluate("DATE_AFTER", (literal,), T0 + 1) is True
    assert evaluate("DATE_AFTER", (literal,), T0) is False
    assert evaluate("DATE_BEFORE", (literal,), T0 - 1) is True


# --------------------------------------------------------------------------------------------
# Semantic versions
# --------------------------------------------------------------------------------------------

SEMVER_CHAIN = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.1.0",
    "1.10.0",
    "2.0.0",
]
"""Strictly increasing by SemVer 2.0.0 precedence (the spec's own example, extended)."""


def test_semver_precedence_chain() -> None:
    """Pre-releases sort before the release, numerically where numeric: every pair of the chain orders right."""
    for (i, low), (j, high) in itertools.combinations(enumerate(SEMVER_CHAIN), 2):
        assert i < j
        assert evaluate("SEMVER_LT", (high,), low) is True, (low, high)
        assert evaluate("SEMVER_LTE", (high,), low) is True
        assert evaluate("SEMVER_GT", (high,), low) is False
        assert evaluate("SEMVER_GTE", (high,), low) is False
        assert evaluate("SEMVER_EQ", (high,), low) is False
        assert evaluate("SEMVER_GT", (low,), high) is True
    for version in SEMVER_CHAIN:
        assert evaluate("SEMVER_EQ", (version,), version) is True


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("1.0.0", "1.0.0+build.5"),
        ("1.0.0+20260101", "1.0.0+other"),
        ("1.0.0-rc.1+sha.abc", "1.0.0-rc.1"),
        ("v1.2.3", "1.2.3"),
        ("1.2.3", "v1.2.3+meta"),
        ("1.2.3", " 1.2.3 "),
    ],
)
def test_semver_equality_ignores_build_metadata_and_leading_v(literal: str, value: str) -> None:
    """Build metadata is ignored and a leading 'v' is allowed, in the literal and in the context."""
    assert evaluate("SEMVER_EQ", (literal,), value) is True
    assert evaluate("SEMVER_GT", (literal,), value) is False
    assert evaluate("SEMVER_LT", (literal,), value) is False


def _reference_semver(text: str) -> tuple[tuple[int, int, int], list[str] | None]:
    """A deliberately simple, independent SemVer parser for generated (always valid) versions."""
    text = text.removeprefix("v").split("+", 1)[0]
    core, _, pre = text.partition("-")
    major, minor, patch = (int(x) for x in core.split("."))
    return (major, minor, patch), (pre.split(".") if pre else None)


def _reference_compare(a: str, b: str) -> int:
    """Compare two versions by SemVer 2.0.0 section 11, returning -1, 0 or 1."""
    (core_a, pre_a), (core_b, pre_b) = _reference_semver(a), _reference_semver(b)
    if core_a != core_b:
        return -1 if core_a < core_b else 1
    if pre_a is None or pre_b is None:
        return (pre_a is None) - (pre_b is None)
    for x, y in zip(pre_a, pre_b, strict=False):
        if x == y:
            continue
        if x.isdigit() and y.isdigit():
            return -1 if int(x) < int(y) else 1
        if x.isdigit() != y.isdigit():
            return -1 if x.isdigit() else 1
        return -1 if x < y else 1
    return (len(pre_a) > len(pre_b)) - (len(pre_a) < len(pre_b))


_numeric_id = st.integers(0, 30).map(str)
_alnum_id = st.from_regex(re.compile(r"[0-9]{0,2}[A-Za-z-][0-9A-Za-z-]{0,3}", re.ASCII), fullmatch=True)
semvers = st.builds(
    lambda core, pre, build, v: (
        f"{v}{core[0]}.{core[1]}.{core[2]}" + (f"-{'.'.join(pre)}" if pre else "") + (f"+{build}" if build else "")
    ),
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 12)),
    st.lists(_numeric_id | _alnum_id, max_size=3),
    st.sampled_from(["", "build.1", "sha-5114f85"]),
    st.sampled_from(["", "v"]),
)


@settings(max_examples=300, derandomize=True)
@given(a=semvers, b=semvers)
def test_semver_operators_agree_with_a_reference_comparison(a: str, b: str) -> None:
    """For generated versions, every SEMVER operator agrees with an independent SemVer 2.0.0 comparison."""
    order = _reference_compare(a, b)
    assert evaluate("SEMVER_EQ", (b,), a) is (order == 0)
    assert evaluate("SEMVER_GT", (b,), a) is (order > 0)
    assert evaluate("SEMVER_GTE", (b,), a) is (order >= 0)
    assert evaluate("SEMVER_LT", (b,), a) is (order < 0)
    assert evaluate("SEMVER_LTE", (b,), a) is (order <= 0)


# --------------------------------------------------------------------------------------------
# IP addresses
# --------------------------------------------------------------------------------------------


def test_cidr_accepts_address_objects_and_both_families() -> None:
    """IN_CIDR matches IPv4 and IPv6 addresses (text or ipaddress objects) against blocks of their own family."""
    blocks = ("10.0.0.0/8", "2001:db8::/32")
    assert evaluate("IN_CIDR", blocks, ipaddress.ip_address("10.1.1.1")) is True
    assert evaluate("IN_CIDR", blocks, ipaddress.ip_address("2001:db8::42")) is True
    assert evaluate("IN_CIDR", blocks, ipaddress.ip_address("172.16.0.1")) is False
    assert evaluate("IN_CIDR", blocks, "::ffff:10.0.0.1") is False  # IPv4-mapped IPv6 is the IPv6 family
    assert evaluate("IN_CIDR", ("::/0",), "2001:db8::1") is True
    assert evaluate("IN_CIDR", ("0.0.0.0/0",), "8.8.8.8") is True


# --------------------------------------------------------------------------------------------
# Bad literals in the condition
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "values", "field", "phrase"),
    [
        ("REGEX", ("(",), "value", "invalid regular expression"),
        ("REGEX", ("[a-",), "value", "invalid regular expression"),
        ("REGEX", (5,), "value", "regular expression"),
        ("SEMVER_EQ", ("1.0",), "value", "semantic version"),
        ("SEMVER_GT", ("01.0.0",), "value", "semantic version"),
        ("SEMVER_LT", (1,), "value", "semantic version"),
        ("SEMVER_LTE", ("1\u0661.0.0",), "value", "semantic version"),
        ("IN_CIDR", ("10.0.0.0/33",), "values[0]", "CIDR"),
        ("IN_CIDR", ("10.0.0.0/8", "nope"), "values[1]", "CIDR"),
        ("IN_CIDR", ("10.0.0.0/8", None), "values[1]", "CIDR"),
        ("DATE_AFTER", ("yesterday",), "value", "ISO-8601"),
        ("DATE_BEFORE", ("2026-13-01",), "value", "ISO-8601"),
        ("DATE_AFTER", (1_767_225_600,), "value", "ISO-8601"),
        ("DATE_AFTER", (True,), "value", "ISO-8601"),
        ("NUM_EQ", ("ten",), "value", "number"),
        ("NUM_GT", (math.nan,), "value", "number"),
        ("NUM_GTE", (True,), "value", "number"),
        ("NUM_LT", (None,), "value", "number"),
        ("NUM_LTE", ([5],), "value", "number"),
        ("NUM_EQ", (), "value", "exactly one value"),
        ("NUM_EQ", (1, 2), "value", "exactly one value"),
        ("DATE_AFTER", (), "value", "exactly one value"),
        ("SEMVER_EQ", ("1.0.0", "2.0.0"), "value", "exactly one value"),
        ("REGEX", ("a", "b"), "value", "exactly one value"),
        ("IN", (), "values", "at least one value"),
        ("NOT_IN", (), "values", "at least one value"),
        ("STR_CONTAINS", (), "values", "at least one value"),
        ("IN_CIDR", (), "values", "at least one value"),
        ("IN", (None,), "values[0]", "string"),
        ("IN", ("a", object()), "values[1]", "string"),
        ("STR_STARTS_WITH", ("a", "b", b"\xff"), "values[2]", "string"),
        ("in", ("a",), "operator", "unknown operator"),
        ("EQUALS", ("a",), "operator", "unknown operator"),
    ],
)
def test_bad_literal_raises_condition_value_error(
    operator: str, values: tuple[Any, ...], field: str, phrase: str
) -> None:
    """An unusable literal raises ConditionValueError naming the field (value, values, values[i], operator)."""
    with pytest.raises(ConditionValueError) as info:
        compile_(operator, values)
    assert info.value.field == field
    assert phrase in info.value.message
    assert isinstance(info.value, ValueError)


def test_huge_integer_literals_are_handled() -> None:
    """A literal int too large for float or str() is still a ConditionValueError or a usable number, nothing else."""
    huge = 10**5000
    with pytest.raises(ConditionValueError) as info:
        compile_("IN", ("a", huge))
    assert info.value.field == "values[1]"
    with pytest.raises(ConditionValueError) as info:
        compile_("DATE_AFTER", (huge,))
    assert info.value.field == "value"
    assert compile_("NUM_LT", (huge,))({"a": 10**300}, fixed(T0)) is True
    assert compile_("NUM_GT", (5,))({"a": huge}, fixed(T0)) is True
    assert compile_("NUM_LT", (5,))({"a": -huge}, fixed(T0)) is True


literal_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.dates(),
    st.datetimes(timezones=st.none() | st.just(UTC)),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=400, derandomize=True)
@given(operator=st.sampled_from(sorted(OPERATORS)), values=st.lists(literal_values, max_size=3))
def test_compile_raises_only_condition_value_error(operator: str, values: list[Any]) -> None:
    """For any literal, compile_condition either returns a predicate or raises ConditionValueError."""
    field: str | None = None
    try:
        predicate = compile_(operator, values)
    except ConditionValueError as exc:
        field = exc.field
    if field is None:
        assert predicate({"a": "x"}, fixed(T0)) in (True, False)
    else:
        assert re.fullmatch(r"values?(\[\d+\])?", field), field


# --------------------------------------------------------------------------------------------
# Never raises, for anything
# --------------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.binary(),
    st.dates(),
    st.datetimes(timezones=st.none() | st.timezones()),
    st.ip_addresses(),
    st.sampled_from(["1.2.3", "v1.2.3-rc.1", "10.1.2.3", "2001:db8::1", T0_ISO, "5", "aaa7", "pre-mid@example.com"]),
)
attribute_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=5), children, max_size=3)
        | st.frozensets(st.integers() | st.text(max_size=5), max_size=3)
    ),
    max_leaves=8,
)

ALL_PREDICATES = [
    (
        operator,
        compile_(operator, VALID_LITERALS[operator], inverted=False, case_insensitive=ci),
        compile_(operator, VALID_LITERALS[operator], inverted=True, case_insensitive=ci),
    )
    for operator in sorted(OPERATORS)
    for ci in (False, True)
]


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(value=attribute_values, now=st.floats(allow_nan=True, allow_infinity=True))
def test_no_predicate_ever_raises(value: Any, now: float) -> None:
    """Every operator returns a bool for any attribute value, and a condition and its inverse are never both true."""
    for operator, plain, inverted in ALL_PREDICATES:
        result = plain({"a": value}, fixed(now))
        negated = inverted({"a": value}, fixed(now))
        assert type(result) is bool, operator
        assert type(negated) is bool, operator
        assert not (result and negated), (operator, value)
    current = compile_("DATE_AFTER", (T0_ISO,), attribute="current_time")
    assert type(current({}, fixed(now))) is bool
    assert type(current({"current_time": value}, fixed(now))) is bool


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    values=st.lists(st.one_of(st.text(max_size=5), st.integers(-3, 3), st.booleans()), min_size=1, max_size=4),
    attribute=st.one_of(st.text(max_size=5), st.sampled_from(["true", "false", "1", "-2", "True"])),
    operator=st.sampled_from(["IN", "NOT_IN"]),
    inverted=st.booleans(),
)
def test_in_fast_path_agrees_with_the_general_path(
    values: list[object], attribute: str, operator: str, inverted: bool
) -> None:
    """IN / NOT_IN on a string attribute (the fast path) answers like the same check on a one-element list."""
    predicate = compile_condition(Condition("a", operator, tuple(values), inverted))
    # a one-element list takes the general path; for IN / NOT_IN it must give the same answer
    assert predicate({"a": attribute}, lambda: 0.0) == predicate({"a": [attribute]}, lambda: 0.0)
