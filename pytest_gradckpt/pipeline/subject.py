"""What ``check()`` was given, validated once, with messages that name the fix.

Every rule about acceptable input lives here.
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.compilation import compiled
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.pipeline.materialise import is_meta, to_device
from pytest_gradckpt.settings import check_fraction, check_timeout, check_tolerance  # noqa: F401 - re-exported
from pytest_gradckpt.pipeline.process_state import cuda_present
from pytest_gradckpt.pipeline.tensors import map_tensors, tensor_bytes, tensor_leaves, tensors_in  # noqa: F401 - re-exported

Inputs = Any  # Mapping[str, Tensor] | Sequence[Tensor] | Tensor | Callable[[], those]


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (CPU for a model without parameters).

    Example:
        >>> model_device(torch.nn.Linear(2, 2))
        device(type='cpu')
    """
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def default_loss(output: Any, inputs: Any) -> torch.Tensor:
    """``output.loss`` when the model computed one (transformers with labels); otherwise
    the sum over every floating-point tensor in the output of ``t.float().square().mean()``.

    Squares make the gradient flowing into the model depend on the output values,
    so an output that is wrong in backward cannot hide behind a constant gradient.

    Example:
        >>> float(default_loss(torch.ones(2, 3), None))
        1.0
    """
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    leaves = tensor_leaves(output)
    if not leaves:
        raise GradckptUsageError(
            f"default loss: the model returned {type(output).__name__} with no floating-point tensor and no "
            "'.loss'; pass loss=callable(output, inputs) returning a scalar tensor")
    return sum(t.float().square().mean() for t in leaves.values())


def describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{type(value).__name__} object"


