"""The checking process imports a model library while its ranks do, not after them.

A check whose ranks build the model (:func:`~pytest_gradckpt.ranks.launcher.build_on_ranks`) reads
it here from the ranks' skeleton (:func:`~pytest_gradckpt.ranks.rank_group.skeleton`), and
unpickling that imports the modules the model's classes live in. When this process had not
imported them (a factory that imports its library inside itself), the import was paid twice, one
after the other: on the rank while the factory ran, then here after the build. For a transformers
model that is ``transformers.modeling_utils``: 2.4 s on a 2-core CPU, about 5 s on an H200 host,
a third of the first 1.1B FSDP2 check there (issue 30).

Rank 0 reports, while it builds, each module of a library of :data:`OVERLAPPED` as its import
starts (:class:`ReportingImports`), and this process imports it at once (:func:`follow`): the
library's main module as soon as the rank begins the package, then each module the rank went on to
import (a model's own module, its generation mixins), so the two imports overlap.

This process need not wait for that word: the libraries a factory's code names
(:func:`named_libraries`) are imported as soon as the ranks are forked, by an :class:`Importer`
thread, which takes the rank's words too, so this process's main thread never stops receiving.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import queue
import sys
import threading
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from types import TracebackType

#: The model libraries this process imports as soon as a rank begins to: the package whose import
#: starts it -> the module to import here. Importing them changes nothing here but the time, as
#: unpickling a skeleton of their models imports them anyway; a module that patches others when
#: imported (unsloth) is never imported here on a rank's word. The package is the trigger because a
#: rank imports most of a library before the module a skeleton needs: on this project's 2-core CPU,
#: ``from transformers import LlamaConfig, LlamaForCausalLM`` spent 2.9 s in ``transformers.utils``
#: and the hub before ``transformers.modeling_utils`` was asked for, and 0.1 s after it. On an H200
#: host, waiting for ``modeling_utils`` left the first 1.1B FSDP2 check at 11.0-13.5 s; importing
#: only it, reading the skeleton still took 1.3-1.6 s there (the modules the model's class needs
#: beyond it), hence every module the rank imports is followed too.
OVERLAPPED = {"transformers": "transformers.modeling_utils", "peft": "peft"}


class ReportingImports(importlib.abc.MetaPathFinder):
    """While installed (a context manager), calls ``report(name)`` once when the import of a module
    of a package named in :data:`OVERLAPPED` (the package itself included) starts in this process.
    It finds nothing itself: every import goes on as before, and a report that fails is dropped
    (the import matters, the report does not).

    Example:
        >>> import importlib, sys
        >>> seen = []
        >>> with ReportingImports(seen.append, watched=["xml"]):
        ...     for name in ("xml.dom", "xml.dom.domreg", "colorsys"):
        ...         _ = sys.modules.pop(name, None)
        ...     _ = importlib.import_module("xml.dom.domreg"), importlib.import_module("colorsys")
        >>> seen  # the modules of the package, not those of another
        ['xml.dom', 'xml.dom.domreg']
    """

    def __init__(self, report: Callable[[str], None], watched: Collection[str] | None = None):
        self.report, self.watched = report, watched
        self.reported: set[str] = set()

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        watched = OVERLAPPED if self.watched is None else self.watched  # read now: tests widen it
        if fullname.partition(".")[0] in watched and fullname not in self.reported:
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
    """Import here each module of ``names`` (a rank began to import them) that belongs to a package
    of :data:`OVERLAPPED`, and for a package itself the module :data:`OVERLAPPED` names; returns the
    modules imported. Others are ignored. One that fails here is left alone: reading the skeleton
    meets the same error, where it is reported.

    Example:
        >>> follow(["os", "colorsys"])  # no module of a package of OVERLAPPED
        []
    """
    imported = []
    for name in names:
        main = OVERLAPPED.get(name.partition(".")[0])
        if main is None:
            continue
        for module in dict.fromkeys((main, name) if name in OVERLAPPED else (name,)):  # peft names itself
            with contextlib.suppress(Exception):
                importlib.import_module(module)
                imported.append(module)
    return imported


def named_libraries(factory: object, depth: int = 3) -> list[str]:
    """The packages of :data:`OVERLAPPED` that ``factory``'s code names (its imports), or that the
    functions it calls name, up to ``depth`` calls deep: functions of its module, of its closure and
    of a ``functools.partial``. A factory that is no Python function (a class) names none.

    Example:
        >>> def tiny_llama():
        ...     from transformers import LlamaConfig, LlamaForCausalLM
        ...     return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1))
        >>> def with_adapters():
        ...     import peft
        ...     return peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"]))
        >>> named_libraries(functools.partial(with_adapters)), named_libraries(len)
        (['peft', 'transformers'], [])
    """
    found: dict[str, None] = {}
    pending, seen = [(_function(factory), 0)], set()
    while pending:
        function, level = pending.pop()
        if function is None or id(function) in seen:
            continue
        seen.add(id(function))
        cells = [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
        for name in _names(function.__code__):
            if name.partition(".")[0] in OVERLAPPED:
                found[name.partition(".")[0]] = None
            elif level < depth:
                pending.append((_function(function.__globals__.get(name)), level + 1))
        pending.extend((_function(value), level + 1) for value in cells if level < depth)
    return sorted(found)


def _function(value: object) -> types.FunctionType | None:
    """The Python function behind ``value`` (a partial's, a method's), else None."""
    while isinstance(value, functools.partial):
        value = value.func
    value = getattr(value, "__func__", value)
    return value if isinstance(value, types.FunctionType) else None


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True


def _names(code: types.CodeType) -> Iterator[str]:
    """The global and imported names of ``code`` and of the code nested in it."""
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _names(constant)


class Importer:
    """A thread of this process that imports, in order, the libraries and modules it is told of
    (:meth:`want`, through :func:`follow`), while the main thread waits on the ranks; a context
    manager whose exit waits for the last import. Start one only after the ranks are forked: a
    process forked while a thread imports inherits that import's locks, held by nobody.

    Example:
        >>> with Importer() as importer:
        ...     importer.want(["colorsys"])  # no module of a package of OVERLAPPED: ignored
        >>> importer.imported
        []
    """

    def __init__(self) -> None:
        self.imported: list[str] = []
        self._wanted: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="gradckpt-overlapped-imports", daemon=True)

    def want(self, names: Iterable[str]) -> None:
        """Import ``names`` (see :func:`follow`) after those asked for before."""
        self._wanted.put(list(names))

    def _work(self) -> None:
        while (names := self._wanted.get()) is not None:
            self.imported.extend(follow(names))

    def finish(self) -> None:
        """Wait for every import asked for (the skeleton is read after them, in the main thread)."""
        if self._thread.is_alive():
            self._wanted.put(None)
            self._thread.join()

    def __enter__(self) -> Importer:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.finish()
