"""Pure statistics: step aggregates in, a :class:`Verdict` with its numbers out. No I/O, no clock.

Every comparison uses *anytime-valid* confidence sequences, so the guard may be consulted after every
request without inflating false alarms. For a binomial proportion (an error rate, or the share of requests
slower than a threshold) the sequence is the Beta-binomial mixture (Robbins' method of mixtures with a
Jeffreys Beta(½, ½) prior): with ``S`` successes in ``n`` trials,

    M_n(p) = B(½ + S, ½ + n − S) / (B(½, ½) · p^S · (1 − p)^(n − S))

is a non-negative martingale under ``p``, so by Ville's inequality ``{p : M_n(p) < 1/α}`` covers the true
rate at every ``n`` simultaneously with probability ≥ 1 − α. It is exact (no normal approximation), so it
stays calibrated with the handful of errors a small canary sees. Two arms are compared through their two
sequences (a union bound: each at α/2), and the guard's α is split evenly across its failing checks.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .model import GuardConfig
from .observe import BOUNDS, StepSnapshot, VariantSnapshot

__all__ = [
    "Check",
    "CheckResult",
    "Outcome",
    "Verdict",
    "binomial_bounds",
    "evaluate",
    "sample_ratio_evalue",
]

_A = 0.5  # Jeffreys prior
_B = 0.5
_LNB_PRIOR = math.lgamma(_A) + math.lgamma(_B) - math.lgamma(_A + _B)


class Outcome(enum.StrEnum):
    """What a check, or the whole guard, concludes."""

    PASS = "pass"  # noqa: S105  # not a password
    """The evidence says the new version is within tolerance."""
    FAIL = "fail"
    """The evidence says the new version is worse than tolerated: roll back."""
    INCONCLUSIVE = "inconclusive"
    """Not enough evidence either way (yet)."""
    MISMATCH = "sample_ratio_mismatch"
    """The observed split of units differs from the configured one: pause and investigate."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The result of one check, with the numbers behind it."""

    name: str
    outcome: Outcome
    message: str
    test: str = ""
    numbers: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "name": self.name,
            "outcome": self.outcome.value,
            "message": self.message,
            "test": self.test,
            "numbers": dict(self.numbers),
        }


Check = Callable[[StepSnapshot, float], CheckResult]
"""A custom check: ``check(snapshot, percent) -> CheckResult``."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The guard's conclusion for one step: the overall outcome and every check's result."""

    outcome: Outcome
    checks: tuple[CheckResult, ...]
    old: VariantSnapshot
    new: VariantSnapshot

    @property
    def message(self) -> str:
        """One line: the deciding checks' messages."""
        if self.outcome is Outcome.PASS:
            return "; ".join(c.message for c in self.checks) or "pass"
        deciding = [c for c in self.checks if c.outcome is self.outcome] or list(self.checks)
        return "; ".join(c.message for c in deciding)

    def check(self, name: str) -> CheckResult | None:
        """Return the result of the check called ``name``, if it ran."""
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "outcome": self.outcome.value,
            "message": self.message,
            "checks": [c.to_dict() for c in self.checks],
            "old": {"requests": self.old.requests, "errors": self.old.errors, "units": self.old.units},
            "new": {"requests": self.new.requests, "errors": self.new.errors, "units": self.new.units},
        }


def _log_mixture_constant(successes: int, failures: int) -> float:
    return (
        math.lgamma(_A + successes) + math.lgamma(_B + failures) - math.lgamma(_A + _B + successes + failures)
    ) - _LNB_PRIOR


