"""The canary-router command line: validate, bucket, demo, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from canary_router import bucket

GOOD = """
[rollouts.recommender]
steps = [5, 10, 25, 50, 100]
bake_time = "1h"
"""

BAD = """
[rollouts.recommender]
stikiness = "user_id"
steps = [5, 25, 20]
bake_time = "soon"
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed canary-router entry point."""
    exe = shutil.which("canary-router", path=str(Path(sys.executable).parent))
    assert exe is not None, "the canary-router console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)


def test_validate_accepts_a_good_file(tmp_path: Path) -> None:
    """Validate exits 0 and names the rollouts of a valid file."""
    path = tmp_path / "canary.toml"
    path.write_text(GOOD)
    result = run("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "recommender" in result.stdout


def test_validate_prints_every_error_and_exits_1(tmp_path: Path) -> None:
    """Validate lists every problem (not just the first) with its path, and exits 1."""
    path = tmp_path / "canary.toml"
    path.write_text(BAD)
    result = run("validate", str(path))
    assert result.returncode == 1
    assert "rollouts.recommender.stikiness: unknown key (did you mean 'stickiness'?)" in result.stdout
    assert "rollouts.recommender.steps[2]" in result.stdout
    assert "rollouts.recommender.bake_time" in result.stdout
    assert "3 problems" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_validate_json_output(tmp_path: Path) -> None:
    """Validate --json reports each file's errors as data for scripts."""
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(GOOD)
    bad.write_text(BAD)
    result = run("validate", "--json", str(good), str(bad))
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data[0] == {"file": str(good), "ok": True, "rollouts": ["recommender"], "segments": []}
    assert data[1]["ok"] is False
    assert {e["path"] for e in data[1]["errors"]} == {
        "rollouts.recommender.stikiness",
        "rollouts.recommender.steps[2]",
        "rollouts.recommender.bake_time",
    }


def test_validate_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    """A missing file is reported in one line, without a traceback."""
    result = run("validate", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "cannot read the file" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_bucket_command_prints_spec_buckets() -> None:
    """The bucket command prints bucket(salt, id) for each id."""
    result = run("bucket", "recommender", "user-1", "user-2")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"user-1\t{bucket('recommender', 'user-1')}",
        f"user-2\t{bucket('recommender', 'user-2')}",
    ]


def test_demo_healthy_completes_every_step() -> None:
    """The healthy demo is promoted 5 → 10 → 25 → 50 → 100 % by the controller and completes, sticky throughout."""
    result = run("demo", "--users", "3000", "--seed", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for target in ("10", "25", "50", "100"):
        assert f"promoted to {target} %" in out
    assert "final phase: completed" in out
    assert "nobody who got the new version went back to the old one" in out


def test_demo_faulty_is_rolled_back_with_numbers() -> None:
    """The faulty demo is rolled back automatically, and the reason carries the error rates and bounds."""
    result = run("demo", "--scenario", "faulty", "--seed", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "rollback: guard failed at" in out
    assert "exceeds the tolerance (1 pp)" in out
    assert "final phase: rolled_back" in out


def test_usage_error_exits_2() -> None:
    """An unknown command is a usage error (exit 2)."""
    result = run("no-such-command")
    assert result.returncode == 2


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help(argv: list[str]) -> None:
    """--version and --help work."""
    result = run(*argv)
    assert result.returncode == 0
    assert "canary-router" in result.stdout or "Usage" in result.stdout


def test_controller_command_ticks_and_reports(tmp_path: Path) -> None:
    """canary-router controller runs the given number of ticks and prints each action as JSON."""
    path = tmp_path / "canary.toml"
    path.write_text(GOOD)
    result = run("controller", str(path), "--ticks", "2", "--interval", "0.05", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["rollout"], line["action"]) for line in lines] == [("recommender", "wait")] * 2
    assert "waiting for a passing verdict at 5 %" in lines[0]["reason"]
