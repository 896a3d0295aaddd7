"""Compiled subjects: a model the caller compiled stays compiled in every run of the check.

A deep copy drops per-block compilation silently (``nn.Module.__getstate__`` pops
``_compiled_call_impl``), and the engine's probes and checkpoint wrappers must see the eager
module underneath a top-level ``OptimizedModule``. So the check records *how* the caller
compiled (:class:`Compilation`), copies the eager modules, and compiles each copy again in the
same places with the caller's own ``torch.compile`` settings (the very dynamo context the
caller built: backend, mode, options). Three forms are recognised:

- ``whole``: ``torch.compile(model)``, an ``OptimizedModule``;
- ``per_block``: ``block.compile()`` on submodules (torchtitan's default);
- ``regional``: submodules replaced by ``torch.compile(block)`` (``OptimizedModule`` children).

Every compiled run resets dynamo first and counts what dynamo compiled for it
(:func:`compiled_run`), so a run that executed no compiled frame is an error, never a silent
check of the eager model. See docs/compile.md for the judgement under compile.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import sysconfig
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pytest_gradckpt import settings
from pytest_gradckpt.compilation.optimized_module import optimized_module_type
from pytest_gradckpt.errors import GradckptUsageError

if TYPE_CHECKING:
    from pytest_gradckpt.probes.unit_counter import LayerCounter

WHOLE, PER_BLOCK, REGIONAL = "whole", "per_block", "regional"

#: Where a strategy's checkpoint sits relative to the compiled code of a block (torchtitan supports both):
#: ``compile_outside``: the module at each compiled name is compiled after the strategy ran, wrapper
#: included (checkpoint regions inside compiled code: dynamo traces them, the partitioner recomputes);
#: ``checkpoint_outside``: the block's own forward is compiled, and the checkpoint around it runs eager
#: (recompute reruns the compiled forward).
COMPILE_OUTSIDE, CHECKPOINT_OUTSIDE = settings.COMPILE_ORDERS
ORDERS = settings.COMPILE_ORDERS

#: Counters of :data:`torch._dynamo.utils.counters` reported per run.
_FRAMES, _BREAKS = "frames", "graph_break"


def _dynamo_context(compiled_fn: Any) -> Any:
    """The ``_TorchDynamoContext`` a ``torch.compile``'d function was built by (kept in its closure)."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for cell in getattr(compiled_fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _TorchDynamoContext):
            return value
    raise GradckptUsageError(
        f"a compiled module's call ({compiled_fn!r}) does not come from torch.compile; the check cannot compile "
        "its copies the same way: compile with torch.compile(model) or module.compile()")


