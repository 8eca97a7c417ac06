"""Targeting conditions compiled once into fast predicates.

Semantics follow the Unleash constraint model:

* every operator is evaluated against one context attribute; ``inverted`` negates the result;
* a *missing* attribute (absent or ``None``) makes every operator false, except ``NOT_IN``, which is
  true (a missing value is not in any list) — then ``inverted`` applies, as in Unleash;
* a *malformed* value (not a number, a date, a semver, an IP address; bytes that are not UTF-8; an
  object of no textual form) makes the condition false whatever ``inverted`` says: garbage never
  targets anyone in or out by accident, and never raises;
* a list, tuple or set attribute holds when any element matches (``NOT_IN``: when none is in the list);
* ``current_time`` is "now" (from the router's clock, UTC) unless the context sets it.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, time
from typing import Any

from .model import Condition

__all__ = [
    "MULTI_VALUE_OPERATORS",
    "OPERATORS",
    "SINGLE_VALUE_OPERATORS",
    "ConditionValueError",
    "Predicate",
    "compile_condition",
    "parse_semver",
]

Predicate = Callable[[Mapping[str, Any], Callable[[], float]], bool]
"""A compiled condition: ``predicate(attributes, now) -> bool``; ``now()`` returns POSIX seconds."""

MULTI_VALUE_OPERATORS = frozenset({"IN", "NOT_IN", "STR_CONTAINS", "STR_STARTS_WITH", "STR_ENDS_WITH", "IN_CIDR"})
"""Operators that take a list of ``values``."""
SINGLE_VALUE_OPERATORS = frozenset(
    {
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
    }
)
"""Operators that take a single ``value``."""
OPERATORS = MULTI_VALUE_OPERATORS | SINGLE_VALUE_OPERATORS
"""Every supported operator."""

CURRENT_TIME = "current_time"


class ConditionValueError(ValueError):
    """A literal in a condition is unusable. ``field`` names it (``"values[2]"``, ``"value"``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


_MALFORMED = object()
_COLLECTIONS = (list, tuple, set, frozenset)


def _show(value: Any) -> str:
    """Return a short ``repr`` of a literal for an error message (never raises, even for a 5,000-digit int)."""
    try:
        text = repr(value)
    except Exception:  # an int too long for str(), or an object whose repr fails
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: Any) -> Any:
    """Return ``value`` as text, or ``_MALFORMED`` when it has no sensible textual form."""
    kind = type(value)
    if kind is str:
        return value
    if kind is bool:
        return "true" if value else "false"
    if kind is float:
        return str(value)
    if kind is int:
        try:
            return str(value)
        except ValueError:  # more digits than sys.get_int_max_str_digits()
            return _MALFORMED
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return _MALFORMED
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:
            return _MALFORMED
    return _MALFORMED


def _number(value: Any) -> float | None:
    """Return a finite-or-infinite float, or ``None`` for anything that is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range is still a number
            number = math.inf if value > 0 else -math.inf
    elif isinstance(value, str):
        if len(value) > 100:
            return None
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return None if math.isnan(number) else number


def _timestamp(value: Any) -> float | None:
    """Return POSIX seconds for a datetime, date, ISO-8601 string or number; ``None`` if malformed."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.timestamp()
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=UTC).timestamp()
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, str):
        if not value or len(value) > 64:
            return None
        text = value.strip()
        try:
            moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" and text else text)
        except ValueError:
            return None
        return _timestamp(moment)
    return None


_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$",
    re.ASCII,  # SemVer digits are ASCII: without this, \d would accept e.g. "1\u0661.0.0" as 11.0.0
)

SemverKey = tuple[int, int, int, tuple[Any, ...]]


