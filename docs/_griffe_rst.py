"""Griffe extension for the API reference: render the Sphinx roles of our docstrings as inline code.

The docstrings say ``:func:`plan_pruning``` and ``:class:`~peft_gates.pruning.PrunePlan``` (readable in
an editor and in ``help()``); without this, mkdocs would show the role markup literally. Targets become
``plan_pruning`` / ``PrunePlan`` in code font; a leading ``~`` keeps only the last dotted part, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` to `` `target` `` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
