"""What a trainer adapter provides: one small class per trainer library, each in its own module.

An adapter knows, for one kind of trainer, where its checkpointing is configured, how the
trainer switches it on, how it takes one batch, and how it runs one training step (forward,
loss, backward) through its own code. It never steps an optimizer. The comparison itself
(:mod:`pytest_gradckpt.trainers.compare`) is the same for every trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class Configuration:
    """The checkpointing a trainer is configured with, as its settings say.

    Example:
        >>> c = Configuration(True, "gradient_checkpointing=True", "TrainingArguments.gradient_checkpointing")
        >>> c.enabled, c.field
        (True, 'TrainingArguments.gradient_checkpointing')
    """

    enabled: bool
    #: how it is set, in the trainer's own words (shown as the result's strategy)
    label: str
    #: the setting that turns it on or off, e.g. ``TrainingArguments.gradient_checkpointing``
    field: str
    #: keyword arguments the trainer passes to the checkpoint function
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the setting that holds ``kwargs``
    kwargs_field: str = ""


class TrainerAdapter:
    """Base class: subclass it for a trainer library and register it with
    :func:`pytest_gradckpt.trainers.register_trainer_adapter`."""

    #: shown in reports and errors, e.g. ``"transformers.Trainer"``
    name: str = ""

    def matches(self, trainer: Any) -> bool:
        """Whether ``trainer`` is one this adapter runs (without importing its library)."""
        raise NotImplementedError

    def configuration(self, trainer: Any) -> Configuration:
        """The trainer's checkpointing configuration."""
        raise NotImplementedError

    def preserved(self, trainer: Any) -> Any:
        """A context manager that leaves the trainer exactly as it was on entry."""
        raise NotImplementedError

    def model(self, trainer: Any) -> nn.Module:
        """The module the trainer trains (copied for every run, never stepped)."""
        raise NotImplementedError

    def batches(self, trainer: Any) -> Any:
        """What one optimizer step consumes, taken from the trainer's own data pipeline."""
        raise NotImplementedError

    def set_checkpointing(self, trainer: Any, model: nn.Module, enabled: bool) -> None:
        """Switch checkpointing on ``model`` (a private copy) on as the trainer would, or off."""
        raise NotImplementedError

    def step(self, trainer: Any, model: nn.Module, batches: Any) -> torch.Tensor:
        """One step through the trainer's own code on ``model``: forward, loss and backward for
        every micro-batch; returns the loss. No optimizer step."""
        raise NotImplementedError

    def device(self, trainer: Any, model: nn.Module) -> torch.device:
        """Where the trainer runs its step (the memory probes measure there): where ``model`` is, by default."""
        from pytest_gradckpt.pipeline.subject import model_device

        return model_device(model)

    def compute_dtype(self, trainer: Any, model: nn.Module) -> torch.dtype:
        """The dtype tolerances are chosen for (bf16 under the trainer's autocast)."""
        return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def advice(self, configuration: Configuration, outcome: str, message: str) -> str:
        """What to change in the trainer's settings, for a result that is not ``pass``."""
        return ""


def kwargs_advice(kwargs: dict[str, Any], where: str, outcome: str) -> str | None:
    """Advice that follows from the checkpoint function's keyword arguments, or None.

    Example:
        >>> kwargs_advice({"use_reentrant": True}, "TrainingArguments.gradient_checkpointing_kwargs", "silent")[:64]
        "Set TrainingArguments.gradient_checkpointing_kwargs={'use_reentr"
    """
    if outcome in ("silent", "error") and kwargs.get("use_reentrant", True) is not False:
        return (f"Set {where}={{'use_reentrant': False}} (reentrant checkpointing loses gradients when no input of "
                "a checkpointed layer requires grad, e.g. frozen embeddings under PEFT), or call "
                "model.enable_input_require_grads() before training")
    if outcome in ("mismatch", "buffers") and kwargs.get("preserve_rng_state") is False:
        return (f"Remove preserve_rng_state=False from {where}: the recompute then draws new dropout masks, so "
                "gradients no longer belong to the forward that made the loss")
    return None


def unwrap_checkpoint_wrappers(model: nn.Module) -> int:
    """Replace every torch ``CheckpointWrapper`` (``checkpoint_wrapper``/``offload_wrapper``) in
    ``model`` by the module it wraps; returns how many were removed.

    Example:
        >>> from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        >>> net = torch.nn.Sequential(checkpoint_wrapper(torch.nn.Linear(2, 2)))
        >>> unwrap_checkpoint_wrappers(net), type(net[0]).__name__
        (1, 'Linear')
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

    removed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            while isinstance(child, ActivationWrapper):
                child, removed = child._checkpoint_wrapped_module, removed + 1
                setattr(module, name, child)
    return removed


def count_checkpoint_wrappers(model: nn.Module) -> int:
    """How many torch ``CheckpointWrapper``/``OffloadWrapper`` modules ``model`` holds."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper

    return sum(isinstance(m, ActivationWrapper) for m in model.modules())
