"""Packaging promises: a light core, typed, lint-clean, the README and CI in step."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def test_core_import_pulls_in_no_extra() -> None:
    """Importing canary_router loads no framework, CLI, YAML, Redis or test library."""
    code = (
        "import sys, canary_router, canary_router.testing\n"
        "banned = ['click', 'rich', 'yaml', 'redis', 'django', 'starlette', 'flask', 'pytest', 'hypothesis']\n"
        "print(','.join(sorted(m for m in banned if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_public_names_are_exported_and_documented() -> None:
    """Every name in canary_router.__all__ exists and has a docstring."""
    import canary_router

    for name in canary_router.__all__:
        obj = getattr(canary_router, name)
        if name in ("__version__", "Variant"):
            continue
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_py_typed_marker_ships() -> None:
    """The package carries py.typed so type checkers use its annotations."""
    assert (ROOT / "src" / "canary_router" / "py.typed").exists()


def readme_commands() -> list[str]:
    """Return the shell commands of the README's code blocks."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)\n```", text, flags=re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    """The README gives two commands (demo, tests) and .ci/run runs the test command verbatim."""
    commands = readme_commands()
    assert len(commands) == 2
    demo, tests = commands
    assert "canary-router demo" in demo
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci


def _tool(name: str) -> str:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed (it is part of the 'test' extra)")
        pytest.skip(f"{name} is not installed; pip install -e '.[test]'")
    return exe


def test_ruff_is_clean() -> None:
    """Ruff check and ruff format --check pass on the whole tree."""
    ruff = _tool("ruff")
    paths = ["src", "tests", "bench", "noxfile.py", "docs", "integrations"]
    paths = [p for p in paths if (ROOT / p).exists()]
    check = subprocess.run([ruff, "check", *paths], cwd=ROOT, capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([ruff, "format", "--check", *paths], cwd=ROOT, capture_output=True, text=True, check=False)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict_is_clean() -> None:
    """Mypy --strict (configured in pyproject.toml) reports no error in src/."""
    mypy = _tool("mypy")
    result = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
