"""The frozen v1 bucketing spec, checked against an independent MurmurHash3 written here.

    h      = MurmurHash3_x86_32(utf8(f"{salt}:{unit_id}"), seed=0), unsigned
    bucket = (h % 100) * 100 + (h // 100) % 100
    new    <=> bucket < round(percent * 100)

Statistical checks use deterministic ids (``f"user-{i}"``), so they pass or fail the same way on
every run; their critical values are fixed at p = 0.001.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canary_router
from canary_router.bucketing import BUCKETS, bucket_of_key, threshold

# --------------------------------------------------------------------------------------------
# An independent, pure-Python MurmurHash3_x86_32 (Austin Appleby's reference algorithm).
# --------------------------------------------------------------------------------------------

_MASK = 0xFFFFFFFF
_C1 = 0xCC9E2D51
_C2 = 0x1B873593


def _rotl32(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    h ^= h >> 16
    return h


def murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """Return the unsigned 32-bit MurmurHash3_x86_32 of ``data``."""
    h = seed & _MASK
    length = len(data)
    n_blocks = length // 4
    for i in range(n_blocks):
        k = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        k = (k * _C1) & _MASK
        k = _rotl32(k, 15)
        k = (k * _C2) & _MASK
        h ^= k
        h = _rotl32(h, 13)
        h = (h * 5 + 0xE6546B64) & _MASK
    tail = data[4 * n_blocks :]
    k = 0
    if len(tail) >= 3:
        k ^= tail[2] << 16
    if len(tail) >= 2:
        k ^= tail[1] << 8
    if len(tail) >= 1:
        k ^= tail[0]
        k = (k * _C1) & _MASK
        k = _rotl32(k, 15)
        k = (k * _C2) & _MASK
        h ^= k
    h ^= length & _MASK
    return _fmix32(h)


def spec_hash(salt: str, unit_id: object) -> int:
    """Return the v1 spec's ``h`` for a salt and a unit id, computed by the independent MurmurHash3."""
    return murmur3_x86_32(f"{salt}:{unit_id}".encode(), 0)


def spec_bucket(salt: str, unit_id: object) -> int:
    """Return the v1 spec's bucket, computed from the independent MurmurHash3."""
    h = spec_hash(salt, unit_id)
    return (h % 100) * 100 + (h // 100) % 100


# Published MurmurHash3_x86_32 vectors (widely reproduced from the reference SMHasher implementation).
PUBLISHED_VECTORS = [
    (b"", 0, 0x00000000),
    (b"", 1, 0x514E28B7),
    (b"", 0xFFFFFFFF, 0x81F16F39),
    (b"\x00\x00\x00\x00", 0, 0x2362F9DE),
    (b"\xff\xff\xff\xff", 0, 0x76293B50),
    (b"!Ce\x87", 0, 0xF55B516B),
    (b"!Ce\x87", 0x5082EDEE, 0x2362F9DE),
    (b"!Ce", 0, 0x7E4A8634),
    (b"!C", 0, 0xA0F7B07A),
    (b"!", 0, 0x72661CF4),
    (b"aaaa", 0x9747B28C, 0x5A97808A),
    (b"abc", 0, 0xB3DD93FA),
    (b"Hello, world!", 0x9747B28C, 0x24884CBA),
    (b"The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD),
]

N_IDS = 100_000
CHI2_1DF_P001 = 10.83
CHI2_99DF_P001 = 148.2


@cache
def _buckets(salt: str, n: int = N_IDS) -> tuple[int, ...]:
    return tuple(canary_router.bucket(salt, f"user-{i}") for i in range(n))


# --------------------------------------------------------------------------------------------
# The hash and the formula
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "seed", "expected"), PUBLISHED_VECTORS)
def test_reference_murmur_matches_published_vectors(data: bytes, seed: int, expected: int) -> None:
    """The test's own MurmurHash3 reproduces the published vectors, so it is a trustworthy oracle."""
    assert murmur3_x86_32(data, seed) == expected


unit_ids = st.one_of(
    st.text(max_size=40),
    st.text(min_size=200, max_size=2_000),
    st.integers(),
    st.uuids(),
    st.just(""),
)


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(salt=st.text(max_size=60), unit_id=unit_ids)
def test_bucket_follows_the_v1_formula(salt: str, unit_id: object) -> None:
    """bucket() equals (h % 100) * 100 + (h // 100) % 100 of the independent MurmurHash3 for any salt and id."""
    assert canary_router.bucket(salt, unit_id) == spec_bucket(salt, unit_id)


