"""The checking process imports a model library while its ranks do, not after them.

A check whose ranks build the model (:func:`~pytest_gradckpt.ranks.launcher.build_on_ranks`) reads
it here from the ranks' skeleton (:func:`~pytest_gradckpt.ranks.rank_group.skeleton`), and
unpickling that imports the modules the model's classes live in. When this process had not
imported them (a factory that imports its library inside itself), the import was paid twice, one
after the other: on the rank while the factory ran, then here after the build. For a transformers
model that is ``transformers.modeling_utils``: 2.4 s on a 2-core CPU, about 5 s on an H200 host,
a third of the first 1.1B FSDP2 check there (issue 30).

Rank 0 reports, while it builds, each import of a library of :data:`OVERLAPPED` as it starts
(:class:`ReportingImports`), and this process imports it at once (:func:`follow`): the two
imports overlap.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType

#: The model libraries this process imports as soon as a rank begins to: importing them changes
#: nothing here but the time, as unpickling a skeleton of their models imports them anyway. A
#: module that patches others when imported (unsloth) is never imported here on a rank's word.
#: Each is the module whose import dominates (measured: ``transformers.modeling_utils`` 2.36 s,
#: ``modeling_llama`` after it 0.09 s, ``peft`` 1.46 s, on this project's 2-core CPU).
OVERLAPPED = ("transformers.modeling_utils", "peft")


class ReportingImports(importlib.abc.MetaPathFinder):
    """While installed (a context manager), calls ``report(name)`` once when an import of a module
    named in :data:`OVERLAPPED` starts in this process. It finds nothing itself: every import goes
    on as before, and a report that fails is dropped (the import matters, the report does not).

    Example:
        >>> import importlib, sys
        >>> seen = []
        >>> with ReportingImports(seen.append, watched=["colorsys"]):
        ...     _ = sys.modules.pop("colorsys", None)
        ...     _ = importlib.import_module("colorsys")
        >>> seen
        ['colorsys']
    """

    def __init__(self, report: Callable[[str], None], watched: Sequence[str] | None = None):
        self.report, self.watched = report, watched
        self.reported: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        watched = OVERLAPPED if self.watched is None else self.watched  # read now: tests widen it
        if fullname in watched and fullname not in self.reported:
            self.reported.add(fullname)
            with contextlib.suppress(Exception):
                self.report(fullname)
        return None

    def __enter__(self) -> ReportingImports:
        sys.meta_path.insert(0, self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)


def follow(names: Iterable[str]) -> list[str]:
    """Import here the modules of ``names`` that :data:`OVERLAPPED` holds (a rank began to import
    them); returns those imported. One that fails here is left alone: reading the skeleton meets
    the same error, where it is reported.

    Example:
        >>> follow(["os.path", "peft.not_a_module"])  # neither is a library of OVERLAPPED
        []
    """
    imported = []
    for name in names:
        if name not in OVERLAPPED:
            continue
        with contextlib.suppress(Exception):
            importlib.import_module(name)
            imported.append(name)
    return imported
