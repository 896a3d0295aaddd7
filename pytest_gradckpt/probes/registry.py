"""Every probe a step runs, in one ordered table (:data:`PROBES`), and what iterates it: a run's
measurements to and from the host form that ships from a rank, merged across ranks, and the
metric keys and report columns the probes declare.

The order is the order probes are entered around a step (the first outermost; the step time
last, so it times the micro-batches only) and the order of their report columns. Adding a probe
is one module with a :class:`~pytest_gradckpt.probes.protocol.Probe` subclass and one line here;
:func:`using` adds probes for the code inside a ``with`` block only (a test's, or a check's own),
:func:`register_probe` / :func:`unregister_probe` for the rest of the context
(:class:`~pytest_gradckpt.pipeline.registries.Registry`, the idiom of every registry).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from pytest_gradckpt.probes.backward_calls import BackwardCallsProbe
from pytest_gradckpt.probes.compiled_regions import CompiledRegionsProbe
from pytest_gradckpt.probes.cuda import CudaProbe
from pytest_gradckpt.probes.recompute_counts import RecomputeProbe
from pytest_gradckpt.probes.memory import MemoryProbe
from pytest_gradckpt.probes.op_counts import OpCountProbe, UncountedOpsProbe
from pytest_gradckpt.probes.phases import DevicePhasesProbe, PhasesProbe
from pytest_gradckpt.probes.protocol import Column, Probe
from pytest_gradckpt.probes.saved_elsewhere import SavedElsewhereProbe
from pytest_gradckpt.probes.timing import StepTime
from pytest_gradckpt.probes.warnings import WarningsProbe
from pytest_gradckpt.pipeline.registries import Registry

Kinds = tuple[type[Probe[Any]], ...]

#: The probes of every step, in order.
PROBES: Kinds = (
    WarningsProbe,        # outermost: warnings raised while the others attach are kept too
    MemoryProbe,          # before the recompute counter's units report to it, and before saved_elsewhere
    CudaProbe,
    RecomputeProbe,
    BackwardCallsProbe,
    SavedElsewhereProbe,  # after MemoryProbe: its hook is ours, not "elsewhere"
    OpCountProbe,         # matmuls and FLOPs, forward and backward: what recompute costs
    CompiledRegionsProbe,  # checkpoint regions the compiled backward recomputes (no Python runs there)
    PhasesProbe,          # resident after forward, device and host
    StepTime,             # innermost: times the micro-batches only
)

_PROBES: Registry[type[Probe[Any]]] = Registry("probes", PROBES, name_of=lambda kind: kind.name)
#: Measurements that cost a Python call for every aten op of a step (a dispatch mode), which a check
#: takes only where a verdict reads them or :func:`asking` asks: ``"ops"`` (matmuls and FLOPs) and
#: ``"host_copies"`` (host tensors made during the step).
PER_OP = ("ops", "host_copies")
_asked: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("pytest_gradckpt_asked", default=frozenset())


def registered() -> Kinds:
    """The probes in force: :data:`PROBES`, plus any registered or :func:`using` added here.

    Example:
        >>> [kind.name for kind in registered()]
        ['warnings', 'memory', 'cuda', 'recompute', 'backward_calls', 'saved_elsewhere', 'ops', 'compiled_regions', 'phases', 'seconds']
    """
    return _PROBES.registered()


def _checked(chosen: Kinds) -> Kinds:
    names = [kind.name for kind in chosen]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"probe name(s) {', '.join(duplicated)} registered twice; give each probe its own name")
    undeclared = [kind.__name__ for kind in chosen if not dataclasses.is_dataclass(getattr(kind, "measurement", None))]
    if undeclared:
        raise ValueError(f"probe(s) {', '.join(undeclared)} declare no measurement: set measurement = <a dataclass>")
    return chosen


@contextlib.contextmanager
def using(*kinds: type[Probe[Any]], only: bool = False) -> Iterator[Kinds]:
    """Run the block with ``kinds`` added after the registered probes (``only``: exactly these).
    Nothing outlives the block; rank processes get the probes in force with each step.

    Example:
        >>> from pytest_gradckpt.probes.timing import StepTime
        >>> with using(StepTime, only=True) as kinds:
        ...     [kind.name for kind in kinds]
        ['seconds']
        >>> len(registered())
        10
    """
    _checked(tuple(kinds) if only else (*registered(), *kinds))
    with _PROBES.using(*kinds, only=only) as chosen:
        yield chosen


def register_probe(kind: type[Probe[Any]]) -> type[Probe[Any]]:
    """Add probe ``kind`` after those in force, for the rest of this context (a conftest's own probe).

    Example:
        >>> import dataclasses
        >>> from pytest_gradckpt.probes.protocol import Probe
        >>> @dataclasses.dataclass
        ... class Nothing:
        ...     seen: int = 0
        >>> class NothingProbe(Probe[Nothing]):
        ...     name, measurement = "nothing", Nothing
        ...     def read(self): return Nothing()
        >>> register_probe(NothingProbe).name, registered()[-1].name
        ('nothing', 'nothing')
        >>> unregister_probe("nothing") is NothingProbe, len(registered())
        (True, 10)
    """
    _checked((*registered(), kind))
    return _PROBES.register(kind)


def unregister_probe(name: str) -> type[Probe[Any]]:
    """Take the probe called ``name`` out of force for the rest of this context; the built-in
    probes (:data:`PROBES`) stay."""
    refusal = _PROBES.unregister_refusal(name, "unregister_probe", "probe", "probes")
    if refusal:
        raise ValueError(refusal)
    return _PROBES.unregister(name)


@contextlib.contextmanager
def asking(*measures: str) -> Iterator[None]:
    """Take ``measures`` (of :data:`PER_OP`) in every check inside the block, whether or not a verdict
    reads them (a planner reports every candidate's recomputed FLOPs).

    Example:
        >>> with asking("ops"):
        ...     [kind.__name__ for kind in lean(())][-4:]
        ['OpCountProbe', 'CompiledRegionsProbe', 'DevicePhasesProbe', 'StepTime']
    """
    unknown = sorted(set(measures) - set(PER_OP))
    if unknown:
        raise ValueError(f"asking({', '.join(map(repr, unknown))}): not a per-op measurement; pick from {PER_OP}")
    token = _asked.set(_asked.get() | frozenset(measures))
    try:
        yield
    finally:
        _asked.reset(token)


def lean(needed: Iterable[str]) -> Kinds:
    """The probes in force less the per-op work (:data:`PER_OP`) that neither ``needed`` nor
    :func:`asking` names: :class:`OpCountProbe` as :class:`UncountedOpsProbe` without ``"ops"``,
    :class:`PhasesProbe` as :class:`DevicePhasesProbe` without ``"host_copies"`` (same names, same
    metric keys). A check runs its steps under these.

    Example:
        >>> [kind.__name__ for kind in lean(["host_copies"])][-4:]
        ['UncountedOpsProbe', 'CompiledRegionsProbe', 'PhasesProbe', 'StepTime']
        >>> lean(["ops", "host_copies"]) == registered()
        True
    """
    wanted = _asked.get() | frozenset(needed)
    lighter = {OpCountProbe: None if "ops" in wanted else UncountedOpsProbe,
               PhasesProbe: None if "host_copies" in wanted else DevicePhasesProbe}
    return tuple(lighter.get(kind) or kind for kind in registered())


def metric_keys() -> frozenset[str]:
    """Every metric key the probes in force declare."""
    return frozenset(key for kind in registered() for key in kind.metric_keys)


def columns() -> tuple[Column, ...]:
    """The probes' report columns, in registry order."""
    return tuple(column for kind in registered() for column in kind.columns)


def to_host(measured: Mapping[str, Any]) -> dict[str, Any]:
    """A run's measurements (by probe name) as picklable host forms."""
    return {kind.name: kind.to_host(measured[kind.name]) for kind in registered() if kind.name in measured}


def from_host(forms: Mapping[str, Any]) -> dict[str, Any]:
    """Measurements back from :func:`to_host`'s forms."""
    return {kind.name: kind.from_host(forms[kind.name]) for kind in registered() if kind.name in forms}


def merge(mine: Mapping[str, Any], ranks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One run's measurements from every rank's (``mine``: this process's), probe by probe.

    Example:
        >>> from pytest_gradckpt.probes.cuda import CudaMemory
        >>> merge({"cuda": CudaMemory(1)}, [{"cuda": CudaMemory(1)}, {"cuda": CudaMemory(4)}])["cuda"]
        CudaMemory(cuda_peak_bytes=4, rank_cuda_peak_bytes=[1, 4])
    """
    merged = dict(mine)
    for kind in registered():
        if kind.name in mine and all(kind.name in rank for rank in ranks):
            merged[kind.name] = kind.merge(mine[kind.name], [rank[kind.name] for rank in ranks])
    return merged
