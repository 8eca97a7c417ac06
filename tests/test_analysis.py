"""The guard's statistics: anytime-valid confidence sequences, the sample-ratio e-value and evaluate()."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, special, stats

from canary_router import GuardConfig
from canary_router.analysis import (
    CheckResult,
    Outcome,
    Verdict,
    binomial_bounds,
    evaluate,
    sample_ratio_evalue,
)
from canary_router.observe import BOUNDS, Aggregator, StepSnapshot

NBUCKETS = len(BOUNDS) + 1
_BOUNDS = np.array(BOUNDS)


# ---------------------------------------------------------------------------------------------- helpers


def log_mixture(successes: int | np.ndarray, trials: int | np.ndarray, p: float) -> Any:
    """Independent reference: log M_n(p) of the Jeffreys Beta-binomial mixture, via scipy.special.betaln."""
    s = np.asarray(successes, dtype=float)
    f = np.asarray(trials, dtype=float) - s
    return special.betaln(0.5 + s, 0.5 + f) - special.betaln(0.5, 0.5) - special.xlogy(s, p) - special.xlog1py(f, -p)


def histogram(durations: np.ndarray) -> list[int]:
    """Bucket durations like the aggregator: bucket i holds [BOUNDS[i-1], BOUNDS[i])."""
    index = np.searchsorted(_BOUNDS, durations, side="right")
    return [int(c) for c in np.bincount(index, minlength=NBUCKETS)]


def lognormal(seed: int, n: int, median: float, sigma: float = 0.5) -> np.ndarray:
    """Seeded lognormal request durations (seconds)."""
    return np.random.default_rng(seed).lognormal(math.log(median), sigma, n)


def arm(
    requests: int, errors: int = 0, durations: np.ndarray | None = None, units: Iterable[int] = ()
) -> dict[str, Any]:
    """Keyword arguments of Aggregator.add_counts for one variant (fast calls when no durations are given)."""
    hist: Mapping[int, int] | list[int] = {0: requests} if durations is None else histogram(durations)
    return {"requests": requests, "errors": errors, "histogram": hist, "unit_hashes": units}


def step(old: dict[str, Any], new: dict[str, Any]) -> StepSnapshot:
    """A step snapshot filled through Aggregator.add_counts."""
    agg = Aggregator()
    agg.add_counts("r", 1, "old", now=0.0, **old)
    agg.add_counts("r", 1, "new", now=0.0, **new)
    snap = agg.snapshot("r")
    assert snap is not None
    return snap


def healthy(n: int = 20_000, seed: int = 0, error_rate: float = 0.01) -> dict[str, Any]:
    """A healthy arm: lognormal latency around 50 ms and the given error rate."""
    return arm(n, int(n * error_rate), lognormal(seed, n, 0.05))


# ---------------------------------------------------------------------------------------------- binomial_bounds


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    st.integers(min_value=1, max_value=10**6).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
    st.sampled_from([0.001, 0.01, 0.05, 0.2, 0.49]),
)
def test_bounds_bracket_the_observed_rate(sample: tuple[int, int], alpha: float) -> None:
    """The sequence always contains p_hat, stays inside [0, 1], is 0 below with no successes and 1 above with all."""
    s, n = sample
    lower, upper = binomial_bounds(s, n, alpha)
    assert 0.0 <= lower <= s / n <= upper <= 1.0
    assert lower < upper
    assert (lower == 0.0) == (s == 0)
    assert (upper == 1.0) == (s == n)


def test_no_trials_means_no_information() -> None:
    """Without trials the sequence is the whole unit interval."""
    assert binomial_bounds(0, 0, 0.05) == (0.0, 1.0)
    assert binomial_bounds(0, -3, 0.05) == (0.0, 1.0)


def test_extreme_counts() -> None:
    """S = 0 gives a zero lower bound and S = n an upper bound of one, with the other side informative."""
    lower, upper = binomial_bounds(0, 10_000, 0.01)
    assert lower == 0.0
    assert 0.0 < upper < 0.002
    lower, upper = binomial_bounds(10_000, 10_000, 0.01)
    assert upper == 1.0
    assert 0.998 < lower < 1.0


def test_smaller_alpha_widens_the_sequence() -> None:
    """Asking for more confidence never narrows the sequence."""
    previous = (0.037, 0.037)
    for alpha in (0.4, 0.1, 0.05, 0.01, 0.001, 1e-6):
        lower, upper = binomial_bounds(37, 1000, alpha)
        assert lower < previous[0]
        assert upper > previous[1]
        previous = (lower, upper)


def test_more_trials_shrink_the_sequence() -> None:
    """At the same observed rate, ten times the trials gives a strictly narrower sequence."""
    widths = []
    for n in (100, 1_000, 10_000, 100_000, 1_000_000):
        lower, upper = binomial_bounds(n // 20, n, 0.01)
        widths.append(upper - lower)
    assert all(b < a for a, b in itertools.pairwise(widths))
    assert widths[-1] < 0.003


@pytest.mark.parametrize(
    ("s", "n", "alpha"),
    [
        (1, 1, 0.05),
        (3, 10, 0.05),
        (0, 50, 0.01),
        (50, 50, 0.01),
        (7, 5000, 0.001),
        (2500, 5000, 0.2),
        (1, 10_000, 0.01),
        (10, 10**8, 0.01),
        (1, 10**7, 0.01),
    ],
)
def test_bounds_match_a_brute_force_evaluation_of_the_mixture_martingale(s: int, n: int, alpha: float) -> None:
    """At each finite end the mixture martingale (computed independently with scipy) equals 1/alpha."""
    lower, upper = binomial_bounds(s, n, alpha)
    target = math.log(1 / alpha)
    p_hat = s / n
    if 0 < p_hat < 1:
        assert log_mixture(s, n, p_hat) < target
    for end, inner in ((lower, s > 0), (upper, s < n)):
        if not inner:
            continue
        assert log_mixture(s, n, end) == pytest.approx(target, abs=1e-6)
    # and the ends are the roots an independent root finder finds
    if s > 0:
        root = optimize.brentq(lambda p: log_mixture(s, n, p) - target, 1e-300, p_hat, xtol=1e-300, rtol=1e-13)
        assert lower == pytest.approx(root, rel=1e-7)
    if s < n:
        root = optimize.brentq(lambda p: log_mixture(s, n, p) - target, p_hat, 1 - 1e-16, xtol=1e-300, rtol=1e-13)
        assert upper == pytest.approx(root, rel=1e-7)


def acceptance_band(p: float, horizon: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """For n = 1..horizon, the range [lo(n), hi(n)] of success counts whose sequence (per binomial_bounds) holds p.

    lower(S, n) and upper(S, n) grow with S, so hi(n) = max{S: lower <= p} and lo(n) = min{S: upper >= p}; both move
    by about one per n, so a local search from the previous n is exact and fast.
    """
    lo = np.zeros(horizon + 1, dtype=np.int64)
    hi = np.zeros(horizon + 1, dtype=np.int64)
    h = low = 0
    for n in range(1, horizon + 1):
        if binomial_bounds(h, n, alpha)[0] <= p:
            while h + 1 <= n and binomial_bounds(h + 1, n, alpha)[0] <= p:
                h += 1
        else:
            while binomial_bounds(h, n, alpha)[0] > p:
                h -= 1
        if binomial_bounds(low, n, alpha)[1] >= p:
            while low >= 1 and binomial_bounds(low - 1, n, alpha)[1] >= p:
                low -= 1
        else:
            while binomial_bounds(low, n, alpha)[1] < p:
                low += 1
        lo[n], hi[n] = low, h
    return lo[1:], hi[1:]


def uniform_violations(lo: np.ndarray, hi: np.ndarray, p: float, runs: int, seed: int) -> float:
    """Share of seeded Bernoulli(p) streams whose running count leaves [lo(n), hi(n)] at ANY n."""
    rng = np.random.default_rng(seed)
    counts = np.cumsum(rng.random((runs, len(lo))) < p, axis=1, dtype=np.int32)
    return float(((counts < lo) | (counts > hi)).any(axis=1).mean())


@pytest.mark.parametrize("p", [0.005, 0.05, 0.5])
def test_time_uniform_coverage(p: float) -> None:
    """The true rate stays inside the sequence at EVERY n up to 5,000 in at least 1 - alpha of the runs.

    The same harness, fed a fixed-n (pointwise) 95 % interval instead, sees it violated in far more than
    alpha of the runs: the check has the power to catch a sequence that is not anytime-valid.
    """
    alpha, horizon, runs = 0.05, 5_000, 2_000
    lo, hi = acceptance_band(p, horizon, alpha)
    n = np.arange(1, horizon + 1)
    # the band is exactly {S : M_n(p) < 1/alpha}, per the independent scipy evaluation of the martingale
    target = math.log(1 / alpha)
    assert np.all(log_mixture(lo, n, p) < target + 1e-6)
    assert np.all(log_mixture(hi, n, p) < target + 1e-6)
    assert np.all((lo == 0) | (log_mixture(lo - 1, n, p) >= target - 1e-6))
    assert np.all((hi == n) | (log_mixture(hi + 1, n, p) >= target - 1e-6))
    violations = uniform_violations(lo, hi, p, runs, seed=20240601)
    assert violations <= alpha
    pointwise_lo = stats.binom.ppf(alpha / 2, n, p)
    pointwise_hi = stats.binom.isf(alpha / 2, n, p)
    assert uniform_violations(pointwise_lo, pointwise_hi, p, runs, seed=20240601) > 3 * alpha


# ---------------------------------------------------------------------------------------------- sample ratio


def test_sample_ratio_evalue_balanced_split_is_small() -> None:
    """Units split as configured give an e-value of about one or less (no evidence of a mismatch)."""
    assert sample_ratio_evalue(500, 9_500, 0.05) < 1.0
    assert sample_ratio_evalue(5_000, 5_000, 0.5) < 1.0
    assert sample_ratio_evalue(25_000, 475_000, 0.05) < 1.0
    assert sample_ratio_evalue(0, 0, 0.05) == 1.0


def test_sample_ratio_evalue_broken_split_is_huge() -> None:
    """Units split 50/50 at a 5 % rollout give overwhelming evidence of a mismatch."""
    assert sample_ratio_evalue(5_000, 5_000, 0.05) > 1e100
    assert sample_ratio_evalue(700, 9_300, 0.05) > 1e3  # 7 % instead of 5 % on 10,000 units


def test_sample_ratio_evalue_matches_the_independent_mixture() -> None:
    """The e-value is the Beta-binomial mixture likelihood ratio, as computed independently with scipy."""
    for new, old, share in ((500, 9_500, 0.05), (620, 9_380, 0.05), (40, 60, 0.5), (3, 0, 0.25)):
        assert math.log(sample_ratio_evalue(new, old, share)) == pytest.approx(
            float(log_mixture(new, new + old, share)), rel=1e-9, abs=1e-9
        )


def test_sample_ratio_evalue_without_a_split_is_neutral() -> None:
    """An expected share of 0 or 1 cannot be tested: the e-value is 1."""
    assert sample_ratio_evalue(10, 10, 0.0) == 1.0
    assert sample_ratio_evalue(10, 10, 1.0) == 1.0


# ---------------------------------------------------------------------------------------------- evaluate()


def test_clear_error_regression_fails_with_the_numbers() -> None:
    """4 % errors against 1 % fails the "error_rate" check, and the result carries every number behind it."""
    guard = GuardConfig()
    snap = step(healthy(20_000, seed=1), healthy(20_000, seed=2, error_rate=0.04))
    verdict = evaluate(guard, snap, 50)
    assert verdict.outcome is Outcome.FAIL
    check = verdict.check("error_rate")
    assert check is not None
    assert check.outcome is Outcome.FAIL
    assert check.test == "anytime-valid Beta-binomial confidence sequences"
    numbers = check.numbers
    assert (numbers["old_requests"], numbers["old_errors"]) == (20_000, 200)
    assert (numbers["new_requests"], numbers["new_errors"]) == (20_000, 800)
    assert numbers["old_rate"] == pytest.approx(0.01)
    assert numbers["new_rate"] == pytest.approx(0.04)
    lo_new, hi_new = numbers["new_rate_bounds"]
    lo_old, hi_old = numbers["old_rate_bounds"]
    assert lo_new < 0.04 < hi_new
    assert lo_old < 0.01 < hi_old
    assert numbers["difference_bounds"] == pytest.approx((lo_new - hi_old, hi_new - lo_old))
    assert numbers["alpha"] == pytest.approx(guard.alpha / 3)  # split across the three failing checks
    assert (lo_new, hi_new) == binomial_bounds(800, 20_000, guard.alpha / 3 / 2)
    assert numbers["max_error_rate_increase"] == 0.01
    assert "error rate new 4.00 %" in verdict.message
    assert "exceeds the tolerance" in verdict.message


def test_circuit_breaker_trips_before_min_requests() -> None:
    """A new path failing every call is rolled back within a handful of requests, long before min_requests."""
    guard = GuardConfig()
    old = healthy(5_000, seed=3, error_rate=0.05)
    tripped_at = None
    for n in range(1, 50):
        verdict = evaluate(guard, step(old, arm(n, n)), 5)
        if verdict.outcome is Outcome.FAIL:
            tripped_at = n
            break
        assert verdict.outcome is Outcome.INCONCLUSIVE
    assert tripped_at is not None
    assert tripped_at <= 10
    assert tripped_at < guard.min_requests
    check = verdict.check("circuit_breaker")
    assert check is not None
    assert check.outcome is Outcome.FAIL
    assert verdict.check("error_rate") is None
    assert check.numbers["new_errors"] == tripped_at
    assert check.numbers["new_rate_bounds"][0] > check.numbers["old_rate_bounds"][1] + 0.01


def test_one_early_error_does_not_trip_the_breaker() -> None:
    """A single failure among the first requests is not enough evidence to roll back."""
    verdict = evaluate(GuardConfig(), step(healthy(5_000, seed=4), arm(2, 1)), 5)
    assert verdict.outcome is Outcome.INCONCLUSIVE


def test_equal_healthy_data_passes() -> None:
    """Two arms drawn from the same healthy distribution pass every check (error, latency, tail, sample ratio)."""
    old = healthy(20_000, seed=5) | {"unit_hashes": range(10_000)}
    new = healthy(20_000, seed=6) | {"unit_hashes": range(10_000, 20_000)}
    verdict = evaluate(GuardConfig(), step(old, new), 50)
    assert verdict.outcome is Outcome.PASS, verdict.message
    assert {c.name for c in verdict.checks} == {"error_rate", "latency", "latency_tail", "sample_ratio"}
    assert all(c.outcome is Outcome.PASS for c in verdict.checks)


def test_little_data_is_inconclusive() -> None:
    """With fewer than min_requests per variant and nothing alarming, the verdict waits."""
    verdict = evaluate(GuardConfig(), step(healthy(60, seed=7), healthy(60, seed=8)), 50)
    assert verdict.outcome is Outcome.INCONCLUSIVE
    for name in ("error_rate", "latency", "latency_tail"):
        check = verdict.check(name)
        assert check is not None
        assert check.outcome is Outcome.INCONCLUSIVE
        assert "waiting for 500 requests per variant" in check.message


def test_no_snapshot_is_inconclusive() -> None:
    """Without any observation (no snapshot) the verdict is inconclusive and has no sample-ratio check."""
    verdict = evaluate(GuardConfig(), None, 5)
    assert verdict.outcome is Outcome.INCONCLUSIVE
    assert verdict.check("sample_ratio") is None
    assert verdict.new.requests == 0


def test_latency_slowdown_fails() -> None:
    """A new version 1.5x slower at every percentile fails the p95 latency check (tolerance 1.25x)."""
    old = arm(20_000, 0, lognormal(9, 20_000, 0.05))
    new = arm(20_000, 0, lognormal(10, 20_000, 0.05) * 1.5)
    verdict = evaluate(GuardConfig(), step(old, new), 50)
    assert verdict.outcome is Outcome.FAIL
    check = verdict.check("latency")
    assert check is not None
    assert check.outcome is Outcome.FAIL
    numbers = check.numbers
    assert numbers["percentile"] == 95.0
    assert numbers["ratio"] == pytest.approx(1.5, rel=0.1)
    assert numbers["max_latency_ratio"] == 1.25
    assert numbers["fail_threshold"] >= 1.25 * numbers["old"]
    assert numbers["new_share_above_fail_threshold"] > 0.05
    assert numbers["alpha"] == pytest.approx(0.01 / 3)
    error = verdict.check("error_rate")
    assert error is not None
    assert error.outcome is Outcome.PASS


def test_small_slowdown_within_tolerance_does_not_fail() -> None:
    """A 10 % slowdown is within the 1.25x latency tolerance."""
    old = arm(20_000, 0, lognormal(11, 20_000, 0.05))
    new = arm(20_000, 0, lognormal(12, 20_000, 0.05) * 1.1)
    check = evaluate(GuardConfig(), step(old, new), 50).check("latency")
    assert check is not None
    assert check.outcome is Outcome.PASS


def test_latency_check_can_be_turned_off() -> None:
    """max_latency_ratio = None removes the latency check (and its share of alpha)."""
    guard = GuardConfig(max_latency_ratio=None, max_tail_increase=None)
    old = arm(20_000, 0, lognormal(9, 20_000, 0.05))
    new = arm(20_000, 0, lognormal(10, 20_000, 0.05) * 3)
    verdict = evaluate(guard, step(old, new), 50)
    assert [c.name for c in verdict.checks] == ["error_rate"]
    assert verdict.checks[0].numbers["alpha"] == guard.alpha
    assert verdict.outcome is Outcome.PASS


def with_slow_share(seed: int, n: int, share: float, slow: float) -> np.ndarray:
    """Healthy lognormal durations with ``share`` of them replaced by ``slow`` seconds."""
    durations = lognormal(seed, n, 0.05)
    durations[: int(n * share)] = slow
    return durations


def test_tail_regression_fails() -> None:
    """2 % extra new requests slower than old's p99 fail the tail check (tolerance 1 point) without a p95 failure."""
    n = 50_000
    old = arm(n, 0, lognormal(13, n, 0.05))
    new = arm(n, 0, with_slow_share(14, n, 0.02, 2.0))
    verdict = evaluate(GuardConfig(), step(old, new), 50)
    assert verdict.outcome is Outcome.FAIL
    tail = verdict.check("latency_tail")
    assert tail is not None
    assert tail.outcome is Outcome.FAIL
    numbers = tail.numbers
    assert numbers["old_share_above"] <= 0.01
    assert numbers["new_share_above"] == pytest.approx(0.03, abs=0.003)
    assert numbers["difference_bounds"][0] > 0.01
    assert numbers["max_tail_increase"] == 0.01
    assert "old p99" in tail.message
    latency = verdict.check("latency")
    assert latency is not None
    assert latency.outcome is not Outcome.FAIL


