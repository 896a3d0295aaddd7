"""The built-in whole-model strategies (a library's switch, torch's wrapper, sequential segments) and
the one table of built-ins, :func:`builtin_strategies`, that the registry starts from.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pytest_gradckpt.errors import GradckptUsageError, StrategyNotApplicable
from pytest_gradckpt.pipeline.promises import Promise
from pytest_gradckpt.strategies.base import Strategy, Units, install_layer_call
from pytest_gradckpt.strategies.compile_budget import CompileBudget

if TYPE_CHECKING:  # pragma: no cover
    from pytest_gradckpt.pipeline.units import ModelInfo
from pytest_gradckpt.strategies.checkpoint_functions import (
    non_reentrant_checkpoint,
    offload_checkpoint,
    reentrant_checkpoint,
    sac_checkpoint,
    sac_offload_checkpoint,
    selective_checkpoint,
)



class TransformersAPI(Strategy):
    """The transformers model's own switch: ``activation_checkpointing_enable`` (5.23+)
    or ``gradient_checkpointing_enable`` (older), with ``use_reentrant`` set."""

    units = Units.OWN

    def __init__(self, name: str, use_reentrant: bool):
        self.name, self.use_reentrant = name, use_reentrant
        self.description = (f"the model's own activation/gradient_checkpointing_enable(use_reentrant={use_reentrant})")

    def applies_to(self, info: ModelInfo) -> str | None:
        if info.hf_model is None:
            return "not a transformers model (no PreTrainedModel inside)"
        if not getattr(info.hf_model, "supports_gradient_checkpointing", False):
            return f"{type(info.hf_model).__name__}.supports_gradient_checkpointing is False"
        return None

    def apply(self, info: ModelInfo) -> None:
        kwargs = {"use_reentrant": self.use_reentrant}
        enable = getattr(info.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            info.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class TransformersSwitch(Strategy):
    """transformers' switch with its own arguments, ``activation_checkpointing_enable(kwargs,
    every_n_layers, offload)`` (``gradient_checkpointing_enable`` where that is the installed name),
    judged by what it promises: exactly every ``every_n_layers``-th decoder layer recomputes, and
    with ``offload`` the saved activations live in host memory.

    Example:
        >>> s = TransformersSwitch(every_n_layers=2)
        >>> s.name, s.label
        ('hf_every_2', 'every_n_layers=2')
    """

    units = Units.OWN
    opt_in = True

    def __init__(self, name: str | None = None, every_n_layers: int = 1, offload: bool = False,
                 use_reentrant: bool = False):
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise GradckptUsageError(f"TransformersSwitch(every_n_layers={every_n_layers!r}): pass an int >= 1")
        self.every_n_layers, self.offload, self.use_reentrant = every_n_layers, offload, use_reentrant
        self.name = name or ("hf_offload" if offload else f"hf_every_{every_n_layers}")
        self.label = ", ".join([f"every_n_layers={every_n_layers}"] + (["offload=True"] if offload else []))
        self.description = f"transformers' activation_checkpointing_enable({self.label})"

    def _arguments(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if self.every_n_layers != 1:
            found["every_n_layers"] = self.every_n_layers
        if self.offload:
            found["offload"] = True
        return found

    def _enable(self, info: ModelInfo) -> tuple[Callable[..., Any], str]:
        for method, keyword in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                                ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
            found = getattr(info.model, method, None)
            if callable(found):
                return found, keyword
        raise StrategyNotApplicable("the model has no activation_checkpointing_enable or gradient_checkpointing_enable")

    def applies_to(self, info: ModelInfo) -> str | None:
        import inspect

        if info.hf_model is None:
            return "not a transformers model (no PreTrainedModel inside)"
        if not getattr(info.hf_model, "supports_gradient_checkpointing", False):
            return f"{type(info.hf_model).__name__}.supports_gradient_checkpointing is False"
        enable, _ = self._enable(info)
        accepted = inspect.signature(enable).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        missing = [name for name in self._arguments() if name not in accepted and not takes_any]
        if missing:
            import transformers

            return (f"transformers {transformers.__version__}'s {enable.__name__} takes no {', '.join(missing)} "
                    "(added in 5.23 as activation_checkpointing_enable(kwargs, every_n_layers, offload))")
        return None

    def apply(self, info: ModelInfo) -> None:
        enable, keyword = self._enable(info)
        enable(**{keyword: {"use_reentrant": self.use_reentrant}}, **self._arguments())

    def promise(self, info: ModelInfo) -> Promise:
        """Every ``every_n_layers``-th of the model's decoder layers (transformers'
        ``GradientCheckpointingLayer``, counted in module order as transformers counts them)."""
        decoder_layers = _checkpointing_layers(info)
        unit_of = {id(layer): name for name, layer in zip(info.layer_names, info.layers, strict=True)}
        promised = [unit_of[id(layer)] for index, layer in enumerate(decoder_layers)
                    if index % self.every_n_layers == 0 and id(layer) in unit_of]
        return Promise(self.label, units=tuple(info.layer_names), recomputed_units=tuple(promised),
                       activations="host" if self.offload else None)


def _checkpointing_layers(info: ModelInfo) -> list[Any]:
    """The modules transformers' switch counts for ``every_n_layers``, in module order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: the layers that carry the flag
        return [m for m in info.model.modules() if hasattr(m, "gradient_checkpointing")]
    return [m for m in info.model.modules() if isinstance(m, GradientCheckpointingLayer)]


