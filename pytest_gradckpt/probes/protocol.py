"""The probe protocol: one class says everything about one probe.

A probe declares

- what it measures: its ``measurement``, a dataclass of typed fields whose defaults are the
  value of a run it never saw (:meth:`Probe.empty`);
- how it attaches to a step: it is built on the step's private copy before any strategy
  (:meth:`Probe.__init__`), then is entered around the whole step (:meth:`Probe.around_step`)
  and around its micro-batches (:meth:`Probe.around_batches`), and read after it (:meth:`Probe.read`);
- how its measurement ships from a rank: :meth:`Probe.to_host` / :meth:`Probe.from_host` (a
  picklable host form) and :meth:`Probe.merge` (the ranks' measurements into one);
- what it adds to the evidence (:meth:`Probe.evidence`: fields of
  :class:`~pytest_gradckpt.pipeline.verdicts.Evidence` the rules read) and to a result's metrics
  (:meth:`Probe.metrics`, only the keys it declares in ``metric_keys``). Both read the evidence
  through :class:`ProbeEvidence`, the part of it declared here, so no probe imports the verdicts
  (which import the probes);
- its report columns (``columns``).

The probes of a step are those of :mod:`pytest_gradckpt.probes.registry`, in its order: the
order they are entered in (the first is outermost) and the order of their columns. A run keeps
each measurement under its probe's name (:attr:`pytest_gradckpt.pipeline.runs.Run.measured`), read back
typed with ``run.of(SomeProbe)``. Rules stay in :data:`pytest_gradckpt.pipeline.verdicts.RULES`. See
docs/probes.md for adding one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

M = TypeVar("M")
P = TypeVar("P", bound="Probe[Any]")


class Measured(Protocol):
    """A run as the probes read it: each probe's measurement (:class:`~pytest_gradckpt.pipeline.runs.Run`)."""

    def of(self, kind: type[Probe[M]]) -> M:
        """What probe ``kind`` measured in this run."""


class MeasuredBaseline(Protocol):
    """A baseline as the probes read it (:class:`~pytest_gradckpt.pipeline.baselines.Baseline`)."""

    @property
    def run(self) -> Measured:
        """The baseline's own run."""

    @property
    def measures_cost(self) -> bool:
        """Whether its memory and time are a fair reference for the strategy's."""


class ProbeEvidence(Protocol):
    """What a probe reads of one strategy's evidence (:class:`~pytest_gradckpt.pipeline.verdicts.Evidence`
    satisfies it): declared here so the probes need not import the verdicts, which import them."""

    @property
    def run(self) -> Measured:
        """The strategy's run."""

    @property
    def baseline(self) -> MeasuredBaseline:
        """The no-checkpoint run it is judged against."""

    @property
    def compared(self) -> bool:
        """Whether the run completed and was compared with the baseline."""

    @property
    def recomputed(self) -> int:
        """Checkpoint units seen recomputed."""

    @property
    def checkpointable(self) -> int:
        """Checkpoint units the strategy could checkpoint."""

    @property
    def activation_reduction(self) -> float | None:
        """Saved-activation bytes saved against the baseline, as a fraction (None: not measured)."""

    @property
    def cuda_reduction(self) -> float | None:
        """CUDA peak bytes saved against the baseline, as a fraction (None: not measured)."""


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the results table: its header, the metrics it shows (declared, so a
    mistyped key is an error), and how their values (None when absent) become the cell.

    Example:
        >>> Column("recomp", ("recomputed_layers", "layers"), lambda done, total: f"{done}/{total}").cell(1, 3)
        '1/3'
    """

    header: str
    keys: tuple[str, ...]
    cell: Callable[..., str]


@dataclasses.dataclass
class ProbeStep:
    """What probes see of one step: the private copy, with names as in the original model.

    ``trainable`` is filled once the copy is wrapped (for parallelism), just before the step;
    ``probes`` holds the step's probes by name, so one may read another (:meth:`probe`).
    """

    model: nn.Module
    device: torch.device
    layer_names: list[str]
    layers: list[nn.Module]
    #: original module names by object id, taken before any strategy or wrapper
    module_names: dict[int, str]
    trainable: list[tuple[str, nn.Parameter]] = dataclasses.field(default_factory=list)
    probes: dict[str, Probe[Any]] = dataclasses.field(default_factory=dict)

    def probe(self, kind: type[P]) -> P:
        """This step's instance of probe ``kind``."""
        found = self.probes.get(kind.name)
        if not isinstance(found, kind):
            raise LookupError(f"probe {kind.name!r} is not attached to this step (registered: {', '.join(self.probes)})")
        return found


#: a probe's verdict rule: the evidence and the check's limits (``verdicts.Limits``) in, why the run
#: fails (or None) out
ProbeRule = Callable[[ProbeEvidence, Any], "str | None"]