def test_bucket_follows_the_v1_formula_for_every_tail_length() -> None:
    """Keys of every length 0..80 bytes (all four tail cases, multi-byte UTF-8) bucket per the spec."""
    for length in range(81):
        for unit_id in ("x" * length, "é" * length, "😀" * (length // 4)):
            assert canary_router.bucket("", unit_id) == spec_bucket("", unit_id)
            assert canary_router.bucket("s" * length, unit_id) == spec_bucket("s" * length, unit_id)


def test_bucket_of_key_is_the_joined_form() -> None:
    """bucket_of_key() buckets the already joined "salt:unit" key exactly like bucket(salt, unit)."""
    for i in range(500):
        key = f"checkout:user-{i}"
        h = murmur3_x86_32(key.encode(), 0)
        assert bucket_of_key(key) == (h % 100) * 100 + (h // 100) % 100 == canary_router.bucket("checkout", f"user-{i}")


def test_documented_example_and_range() -> None:
    """The docstring example holds and every bucket lies in 0..9999 with all 10,000 values reachable."""
    assert spec_bucket("recommender", "user-42") == 9944 == canary_router.bucket("recommender", "user-42")
    assert BUCKETS == 10_000
    seen = set(_buckets("recommender"))
    assert min(seen) >= 0
    assert max(seen) <= 9_999
    assert len(seen) > 9_990  # 100k draws over 10k buckets: missing more than a handful means a bias


def test_salt_and_separator_are_part_of_the_key() -> None:
    """The salt changes the bucket, and the ':' separator is hashed (not just salt + id)."""
    assert canary_router.bucket("a", "b:c") == canary_router.bucket("a:b", "c")  # same joined key
    ids = [f"user-{i}" for i in range(200)]
    differing = sum(canary_router.bucket("recommender", u) != canary_router.bucket("checkout", u) for u in ids)
    assert differing > 190
    assert all(canary_router.bucket("ab", u) == spec_bucket("ab", u) for u in ids)
    assert any(canary_router.bucket("ab", u) != murmur3_bucket_without_separator("ab", u) for u in ids)


def murmur3_bucket_without_separator(salt: str, unit_id: str) -> int:
    """Return the bucket a wrong implementation that forgot the ':' would produce."""
    h = murmur3_x86_32(f"{salt}{unit_id}".encode(), 0)
    return (h % 100) * 100 + (h // 100) % 100


def test_lone_surrogate_is_rejected() -> None:
    """A unit id that cannot be encoded as UTF-8 raises UnicodeEncodeError, as documented, never a wrong bucket."""
    with pytest.raises(UnicodeEncodeError):
        canary_router.bucket("r", "\ud800")


def test_same_buckets_in_a_separate_process() -> None:
    """Another interpreter (different hash seed) computes the same buckets: nothing depends on process state."""
    ids: list[str | int] = [f"user-{i}" for i in range(1_000)]
    ids += ["", "ünïcødé", "用户-7", "😀" * 50, "x" * 5_000]
    ids += list(range(-50, 50))
    script = (
        "import json, sys\n"
        "import canary_router\n"
        "ids = json.load(sys.stdin)\n"
        "json.dump([canary_router.bucket('recommender', u) for u in ids], sys.stdout)\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(ids),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    remote = json.loads(result.stdout)
    assert remote == [canary_router.bucket("recommender", u) for u in ids]
    assert remote == [spec_bucket("recommender", u) for u in ids]


# --------------------------------------------------------------------------------------------
# Thresholds, monotonic expansion, Unleash equivalence
# --------------------------------------------------------------------------------------------

percents = st.floats(min_value=0, max_value=100, allow_nan=False)


@settings(max_examples=300, derandomize=True)
@given(unit_id=st.text(max_size=30) | st.integers(), p=percents, q=percents)
def test_expanding_never_moves_a_unit_back(unit_id: object, p: float, q: float) -> None:
    """A unit that is new at p % stays new at every q >= p (the threshold is monotone in the percentage)."""
    low, high = min(p, q), max(p, q)
    assert threshold(low) <= threshold(high)
    b = canary_router.bucket("recommender", unit_id)
    if b < threshold(low):
        assert b < threshold(high)


def test_cohorts_are_nested_across_every_step() -> None:
    """Cohorts from 0 % to 100 % (0.01 % steps near the start, coarser later) form a chain from nobody to everybody."""
    buckets = _buckets("recommender", 5_000)
    percents = [n / 100 for n in range(0, 50)] + [n / 100 for n in range(50, 10_001, 97)] + [100]
    previous: set[int] = set()
    for pct in percents:
        current = {i for i, b in enumerate(buckets) if b < threshold(pct)}
        assert previous <= current, pct
        previous = current
    assert not {i for i, b in enumerate(buckets) if b < threshold(0)}
    assert len(previous) == len(buckets)


@pytest.mark.parametrize(
    ("percent", "expected"),
    [(0, 0), (0.01, 1), (1, 100), (5, 500), (12.5, 1_250), (33.33, 3_333), (99.99, 9_999), (100, 10_000)],
)
def test_threshold_is_percent_times_one_hundred(percent: float, expected: int) -> None:
    """threshold(p) is round(p * 100): one bucket per 0.01 %, 10,000 at 100 %."""
    assert threshold(percent) == expected


@pytest.mark.parametrize(
    "bad",
    [math.nan, -math.nan, -0.01, -1, -math.inf, 100.0001, 101, math.inf, True, False, "5", None, [5]],
)
def test_threshold_rejects_non_percentages(bad: object) -> None:
    """threshold() raises ValueError for NaN, negatives, values above 100, bools and non-numbers."""
    with pytest.raises(ValueError, match="percent"):
        threshold(bad)  # type: ignore[arg-type]


@settings(max_examples=300, derandomize=True)
@given(salt=st.text(max_size=20), unit_id=st.text(max_size=30) | st.integers(), p=st.integers(0, 100))
def test_whole_percentages_match_unleash_flexible_rollout(salt: str, unit_id: object, p: int) -> None:
    """For integer p, bucket < p * 100 exactly when Unleash's h % 100 + 1 <= p (same cohort after migration)."""
    h = spec_hash(salt, unit_id)
    unleash_new = h % 100 + 1 <= p
    b = canary_router.bucket(salt, unit_id)
    assert (b < p * 100) == unleash_new
    assert (b < threshold(p)) == unleash_new


def test_whole_percentages_match_unleash_over_many_ids() -> None:
    """Over 20,000 ids and every integer percentage, the cohort equals Unleash's, id for id."""
    for i in range(20_000):
        unit = f"user-{i}"
        b = canary_router.bucket("checkout", unit)
        normalized = spec_hash("checkout", unit) % 100 + 1
        assert b // 100 + 1 == normalized  # bucket < p*100 <=> b // 100 < p <=> normalized <= p


@settings(max_examples=200, derandomize=True)
@given(salt=st.text(max_size=20), n=st.integers())
def test_unit_id_is_converted_with_str(salt: str, n: int) -> None:
    """An int id buckets like its str() form, so 42 and "42" are the same unit."""
    assert canary_router.bucket(salt, n) == canary_router.bucket(salt, str(n))


def test_unit_id_str_normalisation_for_other_objects() -> None:
    """42 and "42" share a bucket, and so do a UUID object and its text, since ids go through str()."""
    for salt in ("recommender", "", "ünï"):
        assert canary_router.bucket(salt, 42) == canary_router.bucket(salt, "42") == spec_bucket(salt, "42")
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert canary_router.bucket("r", u) == canary_router.bucket("r", str(u))


# --------------------------------------------------------------------------------------------
# Statistics (deterministic ids; fixed critical values at p = 0.001)
# --------------------------------------------------------------------------------------------


def _chi2(observed: list[int], expected: list[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))


@pytest.mark.parametrize("salt", ["recommender", "checkout"])
@pytest.mark.parametrize("percent", [1, 5, 10, 25, 50])
def test_share_in_the_canary_is_uniform(salt: str, percent: int) -> None:
    """Over 100,000 ids the share in the canary matches percent: 1-df chi-square below 10.83 (p = 0.001)."""
    buckets = _buckets(salt)
    inside = sum(1 for b in buckets if b < threshold(percent))
    p = percent / 100
    stat = _chi2([inside, N_IDS - inside], [N_IDS * p, N_IDS * (1 - p)])
    assert stat < CHI2_1DF_P001, (inside, stat)


@pytest.mark.parametrize("salt", ["recommender", "checkout"])
def test_bucket_distribution_is_uniform_over_100_bins(salt: str) -> None:
    """Buckets fill 100 equal bins evenly: 99-df chi-square below 148.2 (p = 0.001), for both digit halves."""
    buckets = _buckets(salt)
    coarse = [0] * 100
    fine = [0] * 100
    for b in buckets:
        coarse[b // 100] += 1  # the percent digit (h % 100)
        fine[b % 100] += 1  # the hundredths digit ((h // 100) % 100)
    expected = [N_IDS / 100] * 100
    assert _chi2(coarse, expected) < CHI2_99DF_P001
    assert _chi2(fine, expected) < CHI2_99DF_P001


def test_two_rollouts_pick_independent_cohorts() -> None:
    """Cohorts of "recommender" and "checkout" at 10 % overlap on ~1 % of ids (binomial 4-sigma; 2x2 chi-square)."""
    a = [b < threshold(10) for b in _buckets("recommender")]
    b = [b < threshold(10) for b in _buckets("checkout")]
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    neither = N_IDS - both - only_a - only_b

    p_both = 0.10 * 0.10
    sigma = math.sqrt(N_IDS * p_both * (1 - p_both))
    assert abs(both - N_IDS * p_both) < 4 * sigma, both

    row_a, row_not_a = both + only_a, only_b + neither
    col_b, col_not_b = both + only_b, only_a + neither
    observed = [both, only_a, only_b, neither]
    expected = [
        row_a * col_b / N_IDS,
        row_a * col_not_b / N_IDS,
        row_not_a * col_b / N_IDS,
        row_not_a * col_not_b / N_IDS,
    ]
    assert _chi2(observed, expected) < CHI2_1DF_P001


def test_statistics_would_catch_a_biased_hash() -> None:
    """The uniformity check has teeth: a bucket that ignores the hundredths digit fails the fine-bin test."""
    fine = [0] * 100
    for b in _buckets("recommender"):
        fine[(b // 100) % 50] += 1  # a deliberately broken "hundredths" using only half the bins
    assert _chi2(fine, [N_IDS / 100] * 100) > CHI2_99DF_P001
