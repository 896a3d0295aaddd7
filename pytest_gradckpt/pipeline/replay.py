"""Layer-local replay: the engine's own no-checkpoint arithmetic, one checkpoint unit at a time.

The layer-local baseline (:func:`pytest_gradckpt.pipeline.baselines.layerwise`) needs the gradients a
training step *without* checkpointing would give, for a model whose step without
checkpointing does not fit. :class:`LayerReplay` gets them with one unit's activations at a
time: in forward, each unit runs as in a plain step (same grad mode, same requires_grad flags,
so the same kernels), its graph is dropped at once, and only what it needs to be replayed alone
is kept (its positional and keyword inputs, saved as a checkpoint saves them, the RNG state it
started from, the autocast state); in backward, when the gradient of its output arrives, the
unit is replayed from exactly those inputs and that RNG state, and the gradient is
back-propagated through the replay to its parameters and inputs. The arithmetic of every unit
is the plain, uncheckpointed forward and backward; only *when* it happens changes.

What it deliberately does differently from the checkpoint functions under test:

- the unit's trainable parameters are inputs of the replay node, so gradients reach them even
  when no input requires grad (frozen embeddings: the hazard of reentrant checkpointing);
- gradients are computed with ``torch.autograd.grad`` on the replay, so it works under both
  ``loss.backward()`` and ``torch.autograd.grad`` of the whole model;
- buffers the replay changes (BatchNorm running statistics) are put back, so the baseline's
  buffers are those of one forward;
- replays are not counted as layer executions, so recompute counts are judged as usual;
- the replay's outputs are compared with the first call's: a unit that gives other outputs when
  run again (state outside its parameters and buffers, randomness outside torch's generators)
  raises :class:`~pytest_gradckpt.errors.NotReplayable`, and the baseline says "not judged"
  instead of computing gradients that are not the step's.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from pytest_gradckpt.errors import NotReplayable
from pytest_gradckpt.pipeline.units import ModelInfo, instrumented
from pytest_gradckpt.pipeline.comparison import default_tolerances
from pytest_gradckpt.strategies import Strategy, install_layer_call


class _RngState:
    """The CPU generator's state and, for a unit on an accelerator, that device's."""

    def __init__(self, device: torch.device | None):
        self.cpu = torch.get_rng_state()
        self.device = device if device is not None and device.type != "cpu" else None
        self.accelerator = None
        if self.device is not None:
            self.accelerator = torch.get_device_module(self.device.type).get_rng_state(self.device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block from this state; the generators continue afterwards as if it had not run."""
        devices = [] if self.device is None else [self.device]
        device_type = "cuda" if self.device is None else self.device.type
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.get_device_module(self.device.type).set_rng_state(self.accelerator, self.device)
            yield


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    # A detached alias, not the tensor itself: a saved output packed as itself would hold its own
    # grad_fn, a cycle through autograd's C++ graph that Python's collector cannot break.
    return tensor.detach()


class _UnitCall:
    """One call of one unit: everything needed to run it again, and what it gave the first time."""

    def __init__(self, layer: torch.nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]):
        self.layer, self.forward = layer, forward
        record = instrumented(layer)
        self.name = type(layer).__name__ if record is None else record.name
        leaves, self.in_spec = tree_flatten((args, kwargs))
        self.leaves = leaves
        self.tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        tensors = [leaves[i] for i in self.tensor_at]
        device = next((t.device for t in tensors if t.device.type != "cpu"), None)
        self.rng = _RngState(device)
        self.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                         for kind in {"cpu", device.type if device is not None else "cpu"}]
        self.params = [p for p in layer.parameters() if p.requires_grad]
        #: weak references: the node must not own its own outputs (a cycle autograd cannot collect)
        self.first_outputs: list[tuple[weakref.ref[torch.Tensor], int]] = []
        self.out_spec: Any = None
        self.out_leaves: list[Any] = []

    def call(self, tensors: list[torch.Tensor]) -> Any:
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_at, tensors, strict=True):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.in_spec)
        return self.forward(*args, **kwargs)

    def run(self, tensors: tuple[torch.Tensor, ...], needs_grad: list[bool]) -> tuple[list[torch.Tensor], Any]:
        """The unit on detached copies of its inputs, with a graph (the inputs that need a gradient
        require one, as in a plain step, so every kernel is chosen as a plain step would choose it)."""
        inputs = [t.detach().requires_grad_(need) if need else t.detach() for t, need in zip(tensors, needs_grad, strict=True)]
        # The graph built here is dropped at once (forward) or used right away (replay): like a
        # checkpoint's, it bypasses the step's own saved-tensor hooks (e.g. offloading to the host).
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            return inputs, self.call(inputs)

    @contextlib.contextmanager
    def as_in_forward(self) -> Iterator[None]:
        """The RNG and autocast state of the original call, uncounted, buffers left as they were."""
        record = instrumented(self.layer)
        counter = None if record is None else record.counter
        buffers = [(b, b.detach().clone()) for b in self.layer.buffers()]
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.rng.restored())
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            if counter is not None:
                stack.enter_context(counter.uncounted())
            try:
                yield
            finally:
                with torch.no_grad():
                    for buffer, kept in buffers:
                        buffer.copy_(kept)

    def check_replayed(self, replayed: list[torch.Tensor]) -> None:
        """The replay must give what the first call gave, else its gradients are not the step's."""
        if len(replayed) != len(self.first_outputs):
            raise NotReplayable(f"{self.name}: gave {len(replayed)} output tensor(s) when run again from the same "
                                f"inputs, {len(self.first_outputs)} the first time; the layer-local baseline cannot "
                                "judge this model: use baseline='whole-model'")
        for index, ((ref, version), again) in enumerate(zip(self.first_outputs, replayed, strict=True)):
            first = ref()
            if first is None or first._version != version or not (first.is_floating_point() or first.is_complex()):
                continue  # released, or changed in place by the model after the call: nothing to compare with
            rtol, atol = default_tolerances(first.dtype)
            if first.shape != again.shape or not torch.allclose(first, again.detach(), rtol=rtol, atol=atol):
                raise NotReplayable(
                    f"{self.name}: output {index} differs when the unit runs again from the same inputs and RNG "
                    "state (state outside its parameters and buffers, or randomness outside torch's generators); "
                    "the layer-local baseline cannot judge this model: use baseline='whole-model'")


