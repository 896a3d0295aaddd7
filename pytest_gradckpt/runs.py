"""One *run*: one training step on a private copy of the model, with every probe attached.

The :class:`Stepper` knows the subject and its checkpoint units and runs a step the way a
scenario says, with or without a strategy. It runs in this process; the distributed
launcher (:mod:`pytest_gradckpt.distributed`) calls the same :meth:`Stepper.step` inside
each rank with a ``parallel`` wrapper. Nothing here judges: see :mod:`pytest_gradckpt.verdicts`.

Tensors a run keeps (gradients, outputs, buffers) stay where the step ran, so comparisons
run on the device; :meth:`Run.to_host` moves them when they must travel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Any

import torch
from torch import nn

from pytest_gradckpt import compiled
from pytest_gradckpt.arguments import Subject, tensor_bytes, tensor_leaves
from pytest_gradckpt.tensors import map_tensors
from pytest_gradckpt.errors import GradckptUsageError, StrategyNotApplicable, StrategyTimeout
from pytest_gradckpt.isolation import deadline, seed_everything
from pytest_gradckpt.layers import ModelInfo, find_layers, instrument
from pytest_gradckpt.probes.backward_calls import BackwardCalls, recomputed_units
from pytest_gradckpt.probes.cuda import CudaPeak
from pytest_gradckpt.probes.memory import SavedActivationProbe
from pytest_gradckpt.probes.recompute import LayerCounter
from pytest_gradckpt.probes.saved_elsewhere import SavedElsewhere, units_saved_elsewhere
from pytest_gradckpt.probes.warnings import capture_warnings
from pytest_gradckpt.scenarios import Scenario
from pytest_gradckpt.strategies import Strategy


@dataclasses.dataclass
class Run:
    """Everything measured in one step. Tensors are named as in the model before any
    strategy was applied (wrappers that rename modules do not rename what is compared)."""

    loss: torch.Tensor | None = None
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    grads: dict[str, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    graph_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    #: calls whose output backward really reached (a gradient arrived); None: not measured
    reached_calls: dict[str, int] | None = None
    expected_recompute: dict[str, bool] = dataclasses.field(default_factory=dict)
    #: outermost modules that really ran again during backward, whoever checkpointed them
    recomputed_units: list[str] = dataclasses.field(default_factory=list)
    #: checkpoint units whose forward ran under someone else's saved-tensor hooks (activations offloaded)
    saved_elsewhere_units: list[str] = dataclasses.field(default_factory=list)
    activation_bytes: int = 0
    cuda_peak_bytes: int | None = None
    #: distributed runs on GPUs: each rank's peak (``cuda_peak_bytes`` is the largest)
    rank_cuda_peak_bytes: list[int] | None = None
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: BaseException | None = None
    rank_disagreement: str | None = None  # distributed runs: ranks must hold the same gradients
    #: a compiled subject's run: what dynamo compiled for it (:func:`pytest_gradckpt.compiled.compiled_run`)
    compiled: dict[str, Any] | None = None

    def to_host(self) -> Run:
        """This run with every tensor copied to host memory (for sending between processes).

        Example:
            >>> Run(loss=torch.ones(())).to_host().loss
            tensor(1.)
        """
        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        return dataclasses.replace(self, loss=host(self.loss), outputs=map_tensors(self.outputs, host),
                                   grads={n: host(g) for n, g in self.grads.items()},
                                   buffers=map_tensors(self.buffers, host))

    def drop_tensors(self) -> None:
        """Release the tensors once judged, so the next run has the device memory."""
        self.outputs, self.grads, self.buffers = {}, {}, {}


def _kept_bytes(run: Run) -> int:
    return tensor_bytes((run.loss, *run.grads.values(), *run.outputs.values(), *run.buffers.values()))


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
        >>> from pytest_gradckpt.scenarios import SCENARIOS
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> stepper = Stepper(Subject(net, torch.ones(1, 2), None, None), None, seed=0, timeout=None)
        >>> run = stepper.step(SCENARIOS["train"], None)
        >>> run.error is None, sorted(run.grads), run.calls
        (True, ['0.bias', '0.weight', '1.bias', '1.weight'], {'0': 1, '1': 1})
    """

    def __init__(self, subject: Subject, layers: Any, seed: int, timeout: float | None,
                 distributed: dict[str, Any] | None = None):
        self.subject, self.seed, self.timeout = subject, seed, timeout
        self.distributed = distributed
        self.layer_names, self.found_by = find_layers(subject.peek(), layers, reference=subject.reference)

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
        try:
            self._step(run, scenario, strategy, grad_targets, parallel)
        except GradckptUsageError:
            raise
        except (Exception, StrategyTimeout) as exc:  # noqa: BLE001 - every failure is a verdict
            run.error = exc.with_traceback(None)  # the traceback would keep the model copy alive
        if cuda and torch.cuda.memory_allocated(self.subject.device) - before > 2 * _kept_bytes(run):
            gc.collect()  # the model copy sits in a reference cycle: free it before the next run needs the room
        return run

    def _step(self, run: Run, scenario: Scenario, strategy: Strategy | None, grad_targets: set[str] | None,
              parallel: Any) -> None:
        """The stages of one step, in order: a prepared copy, the strategy (and compiler) on it,
        the parallel wrap, the timed micro-batches under every probe, then what the probes saw."""
        step = self._prepare(scenario)
        self._switch_on(run, step, strategy)
        self._wrap(step, grad_targets, parallel)
        self._train(run, step, scenario, strategy, grad_targets, parallel)
        self._collect(run, step, scenario, parallel)

    def _prepare(self, scenario: Scenario) -> _Step:
        """A fresh copy set up as the scenario says, its names taken and its units instrumented."""
        subject = self.subject
        model = subject.fresh_model()
        if scenario.freeze_input_embeddings:
            freeze_input_embeddings(model)
        model.train(scenario.train_mode)
        compilation = subject.compilation
        # Names, and the modules to compile, are taken before the strategy runs: a wrapper may
        # rename modules (and the modules that were compiled), never the tensors.
        step = _Step(model=model, info=ModelInfo(model, self.layer_names, self.found_by),
                     param_names={id(p): n for n, p in model.named_parameters()},
                     buffer_names={id(b): n for n, b in model.named_buffers()},
                     module_names={id(m): n for n, m in model.named_modules()},
                     compiled_modules={} if compilation is None else compilation.targets(model))
        step.info.state["compilation"] = compilation  # strategies that apply to compiled models only ask
        for name, layer in zip(step.info.layer_names, step.info.layers, strict=True):
            instrument(layer, name, step.counter)
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
            run.compiled = {}

    def _wrap(self, step: _Step, grad_targets: set[str] | None, parallel: Any) -> None:
        """The parallel wrap, the parameters to differentiate, this rank's inputs and the memory probe."""
        model, subject = step.model, self.subject
        # After the strategy and before wrapping for parallelism: FSDP2 swaps parameter objects
        # but keeps their names, a checkpoint wrapper keeps the objects but renames them.
        renamed = {n: step.param_names.get(id(p), n) for n, p in model.named_parameters()}
        step.runner = model if parallel is None else parallel.wrap(model, step.info)
        step.trainable = [(renamed.get(n, n), p) for n, p in model.named_parameters() if p.requires_grad]
        step.targets = [(n, p) for n, p in step.trainable if grad_targets is None or n in grad_targets]
        step.inputs = subject.fresh_inputs() if parallel is None else parallel.shard(subject.fresh_inputs())
        step.memory = SavedActivationProbe(subject.device, [p for _, p in model.named_parameters()])
        step.counter.memory = step.memory

    def _train(self, run: Run, step: _Step, scenario: Scenario, strategy: Strategy | None,
               grad_targets: set[str] | None, parallel: Any) -> None:
        """Every micro-batch of the step, timed, under every probe."""
        subject, device, memory = self.subject, self.subject.device, step.memory
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if scenario.autocast
                    else contextlib.nullcontext())
        seed_everything(self.seed, device)
        step.grads = {n: None for n, _ in step.trainable}
        compilation = subject.compilation
        compiling = (contextlib.nullcontext() if compilation is None
                     else compiled.compiled_run(compilation, run.compiled, step.info.state))  # type: ignore[arg-type]
        with capture_warnings() as run.warnings, deadline(self.timeout), CudaPeak(device) as step.cuda, \
                BackwardCalls(step.module_names) as step.backward_calls, compiling, \
                SavedElsewhere(step.module_names, ours=memory._pack) as step.saved_elsewhere:
            started = time.perf_counter()
            with memory:
                micro_batches = scenario.micro_batches if parallel is None else parallel.micro_batches(scenario)
                for micro_batch in range(micro_batches):
                    last = micro_batch == micro_batches - 1
                    sync = contextlib.nullcontext() if parallel is None else parallel.sync(step.runner, last)
                    with sync:  # DDP's no_sync must cover forward and backward of a micro-batch
                        with autocast:
                            step.output = subject.call(step.runner, step.inputs)
                            step.loss = subject.loss(step.output, step.inputs)
                        if strategy is not None:
                            strategy.after_forward(step.info)
                        self._backward(step, scenario, grad_targets)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            run.seconds = time.perf_counter() - started
        step.counter.memory = None

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
        """What the step produced and what the probes saw, named as in the original model."""
        model, counter, module_names = step.model, step.counter, step.module_names
        run.loss = step.loss.detach().float()
        run.outputs = {k: v.detach() for k, v in tensor_leaves(step.output).items()}
        found_grads = step.grads if scenario.autograd_grad else {n: p.grad for n, p in step.trainable}
        full = (lambda g: g) if parallel is None else parallel.full_tensor
        run.grads = {n: None if g is None else full(g).detach() for n, g in found_grads.items()}
        run.buffers = {step.buffer_names.get(id(b), n): b.detach().clone() for n, b in model.named_buffers()}
        read_probes(run, model, step.info.layer_names, module_names, counter, step.backward_calls,
                    step.saved_elsewhere, step.memory)
        if step.cuda.peak_bytes is not None:
            # A sharded (FSDP2) parameter's gradient on this rank is its local shard, not the whole.
            local = (getattr(p, "_local_tensor", p) for _, p in step.trainable)
            run.cuda_peak_bytes = max(0, step.cuda.peak_bytes - tensor_bytes(local))