class Subject:
    """The model, inputs and loss under test, able to make fresh private copies for each run."""

    _compilation: compiled.Compilation | None

    @property
    def compilation(self) -> compiled.Compilation | None:
        """Where and how the caller's model is compiled (None: eager); only the subject changes it
        (:meth:`order_compilation`, :meth:`eager`)."""
        return self._compilation

    def order_compilation(self, order: str | None, *, elsewhere: bool) -> None:
        """Apply ``check(compile_order=...)`` (:func:`pytest_gradckpt.compilation.compiled.with_order`);
        ``elsewhere``: the check runs steps in other processes, where compiled models cannot go."""
        self._compilation = compiled.with_order(self._compilation, order, elsewhere=elsewhere)

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Inside the block, runs of this subject are eager (compile's distance from eager is measured so).

        Example:
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
            >>> net[0].compile(backend="eager")
            >>> subject = Subject(net, torch.ones(1, 2), None, "cpu")
            >>> with subject.eager():
            ...     subject.compilation is None
            True
            >>> subject.compilation.kind
            'per_block'
        """
        compilation, self._compilation = self._compilation, None
        try:
            yield
        finally:
            self._compilation = compilation

    def __init__(self, model: Any, inputs: Inputs, loss: Callable[[Any, Any], torch.Tensor] | None,
                 device: str | torch.device | None):
        if not isinstance(model, nn.Module) and not callable(model):
            raise GradckptUsageError(
                f"model={describe(model)}: expected an nn.Module or a zero-argument factory returning one")
        if loss is not None and not callable(loss):
            raise GradckptUsageError(
                f"loss={describe(loss)}: expected a callable(output, inputs) returning a scalar tensor, or None "
                "for the default (output.loss, else a reduction of the output tensors)")
        self.model_source = model
        self.inputs_source = inputs
        self.loss_fn = loss or default_loss
        self._seen: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        # A compiled model is checked compiled: copies are made of the eager modules and compiled again.
        self._compilation = compiled.Compilation.of(model) if isinstance(model, nn.Module) else None
        self.reference = compiled.eager_view(model) if isinstance(model, nn.Module) else None
        self._spare: nn.Module | None = None
        self._template: nn.Module | None = None  # see share_build
        self._template_kept = False  # see keep_template_on_device
        self.build_seconds = 0.0  # how long the factory took here: distributed time limits scale with it
        sample = self.peek()
        self.device = self._resolve_device(device, sample)
        self.name = type(sample).__name__
        if not any(p.requires_grad for p in sample.parameters()):
            raise GradckptUsageError(
                f"{self.name} has no trainable parameters (every requires_grad is False), so there are no "
                "gradients to compare; unfreeze at least one parameter, e.g. attach a LoRA adapter")
        self.compute_dtype = next((p.dtype for p in sample.parameters() if p.is_floating_point()), torch.float32)
        self.check_inputs()

    def peek(self) -> nn.Module:
        """A model to read facts from (layers, dtype, names), never to train or change.

        The caller's own module when one was given: reading it is free, and no long-lived copy
        of a billion-parameter model is kept. From a factory: one product, handed out again
        by the next :meth:`fresh_model`, so it is not built in vain.
        """
        if self.reference is not None:
            return self.reference
        if self._spare is None and self._template is not None:
            return self._template  # read only, like the rest: runs get copies of it
        if self._spare is None:
            self._spare = self._build()
        return self._spare

    def drop_spare(self) -> None:
        """Let go of the model :meth:`peek` built, when this process will not train it (the ranks
        build their own): a factory that builds on a GPU would otherwise hold it there all along."""
        self._spare = None

    def share_build(self) -> None:
        """For processes started from here (ranks): the factory's product built here, when it is
        on the CPU or the meta device, becomes the template every later run copies, in shared
        memory, so ranks neither wait for a CPU build per step nor build at all.

        Example:
            >>> subject = Subject(lambda: torch.nn.Linear(2, 2), torch.ones(1, 2), None, None)
            >>> subject.share_build()
            >>> a, b = subject.fresh_model(), subject.fresh_model()
            >>> a is not b and torch.equal(a.weight, b.weight)
            True
        """
        spare = self._spare if self.reference is None else None
        if spare is None or model_device(spare).type not in ("cpu", "meta"):
            return
        # Shared memory: spawned ranks receive the weights as handles, not as a pickled copy.
        self._template, self._spare = (spare if model_device(spare).type == "meta" else spare.share_memory()), None

    def keep_template_on_device(self) -> None:
        """In a rank: the model every later run copies is kept on the rank's device, so a run costs
        a copy there, not a build (a factory that builds on the GPU) or a host copy and a transfer
        (a CPU template); on the host when the device has not room for it beside about three more
        copies (the run's model, its gradients, the held baseline's). A meta template stays as it is.

        Example:
            >>> subject = Subject(lambda: torch.nn.Linear(2, 2), torch.ones(1, 2), None, None)
            >>> subject.keep_template_on_device()
            >>> a, b = subject.fresh_model(), subject.fresh_model()
            >>> a is not b and torch.equal(a.weight, b.weight)
            True
        """
        if self._template_kept or isinstance(self.model_source, nn.Module) or (
                self._template is not None and is_meta(self._template)):
            return
        self._template_kept = True
        template = next((m for m in (self._template, self._spare) if m is not None), None)
        template = self._build() if template is None else template
        size = tensor_bytes([*template.parameters(), *template.buffers()])
        if self.device.type == "cuda" and torch.cuda.mem_get_info(self.device)[0] < 4 * size:
            template = to_device(template, torch.device("cpu"))
        else:
            template = to_device(template, self.device)
        self._template, self._spare = template, None

    def kept_template(self) -> nn.Module | None:
        """The model every run copies in a rank, once :meth:`keep_template_on_device` kept it on the
        rank's device (read only, like the caller's module); None before that, in the checking
        process, and for a meta template (each run materialises its own).

        Example:
            >>> subject = Subject(lambda: torch.nn.Linear(2, 2), torch.ones(1, 2), None, None)
            >>> subject.kept_template() is None
            True
            >>> subject.keep_template_on_device()
            >>> isinstance(subject.kept_template(), torch.nn.Linear)
            True
        """
        if not self._template_kept or self._template is None or is_meta(self._template):
            return None
        return self._template

    def on_device(self, device: torch.device) -> None:
        """Run on ``device`` from now on (a spawned rank's own GPU). A model received from the
        parent is moved there too, so ranks do not all hold a copy on the parent's GPU."""
        self.device = device
        if isinstance(self.model_source, nn.Module):
            self.model_source.to(device)

    def __getstate__(self) -> dict[str, Any]:
        # Spawned distributed ranks receive the subject pickled; the weak set is bookkeeping only.
        if self.compilation is not None:
            raise GradckptUsageError(
                f"{self.name} is compiled ({self.compilation.kind}); compiled models are checked in this process "
                "only: leave out the ddp/fsdp2 scenarios and isolate=True")
        state = dict(self.__dict__)
        state["_seen"] = None
        state["_spare"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._seen = weakref.WeakSet()

    @staticmethod
    def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
        if device in (None, "auto"):
            if device == "auto" and cuda_present():
                return torch.device("cuda")
            where = model_device(model)
            return torch.device("cpu") if where.type == "meta" else where  # a meta model is materialised there
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):
            raise GradckptUsageError(f"device={device!r}: not a device; pass 'cpu', 'cuda', 'auto' or None") from None
        if resolved.type == "cuda" and not cuda_present():
            raise GradckptUsageError(f"device={device!r}: CUDA is not available here; pass 'cpu' or 'auto'")
        return resolved

    def _build(self) -> nn.Module:
        started = time.perf_counter()
        model = self.model_source()
        self.build_seconds = max(self.build_seconds, time.perf_counter() - started)
        if not isinstance(model, nn.Module):
            raise GradckptUsageError(
                f"model factory {getattr(self.model_source, '__name__', self.model_source)!r} returned "
                f"{describe(model)}; it must return a new nn.Module each call")
        if model in self._seen:  # a factory that hands out one shared instance: never touch it
            model = copy.deepcopy(model)
        self._seen.add(model)
        if self._compilation is None:
            self._compilation = compiled.Compilation.of(model)
        return compiled.strip(model)

    def _from_template(self) -> nn.Module:
        if self._template is not None:
            try:
                return copy.deepcopy(self._template)
            except Exception:  # noqa: BLE001 - not copyable: build each run, as without a template
                self._template = None
        return self._build()

    def fresh_model(self) -> nn.Module:
        """A private copy of the model (a deep copy, or a new factory product) on the check's device."""
        if isinstance(self.model_source, nn.Module):
            try:
                model = compiled.eager_copy(self.model_source)
            except Exception as exc:  # noqa: BLE001 - any failure gets the same advice
                raise GradckptUsageError(
                    f"could not copy {type(self.model_source).__name__} ({type(exc).__name__}: {exc}); the check "
                    "never runs the caller's module itself, so pass a zero-argument factory that builds it") from exc
        else:
            model = self._spare if self._spare is not None else self._from_template()
            self._spare = None
        model = to_device(model, self.device)
        for param in model.parameters():
            param.grad = None
        return model

    def fresh_inputs(self) -> Any:
        """The inputs, built anew (factory) or cloned, on the check's device."""
        inputs = self._given_inputs()

        def clone(t: torch.Tensor) -> torch.Tensor:
            copy_ = t.detach().to(self.device, copy=True)
            return copy_.requires_grad_(t.requires_grad) if t.is_floating_point() else copy_

        return map_tensors(inputs, clone)

    def _given_inputs(self) -> Any:
        return self.inputs_source() if callable(self.inputs_source) and not isinstance(
            self.inputs_source, torch.Tensor) else self.inputs_source

    def check_inputs(self) -> None:
        # Where they were given: a check whose steps run on GPU ranks never uses CUDA here.
        inputs = self._given_inputs()
        if isinstance(inputs, Mapping):
            bad = {k: v for k, v in inputs.items() if not isinstance(k, str)}
            if bad:
                raise GradckptUsageError(f"inputs: mapping keys must be argument names (str), got {list(bad)!r}")
            values = list(inputs.values())
        elif isinstance(inputs, (list, tuple)):
            values = list(inputs)
        elif isinstance(inputs, torch.Tensor):
            values = [inputs]
        else:
            raise GradckptUsageError(
                f"inputs={describe(inputs)}: expected a mapping of keyword arguments, a tuple/list of positional "
                "arguments, a single tensor, or a zero-argument callable returning one of those")
        found = tensors_in(values)  # at any depth: nested inputs are inputs too
        if not found:
            raise GradckptUsageError(
                f"inputs contain no tensor ({', '.join(type(v).__name__ for v in values) or 'empty'}); "
                "checkpointing needs tensor inputs, e.g. {'input_ids': torch.randint(0, vocab, (2, 16))}")

    def call(self, model: nn.Module, inputs: Any) -> Any:
        """Run ``model`` on ``inputs`` the way their type says."""
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (list, tuple)):
            return model(*inputs)
        return model(inputs)

    def loss(self, output: Any, inputs: Any) -> torch.Tensor:
        """The scalar loss, validated."""
        value = self.loss_fn(output, inputs)
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            raise GradckptUsageError(
                f"loss must return a scalar floating-point tensor, got {describe(value) if shape is None else shape}"
                "; reduce it, e.g. with .mean()")
        return value.reshape(())
