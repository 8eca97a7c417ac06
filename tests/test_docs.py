"""The documentation site builds strictly, and every example in it runs against the current code.

Conventions for examples in ``docs/**/*.md`` and ``README.md``, written as HTML comments on the line
(or lines) right before a fenced block:

* ``<!-- file: NAME -->``: the block is written to ``NAME`` in the page's scratch directory;
* ``<!-- no-test -->``: the ``python`` block is not run (for code that needs a server, say);
* ``<!-- check-output -->`` (or ``<!-- check-output exit=N -->``): the ``console`` block's
  ``$ canary-router ...`` commands are run and must print exactly the lines shown (and exit with N, 0 by default).

Every other ``python`` block runs, in page order, in one namespace per page, in a scratch directory.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
_CLI = [sys.executable, "-c", "from canary_router._entry import main; main()"]


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, its text, the marker comment before it, and its first line (1-based)."""

    lang: str
    code: str
    marker: str
    line: int


def code_blocks(text: str) -> list[Block]:
    """Return the fenced code blocks of a markdown text, each with the HTML-comment marker preceding it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    marker = ""
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if match is None:
            comment = _MARKER.match(lines[index])
            if comment is not None:
                marker = comment["body"]
            elif lines[index].strip():
                marker = ""
            index += 1
            continue
        indent, fence = match["indent"], match["fence"]
        start = index + 1
        body: list[str] = []
        index += 1
        while index < len(lines):
            stripped = lines[index].strip()
            if stripped.startswith(fence) and not stripped.strip(fence[0]):
                break
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        blocks.append(Block(match["lang"].lower(), "\n".join(body) + "\n", marker, start + 1))
        marker = ""
        index += 1
    return blocks


def pages() -> list[Path]:
    """Return every markdown page of the docs, and the README."""
    found = sorted(DOCS.rglob("*.md"))
    readme = ROOT / "README.md"
    return [*found, readme] if readme.exists() else found


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _run_console(block: Block, cwd: Path, where: str) -> None:
    """Run the ``$ canary-router ...`` commands of a console block and compare their output and exit code."""
    exit_match = re.search(r"exit=(\d+)", block.marker)
    expected_exit = int(exit_match[1]) if exit_match else 0
    commands: list[tuple[str, list[str]]] = []
    for line in block.code.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line.rstrip())
    assert commands, f"{where}: a check-output block without '$ ' commands"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    for command, expected in commands:
        args = shlex.split(command)
        assert args[0] == "canary-router", f"{where}: only canary-router commands are checked, got {command!r}"
        result = subprocess.run(
            [*_CLI, *args[1:]], cwd=cwd, capture_output=True, text=True, env=env, timeout=60, check=False
        )
        printed = [line.rstrip() for line in (result.stdout + result.stderr).splitlines()]
        while expected and not expected[-1]:
            expected.pop()
        assert printed == expected, f"{where}: output of {command!r}"
        assert result.returncode == expected_exit, f"{where}: exit code of {command!r}"


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    """``mkdocs build --strict`` succeeds: no broken link, anchor or nav entry, no page left out."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    config, site = str(ROOT / "mkdocs.yml"), str(tmp_path / "site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", config, "--site-dir", site],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "concepts" / "bucketing" / "index.html").exists()
    assert (tmp_path / "site" / "bucketing-vectors.json").exists()


def test_block_parser_reads_markers() -> None:
    """The example extractor sees languages, markers and bodies the way the conventions above describe."""
    text = (
        "Intro.\n\n<!-- file: a.toml -->\n\n```toml\nx = 1\n```\n\n"
        "<!-- no-test -->\n```python\nraise SystemExit\n```\n\ntext\n\n```python\ny = 2\n```\n"
    )
    assert code_blocks(text) == [
        Block("toml", "x = 1\n", "file: a.toml", 6),
        Block("python", "raise SystemExit\n", "no-test", 11),
        Block("python", "y = 2\n", "", 17),
    ]


@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every python example of a page runs in order in one namespace, and checked CLI output matches."""
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    for block in code_blocks(page.read_text(encoding="utf-8")):
        where = f"{_page_id(page)}:{block.line}"
        if block.marker.startswith("file:"):
            target = tmp_path / block.marker.removeprefix("file:").strip()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.code, encoding="utf-8")
        elif block.lang in ("python", "py") and block.marker != "no-test":
            padded = "\n" * (block.line - 1) + block.code  # tracebacks point at the markdown's own lines
            exec(compile(padded, str(page), "exec"), namespace)  # noqa: S102  # the docs' own examples
        elif block.lang == "console" and block.marker.startswith("check-output"):
            _run_console(block, tmp_path, where)
