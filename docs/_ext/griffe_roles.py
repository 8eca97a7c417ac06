"""Render the reST markup of the package's docstrings as Markdown for the API reference.

The docstrings are written for readers of the source and of ``help()``: Sphinx roles
(``:class:`~canary_router.Router```), ``::`` literal blocks and ``>>>`` examples. This Griffe extension
turns them into Markdown code spans and fenced blocks when the reference is built; the source is unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const|term):`~?([^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match[1]
    if "<" in target and target.endswith(">"):  # :class:`text <target>`
        target = target.split("<", 1)[0].strip()
    elif match[0].split("`", 1)[1].startswith("~"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def markdown(text: str) -> str:
    """Return ``text`` with roles as code spans, ``::`` blocks and ``>>>`` examples as fenced code."""
    text = _ROLE.sub(_role, text)
    out: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.rstrip()
        if stripped.endswith("::"):
            lead = stripped[:-2].rstrip()
            if lead:
                out.append(lead + ":")
            index += 1
            while index < len(lines) and not lines[index].strip():
                index += 1
            block: list[str] = []
            while index < len(lines) and (not lines[index].strip() or lines[index].startswith((" ", "\t"))):
                block.append(lines[index])
                index += 1
            while block and not block[-1].strip():
                block.pop()
            indent = min((len(b) - len(b.lstrip()) for b in block if b.strip()), default=0)
            out.extend(["", "```text", *(b[indent:] for b in block), "```", ""])
            continue
        if stripped.lstrip().startswith(">>>"):
            example: list[str] = []
            while index < len(lines) and lines[index].strip():
                example.append(lines[index].strip())
                index += 1
            out.extend(["```pycon", *example, "```"])
            continue
        out.append(line)
        index += 1
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Walk the package once it is loaded."""
        seen: set[int] = set()
        stack: list[Any] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.is_alias or id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = markdown(obj.docstring.value)
            stack.extend(obj.members.values())