def test_latency_slo_sets_the_tail_threshold() -> None:
    """With latency_slo the tail threshold is the SLO, not old's p99: slow-but-within-SLO requests pass, beyond fail."""
    n = 50_000
    old = arm(n, 0, lognormal(15, n, 0.05))
    # 3 % extra requests at 180 ms: slower than old's p99 (~160 ms) but within a 250 ms SLO
    within = arm(n, 0, with_slow_share(16, n, 0.03, 0.180))
    assert evaluate(GuardConfig(), step(old, within), 50).outcome is Outcome.FAIL
    slo = GuardConfig(latency_slo=0.25)
    verdict = evaluate(slo, step(old, within), 50)
    tail = verdict.check("latency_tail")
    assert tail is not None
    assert tail.outcome is Outcome.PASS
    assert 0.25 <= tail.numbers["threshold"] < 0.25 * 2 ** (1 / 16)
    assert "the SLO (250.0 ms)" in tail.message
    beyond = arm(n, 0, with_slow_share(17, n, 0.03, 0.400))
    tail = evaluate(slo, step(old, beyond), 50).check("latency_tail")
    assert tail is not None
    assert tail.outcome is Outcome.FAIL


def test_error_rate_ratio_loosens_the_tolerance_for_high_base_rates() -> None:
    """Tolerance = max(old + increase, ratio x old): 10 % -> 13 % fails on +1 point alone, passes with ratio 1.5."""
    n = 50_000
    old, new = arm(n, n // 10), arm(n, n * 13 // 100)
    check = evaluate(GuardConfig(), step(old, new), 50).check("error_rate")
    assert check is not None
    assert check.outcome is Outcome.FAIL
    check = evaluate(GuardConfig(max_error_rate_ratio=1.5), step(old, new), 50).check("error_rate")
    assert check is not None
    assert check.outcome is Outcome.PASS
    assert check.numbers["max_error_rate_ratio"] == 1.5
    assert "or ×1.5" in check.message


def test_error_rate_ratio_never_tightens_the_absolute_tolerance() -> None:
    """At a low base rate the absolute increase still applies: 1 % -> 1.8 % is no failure even with ratio 1.5."""
    n = 50_000
    old = arm(n, n // 100)
    guard = GuardConfig(max_error_rate_ratio=1.5)
    check = evaluate(guard, step(old, arm(n, n * 18 // 1000)), 50).check("error_rate")
    assert check is not None
    assert check.outcome is not Outcome.FAIL
    check = evaluate(guard, step(old, arm(n, n * 3 // 100)), 50).check("error_rate")
    assert check is not None
    assert check.outcome is Outcome.FAIL


def test_sample_ratio_mismatch() -> None:
    """Units split 50/50 while 5 % is configured give MISMATCH, with the e-value and shares in the numbers."""
    old = arm(20_000, 0, units=range(5_000))
    new = arm(20_000, 0, units=range(5_000, 10_000))
    verdict = evaluate(GuardConfig(), step(old, new), 5)
    assert verdict.outcome is Outcome.MISMATCH
    check = verdict.check("sample_ratio")
    assert check is not None
    assert check.outcome is Outcome.MISMATCH
    assert check.numbers["new_units"] == 5_000
    assert check.numbers["old_units"] == 5_000
    assert check.numbers["expected_share"] == pytest.approx(0.05)
    assert check.numbers["observed_share"] == pytest.approx(0.5)
    assert check.numbers["e_value"] >= 1 / GuardConfig().srm_alpha
    assert check.numbers["srm_alpha"] == 0.001
    assert "sample-ratio mismatch" in verdict.message


def test_sample_ratio_threshold_is_one_over_srm_alpha() -> None:
    """A moderate imbalance (6.2 % of units instead of 5 %) is a mismatch exactly when e >= 1 / srm_alpha."""
    old = arm(20_000, 0, units=range(9_380))
    new = arm(20_000, 0, units=range(9_380, 10_000))
    e = sample_ratio_evalue(620, 9_380, 0.05)
    assert 1e3 < e < 1e5
    strict = GuardConfig(srm_alpha=0.9 / e)
    lenient = GuardConfig(srm_alpha=1.1 / e)
    check = evaluate(strict, step(old, new), 5).check("sample_ratio")
    assert check is not None
    assert check.outcome is Outcome.PASS
    assert check.numbers["e_value"] == pytest.approx(e)
    check = evaluate(lenient, step(old, new), 5).check("sample_ratio")
    assert check is not None
    assert check.outcome is Outcome.MISMATCH
    assert evaluate(GuardConfig(), step(old, new), 5).outcome is Outcome.MISMATCH


def test_consistent_split_has_no_mismatch() -> None:
    """Units split as configured pass the sample-ratio check; at 100 % (no split) it is not run."""
    old = arm(20_000, 0, units=range(9_500))
    new = arm(20_000, 0, units=range(9_500, 10_000))
    check = evaluate(GuardConfig(), step(old, new), 5).check("sample_ratio")
    assert check is not None
    assert check.outcome is Outcome.PASS
    assert evaluate(GuardConfig(), step(old, new), 100).check("sample_ratio") is None


def test_failure_outranks_mismatch() -> None:
    """A failing check decides the verdict even when the split is also broken."""
    old = arm(20_000, 100, units=range(5_000))
    new = arm(20_000, 4_000, units=range(5_000, 10_000))
    assert evaluate(GuardConfig(), step(old, new), 5).outcome is Outcome.FAIL


def test_sample_ratio_uses_the_unit_sample_not_the_scaled_estimate() -> None:
    """With sampled units the e-value is computed on the sample, so a balanced split stays consistent."""
    agg = Aggregator()
    for i in range(60_000):
        agg.record("r", 1, "new" if i % 2 else "old", True, 1e-6, f"u{i}", True, 0.0)
    snap = agg.snapshot("r")
    assert snap is not None
    assert snap.unit_sample_level >= 1
    check = evaluate(GuardConfig(), snap, 50).check("sample_ratio")
    assert check is not None
    assert check.outcome is Outcome.PASS
    assert check.numbers["new_units"] == snap.new.units


def test_custom_check_failure_fails_the_verdict() -> None:
    """A custom check's FAIL takes part like a built-in one and fails otherwise healthy data."""
    seen: list[tuple[StepSnapshot, float]] = []

    def business_metric(snapshot: StepSnapshot, percent: float) -> CheckResult:
        seen.append((snapshot, percent))
        return CheckResult("conversion", Outcome.FAIL, "conversion dropped 3 %", "custom", {"drop": 0.03})

    snap = step(healthy(20_000, seed=18), healthy(20_000, seed=19))
    verdict = evaluate(GuardConfig(), snap, 50, [business_metric])
    assert verdict.outcome is Outcome.FAIL
    assert verdict.message == "conversion dropped 3 %"
    assert seen == [(snap, 50)]
    check = verdict.check("conversion")
    assert check is not None
    assert check.numbers == {"drop": 0.03}


def test_raising_custom_check_is_inconclusive_not_an_exception() -> None:
    """A custom check that raises (or returns garbage) makes its result INCONCLUSIVE instead of breaking the guard."""

    def broken(snapshot: StepSnapshot, percent: float) -> CheckResult:
        raise ZeroDivisionError("oops")

    def sloppy(snapshot: StepSnapshot, percent: float) -> CheckResult:
        return "fine"  # type: ignore[return-value]

    snap = step(healthy(20_000, seed=20), healthy(20_000, seed=21))
    verdict = evaluate(GuardConfig(), snap, 50, [broken, sloppy])
    assert verdict.outcome is Outcome.INCONCLUSIVE
    raised = verdict.check("broken")
    assert raised is not None
    assert raised.outcome is Outcome.INCONCLUSIVE
    assert "ZeroDivisionError" in raised.message
    returned = verdict.check("sloppy")
    assert returned is not None
    assert returned.outcome is Outcome.INCONCLUSIVE
    assert "'fine'" in returned.message


def test_custom_checks_receive_an_empty_snapshot_without_data() -> None:
    """Without any observation a custom check still runs, on an empty snapshot."""
    got: list[StepSnapshot] = []

    def spy(snapshot: StepSnapshot, percent: float) -> CheckResult:
        got.append(snapshot)
        return CheckResult("spy", Outcome.PASS, "ok")

    evaluate(GuardConfig(), None, 5, [spy])
    assert got[0].old.requests == 0
    assert got[0].new.requests == 0


def test_every_check_carries_its_numbers_and_the_verdict_serialises() -> None:
    """Each built-in result names its test and alpha; Verdict.to_dict is plain, strict JSON."""
    old = healthy(20_000, seed=22) | {"unit_hashes": range(9_000)}
    new = healthy(20_000, seed=23, error_rate=0.03) | {"unit_hashes": range(9_000, 10_000)}
    verdict = evaluate(GuardConfig(), step(old, new), 10)
    assert isinstance(verdict, Verdict)
    for check in verdict.checks:
        assert check.test
        assert check.numbers
    by_name = {c.name: c for c in verdict.checks}
    assert {"error_rate", "latency", "latency_tail", "sample_ratio"} <= set(by_name)
    for name in ("error_rate", "latency", "latency_tail"):
        assert by_name[name].numbers["alpha"] == pytest.approx(0.01 / 3)
    assert {"threshold", "old_share_above", "new_share_above"} <= set(by_name["latency_tail"].numbers)
    assert {"old", "new", "ratio", "percentile"} <= set(by_name["latency"].numbers)
    data = verdict.to_dict()
    text = json.dumps(data, allow_nan=False)
    back = json.loads(text)
    assert back["outcome"] == "fail"
    assert back["new"] == {"requests": 20_000, "errors": 600, "units": 1_000}
    assert back["old"] == {"requests": 20_000, "errors": 200, "units": 9_000}
    assert [c["name"] for c in back["checks"]] == [c.name for c in verdict.checks]
    assert back["checks"][0]["numbers"]["new_errors"] == 600
    assert back["message"] == verdict.message


def test_counts_without_a_histogram_do_not_crash_the_guard() -> None:
    """Pre-aggregated counts merged without a latency histogram give a verdict, not a StopIteration."""
    agg = Aggregator()
    agg.add_counts("r", 1, "old", requests=1_000, errors=5, now=0.0)
    agg.add_counts("r", 1, "new", requests=1_000, errors=5, now=0.0)
    verdict = evaluate(GuardConfig(), agg.snapshot("r"), 50)
    assert verdict.outcome in set(Outcome)
