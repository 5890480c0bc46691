"""Griffe extension for the API reference: render reST markup as Markdown.

The docstrings use Sphinx roles such as ``:class:`~pkg.Name``` and end a
paragraph with ``::`` before a literal block. The API reference is
Markdown, so each role becomes a code span (``Name`` when the target
starts with ``~``, else the whole target), and ``::`` becomes ``:``; the
indented block after it is a Markdown code block already.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_LITERAL_BLOCK_MARKER = re.compile(r"::\n\n")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|data|mod|obj|const):`(~?)([^`]+)`")


def _as_code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class ReSTMarkupAsMarkdown(griffe.Extension):
    """Rewrite the Sphinx roles and literal block markers of every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_as_code, obj.docstring.value)
            obj.docstring.value = _LITERAL_BLOCK_MARKER.sub(":\n\n", text)