def binomial_bounds(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Return the anytime-valid (1 − ``alpha``) confidence sequence for a binomial rate at this sample.

    ``(0.0, 1.0)`` without trials. Valid simultaneously over every sample size (Ville's inequality).
    """
    if trials <= 0:
        return 0.0, 1.0
    s = successes
    f = trials - successes
    c = math.log(1.0 / alpha)
    k = _log_mixture_constant(s, f)
    log = math.log
    log1p = math.log1p
    p_hat = s / trials

    def g(p: float) -> float:  # log M(p) - c; convex, minimum at p_hat where it is < 0
        return k - (s * log(p) if s else 0.0) - (f * log1p(-p) if f else 0.0) - c

    def dg(p: float) -> float:
        return -s / p + f / (1.0 - p)

    lower = 0.0
    if s:
        x = p_hat / 2
        while g(x) <= 0:  # walk left until outside the sequence
            x /= 2
        for _ in range(100):  # Newton from the left of a convex decreasing function: monotone, no overshoot
            step = g(x) / dg(x)
            x_new = x - step
            if x_new >= p_hat or x_new <= x:
                break
            x = x_new
            if abs(step) <= 1e-10 * x:
                break
        lower = x
    upper = 1.0
    if f:
        y = 1.0 - (1.0 - p_hat) / 2
        while g(y) <= 0:
            y = 1.0 - (1.0 - y) / 2
        for _ in range(100):  # Newton from the right of a convex increasing function
            step = g(y) / dg(y)
            y_new = y - step
            if y_new <= p_hat or y_new >= y:
                break
            y = y_new
            if abs(step) <= 1e-10 * y:
                break
        upper = y
    return lower, upper


def sample_ratio_evalue(new_units: int, old_units: int, expected_share: float) -> float:
    """E-value against "each unit is new with probability ``expected_share``" (Beta-binomial mixture).

    Large values are evidence of a sample-ratio mismatch; ``e >= 1/alpha`` rejects at level alpha,
    anytime-valid.
    """
    if not 0.0 < expected_share < 1.0 or new_units + old_units == 0:
        return 1.0
    log_e = (
        _log_mixture_constant(new_units, old_units)
        - new_units * math.log(expected_share)
        - old_units * math.log1p(-expected_share)
    )
    return math.exp(min(log_e, 700.0))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if math.isinf(seconds):
        return "∞"
    return f"{seconds * 1e6:.0f} µs" if seconds < 0.001 else f"{seconds * 1000:.1f} ms"


_CS = "anytime-valid Beta-binomial confidence sequences"


def _allowed(guard: GuardConfig, old_rate: float) -> float:
    allowed = old_rate + guard.max_error_rate_increase
    if guard.max_error_rate_ratio is not None:
        allowed = max(allowed, guard.max_error_rate_ratio * old_rate)
    return allowed


def _error_check(guard: GuardConfig, old: VariantSnapshot, new: VariantSnapshot, alpha: float) -> CheckResult:
    lo_new, hi_new = binomial_bounds(new.errors, new.requests, alpha / 2)
    lo_old, hi_old = binomial_bounds(old.errors, old.requests, alpha / 2)
    fail_at, pass_at = _allowed(guard, hi_old), _allowed(guard, lo_old)
    enough = min(new.requests, old.requests) >= guard.min_requests
    numbers = {
        "old_requests": old.requests,
        "old_errors": old.errors,
        "new_requests": new.requests,
        "new_errors": new.errors,
        "old_rate": old.error_rate,
        "new_rate": new.error_rate,
        "new_rate_bounds": (lo_new, hi_new),
        "old_rate_bounds": (lo_old, hi_old),
        "difference_bounds": (lo_new - hi_old, hi_new - lo_old),
        "max_error_rate_increase": guard.max_error_rate_increase,
        "max_error_rate_ratio": guard.max_error_rate_ratio,
        "alpha": alpha,
    }
    summary = (
        f"error rate new {_pct(new.error_rate)} ({new.errors}/{new.requests}) vs old {_pct(old.error_rate)} "
        f"({old.errors}/{old.requests}); new − old in "
        f"[{100 * (lo_new - hi_old):+.2f}, {100 * (hi_new - lo_old):+.2f}] pp"
    )
    tolerance = f"{100 * guard.max_error_rate_increase:g} pp"
    if guard.max_error_rate_ratio is not None:
        tolerance += f" or ×{guard.max_error_rate_ratio:g}"
    if lo_new > fail_at:
        name = "error_rate" if enough else "circuit_breaker"
        return CheckResult(name, Outcome.FAIL, f"{summary}: exceeds the tolerance ({tolerance})", _CS, numbers)
    if not enough:
        return CheckResult(
            "error_rate",
            Outcome.INCONCLUSIVE,
            f"{summary}: waiting for {guard.min_requests} requests per variant",
            _CS,
            numbers,
        )
    if hi_new < pass_at:
        return CheckResult("error_rate", Outcome.PASS, f"{summary}: within the tolerance ({tolerance})", _CS, numbers)
    return CheckResult("error_rate", Outcome.INCONCLUSIVE, f"{summary}: not enough evidence yet", _CS, numbers)


def _cumulative(histogram: Sequence[int]) -> list[int]:
    running, out = 0, []
    for count in histogram:
        running += count
        out.append(running)
    return out


def _quantile_bounds(old: VariantSnapshot, q: float, alpha: float) -> tuple[int, int, int] | None:
    """Indices (lower, point, upper) of histogram bounds bracketing old's q-quantile, anytime-valid.

    ``upper``: the first bound b with P(X < b) ≥ q confidently; ``lower``: the last bound b with
    P(X < b) < q confidently (-1 when there is none).
    """
    n = sum(old.histogram)  # the latency-bearing requests (pre-aggregated counts may carry none)
    if n == 0:
        return None
    cum = _cumulative(old.histogram)
    # cum[i] = requests in buckets 0..i = requests below BOUNDS[i]
    point = next((i for i, c in enumerate(cum) if c >= q * n), len(BOUNDS) - 1)
    point = min(point, len(BOUNDS) - 1)
    upper = point
    while upper < len(BOUNDS) - 1 and binomial_bounds(cum[upper], n, alpha / 2)[0] < q:
        upper += 1
    lower = point
    while lower >= 0 and binomial_bounds(cum[lower], n, alpha / 2)[1] >= q:
        lower -= 1
    return lower, point, upper


def _latency_check(
    guard: GuardConfig, ratio: float, old: VariantSnapshot, new: VariantSnapshot, alpha: float
) -> CheckResult:
    q = guard.latency_percentile / 100
    new_timed, old_timed = new.timed, old.timed
    name = "latency"
    old_p, new_p = old.percentile(guard.latency_percentile), new.percentile(guard.latency_percentile)
    label = f"p{guard.latency_percentile:g}"
    summary = f"{label} new {_ms(new_p)} vs old {_ms(old_p)}"
    numbers: dict[str, Any] = {
        "percentile": guard.latency_percentile,
        "old": old_p,
        "new": new_p,
        "ratio": (new_p / old_p) if new_p and old_p and not math.isinf(new_p) else None,
        "max_latency_ratio": ratio,
        "alpha": alpha,
    }
    if min(new_timed, old_timed) < guard.min_requests:
        return CheckResult(
            name,
            Outcome.INCONCLUSIVE,
            f"{summary}: waiting for {guard.min_requests} requests per variant",
            _CS,
            numbers,
        )
    bracket = _quantile_bounds(old, q, alpha / 2)
    if bracket is None:  # pragma: no cover - min_requests > 0 guarantees old requests
        return CheckResult(name, Outcome.INCONCLUSIVE, f"{summary}: no old requests", _CS, numbers)
    lower, _point, upper = bracket
    tail = 1.0 - q
    # fail: new's quantile is confidently above ratio × (an upper confidence bound of old's quantile)
    fail_index = next((j for j in range(upper, len(BOUNDS)) if BOUNDS[j] >= ratio * BOUNDS[upper]), None)
    if fail_index is not None:
        above = new.count_above(fail_index)
        lo, _ = binomial_bounds(above, new_timed, alpha / 2)
        numbers["fail_threshold"] = BOUNDS[fail_index]
        numbers["new_share_above_fail_threshold"] = above / new_timed
        if lo > tail:
            return CheckResult(
                name,
                Outcome.FAIL,
                f"{summary}: new {label} is above {ratio:g} × old ({_ms(BOUNDS[fail_index])}) with confidence",
                _CS,
                numbers,
            )
    # pass: new's quantile is confidently below ratio × (a lower confidence bound of old's quantile); below the
    # first bound (10 µs) the histogram cannot tell durations apart, so there they count as equal
    pass_index: int | None = 0
    if lower >= 0:
        pass_index = max((j for j in range(lower, len(BOUNDS)) if BOUNDS[j] <= ratio * BOUNDS[lower]), default=0)
    if pass_index is not None:
        above = new.count_above(pass_index)
        _, hi = binomial_bounds(above, new_timed, alpha / 2)
        numbers["pass_threshold"] = BOUNDS[pass_index]
        if hi < tail:
            return CheckResult(name, Outcome.PASS, f"{summary}: within {ratio:g} × old", _CS, numbers)
    return CheckResult(name, Outcome.INCONCLUSIVE, f"{summary}: not enough evidence yet", _CS, numbers)


def _tail_check(
    guard: GuardConfig, tolerance: float, old: VariantSnapshot, new: VariantSnapshot, alpha: float
) -> CheckResult:
    name = "latency_tail"
    new_timed, old_timed = new.timed, old.timed
    if guard.latency_slo is not None:
        index = next((i for i, b in enumerate(BOUNDS) if b >= guard.latency_slo), len(BOUNDS) - 1)
        source = f"the SLO ({_ms(guard.latency_slo)})"
    elif old_timed:
        cum = _cumulative(old.histogram)
        q = guard.tail_percentile / 100
        timed = cum[-1]
        index = min(next((i for i, c in enumerate(cum) if timed and c >= q * timed), len(BOUNDS) - 1), len(BOUNDS) - 1)
        source = f"old p{guard.tail_percentile:g} ({_ms(BOUNDS[index])})"
    else:
        index, source = len(BOUNDS) - 1, "n/a"
    old_above, new_above = old.count_above(index), new.count_above(index)
    lo_new, hi_new = binomial_bounds(new_above, new_timed, alpha / 2)
    lo_old, hi_old = binomial_bounds(old_above, old_timed, alpha / 2)
    old_share = old_above / old_timed if old_timed else None
    new_share = new_above / new_timed if new_timed else None
    numbers = {
        "threshold": BOUNDS[index],
        "old_share_above": old_share,
        "new_share_above": new_share,
        "difference_bounds": (lo_new - hi_old, hi_new - lo_old),
        "max_tail_increase": tolerance,
        "alpha": alpha,
    }
    summary = f"share slower than {source}: new {_pct(new_share)} vs old {_pct(old_share)}"
    if min(new_timed, old_timed) < guard.min_requests:
        return CheckResult(
            name,
            Outcome.INCONCLUSIVE,
            f"{summary}: waiting for {guard.min_requests} requests per variant",
            _CS,
            numbers,
        )
    if lo_new - hi_old > tolerance:
        return CheckResult(
            name, Outcome.FAIL, f"{summary}: exceeds the tolerance ({100 * tolerance:g} pp)", _CS, numbers
        )
    if hi_new - lo_old < tolerance:
        return CheckResult(
            name, Outcome.PASS, f"{summary}: within the tolerance ({100 * tolerance:g} pp)", _CS, numbers
        )
    return CheckResult(name, Outcome.INCONCLUSIVE, f"{summary}: not enough evidence yet", _CS, numbers)


def _sample_ratio_check(guard: GuardConfig, snap: StepSnapshot, percent: float) -> CheckResult:
    scale = 1 << snap.unit_sample_level
    new_units, old_units = snap.new.units // scale, snap.old.units // scale
    expected = percent / 100
    e = sample_ratio_evalue(new_units, old_units, expected)
    total = new_units + old_units
    observed = new_units / total if total else None
    numbers = {
        "new_units": snap.new.units,
        "old_units": snap.old.units,
        "expected_share": expected,
        "observed_share": observed,
        "e_value": e,
        "srm_alpha": guard.srm_alpha,
    }
    test = "anytime-valid Beta-binomial mixture e-value on unit counts"
    summary = f"units on new {_pct(observed)} of {snap.new.units + snap.old.units} vs configured {percent:g} %"
    if e >= 1.0 / guard.srm_alpha:
        return CheckResult(
            "sample_ratio", Outcome.MISMATCH, f"{summary}: sample-ratio mismatch (e = {e:.3g})", test, numbers
        )
    return CheckResult("sample_ratio", Outcome.PASS, f"{summary}: consistent", test, numbers)


def evaluate(
    guard: GuardConfig,
    snapshot: StepSnapshot | None,
    percent: float,
    checks: Sequence[Check] = (),
) -> Verdict:
    """Evaluate every check of ``guard`` on one step's aggregates, served at ``percent``.

    FAIL when any check fails; else MISMATCH on a sample-ratio mismatch; else PASS when every check
    passes; else INCONCLUSIVE. Custom ``checks`` take part like the built-in ones.
    """
    old = snapshot.old if snapshot is not None else VariantSnapshot.empty()
    new = snapshot.new if snapshot is not None else VariantSnapshot.empty()
    failing = 1 + (guard.max_latency_ratio is not None) + (guard.max_tail_increase is not None)
    alpha = guard.alpha / failing
    results = [_error_check(guard, old, new, alpha)]
    if guard.max_latency_ratio is not None:
        results.append(_latency_check(guard, guard.max_latency_ratio, old, new, alpha))
    if guard.max_tail_increase is not None:
        results.append(_tail_check(guard, guard.max_tail_increase, old, new, alpha))
    if snapshot is not None and 0 < percent < 100 and snapshot.new.units + snapshot.old.units:
        results.append(_sample_ratio_check(guard, snapshot, percent))
    for check in checks:
        try:
            result = check(snapshot if snapshot is not None else StepSnapshot("", 0, 0.0, old, new), percent)
        except Exception as exc:
            result = CheckResult(
                getattr(check, "__name__", "custom"), Outcome.INCONCLUSIVE, f"custom check raised {exc!r}"
            )
        if not isinstance(result, CheckResult):
            result = CheckResult(  # type: ignore[unreachable]  # user code may return anything
                getattr(check, "__name__", "custom"), Outcome.INCONCLUSIVE, f"custom check returned {result!r}"
            )
        results.append(result)
    outcomes = {r.outcome for r in results}
    if Outcome.FAIL in outcomes:
        overall = Outcome.FAIL
    elif Outcome.MISMATCH in outcomes:
        overall = Outcome.MISMATCH
    elif outcomes == {Outcome.PASS}:
        overall = Outcome.PASS
    else:
        overall = Outcome.INCONCLUSIVE
    return Verdict(overall, tuple(results), old, new)