class _Replay(torch.autograd.Function):
    """Forward: the unit, its graph dropped. Backward: the unit replayed with one, back-propagated."""

    @staticmethod
    def forward(ctx: Any, unit: _UnitCall, n_inputs: int, *tensors: torch.Tensor) -> Any:
        ctx.unit = unit
        ctx.set_materialize_grads(False)
        # Saved as a checkpoint saves a unit's inputs: through the step's saved-tensor hooks, with
        # autograd's check that nothing changed them in place before backward.
        ctx.save_for_backward(*tensors[:n_inputs])
        _, output = unit.run(tensors[:n_inputs], list(ctx.needs_input_grad[2:2 + n_inputs]))
        unit.out_leaves, unit.out_spec = tree_flatten(output)
        outputs = tuple(v.detach() for v in unit.out_leaves if isinstance(v, torch.Tensor))
        unit.first_outputs = [(weakref.ref(t), t._version) for t in outputs]
        ctx.mark_non_differentiable(*[t for t in outputs if not (t.is_floating_point() or t.is_complex())])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> Any:
        unit: _UnitCall = ctx.unit
        needs = ctx.needs_input_grad[2:]
        try:
            saved = ctx.saved_tensors
        except RuntimeError as error:  # modified in place after the call
            raise NotReplayable(f"{unit.name}: {error}") from None
        with unit.as_in_forward():
            inputs, replayed = unit.run(saved, list(needs[:len(saved)]))
        outputs = [v for v in tree_flatten(replayed)[0] if isinstance(v, torch.Tensor)]
        unit.check_replayed(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if g is not None and o.requires_grad]
        wanted = [(i, x) for i, x in enumerate([*inputs, *unit.params]) if needs[i]]
        found: list[torch.Tensor | None] = [None] * len(wanted)
        if pairs and wanted:
            found = list(torch.autograd.grad([o for o, _ in pairs], [x for _, x in wanted],
                                             [g for _, g in pairs], allow_unused=True))
        grads: list[torch.Tensor | None] = [None] * len(needs)
        for (i, _), g in zip(wanted, found, strict=True):
            grads[i] = g
        ctx.unit = None  # release inputs and outputs with the node, not with the graph
        return (None, None, *grads)


def replay_call(forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run one call of an instrumented unit through the replay node (an :attr:`~pytest_gradckpt.pipeline.units.Instrumented.call`).

    Example:
        >>> layer = torch.nn.Linear(3, 3)
        >>> x = torch.randn(2, 3)
        >>> replay_call(layer.forward, (x,), {}).sum().backward()
        >>> torch.testing.assert_close(layer.weight.grad, torch.ones(3, 1) * x.sum(0))
    """
    unit = _UnitCall(getattr(forward, "__self__", None) or torch.nn.Module(), forward, args, kwargs)
    inputs = [unit.leaves[i] for i in unit.tensor_at]
    outputs = iter(_Replay.apply(unit, len(inputs), *inputs, *unit.params))
    for i in unit.tensor_at:
        unit.leaves[i] = None  # the node saved them
    leaves = [next(outputs) if isinstance(v, torch.Tensor) else v for v in unit.out_leaves]
    unit.out_leaves = []
    return tree_unflatten(leaves, unit.out_spec)


class LayerReplay(Strategy):
    """Installs :func:`replay_call` on every checkpoint unit: the layer-local baseline's step.

    Not a registered strategy (nothing here is under test); the baseline runs it as one so that
    local and distributed steps need nothing new.
    """

    name = "layer-local replay (baseline)"
    description = "the engine's own replay of each unit without checkpointing"

    def apply(self, info: ModelInfo) -> None:
        for layer in info.layers:
            install_layer_call(layer, replay_call)


#: The one instance the baseline uses.
LAYER_REPLAY = LayerReplay()