class TorchWrapper(Strategy):
    """torch's own wrapper family, as torchtitan, torchtune, accelerate (FSDP) and Lightning apply it:
    ``apply_activation_checkpointing(model, checkpoint_wrapper_fn=..., check_fn=...)`` on the
    engine's checkpoint units. The wrapper replaces each unit by a ``CheckpointWrapper`` module
    (renaming every parameter inside with ``_checkpoint_wrapped_module``); gradients are matched
    by parameter identity, so the renaming is invisible to the verdict.

    ``impl``: ``"no_reentrant"``, ``"reentrant"`` (``checkpoint_wrapper``) or ``"offload"``
    (``offload_wrapper``: activations saved to pinned host memory, nothing recomputed).
    """

    units = Units.CHOSEN

    def __init__(self, name: str, impl: str):
        self.name, self.impl = name, impl
        self.recomputes = impl != "offload"
        self.description = {
            "no_reentrant": "torch apply_activation_checkpointing + checkpoint_wrapper (NO_REENTRANT) per layer",
            "reentrant": "torch apply_activation_checkpointing + checkpoint_wrapper (REENTRANT) per layer",
            "offload": "torch apply_activation_checkpointing + offload_wrapper: activations to host, no recompute",
        }[impl]

    def apply(self, info: ModelInfo) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper, offload_wrapper)

        if self.impl == "offload":
            wrapper: Callable[..., Any] = offload_wrapper
        else:
            impl = CheckpointImpl.REENTRANT if self.impl == "reentrant" else CheckpointImpl.NO_REENTRANT
            wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=impl)
        units = {id(layer) for layer in info.layers}
        apply_activation_checkpointing(info.model, checkpoint_wrapper_fn=wrapper,
                                       check_fn=lambda module: id(module) in units)


#: A model's own checkpointing switch, per library: (method, keyword arguments).
NATIVE_SWITCHES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("activation_checkpointing_enable", {}),   # transformers >= 5.23
    ("gradient_checkpointing_enable", {}),     # transformers (older), PEFT models through their base
    ("enable_gradient_checkpointing", {}),     # diffusers
    ("set_grad_checkpointing", {"enable": True}),  # timm
)


class NativeSwitch(Strategy):
    """The model's own switch, whichever library it comes from, with the library's defaults:
    what a user gets by calling it. Skipped, with the reason, where the model has none."""

    name = "native"
    units = Units.OWN
    description = ("the model's own switch with its defaults: transformers' activation/gradient_checkpointing_enable, "
                   "diffusers' enable_gradient_checkpointing, timm's set_grad_checkpointing")

    @staticmethod
    def _switch(info: ModelInfo) -> tuple[Callable[..., Any], dict[str, Any]] | None:
        for method, kwargs in NATIVE_SWITCHES:
            found = getattr(info.model, method, None)
            if callable(found):
                return found, kwargs
        return None

    def applies_to(self, info: ModelInfo) -> str | None:
        if self._switch(info) is None:
            return (f"{type(info.model).__name__} has no checkpointing switch of its own (looked for "
                    f"{', '.join(m for m, _ in NATIVE_SWITCHES)})")
        if info.hf_model is not None and not getattr(info.hf_model, "supports_gradient_checkpointing", True):
            return f"{type(info.hf_model).__name__}.supports_gradient_checkpointing is False"
        return None

    def apply(self, info: ModelInfo) -> None:
        switch = self._switch(info)
        assert switch is not None
        method, kwargs = switch
        method(**kwargs)