class Probe(ABC, Generic[M]):
    """One measurement of a step. A subclass is one probe; an instance belongs to one step.

    Example (a complete probe: how many forward calls the copy's modules made):
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class Calls:
        ...     forward_calls: int = 0
        >>> class ForwardCalls(Probe[Calls]):
        ...     name = "forward_calls"
        ...     measurement = Calls
        ...     metric_keys = ("forward_calls",)
        ...     def __init__(self, step):
        ...         super().__init__(step)
        ...         self.seen = 0
        ...         for module in step.model.modules():
        ...             module.register_forward_hook(self.count)
        ...     def count(self, *args):
        ...         self.seen += 1
        ...     def read(self):
        ...         return Calls(self.seen)
        ...     @classmethod
        ...     def metrics(cls, evidence):
        ...         return {"forward_calls": evidence.run.of(cls).forward_calls}
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> step = ProbeStep(net, torch.device("cpu"), [], [], {})
        >>> probe = ForwardCalls(step)
        >>> _ = net(torch.ones(1, 2))
        >>> probe.read(), ForwardCalls.from_host(ForwardCalls.to_host(probe.read()))
        (Calls(forward_calls=3), Calls(forward_calls=3))
    """

    #: the key of its measurement in a run, and in what ships from a rank
    name: ClassVar[str]
    #: what it measures: a dataclass whose field defaults are a run it never saw
    measurement: ClassVar[type[Any]]
    #: every metric key :meth:`metrics` may write (a key not declared here is an error)
    metric_keys: ClassVar[tuple[str, ...]] = ()
    #: its columns in the results table, in the order shown
    columns: ClassVar[tuple[Column, ...]] = ()
    #: verdict rules this probe brings, ``(outcome, rule)``: ``rule(evidence, limits)`` returns why
    #: the run fails, or None. They join :data:`pytest_gradckpt.pipeline.verdicts.RULES` while the
    #: probe is registered, after the table's own rules of the same outcome (docs/probes.md)
    judges: ClassVar[tuple[tuple[str, ProbeRule], ...]] = ()

    def __init__(self, step: ProbeStep) -> None:
        """Attach to the step's private copy, before any strategy is applied to it."""
        self.step = step

    def around_step(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around the whole step (after the strategy and the parallel wrap)."""
        return contextlib.nullcontext()

    def around_batches(self) -> contextlib.AbstractContextManager[Any]:
        """Entered around the micro-batches only (inside every probe's :meth:`around_step`)."""
        return contextlib.nullcontext()

    def after_forward(self, loss: Any) -> None:
        """Shown each micro-batch's loss once its forward ran, before its backward (by the engine's
        stepper; nothing by default). A probe may walk the autograd graph from it, e.g. to hook
        the nodes backward will run; a stepper that never calls it leaves such a count unmeasured."""

    @abstractmethod
    def read(self) -> M:
        """The measurement of a step that completed."""

    def after_failure(self) -> M:
        """The measurement of a step that raised (what it saw is usually meaningless then)."""
        return self.empty()

    @classmethod
    def empty(cls) -> M:
        """The measurement of a run this probe never saw (a step that did not start, say)."""
        return cls.measurement()

    @classmethod
    def to_host(cls, measured: M) -> Any:
        """A picklable host form of ``measured`` (it travels from a rank to the judging process)."""
        return dataclasses.asdict(measured)  # type: ignore[call-overload]

    @classmethod
    def from_host(cls, form: Any) -> M:
        """The measurement back from :meth:`to_host`'s form."""
        return cls.measurement(**form)

    @classmethod
    def merge(cls, mine: M, ranks: Sequence[M]) -> M:
        """One measurement from every rank's (``mine``: the one this process holds; ``ranks``: all,
        in rank order). By default the ranks ran the same step and ``mine`` stands for all."""
        return mine

    @classmethod
    def evidence(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        """Fields of ``evidence`` this probe fills (for a run that completed), by name."""
        return {}

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        """This probe's metrics for a result (keys from ``metric_keys``); ``evidence.compared``
        says whether the run completed and was compared with the baseline."""
        return {}


class Attached:
    """Probes of the given kinds on one step, in that order.

    Example:
        >>> from pytest_gradckpt.probes.timing import StepTime
        >>> net = torch.nn.Linear(2, 2)
        >>> attached = Attached([StepTime], ProbeStep(net, torch.device("cpu"), [], [], {}))
        >>> with attached.around_step(), attached.around_batches():
        ...     _ = net(torch.ones(1, 2))
        >>> attached.read(completed=True)["seconds"].seconds > 0
        True
    """

    def __init__(self, kinds: Sequence[type[Probe[Any]]], step: ProbeStep):
        self.step = step
        for kind in kinds:
            step.probes[kind.name] = kind(step)

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for probe in self.step.probes.values():
                stack.enter_context(probe.around_step())
            yield

    @contextlib.contextmanager
    def around_batches(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for probe in self.step.probes.values():
                stack.enter_context(probe.around_batches())
            yield

    def after_forward(self, loss: Any) -> None:
        """Show every probe a micro-batch's loss before its backward (:meth:`Probe.after_forward`)."""
        for probe in self.step.probes.values():
            probe.after_forward(loss)

    def read(self, completed: bool) -> dict[str, Any]:
        """Every probe's measurement, by probe name."""
        return {name: probe.read() if completed else probe.after_failure()
                for name, probe in self.step.probes.items()}

    def detach(self) -> None:
        """Forget the step's probes once they are read: they and the step refer to each other, and
        without this the copy they see lives until Python's cyclic collector runs."""
        self.step.probes.clear()
