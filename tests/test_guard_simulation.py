"""A fast, seeded subset of the guard simulation (the full run is ``nox -s simulate``)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

guard_simulation = pytest.importorskip("guard_simulation", reason="numpy is part of the 'test' extra")

SEED = 11


def test_aa_has_no_false_rollbacks_while_the_naive_rule_flaps() -> None:
    """With equal error rates the guard rolls back (almost) never; the naive 1 pp rule often does."""
    summary = guard_simulation.summarise("aa", guard_simulation.run_scenario("aa", 40, SEED, workers=1))
    assert summary["rolled_back"] <= 1
    assert summary["naive_rollback_rate"] >= 0.05
    assert summary["ever_passed"] >= 36  # healthy rollouts do pass (and would be promoted)


def test_regression_is_rolled_back() -> None:
    """A 0.5 % → 2.5 % error regression is rolled back in nearly every run, by the error-rate check."""
    summary = guard_simulation.summarise("regression", guard_simulation.run_scenario("regression", 30, SEED, 1))
    assert summary["rollback_rate"] >= 0.9
    assert summary["ever_passed"] == 0  # never promotable
    assert set(summary["checks"]) == {"error_rate"}
    assert summary["p90_requests"] <= 200_000


def test_catastrophe_is_caught_within_ten_new_requests() -> None:
    """A new path that always fails is rolled back by the circuit breaker within 10 new-version requests."""
    summary = guard_simulation.summarise("catastrophe", guard_simulation.run_scenario("catastrophe", 40, SEED, 1))
    assert summary["rollback_rate"] == 1.0
    assert summary["max_new_requests"] <= 10
    assert set(summary["checks"]) == {"circuit_breaker"}


def test_slowdown_is_caught() -> None:
    """A 1.5× slowdown of every new request is rolled back by a latency check."""
    summary = guard_simulation.summarise("latency", guard_simulation.run_scenario("latency", 15, SEED, 1))
    assert summary["rollback_rate"] == 1.0
    assert summary["ever_passed"] == 0
    assert set(summary["checks"]) <= {"latency", "latency_tail"}


def test_tail_regression_is_caught_most_of_the_time() -> None:
    """2 % extra new requests slower than the old p99 are rolled back by the tail check in most runs."""
    summary = guard_simulation.summarise("tail", guard_simulation.run_scenario("tail", 20, SEED, 1))
    assert summary["rollback_rate"] >= 0.5
    assert summary["ever_passed"] == 0  # not caught yet is not promoted either
    assert set(summary["checks"]) == {"latency_tail"}


def test_healthy_rollout_completes_on_schedule() -> None:
    """A healthy rollout walks 5 → 10 → 25 → 50 → 100 %, each step lasting its bake time (10 min) or a little more."""
    result = guard_simulation.schedule_run(SEED, 200.0, 4 * 3600, "10m", "1h")
    assert [action for _, action, _ in result.transitions] == ["promote"] * 5
    assert result.final_phase == "completed"
    times = [0.0] + [t for t, _, _ in result.transitions]
    steps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(600 <= step <= 1200 for step in steps), steps


def test_low_traffic_waits_then_pauses_with_a_reason() -> None:
    """At 10 requests/s the guard neither promotes nor rolls back; it pauses at max_bake_time with a reason."""
    result = guard_simulation.schedule_run(SEED, 10.0, 2 * 3600, "10m", "20m")
    assert [action for _, action, _ in result.transitions] == ["pause"]
    when, _, reason = result.transitions[0]
    assert round(when / 60) == 20
    assert "inconclusive after 20 min" in reason