class SequentialSegments(Strategy):
    """``checkpoint_sequential``-style: about sqrt(n) segments of consecutive layers,
    each recomputed as one unit, so only segment inputs stay alive.

    Layers stay where the model calls them: the first layer of a segment runs
    the whole segment under a non-reentrant checkpoint and the others hand its
    output on. That is only valid when the model passes each layer's output
    straight to the next with the same extra arguments; each later layer checks
    it was called that way and otherwise the strategy reports ``skipped``.
    """

    name = "sequential"
    units = Units.CHOSEN
    description = "about sqrt(n) segments of consecutive layers, each checkpointed as one unit"

    def applies_to(self, info: ModelInfo) -> str | None:
        if len(info.layers) < 2:
            return "needs two or more layers to make segments"
        return None

    def apply(self, info: ModelInfo) -> None:
        layers = list(info.layers)
        segment_count = max(1, round(math.sqrt(len(layers))))
        size = math.ceil(len(layers) / segment_count)
        info.state["segments"] = [_Segment(layers[start:start + size]) for start in range(0, len(layers), size)]
        for segment in info.state["segments"]:
            segment.install()

    def after_forward(self, info: ModelInfo) -> None:
        for segment in info.state["segments"]:
            segment.finish_forward()


class _Segment:
    def __init__(self, layers: list[Any]):
        self.layers = layers
        self.output: Any = None
        self.rng_after: Any = None
        self.pending = 0  # later layers of the last head call that the model has not called yet
        self.extra: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}

    def install(self) -> None:
        install_layer_call(self.layers[0], self.run_head)
        for position, layer in enumerate(self.layers[1:], start=1):
            install_layer_call(layer, functools.partial(self.hand_on, position))

    @staticmethod
    def _hidden(output: Any) -> Any:
        return output if not isinstance(output, (tuple, list)) else output[0]

    def _not_chained(self, why: str) -> StrategyNotApplicable:
        return StrategyNotApplicable(
            f"sequential: {why}; this model does not call each layer once, in order, on the previous layer's "
            "output, so its layers cannot be fused into segments (use a per-layer strategy)")

    def finish_forward(self) -> None:
        if self.pending:
            name = _unit_name(self.layers[len(self.layers) - self.pending])
            self.pending = 0
            raise self._not_chained(f"{name} was never called after {_unit_name(self.layers[0])}")

    def run_head(self, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        from torch.utils.checkpoint import checkpoint

        if self.pending:
            raise self._not_chained(f"{_unit_name(self.layers[0])} was called again before "
                                    f"{_unit_name(self.layers[len(self.layers) - self.pending])}")
        head, followers = self.layers[0], self.layers[1:]
        recomputing = False  # in recompute, checkpoint's own control-flow exceptions must pass through

        def run_segment(*segment_args: Any) -> Any:
            # In recompute the head runs through its module too: a sharded (FSDP2) head gathers its weights.
            output = _through_module(head, segment_args, kwargs) if recomputing else forward(*segment_args, **kwargs)
            for layer in followers:
                try:
                    output = _through_module(layer, (self._hidden(output), *segment_args[1:]), kwargs)
                except Exception as error:  # noqa: BLE001 - the layer ran fine with its own arguments
                    if recomputing:
                        raise
                    raise StrategyNotApplicable(
                        f"sequential: layer {_unit_name(layer)} fails when given the previous layer's "
                        f"output and arguments ({type(error).__name__}: {str(error)[:120]}); this model passes "
                        "per-layer arguments, so its layers cannot be fused into segments") from error
            return output

        self.output = checkpoint(run_segment, *args, use_reentrant=False)
        recomputing = True
        self.pending = len(followers)
        self.extra, self.kwargs = args[1:], kwargs
        self.rng_after = _rng_state(args)
        return self.output

    def hand_on(self, position: int, forward: Callable[..., Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
        if self.pending != len(self.layers) - position:
            raise self._not_chained(f"{_unit_name(self.layers[position])} was called out of order")
        self.pending -= 1
        same_input = bool(args) and _same(args[0], self._hidden(self.output))
        same_extra = len(args[1:]) == len(self.extra) and all(_same(a, b) for a, b in zip(args[1:], self.extra, strict=True))
        same_kwargs = kwargs.keys() == self.kwargs.keys() and all(_same(kwargs[k], self.kwargs[k]) for k in kwargs)
        if not _same_rng(self.rng_after, _rng_state(args)):
            raise StrategyNotApplicable(
                f"sequential: the model draws random numbers between layers (e.g. LayerDrop) before "
                f"{_unit_name(self.layers[position])}; fusing layers into a segment would reorder those "
                "draws and change dropout masks, so segments cannot be used for this model")
        if not (same_input and same_extra and same_kwargs):
            raise StrategyNotApplicable(
                f"sequential: layer {_unit_name(self.layers[position])} was called with something other than "
                "the previous layer's output and the same extra arguments, so consecutive layers cannot be "
                "fused into one checkpointed segment for this model; use a per-layer strategy")
        return self.output


def _unit_name(layer: Any) -> str:
    """An instrumented unit's name in the original model (for messages)."""
    from pytest_gradckpt.pipeline.units import instrumented

    record = instrumented(layer)
    return type(layer).__name__ if record is None else record.name


def _same(given: Any, expected: Any) -> bool:
    """The same object, or the same tensor under another name: FSDP2's hooks hand a layer its
    inputs through an autograd function, as new tensors over the same memory, in containers
    rebuilt around them (a tuple of rotary embeddings is a new tuple of the same tensors).

    Example:
        >>> import torch
        >>> t = torch.ones(2, 3)
        >>> _same(t, t), _same(t.view(2, 3), t), _same(t.clone(), t), _same(t[0], t)
        (True, True, False, False)
        >>> _same((t.view(2, 3), 1), (t, 1)), _same({"a": t}, {"a": t.clone()})
        (True, False)
    """
    import torch

    if given is expected:
        return True
    if isinstance(given, (tuple, list)) and type(given) is type(expected):
        return len(given) == len(expected) and all(_same(a, b) for a, b in zip(given, expected, strict=True))
    if isinstance(given, dict) and isinstance(expected, dict):
        return given.keys() == expected.keys() and all(_same(given[k], expected[k]) for k in given)
    return (isinstance(given, torch.Tensor) and isinstance(expected, torch.Tensor)
            and given.data_ptr() == expected.data_ptr() and given.shape == expected.shape
            and given.stride() == expected.stride() and given.dtype == expected.dtype)


def _through_module(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """A layer's counted forward inside a segment. A layer sharded by FSDP2 (``fully_shard``) is
    called through its module, so its hooks gather its weights first and register their gradients'
    reduction, as plain torch does for a checkpointed function that calls sharded layers; any other
    layer runs its forward directly."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(layer, FSDPModule):
        return layer._gradckpt_forward(*args, **kwargs)
    layer.__dict__["forward"] = layer._gradckpt_forward  # the counted body, not the strategy's routing
    try:
        return layer(*args, **kwargs)
    finally:
        del layer.__dict__["forward"]


def _rng_state(args: tuple[Any, ...]) -> tuple[Any, Any]:
    import torch

    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    on_cuda = device is not None and device.type == "cuda"
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None


def _same_rng(before: tuple[Any, Any], now: tuple[Any, Any]) -> bool:
    import torch

    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(before, now, strict=True))


def _opt_in(strategy: Strategy) -> Strategy:
    strategy.opt_in = True
    return strategy


def builtin_strategies() -> tuple[Strategy, ...]:
    from_fn = Strategy.from_checkpoint_fn
    return (
        from_fn("reentrant", reentrant_checkpoint,
                description="torch.utils.checkpoint per layer, use_reentrant=True"),
        from_fn("non_reentrant", non_reentrant_checkpoint,
                description="torch.utils.checkpoint per layer, use_reentrant=False"),
        TransformersAPI("hf_reentrant", use_reentrant=True),
        TransformersAPI("hf_non_reentrant", use_reentrant=False),
        from_fn("selective", selective_checkpoint, skips_frozen=True,
                description="only layers with trainable parameters; reentrant made safe for frozen inputs"),
        from_fn("offload", offload_checkpoint,
                description="layer inputs kept in host memory, layer recomputed in backward"),
        from_fn("sac", sac_checkpoint,
                description="torch selective activation checkpointing: save matmul outputs, recompute the rest",
                promise=Promise("MUST_SAVE", kept_ops="matmuls")),
        SequentialSegments(),
        TorchWrapper("torch_wrapper", "no_reentrant"),
        TorchWrapper("torch_wrapper_reentrant", "reentrant"),
        TorchWrapper("torch_offload_wrapper", "offload"),
        NativeSwitch(),
        _opt_in(from_fn("sac_offload", sac_offload_checkpoint,
                        description="selective activation checkpointing whose policy offloads matmul outputs "
                                    "(MUST_CPU_OFFLOAD); opt-in",
                        promise=Promise("MUST_CPU_OFFLOAD", kept_ops="matmuls"))),
        TransformersSwitch(every_n_layers=2),
        TransformersSwitch(offload=True),
        CompileBudget(),
    )