@dataclasses.dataclass
class Compilation:
    """Where and how the caller's model was compiled, by module name in the *eager* model
    (``OptimizedModule`` wrappers left out of the names).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> Compilation.of(net) is None
        True
        >>> net[0].compile(backend="aot_eager")
        >>> found = Compilation.of(net)
        >>> found.kind, sorted(found.blocks)
        ('per_block', ['0'])
    """

    kind: str
    #: module name -> the dynamo context that compiled it ("" is the whole model)
    blocks: dict[str, Any]
    order: str = COMPILE_OUTSIDE
    #: the names compiled as ``torch.compile(block)``: their whole call is compiled, a class's own
    #: ``__call__`` included (transformers <= 5.22 checkpoints there), where ``block.compile()``
    #: compiles only what ``nn.Module.__call__`` runs
    wrapped: frozenset[str] = frozenset()

    def ordered(self, order: str | None) -> Compilation:
        """This compilation with checkpoints placed by ``order`` (one of :data:`ORDERS`; None keeps it)."""
        if order is None:
            return self
        settings.check_compile_order(order)
        if order == CHECKPOINT_OUTSIDE and self.kind == WHOLE:
            raise GradckptUsageError(
                "compile_order='checkpoint_outside' needs compiled blocks (block.compile() or "
                "torch.compile(block)); the whole model is compiled here, so every checkpoint is inside it")
        return dataclasses.replace(self, order=order)

    @staticmethod
    def of(model: nn.Module) -> Compilation | None:
        """How ``model`` was compiled, or None when nothing in it is."""
        optimized = optimized_module_type()
        blocks: dict[str, Any] = {}
        wrapped: set[str] = set()
        kind = None
        if isinstance(model, optimized):
            blocks[""], kind = model.dynamo_ctx, WHOLE
            model = model._orig_mod
        for name, module in _eager_named_modules(model):
            if isinstance(module, optimized):
                blocks[name] = module.dynamo_ctx
                wrapped.add(name)
                kind = kind or REGIONAL
            elif module._compiled_call_impl is not None:
                blocks[name] = _dynamo_context(module._compiled_call_impl)
                kind = kind or PER_BLOCK
        return None if kind is None else Compilation(kind, blocks, wrapped=frozenset(wrapped))

    def backend(self) -> str:
        """The compiler backend's name, e.g. ``inductor`` or ``aot_eager``."""
        backend = next(iter(self.blocks.values())).callback
        while hasattr(backend, "_torchdynamo_orig_backend"):  # unwrap dynamo's wrappers (as innermost_backend does)
            backend = backend._torchdynamo_orig_backend
        backend = getattr(backend, "compiler_fn", backend)  # a backend with options wraps the function
        name = getattr(backend, "compiler_name", None) or getattr(backend, "__name__", None)
        return str(name or type(backend).__name__)

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The engine copy's modules at the compiled names (taken before a strategy renames any)."""
        return {name: model.get_submodule(name) for name in self.blocks}

    def apply(self, model: nn.Module, before: dict[str, nn.Module]) -> None:
        """Compile the engine's copy after the strategy ran. ``before``: :meth:`targets` taken
        before the strategy. Checkpoint outside: the blocks' own forwards are compiled (an engine
        checkpoint unit's body, below the checkpoint the strategy installed in its forward);
        compile outside: whatever module now sits at each name (a checkpoint wrapper included)."""
        from pytest_gradckpt.pipeline.units import instrumented

        counter = None  # the run's counter: every unit of the copy carries the same one
        for module in model.modules():  # dynamo tracing a unit now means the caller's compiled program
            record = instrumented(module)
            if record is not None:
                record.caller_compiled = True
                counter = record.counter
        for name, ctx in self.blocks.items():
            if self.order == CHECKPOINT_OUTSIDE:
                _compile_body(before[name], ctx)
            elif name in self.wrapped:
                _compile_whole_call(_sitting_at(model, name, before[name]), ctx, counter)
            else:
                module = _sitting_at(model, name, before[name])
                module._compiled_call_impl = _seen_in_backward(module, ctx(module._call_impl), counter)


def _compile_whole_call(module: nn.Module, ctx: Any, counter: LayerCounter | None) -> None:
    """Compile ``module``'s whole call as ``torch.compile(module)`` does, in place (its name stays
    the eager one): a class's own ``__call__`` (transformers <= 5.22's checkpoint) runs inside the
    compiled code, as in the caller's program. The wrapper binds ``module.__call__`` now, then this
    copy's class gets a ``__call__`` that calls the wrapper (the class of the engine's copy, never
    the caller's)."""
    from pytest_gradckpt.pipeline.units import CompiledCall

    wrapper = optimized_module_type()(module, ctx)
    call = _seen_in_backward(module, wrapper, counter)
    base = type(module)

    def compiled_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self is not module:  # a deep copy keeps this class, and the call would run on the original
            raise RuntimeError(f"a copy of the compiled block {base.__name__} was called; compile each copy "
                               "again (Compilation.apply), do not copy a compiled one")
        return call(*args, **kwargs)

    module.__class__ = type(base.__name__, (base, CompiledCall), {
        "__call__": compiled_call, "__module__": base.__module__, "__qualname__": base.__qualname__})


def _seen_in_backward(module: nn.Module, compiled_call: Any, counter: LayerCounter | None) -> Any:
    """``compiled_call`` (a block's compiled ``_call_impl``), with each call made during backward
    shown to the run's backward-calls probe, reached through the run's unit counter (an eager
    checkpoint around the compiled block recomputes it that way; module hooks run inside the
    compiled code, where the probe sees nothing). The call itself is unchanged: what runs compiled
    is the caller's program."""

    def call(*args: Any, **kwargs: Any) -> Any:
        seen = None if counter is None else counter.backward_calls
        if seen is not None:
            seen.note_compiled_call(module)
        return compiled_call(*args, **kwargs)

    return call


