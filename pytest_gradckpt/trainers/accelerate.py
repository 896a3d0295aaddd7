"""accelerate: a model and the ``Accelerator`` that prepared it, stepped the way an accelerate
training loop steps: ``accelerator.accumulate(model)``, ``accelerator.autocast()``,
``accelerator.backward(loss)`` for each of ``gradient_accumulation_steps`` micro-batches.

Checkpointing is what the prepared model carries: transformers' switch
(``gradient_checkpointing_enable``, called before ``prepare``) or torch's checkpoint wrappers
(``apply_activation_checkpointing``, as accelerate's FSDP plugin applies them with
``activation_checkpointing=True``). "Off" is the same model with the switch off and the
wrappers removed. A model FSDP wraps is stepped as a copy without FSDP
(:mod:`pytest_gradckpt.trainers.unshard`): its checkpoint wrappers and parameters, not its sharding.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.pipeline.subject import default_loss
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.pipeline.units import transformers_model_in
from pytest_gradckpt.trainers.adapter import (Configuration, TrainerAdapter, count_checkpoint_wrappers,
                                              kwargs_advice, unwrap_checkpoint_wrappers)
from pytest_gradckpt.trainers.preserve import restored_attributes
from pytest_gradckpt.trainers.unshard import unsharded_copy


@dataclasses.dataclass
class Prepared:
    """What ``check_trainer`` needs of an accelerate training loop.

    Example:
        >>> Prepared(accelerator=None, model=torch.nn.Linear(2, 2), dataloader=[]).loss is None
        True
    """

    accelerator: Any
    #: the model as ``accelerator.prepare`` returned it
    model: nn.Module
    #: the training batches (a prepared DataLoader or any iterable)
    dataloader: Iterable[Any]
    #: ``loss(output, batch) -> scalar``; default ``output.loss``, else a sum of squares of the outputs
    loss: Callable[[Any, Any], torch.Tensor] | None = None


def _hf_checkpoint_kwargs(model: nn.Module) -> dict[str, Any] | None:
    """The keyword arguments transformers' switch gave its checkpoint function, or None when it is off."""
    hf = transformers_model_in(model)
    if hf is None or not getattr(hf, "is_gradient_checkpointing", False):
        return None
    functions = [getattr(m, "_gradient_checkpointing_func", None) for m in hf.modules()]
    function = next((f for f in functions if f is not None), None)
    return dict(getattr(function, "keywords", {}) or {})


