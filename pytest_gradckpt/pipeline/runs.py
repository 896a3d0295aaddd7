"""One *run*: one training step on a private copy of the model, with every probe attached.

The probes are those of :mod:`pytest_gradckpt.probes.registry`; :func:`prepare_copy` attaches
them to a copy and :func:`probed` runs a step under them (a trainer's stepper uses both too). A
:class:`Run` keeps the step's outputs, gradients and buffers as fields and each probe's
measurement under the probe's name (``run.of(Probe)``).

The :class:`Stepper` knows the subject and its checkpoint units and runs a step the way a
scenario says, with or without a strategy. It runs in this process; the distributed
launcher (:mod:`pytest_gradckpt.ranks.distributed`) calls the same :meth:`Stepper.step` inside
each rank with a ``parallel`` wrapper. Nothing here judges: see :mod:`pytest_gradckpt.pipeline.verdicts`.

Tensors a run keeps (gradients, outputs, buffers) stay where the step ran, so comparisons
run on the device; :meth:`Run.to_host` moves them when they must travel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from pytest_gradckpt.compilation import compiled
from pytest_gradckpt.pipeline.subject import Subject
from pytest_gradckpt.pipeline.tensors import map_tensors, tensor_bytes, tensor_leaves
from pytest_gradckpt.errors import GradckptUsageError, StrategyNotApplicable, StrategyTimeout
from pytest_gradckpt.pipeline.process_state import deadline, seed_everything
from pytest_gradckpt.pipeline.units import ModelInfo, find_layers
from pytest_gradckpt.probes import registry
from pytest_gradckpt.probes.protocol import Attached, Probe, ProbeStep
from pytest_gradckpt.pipeline.materialise import is_meta
from pytest_gradckpt.pipeline.reused_copy import Reuse
from pytest_gradckpt.pipeline.promises import Promise
from pytest_gradckpt.pipeline.scenarios import Scenario
from pytest_gradckpt.strategies import Strategy, is_builtin

M = TypeVar("M")


@dataclasses.dataclass
class Run:
    """Everything measured in one step. Tensors are named as in the model before any
    strategy was applied (wrappers that rename modules do not rename what is compared).
    Each probe's measurement is kept under its name in ``measured``, read typed with :meth:`of`."""

    loss: torch.Tensor | None = None
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    grads: dict[str, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    expected_recompute: dict[str, bool] = dataclasses.field(default_factory=dict)
    #: what the probes measured, by probe name (:mod:`pytest_gradckpt.probes.registry`)
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: BaseException | None = None
    rank_disagreement: str | None = None  # distributed runs: ranks must hold the same gradients
    #: a compiled subject's run: what dynamo compiled for it (:func:`pytest_gradckpt.compilation.compiled.compiled_run`)
    compiled: compiled.CompiledRun | None = None
    #: what the strategy promised for this run (:meth:`pytest_gradckpt.strategies.Strategy.promise`)
    promise: Promise | None = None

    #: The step's own fields a rank sends back; its measurements travel beside them (:meth:`to_payload`).
    SHIPPED: ClassVar[tuple[str, ...]] = ("loss", "outputs", "grads", "buffers", "expected_recompute", "promise")

    def of(self, kind: type[Probe[M]]) -> M:
        """What probe ``kind`` measured in this run (its empty measurement if it measured nothing).

        Example:
            >>> from pytest_gradckpt.probes.memory import MemoryProbe, SavedMemory
            >>> Run(measured={"memory": SavedMemory(64)}).of(MemoryProbe).activation_bytes, Run().of(MemoryProbe)
            (64, SavedMemory(activation_bytes=0))
        """
        found = self.measured.get(kind.name)
        return kind.empty() if found is None else found

    def to_host(self) -> Run:
        """This run with every tensor copied to host memory (for sending between processes).

        Example:
            >>> Run(loss=torch.ones(())).to_host().loss
            tensor(1.)
        """
        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or not isinstance(t, torch.Tensor):  # a stand-in for a held tensor travels as it is
                return t
            return t.detach().to("cpu", copy=True)

        return dataclasses.replace(self, loss=host(self.loss), outputs=map_tensors(self.outputs, host),
                                   grads={n: host(g) for n, g in self.grads.items()},
                                   buffers=map_tensors(self.buffers, host))

    def to_payload(self) -> dict[str, Any]:
        """What a rank sends back: the shipped fields on the host, every measurement in its host form.

        Example:
            >>> from pytest_gradckpt.probes.memory import SavedMemory
            >>> payload = Run(loss=torch.ones(()), measured={"memory": SavedMemory(8)}).to_payload()
            >>> payload["measured"], Run.from_payload(payload).measured
            ({'memory': {'activation_bytes': 8}}, {'memory': SavedMemory(activation_bytes=8)})
        """
        host = self.to_host()
        return {**{key: getattr(host, key) for key in self.SHIPPED}, "measured": registry.to_host(self.measured)}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Run:
        """The run a rank described with :meth:`to_payload`."""
        return cls(**{key: payload[key] for key in cls.SHIPPED}, measured=registry.from_host(payload["measured"]))

    def drop_tensors(self) -> None:
        """Release the tensors once judged, so the next run has the device memory."""
        self.outputs, self.grads, self.buffers = {}, {}, {}


def _kept_bytes(run: Run) -> int:
    return tensor_bytes((run.loss, *run.grads.values(), *run.outputs.values(), *run.buffers.values()))


def _leaves_copy_fit(strategy: Strategy | None, run: Run) -> bool:
    """Whether a run leaves its copy fit for the next, once restored (:mod:`pytest_gradckpt.pipeline.reused_copy`):
    a run without a strategy or with a built-in one, not cut short by a timeout. A strategy that is not
    built in may change anything its code reaches, so its copy is never reused.

    Example:
        >>> from pytest_gradckpt.strategies import Strategy, get_strategy
        >>> _leaves_copy_fit(get_strategy("non_reentrant"), Run()), _leaves_copy_fit(None, Run(error=StrategyTimeout()))
        (True, False)
        >>> import torch.utils.checkpoint as cp
        >>> _leaves_copy_fit(Strategy.from_checkpoint_fn("mine", cp.checkpoint), Run())
        False
    """
    if isinstance(run.error, StrategyTimeout):
        return False
    return strategy is None or is_builtin(strategy)


def _unwrap(step: _Step | None, parallel: Any) -> bool:
    """Undo what the step's parallel wrap left outside the copy's modules (DDP's hooks on the parameters'
    gradient accumulators); False when that failed, and the copy is not to be reused. Nothing to undo
    without a wrap: a step that failed before it, or ran without parallelism.

    Example:
        >>> _unwrap(None, parallel=None)
        True
    """
    if parallel is None or step is None or not step.wrapped:
        return True
    step.wrapped = False
    return bool(parallel.unwrap(step.runner))


def freeze_input_embeddings(model: nn.Module) -> None:
    """The ``frozen_inputs`` scenario: input embeddings frozen, as in LoRA."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = [get()] if callable(get) else [m for m in model.modules() if isinstance(m, nn.Embedding)]
    embeddings = [e for e in embeddings if e is not None]
    if not embeddings:
        raise StrategyNotApplicable("frozen_inputs: the model has no input embedding (nn.Embedding) to freeze")
    for embedding in embeddings:
        embedding.requires_grad_(False)


class Stepper:
    """Runs steps of one subject: the model, its inputs and loss, its checkpoint units.

    Example:
        >>> from pytest_gradckpt.pipeline.scenarios import SCENARIOS
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> stepper = Stepper(Subject(net, torch.ones(1, 2), None, None), None, seed=0, timeout=None)
        >>> run = stepper.step(SCENARIOS["train"], None)
        >>> from pytest_gradckpt.probes.recompute_counts import RecomputeProbe
        >>> run.error is None, sorted(run.grads), run.of(RecomputeProbe).calls
        (True, ['0.bias', '0.weight', '1.bias', '1.weight'], {'0': 1, '1': 1})
    """

    def __init__(self, subject: Subject, layers: Any, seed: int, timeout: float | None,
                 distributed: dict[str, Any] | None = None):
        self.subject, self.seed, self.timeout = subject, seed, timeout
        self.distributed = distributed
        names, self.found_by = find_layers(subject.peek(), layers, reference=subject.reference)
        self.layer_names = [compiled.eager_name(name) for name in names]  # a regional model's names, on its copies
        self.copies = self._copies()

    def _copies(self) -> Reuse:
        """One working copy for the runs in this process (:mod:`pytest_gradckpt.pipeline.reused_copy`) when the
        subject is the caller's eager module, or (in a rank) the template a factory's product was kept as on
        the rank's device; compiled or meta models, and a factory's elsewhere, get a new copy per run."""
        source = self._reuse_source()
        eligible = (isinstance(source, nn.Module) and self.subject.compilation is None and not is_meta(source))
        return Reuse(source, self.subject.fresh_model, eligible)

    def _reuse_source(self) -> Any:
        """What a reused working copy is refilled from: the caller's module, or a rank's kept template."""
        source = self.subject.model_source
        return source if isinstance(source, nn.Module) else self.subject.kept_template()

    def __getstate__(self) -> dict[str, Any]:
        # A process started from here (an isolated child, a rank) keeps copies of its own.
        state = dict(self.__dict__)
        state["copies"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.copies = self._copies()

    def step(self, scenario: Scenario, strategy: Strategy | None, grad_targets: set[str] | None = None,
             parallel: Any = None) -> Run:
        """One training step on a fresh copy. ``grad_targets``: for ``autograd_grad``, the parameters
        that had a gradient in the baseline; they are requested with ``allow_unused=False`` so that a
        strategy hiding them from autograd fails loudly, as torch intends, instead of yielding None.
        ``parallel`` (inside a distributed rank) wraps the model, shards the inputs and gathers
        full gradients."""
        run = Run()
        cuda = self.subject.device.type == "cuda"
        before = torch.cuda.memory_allocated(self.subject.device) if cuda else 0
        if self.copies.source is not self._reuse_source():  # a rank kept its template since: reuse copies of it
            self.copies = self._copies()
        step: _Step | None = None
        try:
            step = self._prepare(scenario, reuse=True)
            self._step(run, step, strategy, grad_targets, parallel)
        except GradckptUsageError:
            _unwrap(step, parallel)
            self.copies.give_back(fit=False)
            raise
        except (Exception, StrategyTimeout) as exc:  # noqa: BLE001 - every failure is a verdict
            run.error = exc.with_traceback(None)  # the traceback would keep the model copy alive
        unwrapped = _unwrap(step, parallel)
        del step  # the copy's modules: the collector below may be what frees them
        self.copies.give_back(fit=unwrapped and _leaves_copy_fit(strategy, run))
        kept = self.copies.kept_bytes()  # a copy made for this run that the next one reuses stays allocated
        if cuda and torch.cuda.memory_allocated(self.subject.device) - before > 2 * _kept_bytes(run) + kept:
            gc.collect()  # the model copy sits in a reference cycle: free it before the next run needs the room
        return run

    def _step(self, run: Run, step: _Step, strategy: Strategy | None, grad_targets: set[str] | None,
              parallel: Any) -> None:
        """The stages of one step on a prepared copy, in order: the strategy (and compiler) on it,
        the parallel wrap, the timed micro-batches under every probe, then what the probes saw."""
        scenario = step.scenario
        self._switch_on(run, step, strategy)
        self._wrap(step, grad_targets, parallel)
        self._train(run, step, scenario, strategy, grad_targets, parallel)
        self._collect(run, step, scenario, parallel)
        run.promise = None if strategy is None else strategy.promise(step.info)

    def _prepare(self, scenario: Scenario, reuse: bool = False) -> _Step:
        """A fresh copy set up as the scenario says, its names taken and its probes attached."""
        subject = self.subject
        model = self.copies.take() if reuse else subject.fresh_model()
        if scenario.freeze_input_embeddings:
            freeze_input_embeddings(model)
        model.train(scenario.train_mode)
        compilation = subject.compilation
        # The modules to compile are taken before the strategy runs, as the names are.
        step = _Step(copy=prepare_copy(model, self.layer_names, self.found_by, subject.device),
                     compiled_modules={} if compilation is None else compilation.targets(model), scenario=scenario)
        step.info.compile_kind = None if compilation is None else compilation.kind  # compiled-only strategies ask
        return step

    def _switch_on(self, run: Run, step: _Step, strategy: Strategy | None) -> None:
        """The strategy on the copy (refused when it does not apply), then the subject's compiler."""
        info = step.info
        if strategy is not None:
            reason = strategy.applies_to(info)
            if reason:
                raise StrategyNotApplicable(reason)
            strategy.apply(info)
            run.expected_recompute = {n: strategy.expects_recompute(info, layer)
                                      for n, layer in zip(info.layer_names, info.layers, strict=True)}
        compilation = self.subject.compilation
        if compilation is not None:
            compilation.apply(step.model, step.compiled_modules)
            run.compiled = compiled.CompiledRun()

    def _wrap(self, step: _Step, grad_targets: set[str] | None, parallel: Any) -> None:
        """The parallel wrap, the parameters to differentiate and this rank's inputs."""
        model, subject = step.model, self.subject
        # After the strategy and before wrapping for parallelism: FSDP2 swaps parameter objects
        # but keeps their names, a checkpoint wrapper keeps the objects but renames them.
        renamed = {n: step.copy.param_names.get(id(p), n) for n, p in model.named_parameters()}
        step.runner = model if parallel is None else parallel.wrap(model, step.info)
        step.wrapped = parallel is not None
        step.trainable = [(renamed.get(n, n), p) for n, p in model.named_parameters() if p.requires_grad]
        step.copy.view.trainable = step.trainable
        step.targets = [(n, p) for n, p in step.trainable if grad_targets is None or n in grad_targets]
        step.inputs = subject.fresh_inputs() if parallel is None else parallel.shard(subject.fresh_inputs())

    def _train(self, run: Run, step: _Step, scenario: Scenario, strategy: Strategy | None,
               grad_targets: set[str] | None, parallel: Any) -> None:
        """Every micro-batch of the step, under every probe."""
        subject, device = self.subject, self.subject.device
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if scenario.autocast
                    else contextlib.nullcontext())
        seed_everything(self.seed, device)
        step.grads = {n: None for n, _ in step.trainable}
        compilation = subject.compilation
        compiling = (contextlib.nullcontext() if compilation is None
                     else compiled.compiled_run(compilation, run.compiled or compiled.CompiledRun(),
                                                step.info.activation_memory_budget))
        with probed(run, step.copy, deadline(self.timeout), compiling):
            micro_batches = scenario.micro_batches if parallel is None else parallel.micro_batches(scenario)
            for micro_batch in range(micro_batches):
                last = micro_batch == micro_batches - 1
                sync = contextlib.nullcontext() if parallel is None else parallel.sync(step.runner, last)
                with sync:  # DDP's no_sync must cover forward and backward of a micro-batch
                    with autocast:
                        step.output = subject.call(step.runner, step.inputs)
                        step.loss = subject.loss(step.output, step.inputs)
                    step.copy.probes.after_forward(step.loss)  # before backward: probes may hook its graph
                    if strategy is not None:
                        strategy.after_forward(step.info)
                    self._backward(step, scenario, grad_targets)

    @staticmethod
    def _backward(step: _Step, scenario: Scenario, grad_targets: set[str] | None) -> None:
        """One micro-batch's backward: into ``.grad``, or through ``torch.autograd.grad`` summed here."""
        if not scenario.autograd_grad:
            step.loss.backward()
            return
        found = torch.autograd.grad(step.loss, [p for _, p in step.targets], allow_unused=grad_targets is None)
        for (name, _), grad in zip(step.targets, found, strict=True):
            if grad is not None:
                known = step.grads[name]
                step.grads[name] = grad if known is None else known + grad

    def _collect(self, run: Run, step: _Step, scenario: Scenario, parallel: Any) -> None:
        """What the step produced, named as in the original model (the probes' measurements are in already)."""
        model = step.model
        run.loss = step.loss.detach().float()
        run.outputs = {k: v.detach() for k, v in tensor_leaves(step.output).items()}
        found_grads = step.grads if scenario.autograd_grad else {n: p.grad for n, p in step.trainable}
        full = (lambda g: g) if parallel is None else parallel.full_tensor
        run.grads = {n: None if g is None else full(g).detach() for n, g in found_grads.items()}
        run.buffers = {step.copy.buffer_names.get(id(b), n): b.detach().clone() for n, b in model.named_buffers()}