def _sitting_at(model: nn.Module, name: str, original: nn.Module) -> nn.Module:
    """The module at ``name`` now, or ``original`` if a wrapper moved it elsewhere (e.g. into a
    CheckpointWrapper's ``_checkpoint_wrapped_module``: then the wrapper sits at ``name``)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return original


def _compile_body(module: nn.Module, ctx: Any) -> None:
    """Compile ``module``'s forward body only. An engine-instrumented unit keeps its counting and
    the strategy's checkpoint eager, around the compiled body; other modules compile their call."""
    from pytest_gradckpt.pipeline.units import instrumented

    record = instrumented(module)
    if record is None:
        module._compiled_call_impl = ctx(module._call_impl)
        return
    inner = record.inner_forward
    eager_forward = inner if inner is not None else getattr(type(module).__mro__[1], "forward").__get__(module)

    def body(*args: Any, **kwargs: Any) -> Any:
        return eager_forward(*args, **kwargs)

    record.inner_forward, record.compiled_body = ctx(body), True


def _eager_named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with every ``OptimizedModule`` reported under its own name and its
    ``_orig_mod`` level left out of the names below it."""
    optimized = optimized_module_type()
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        yield from _eager_named_modules(child._orig_mod if isinstance(child, optimized) else child, name)


def eager_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``OptimizedModule`` replaced by the module it wraps
    and no compiled call left (the engine compiles again once its probes and strategy are in).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.compile(torch.nn.Linear(2, 2), backend="eager"))
        >>> type(eager_copy(net)[1]).__name__
        'Linear'
    """
    return strip(copy.deepcopy(model))


def strip(model: nn.Module) -> nn.Module:
    """``model`` (a private copy) without compilation: ``OptimizedModule`` wrappers replaced by
    what they wrap, compiled calls removed."""
    optimized = optimized_module_type()
    if isinstance(model, optimized):
        model = model._orig_mod
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, optimized):
                setattr(module, child_name, child._orig_mod)
        module._compiled_call_impl = None
    return model


def with_order(compilation: Compilation | None, order: str | None, elsewhere: bool = False) -> Compilation | None:
    """``check(compile_order=...)`` applied to the subject's compilation. ``elsewhere``: the check
    would run steps in other processes (distributed scenarios, ``isolate=True``), where the
    caller's dynamo contexts cannot travel.

    Example:
        >>> with_order(None, None) is None
        True
    """
    if compilation is not None and elsewhere:
        raise GradckptUsageError(
            f"the model is compiled ({compilation.kind}); compiled models are checked in this process only: "
            "leave out the ddp/fsdp2 scenarios and isolate=True")
    if compilation is None:
        if order is not None:
            raise GradckptUsageError(f"compile_order={order!r}: the model is not compiled; leave compile_order out "
                                     "or compile the model (torch.compile(model) or block.compile())")
        return None
    return compilation.ordered(order)


def blocks_order(model: nn.Module, order: str | None) -> str | None:
    """A session-wide ``compile_order`` (``--gradckpt-compile-order`` or its ini twin) for ``model``:
    ``order`` where the model has compiled blocks (the only place an order means something), None
    for eager and whole-model compiled models, which a suite-wide default must leave alone.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> blocks_order(net, "checkpoint_outside") is None
        True
        >>> net[0].compile(backend="aot_eager")
        >>> blocks_order(net, "checkpoint_outside")
        'checkpoint_outside'
    """
    compilation = Compilation.of(model) if isinstance(model, nn.Module) else None
    return order if compilation is not None and compilation.kind != WHOLE else None


