"""The frozen v1 bucketing spec. Do not change: a new algorithm arrives under a new name.

::

    h      = MurmurHash3_x86_32(utf8(f"{salt}:{unit_id}"), seed=0), unsigned
    bucket = (h % 100) * 100 + (h // 100) % 100          # 0 .. 9999
    new    <=> bucket < round(percent * 100)
"""

from __future__ import annotations

import math

import mmh3

__all__ = ["BUCKETS", "SPEC_VERSION", "bucket", "bucket_of_key", "threshold"]

SPEC_VERSION = "v1"
"""The name of this bucketing algorithm. Buckets computed by it never change."""

BUCKETS = 10_000
"""Number of buckets: one bucket is 0.01 % of the units."""

_hash = mmh3.hash


def bucket_of_key(key: str) -> int:
    """Return the v1 bucket (0..9999) of an already joined ``"{salt}:{unit_id}"`` key.

    Raises :class:`UnicodeEncodeError` for strings that are not valid UTF-8 (lone surrogates).
    """
    h = _hash(key.encode("utf-8"), 0, False)
    return (h % 100) * 100 + (h // 100) % 100


def bucket(salt: str, unit_id: object) -> int:
    """Return the v1 bucket (0..9999) of ``unit_id`` under ``salt``.

    ``unit_id`` is converted with :func:`str`; ``salt`` is the rollout's salt (its name by
    default). The unit is in the new version at ``percent`` when ``bucket < round(percent * 100)``.

    >>> bucket("recommender", "user-42")
    9944
    """
    return bucket_of_key(f"{salt}:{unit_id}")


def threshold(percent: float) -> int:
    """Return the bucket threshold for ``percent`` (0..100): units with ``bucket < threshold`` get "new"."""
    if not isinstance(percent, (int, float)) or isinstance(percent, bool) or math.isnan(percent):
        raise ValueError(f"percent must be a number in [0, 100], got {percent!r}")
    if percent < 0 or percent > 100:
        raise ValueError(f"percent must be in [0, 100], got {percent!r}")
    return round(percent * 100)