def read_probes(run: Run, model: nn.Module, layer_names: list[str], module_names: dict[int, str],
                counter: LayerCounter, backward_calls: Any, saved_elsewhere: Any, memory: Any) -> None:
    """Put what the probes of one step saw into ``run``, modules named as in the original model
    (``module_names``: original names by object id, taken before any strategy or wrapper). Every
    stepper (this module's, a trainer's) reads its probes here, so their runs are judged alike."""
    run.calls = dict(counter.counts)
    run.graph_calls = dict(counter.graph_calls)
    run.reached_calls = dict(counter.reached_calls)
    original_modules = [(module_names[id(m)], m) for m in model.modules() if id(m) in module_names]
    run.recomputed_units = recomputed_units(original_modules, backward_calls.names)
    run.saved_elsewhere_units = units_saved_elsewhere(layer_names, saved_elsewhere.names)
    run.activation_bytes = memory.peak_bytes


@dataclasses.dataclass
class _Step:
    """What the stages of one :meth:`Stepper._step` hand each other (the copy, its names, the probes)."""

    model: nn.Module
    info: ModelInfo
    #: original names by object id, taken before any strategy or wrapper
    param_names: dict[int, str]
    buffer_names: dict[int, str]
    module_names: dict[int, str]
    compiled_modules: Any
    counter: LayerCounter = dataclasses.field(default_factory=LayerCounter)
    runner: Any = None
    trainable: list[tuple[str, nn.Parameter]] = dataclasses.field(default_factory=list)
    targets: list[tuple[str, nn.Parameter]] = dataclasses.field(default_factory=list)
    inputs: Any = None
    memory: Any = None
    grads: dict[str, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    output: Any = None
    loss: Any = None
    cuda: Any = None
    backward_calls: Any = None
    saved_elsewhere: Any = None