def eager_name(name: str) -> str:
    """``name`` as in the eager model: the ``_orig_mod`` levels of ``OptimizedModule`` wrappers left out
    (the caller's regional model names a compiled layer's modules through them; the engine's copies,
    stripped of the wrappers, do not have them).

    Example:
        >>> eager_name("model.layers.0._orig_mod"), eager_name("model.layers.0._orig_mod.mlp"), eager_name("_orig_mod")
        ('model.layers.0', 'model.layers.0.mlp', '')
    """
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def eager_view(model: nn.Module) -> nn.Module:
    """The caller's own eager module under a top-level ``OptimizedModule`` (not a copy: the
    engine reads facts from it, never trains it); other models unchanged."""
    return model._orig_mod if isinstance(model, optimized_module_type()) else model


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU, or None (then only ``aot_eager`` runs there).

    Example:
        >>> cxx_compiler() is None or isinstance(cxx_compiler(), str)
        True
    """
    configured = torch._inductor.config.cpp.cxx[-1] if hasattr(torch, "_inductor") else None
    for candidate in (configured, sysconfig.get_config_var("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(str(candidate).split()[0]):
            return str(candidate)
    return None


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"frames": counters[_FRAMES]["ok"], "graph_breaks": sum(counters[_BREAKS].values())}


@dataclasses.dataclass
class CompiledRun:
    """What was compiled for one run of a compiled subject (:func:`compiled_run` fills it; None:
    not recorded, e.g. the step failed before it compiled). A result's ``compiled`` metrics.

    Example:
        >>> CompiledRun(kind="whole", frames=1).metrics()
        {'kind': 'whole', 'frames': 1}
    """

    #: the memory budget a strategy asked the partitioner for (``compile_budget``)
    activation_memory_budget: float | None = None
    kind: str | None = None
    order: str | None = None
    backend: str | None = None
    blocks: list[str] | None = None
    random: str | None = None
    frames: int | None = None
    graph_breaks: int | None = None
    #: a baseline's: the saved-activation bytes checkpointing could cut (:func:`checkpoint_room`),
    #: set by the engine and read by ``verdicts.recompute_unobserved``
    checkpoint_room_bytes: int | None = None

    def metrics(self) -> dict[str, Any]:
        """The recorded fields, in declaration order."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@contextlib.contextmanager
def compiled_run(compilation: Compilation, report: CompiledRun, budget: float | None = None) -> Iterator[None]:
    """Run one step's compiled code from a clean dynamo cache, with dynamo's recompile limits
    lifted (each run compiles a fresh copy; past the limit dynamo would silently run eager),
    and fill ``report`` with what was compiled for it: frames and graph breaks.

    ``budget``: the ``activation_memory_budget`` the run's strategy asked for
    (:attr:`pytest_gradckpt.pipeline.units.ModelInfo.activation_memory_budget`, ``compile_budget``), set in
    torch._functorch.config while the step compiles.

    Random ops draw as eager draws them (:func:`eager_random`), in the baseline and in every
    strategy: the one oracle for compiled programs (docs/compile.md).

    The step raises :class:`CompilationDropped` when no frame was compiled: its model ran eager.
    """
    import torch._dynamo
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    before = _counts()
    budgeted = (functorch_config.patch(activation_memory_budget=budget) if budget is not None
                else contextlib.nullcontext())
    limits = {key: 1 << 20 for key in ("recompile_limit", "accumulated_recompile_limit", "cache_size_limit",
                                       "accumulated_cache_size_limit") if hasattr(torch._dynamo.config, key)}
    backend = compilation.backend()
    with torch._dynamo.config.patch(**limits), budgeted, eager_random(backend):
        yield
    after = _counts()
    report.activation_memory_budget = budget
    report.kind, report.order, report.backend = compilation.kind, compilation.order, backend
    report.blocks, report.random = sorted(compilation.blocks), RANDOM_AS_EAGER
    report.frames, report.graph_breaks = (after[key] - before[key] for key in ("frames", "graph_breaks"))
    if report.frames == 0:
        raise CompilationDropped(
            f"the caller's model is compiled ({compilation.kind}, {len(compilation.blocks)} place(s)), yet dynamo "
            "compiled no frame in this run: it ran the copy eager (as it does under an active TorchDispatchMode, "
            "e.g. eager selective checkpointing around compiled code), so the compiled program was not checked")


class CompilationDropped(RuntimeError):
    """A run of a compiled subject executed no compiled frame."""


# --------------------------------------------------------------------------- judgement under compile