@dataclasses.dataclass
class PreparedCopy:
    """A private copy of the model with its original names and every registered probe attached."""

    model: nn.Module
    info: ModelInfo
    #: original names by object id, taken before any strategy or wrapper
    param_names: dict[int, str]
    buffer_names: dict[int, str]
    #: what the probes see of the step; set ``view.trainable`` before the step runs
    view: ProbeStep
    probes: Attached


def prepare_copy(model: nn.Module, layer_names: list[str], found_by: str, device: torch.device) -> PreparedCopy:
    """Name ``model`` (a private copy) and attach the probes in force to it, before any strategy or
    checkpointing switch runs: a wrapper may rename modules, never the tensors. Every stepper (this
    module's, a trainer's) prepares its copies here, so their runs are measured alike.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> prepared = prepare_copy(net, ["0", "1"], "given", torch.device("cpu"))
        >>> sorted(prepared.param_names.values())[:2], list(prepared.view.probes)[:2]
        (['0.bias', '0.weight'], ['warnings', 'memory'])
    """
    info = ModelInfo(model, layer_names, found_by)
    view = ProbeStep(model, device, info.layer_names, info.layers, {id(m): n for n, m in model.named_modules()})
    return PreparedCopy(model, info, {id(p): n for n, p in model.named_parameters()},
                        {id(b): n for n, b in model.named_buffers()}, view, Attached(registry.registered(), view))


