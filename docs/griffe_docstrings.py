"""A Griffe extension for the API reference (mkdocs.yml loads it).

bnlab's docstrings are Google style with two reST habits that Markdown does
not read: an ``Example:`` section (Griffe knows ``Examples:``; otherwise the
``>>>`` lines render as nested quotes) and Sphinx roles such as
``:func:`batch_norm```, rendered here as the code span they name.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


class DocstringHabits(griffe.Extension):
    """Rewrites ``Example:`` to ``Examples:`` and Sphinx roles to code spans,
    in every docstring of the package, before mkdocstrings parses them."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        todo: list[griffe.Object] = [pkg]
        while todo:
            obj = todo.pop()
            if obj.docstring is not None:
                text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
                obj.docstring.value = _ROLE.sub(r"`\1`", text)
            todo += [m for m in obj.members.values() if not m.is_alias]