@dataclasses.dataclass
class CompileDistance:
    """How far the compiled step without checkpointing is from the eager step, per tensor
    (relative error norm), measured with random ops drawn as eager draws them."""

    grads: dict[str, float]
    loss: dict[str, float]
    outputs: dict[str, float]

    @property
    def largest(self) -> float:
        return max((*self.grads.values(), *self.loss.values(), *self.outputs.values()), default=0.0)


#: How every compiled run of a check draws random numbers: :func:`eager_random`.
RANDOM_AS_EAGER = "as eager"


@contextlib.contextmanager
def eager_random(backend: str) -> Iterator[None]:
    """Under inductor, random ops call the eager ops (``fallback_random``), which draw what eager
    draws from the same seed. Inductor otherwise draws its own numbers, by a seed per random op
    assigned in the order of the compiled graph, and a checkpointed program is another graph: on an
    H200 (Llama of the 1.1B width, attention dropout 0.1, per-block compile) plain torch's step with a
    correct checkpoint was 1.23 from the step without (relative error norm), through other dropout
    masks, and 0.0 with eager draws. With eager draws, the baseline and every strategy draw the same
    masks, as the eager model would (docs/compile.md: "The oracle"). Other backends already draw as
    eager does. The engine holds it for a whole check too, so code a checkpoint function compiles
    itself on an eager model draws as eager (the user function compiling its layer: on the CPU,
    inductor's own draws for the tests' dropout MLP put it 0.38 from the eager baseline).

    Example:
        >>> import torch._inductor.config as inductor_config
        >>> with eager_random("inductor"):
        ...     inductor_config.fallback_random
        True
    """
    if backend != "inductor":
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        yield


def measure_distance(step: Any, subject: Any, scenario: Any, compiled_first: Any) -> CompileDistance:
    """Compile's own distance from eager: one eager step without checkpointing against the compiled
    baseline's first run ``compiled_first`` (which drew random numbers as eager does: :func:`compiled_run`).

    ``step(scenario, None)`` runs the subject; the eager run runs it under ``subject.eager()``.
    """
    from pytest_gradckpt.pipeline.comparison import measure_noise

    compiled_run_ = compiled_first
    with subject.eager():
        eager = step(scenario, None)
    for run in (compiled_run_, eager):
        if run.error is not None:
            raise RuntimeError(f"measuring compile's distance from eager: a step failed: {run.error}") from run.error
    return CompileDistance(
        grads=measure_noise(eager.grads, compiled_run_.grads).rel_norm,
        loss=measure_noise({"loss": eager.loss}, {"loss": compiled_run_.loss}).rel_norm,
        outputs=measure_noise(eager.outputs, compiled_run_.outputs).rel_norm)


#: How far a correct strategy's compiled program may be from the compiled baseline, in units of
#: compile's measured distance from eager (the triangle inequality, docs/compile.md): with B the
#: compiled baseline, S a strategy's compiled program and E the eager step, d(S, B) <= d(S, E) +
#: d(E, B); a correct S is one more compilation of the same math, so d(S, E) is of the size of
#: d(B, E), and d(S, B) <= 2 d(B, E). A strategy farther than that from its baseline is farther from
#: eager than compiling itself moved the baseline.
DISTANCE_FACTOR = 2.0