@contextlib.contextmanager
def probed(run: Run, prepared: PreparedCopy, *outer: contextlib.AbstractContextManager[Any]) -> Iterator[None]:
    """The block is the step: inside ``outer`` (a deadline, a compiler's run), the probes around the
    step, then around its micro-batches. Their measurements land in ``run.measured`` whether the
    step completes or raises."""
    completed = False
    try:
        with contextlib.ExitStack() as stack:
            for context in (*outer, prepared.probes.around_step(), prepared.probes.around_batches()):
                stack.enter_context(context)
            yield
        completed = True
    finally:
        run.measured = prepared.probes.read(completed=completed)
        # The probes and their step refer to each other: a cycle that only the cyclic collector
        # frees, which would keep this copy's weights and gradients on the device into the next run.
        prepared.probes.detach()


@dataclasses.dataclass
class _Step:
    """What the stages of one :meth:`Stepper._step` hand each other (the prepared copy, the step's state)."""

    copy: PreparedCopy
    compiled_modules: Any
    scenario: Scenario
    runner: Any = None
    wrapped: bool = False  # ``runner`` is the parallel wrap of the copy, to be undone after the run
    trainable: list[tuple[str, nn.Parameter]] = dataclasses.field(default_factory=list)
    targets: list[tuple[str, nn.Parameter]] = dataclasses.field(default_factory=list)
    inputs: Any = None
    grads: dict[str, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    output: Any = None
    loss: Any = None

    @property
    def model(self) -> nn.Module:
        return self.copy.model

    @property
    def info(self) -> ModelInfo:
        return self.copy.info