def parse_semver(text: str) -> SemverKey | None:
    """Parse a SemVer 2.0.0 version (an optional leading ``v`` allowed) into a sortable key, or ``None``.

    Precedence follows the spec: a pre-release sorts before its release, numeric identifiers sort
    numerically and before alphanumeric ones, and build metadata is ignored.
    """
    if not isinstance(text, str) or len(text) > 256:
        return None
    match = _SEMVER.match(text.strip())
    if match is None:
        return None
    major, minor, patch, pre, _build = match.groups()
    if pre is None:
        pre_key: tuple[Any, ...] = (1,)
    else:
        pre_key = (0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")))
    return int(major), int(minor), int(patch), pre_key


def _single(cond: Condition) -> Any:
    if len(cond.values) != 1:
        raise ConditionValueError("value", f"{cond.operator} takes exactly one value, got {len(cond.values)}")
    return cond.values[0]


Matcher = Callable[[Any], "bool | None"]


def _text_matcher(cond: Condition) -> Matcher:
    op = cond.operator
    folded = cond.case_insensitive
    literals: list[str] = []
    for index, raw in enumerate(cond.values):
        text = _text(raw)
        if text is _MALFORMED:
            raise ConditionValueError(f"values[{index}]", f"expected a string, got {_show(raw)}")
        literals.append(text.casefold() if folded else text)
    if op in {"IN", "NOT_IN"}:
        members = frozenset(literals)

        def match_in(value: Any) -> bool | None:
            text = _text(value)
            if text is _MALFORMED:
                return None
            return (text.casefold() if folded else text) in members

        return match_in
    prefixes = tuple(literals)
    if op == "STR_STARTS_WITH":

        def match_start(value: Any) -> bool | None:
            text = _text(value)
            if text is _MALFORMED:
                return None
            return bool(prefixes) and (text.casefold() if folded else text).startswith(prefixes)

        return match_start
    if op == "STR_ENDS_WITH":

        def match_end(value: Any) -> bool | None:
            text = _text(value)
            if text is _MALFORMED:
                return None
            return bool(prefixes) and (text.casefold() if folded else text).endswith(prefixes)

        return match_end

    def match_contains(value: Any) -> bool | None:
        text = _text(value)
        if text is _MALFORMED:
            return None
        text = text.casefold() if folded else text
        return any(literal in text for literal in prefixes)

    return match_contains


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "EQ": lambda a, b: a == b,
    "GT": lambda a, b: a > b,
    "GTE": lambda a, b: a >= b,
    "LT": lambda a, b: a < b,
    "LTE": lambda a, b: a <= b,
    "AFTER": lambda a, b: a > b,
    "BEFORE": lambda a, b: a < b,
}


def _num_matcher(cond: Condition) -> Matcher:
    raw = _single(cond)
    target = _number(raw)
    if target is None:
        raise ConditionValueError("value", f"expected a number, got {_show(raw)}")
    compare = _COMPARE[cond.operator.removeprefix("NUM_")]

    def match_num(value: Any) -> bool | None:
        number = _number(value)
        return None if number is None else compare(number, target)

    return match_num


def _date_matcher(cond: Condition) -> Matcher:
    raw = _single(cond)
    target = _timestamp(raw) if not isinstance(raw, (int, float)) else None
    if target is None:
        raise ConditionValueError(
            "value", f"expected an ISO-8601 date-time such as '2026-12-01T09:00:00Z', got {_show(raw)}"
        )
    compare = _COMPARE[cond.operator.removeprefix("DATE_")]

    def match_date(value: Any) -> bool | None:
        moment = _timestamp(value)
        return None if moment is None else compare(moment, target)

    return match_date


def _semver_matcher(cond: Condition) -> Matcher:
    raw = _single(cond)
    target = parse_semver(raw) if isinstance(raw, str) else None
    if target is None:
        raise ConditionValueError("value", f"expected a semantic version such as '2.1.0', got {_show(raw)}")
    compare = _COMPARE[cond.operator.removeprefix("SEMVER_")]

    def match_semver(value: Any) -> bool | None:
        text = _text(value)
        if text is _MALFORMED:
            return None
        key = parse_semver(text)
        return None if key is None else compare(key, target)

    return match_semver