def tolerate_distance(baseline: Any, distance: CompileDistance, cap: float) -> float:
    """Let a strategy's compiled program differ from the compiled baseline by up to
    :data:`DISTANCE_FACTOR` times compile's own distance from eager, at most ``cap`` (the dtype's
    noise cap); returns that tolerance. A checkpointed program is another compilation of the same
    math (other fusions, other rounding, graph breaks that cut it into other pieces), and
    compiled-vs-eager is a measured pair of two such compilations; by the triangle inequality two
    compilations each that far from eager are at most twice that far from each other. The distance
    is a property of the program, and one tensor's figure is a single noisy sample (a kind with one
    tensor, the logits or the loss, is one sample only), so every compared tensor tolerates the
    largest distance measured anywhere in the program. (Per kind was not enough: on an H200, 1.1B
    bf16 under whole-model compile, ``sequential``'s logits were 0.0284 from the compiled baseline
    against a logits-only distance of about 0.028; with the largest distance alone, 0.0489, its
    gradients sat at 0.0487, inside by luck.) The baseline's noise is tolerated up to
    :data:`~pytest_gradckpt.pipeline.comparison.NOISE_FACTOR` times, so the tolerance enters divided by it.

    Example:
        >>> from pytest_gradckpt.pipeline.baselines import Baseline
        >>> from pytest_gradckpt.pipeline.runs import Run
        >>> base = Baseline(Run(loss=torch.ones(()), grads={"a": torch.ones(2), "b": torch.ones(2)}))
        >>> tolerate_distance(base, CompileDistance(grads={"a": 0.03}, loss={"loss": 0.01}, outputs={}), cap=0.125)
        0.06
        >>> {name: round(3 * noise, 3) for name, noise in base.grad_noise.rel_norm.items()}
        {'a': 0.06, 'b': 0.06}
        >>> round(3 * base.loss_noise.rel_norm["loss"], 3)
        0.06
    """
    from pytest_gradckpt.pipeline.comparison import NOISE_FACTOR

    tolerance = min(DISTANCE_FACTOR * distance.largest, cap)
    if tolerance == 0.0:
        return tolerance
    run = baseline.run
    for noise, names in ((baseline.grad_noise, run.grads), (baseline.loss_noise, ("loss",)),
                         (baseline.output_noise, run.outputs)):
        for name in names:
            noise.rel_norm[name] = max(noise.rel_norm.get(name, 0.0), tolerance / NOISE_FACTOR)
    return tolerance


# --------------------------------------------------------------------------- memory evidence under compile


def boundary_bytes(subject: Any, layer_names: list[str], autocast: bool = False) -> int:
    """Bytes of the tensors that enter or leave the checkpoint units in one forward (each storage
    once): what a checkpointed program keeps whatever it recomputes (a checkpoint saves its
    unit's inputs; a unit's output is the next unit's input, or what the code after it saves).
    Measured on a fresh eager copy under ``torch.no_grad`` (shapes only; nothing is trained).

    Example:
        >>> from pytest_gradckpt.pipeline.subject import Subject
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
        >>> boundary_bytes(Subject(net, torch.ones(4, 8), None, None), ["0", "2"])  # in and out of each: 4 x (4 x 8) floats
        512
    """
    from pytest_gradckpt.pipeline.tensors import tensor_leaves

    model = subject.fresh_model()
    seen: dict[tuple[Any, int], int] = {}

    def note(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        for value in tensor_leaves((args, kwargs, output)).values():
            if value.is_floating_point():
                storage = value.untyped_storage()
                seen[(value.device, storage.data_ptr())] = storage.nbytes()

    handles = [model.get_submodule(name).register_forward_hook(note, with_kwargs=True) for name in layer_names]
    mixed = torch.autocast(subject.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with torch.no_grad(), mixed:
            subject.call(model, subject.fresh_inputs())
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values())


def checkpoint_room(baseline_bytes: int, boundary: int | None) -> int | None:
    """How many saved-activation bytes checkpointing could still cut from the compiled baseline's:
    what the baseline saves beyond the units' :func:`boundary_bytes`. The compiled baseline already
    rematerialises what is cheap (AOT autograd's min-cut partitioner); where it keeps no more than
    the units' boundaries, checkpointing has nothing left to cut, and saved memory cannot tell
    checkpointing applied from not applied (``verdicts.recompute_unobserved`` then stays silent).

    ``boundary`` None (not measured): None, and the memory rule judges as without this.

    Example:
        >>> checkpoint_room(512, 512), checkpoint_room(4096, 512), checkpoint_room(512, None)
        (0, 3584, None)
    """
    return None if boundary is None else baseline_bytes - boundary


def try_boundary_bytes(subject: Any, layer_names: list[str], autocast: bool = False) -> int | None:
    """:func:`boundary_bytes`, or None when that extra forward fails (the check goes on without it:
    a model whose forward needs gradients on, say, is judged by memory as before).

    Example:
        >>> from pytest_gradckpt.pipeline.subject import Subject
        >>> try_boundary_bytes(Subject(torch.nn.Linear(2, 2), torch.ones(1, 2), None, None), ["no.such.unit"]) is None
        True
    """
    try:
        return boundary_bytes(subject, layer_names, autocast)
    except Exception:  # noqa: BLE001 - a missing measurement, never a crash of the check
        return None
