"""The published golden vectors of the v1 bucketing spec hold for the library and for the documented reference code."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mmh3
import pytest

import canary_router
from canary_router import Rollout, Router

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "docs" / "bucketing-vectors.json"
PAGE = ROOT / "docs" / "concepts" / "bucketing.md"


def load_vectors() -> list[dict[str, Any]]:
    """Return the vectors of docs/bucketing-vectors.json, after checking the file's header."""
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert data["spec"] == "v1"
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def reference_namespace() -> dict[str, Any]:
    """Execute the reference implementation code block of docs/concepts/bucketing.md and return its names."""
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(encoding="utf-8"), flags=re.S | re.M)
    (source,) = [block for block in blocks if "def murmur3_x86_32" in block]
    assert "import mmh3" not in source, "the reference must be self-contained"
    assert "canary_router" not in source, "the reference must be self-contained"
    namespace: dict[str, Any] = {}
    exec(compile(source, str(PAGE), "exec"), namespace)  # noqa: S102  # our own documentation's code
    return namespace


VECTOR_LIST = load_vectors()


def _vector_id(vector: dict[str, Any]) -> str:
    unit = vector["unit_id"]
    shown = unit if len(unit) <= 24 else f"{unit[:8]}...({len(unit)} chars)"
    return f"{vector['salt']!r}:{shown!r}"


def test_vector_file_is_large_and_well_formed() -> None:
    """The file has at least 30 vectors, each with string inputs, a 32-bit hash and a bucket in range."""
    assert len(VECTOR_LIST) >= 30
    for vector in VECTOR_LIST:
        assert set(vector) <= {"salt", "unit_id", "hash", "bucket", "note"}
        assert isinstance(vector["salt"], str)
        assert isinstance(vector["unit_id"], str)
        assert 0 <= vector["hash"] < 2**32
        assert 0 <= vector["bucket"] < 10_000
        assert vector["bucket"] == (vector["hash"] % 100) * 100 + (vector["hash"] // 100) % 100


def test_vectors_cover_the_documented_cases() -> None:
    """Unicode, empty ids and salts, very long ids, numeric ids and a salt with a colon are all represented."""
    units = [v["unit_id"] for v in VECTOR_LIST]
    salts = {v["salt"] for v in VECTOR_LIST}
    assert "" in units
    assert "" in salts
    assert max(len(u) for u in units) >= 10_000
    assert any(len(u) == 1_000 for u in units)
    assert any(any(ord(c) > 0xFFFF for c in u) for u in units)  # emoji: 4-byte UTF-8
    assert any(any("\u4e00" <= c <= "\u9fff" for c in u) for u in units)  # CJK
    assert any(any("\u0590" <= c <= "\u06ff" for c in u) for u in units)  # Hebrew / Arabic (RTL)
    assert any(u.isdigit() for u in units)
    assert {"recommender", "checkout", "auth-flow"} <= salts
    assert any(":" in s and s != ":" for s in salts)


@pytest.mark.parametrize("vector", VECTOR_LIST, ids=_vector_id)
def test_library_bucket_matches_vector(vector: dict[str, Any]) -> None:
    """``canary_router.bucket`` and mmh3 reproduce the vector's bucket and unsigned hash."""
    key = f"{vector['salt']}:{vector['unit_id']}".encode()
    assert mmh3.hash(key, 0, False) == vector["hash"]
    assert canary_router.bucket(vector["salt"], vector["unit_id"]) == vector["bucket"]


def test_reference_implementation_reproduces_every_vector() -> None:
    """The pure-Python reference code on the bucketing page computes every vector's hash and bucket."""
    namespace = reference_namespace()
    murmur: Callable[[bytes], int] = namespace["murmur3_x86_32"]
    bucket: Callable[[str, object], int] = namespace["bucket"]
    for vector in VECTOR_LIST:
        key = f"{vector['salt']}:{vector['unit_id']}".encode()
        assert murmur(key) == vector["hash"], _vector_id(vector)
        assert bucket(vector["salt"], vector["unit_id"]) == vector["bucket"], _vector_id(vector)


def test_reference_murmur_agrees_with_mmh3_on_every_tail_length() -> None:
    """The reference MurmurHash3 equals mmh3 on random bytes of every length 0..64 (all four tail cases)."""
    murmur: Callable[[bytes], int] = reference_namespace()["murmur3_x86_32"]
    rng = random.Random(20240601)
    for length in range(65):
        for _ in range(5):
            data = rng.randbytes(length)
            assert murmur(data) == mmh3.hash(data, 0, False), data


def test_router_hot_path_agrees_with_vectors() -> None:
    """``Router.decide`` (which inlines the formula) reports the vector's bucket for every usable vector."""
    checked = 0
    for index, vector in enumerate(VECTOR_LIST):
        if not vector["salt"] or not vector["unit_id"]:
            continue  # config salts are non-empty, and the router treats "" as no unit
        router = Router(rollouts=[Rollout(name=f"r{index}", salt=vector["salt"], steps=(50.0, 100.0))])
        decision = router.decide(f"r{index}", {"user_id": vector["unit_id"]})
        assert (decision.bucket, decision.unit) == (vector["bucket"], vector["unit_id"]), _vector_id(vector)
        assert decision.variant == ("new" if vector["bucket"] < 5000 else "old")
        checked += 1
    assert checked >= 30


def test_numeric_vectors_hold_for_integers() -> None:
    """A vector whose unit id is the ``str()`` of an integer gives the same bucket for the integer itself."""
    numeric = [v for v in VECTOR_LIST if re.fullmatch(r"-?\d+", v["unit_id"])]
    assert len(numeric) >= 3
    for vector in numeric:
        assert canary_router.bucket(vector["salt"], int(vector["unit_id"])) == vector["bucket"]


def test_docs_table_lists_the_vectors_in_order() -> None:
    """The table on the bucketing page shows the same hashes and buckets as the JSON file, in the same order."""
    text = PAGE.read_text(encoding="utf-8")
    table = text.split("<!-- vectors:start -->", 1)[1].split("<!-- vectors:end -->", 1)[0]
    rows = [line for line in table.strip().splitlines()[2:] if line.startswith("|")]
    shown = [tuple(int(cell.strip()) for cell in row.split("|")[3:5]) for row in rows]
    assert shown == [(v["hash"], v["bucket"]) for v in VECTOR_LIST]