def _regex_matcher(cond: Condition) -> Matcher:
    raw = _single(cond)
    if not isinstance(raw, str):
        raise ConditionValueError("value", f"expected a regular expression string, got {_show(raw)}")
    try:
        pattern = re.compile(raw, re.IGNORECASE if cond.case_insensitive else 0)
    except re.error as exc:
        raise ConditionValueError("value", f"invalid regular expression {raw!r}: {exc}") from None
    search = pattern.search

    def match_regex(value: Any) -> bool | None:
        text = _text(value)
        if text is _MALFORMED:
            return None
        return search(text) is not None

    return match_regex


def _cidr_matcher(cond: Condition) -> Matcher:
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for index, raw in enumerate(cond.values):
        try:
            networks.append(ipaddress.ip_network(str(raw).strip(), strict=False))
        except ValueError:
            raise ConditionValueError(
                f"values[{index}]", f"expected a CIDR block such as '10.0.0.0/8', got {_show(raw)}"
            ) from None

    def match_cidr(value: Any) -> bool | None:
        if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            address = value
        else:
            text = _text(value)
            if text is _MALFORMED or len(text) > 64:
                return None
            try:
                address = ipaddress.ip_address(text.strip())
            except ValueError:
                return None
        return any(address in network for network in networks)

    return match_cidr


def _matcher(cond: Condition) -> Matcher:
    op = cond.operator
    if op in ("IN", "NOT_IN") or op.startswith("STR_"):
        return _text_matcher(cond)
    if op.startswith("NUM_"):
        return _num_matcher(cond)
    if op.startswith("DATE_"):
        return _date_matcher(cond)
    if op.startswith("SEMVER_"):
        return _semver_matcher(cond)
    if op == "REGEX":
        return _regex_matcher(cond)
    if op == "IN_CIDR":
        return _cidr_matcher(cond)
    raise ConditionValueError("operator", f"unknown operator {op!r}")


def compile_condition(cond: Condition) -> Predicate:
    """Compile ``cond`` into a predicate. Raises :class:`ConditionValueError` for an unusable literal.

    The predicate never raises for any attribute value.
    """
    if cond.operator not in OPERATORS:
        raise ConditionValueError("operator", f"unknown operator {cond.operator!r}")
    if cond.operator in MULTI_VALUE_OPERATORS and not cond.values:
        raise ConditionValueError("values", f"{cond.operator} needs at least one value")
    match = _matcher(cond)
    attribute = cond.attribute
    negate = cond.operator == "NOT_IN"
    inverted = cond.inverted
    missing = negate != inverted
    is_time = attribute == CURRENT_TIME

    def match_value(value: Any) -> bool | None:
        if isinstance(value, _COLLECTIONS):
            seen = False
            for element in value:
                result = match(element)
                if result:
                    return True
                seen = seen or result is not None
            return False if seen or not value else None
        return match(value)

    def predicate(attributes: Mapping[str, Any], now: Callable[[], float]) -> bool:
        try:
            value = attributes.get(attribute)
            if value is None:
                if not is_time:
                    return missing
                value = now()
            result = match_value(value)
        except Exception:  # a hostile attribute object: never raise on the hot path
            return False
        if result is None:
            return False
        return (result != negate) != inverted

    if cond.operator in ("IN", "NOT_IN") and not cond.case_insensitive and not is_time:
        # fast path for the common case (a string attribute against a list): one set lookup
        members = frozenset(_text(v) for v in cond.values)  # literals normalised as the general path does
        flip = negate != inverted

        def in_predicate(attributes: Mapping[str, Any], now: Callable[[], float]) -> bool:
            try:
                value = attributes.get(attribute)
            except Exception:  # pragma: no cover - a hostile mapping
                return False
            if type(value) is str:
                return (value in members) != flip
            return predicate(attributes, now)

        return in_predicate
    return predicate
