r"""A griffe extension for the API pages: read ``Example:`` as an examples section.

The project's docstrings title their doctests ``Example:`` (singular). Griffe's Google
parser knows only ``Examples:``, and would render the doctest as Markdown (``>>>`` as
nested quotes, ``[...]`` output as cross-references). This renames the title before
parsing, so the pages show the doctests as code; the docstrings themselves stay as
they are, and pytest runs them unchanged.

Example:
    >>> as_examples_section("Adds.\n\n    Example:\n        add(1, 1) == 2")
    'Adds.\n\n    Examples:\n        add(1, 1) == 2'
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


def as_examples_section(docstring: str) -> str:
    """``docstring`` with each line that is exactly ``Example:`` retitled ``Examples:``."""
    return _SINGULAR_TITLE.sub(r"\1Examples:", docstring)


class ExampleSections(griffe.Extension):
    """Retitles every docstring's ``Example:`` section as soon as griffe reads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = as_examples_section(obj.docstring.value)