class AccelerateAdapter(TrainerAdapter):
    """A :class:`Prepared` model and accelerator."""

    name = "accelerate (pytest_gradckpt.trainers.accelerate.Prepared)"

    def matches(self, trainer: Any) -> bool:
        return isinstance(trainer, Prepared)

    def configuration(self, trainer: Any) -> Configuration:
        kwargs = _hf_checkpoint_kwargs(trainer.model)
        wrappers = count_checkpoint_wrappers(trainer.model)
        parts = []
        if kwargs is not None:
            parts.append(f"model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={kwargs})")
        if wrappers:
            settings = ", ".join(_wrapper_settings(trainer.model))
            parts.append(f"{wrappers} torch checkpoint wrapper(s) ({settings}; apply_activation_checkpointing)")
        label = " + ".join(parts) or "no checkpointing in the prepared model"
        field = ("the gradient_checkpointing_kwargs given to model.gradient_checkpointing_enable before "
                 "accelerator.prepare" if kwargs is not None else
                 "the checkpoint_wrapper_fn given to apply_activation_checkpointing (or FullyShardedDataParallelPlugin."
                 "activation_checkpointing)")
        return Configuration(bool(parts), label, field, kwargs or {}, field)

    def preserved(self, trainer: Any) -> Any:
        accelerator = trainer.accelerator
        return restored_attributes(accelerator, getattr(accelerator, "gradient_state", None),
                                   getattr(accelerator, "state", None))

    def model(self, trainer: Any) -> nn.Module:
        # An FSDP-prepared model cannot be deep-copied: the runs start from a copy without FSDP
        return unsharded_copy(trainer.model)

    def batches(self, trainer: Any) -> Any:
        steps = getattr(trainer.accelerator, "gradient_accumulation_steps", 1) or 1
        iterator = iter(trainer.dataloader)
        batches = list(itertools.islice(iterator, steps))
        close = getattr(iterator, "close", None)
        if callable(close):
            close()
        if not batches:
            raise GradckptUsageError("check_trainer: the dataloader of Prepared(...) yields no batch")
        return batches

    def set_checkpointing(self, trainer: Any, model: nn.Module, enabled: bool) -> None:
        if enabled:
            return  # the copy is the prepared model: checkpointing as configured
        unwrap_checkpoint_wrappers(model)
        hf = transformers_model_in(model)
        if hf is not None and getattr(hf, "is_gradient_checkpointing", False):
            disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
            disable()

    def step(self, trainer: Any, model: nn.Module, batches: Any) -> torch.Tensor:
        accelerator, loss_fn = trainer.accelerator, trainer.loss or default_loss
        model.train()
        total = torch.zeros(())
        for batch in batches:
            with _accumulating(accelerator, model), accelerator.autocast():
                output = model(**batch) if isinstance(batch, Mapping) else model(*_positional(batch))
                loss = loss_fn(output, batch)
            accelerator.backward(loss)
            total = total + loss.detach().float().cpu()
        return total

    def compute_dtype(self, trainer: Any, model: nn.Module) -> torch.dtype:
        precision = str(getattr(trainer.accelerator, "mixed_precision", "no"))
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, super().compute_dtype(trainer, model))

    def advice(self, configuration: Configuration, outcome: str, message: str) -> str:
        if "preserve_rng_state=False" in configuration.label and outcome in ("mismatch", "buffers"):
            return ("The checkpoint wrappers are built with preserve_rng_state=False (accelerate's FSDP2 "
                    "activation_checkpointing builds them so): the recompute draws new dropout masks, so gradients no "
                    "longer belong to the forward that made the loss. Wrap with checkpoint_wrapper(...) keeping "
                    "preserve_rng_state=True (apply_activation_checkpointing yourself), or train without dropout")
        if "REENTRANT" in configuration.label.replace("NO_REENTRANT", "") and outcome in ("silent", "error"):
            return ("Wrap with checkpoint_wrapper(..., checkpoint_impl=CheckpointImpl.NO_REENTRANT) in "
                    "apply_activation_checkpointing: reentrant checkpointing loses gradients when no input of a "
                    "wrapped layer requires grad (frozen embeddings under PEFT)")
        return kwargs_advice(configuration.kwargs, configuration.kwargs_field, outcome) or (
            f"The prepared model ({configuration.label}) trains differently from the same model without "
            f"checkpointing; change {configuration.field}")


def _wrapper_settings(model: nn.Module) -> list[str]:
    """How the torch checkpoint wrappers in ``model`` checkpoint: their impl, and preserve_rng_state=False if set."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

    found = set()
    for module in model.modules():
        if isinstance(module, ActivationWrapper):
            impl = getattr(getattr(module, "checkpoint_impl", None), "name", "OFFLOAD")
            keywords = getattr(getattr(module, "checkpoint_fn", None), "keywords", {}) or {}
            found.add(impl + (", preserve_rng_state=False" if keywords.get("preserve_rng_state") is False else ""))
    return sorted(found)


def _accumulating(accelerator: Any, model: nn.Module) -> Any:
    """``accelerator.accumulate(model)``; for FSDP2 the unsharded copy has no gradient sync to turn off
    (accelerate would call ``set_requires_gradient_sync`` on it), so only the accumulation bookkeeping runs."""
    if getattr(accelerator, "is_fsdp2", False) and not hasattr(model, "set_requires_gradient_sync"):
        return accelerator.accumulate()
    return accelerator.accumulate(model)


def _positional(batch: Any) -> tuple[Any, ...]:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


#: The adapters this module provides (read by the registry).
ADAPTERS: list[TrainerAdapter] = [AccelerateAdapter()]
