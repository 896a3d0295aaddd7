"""transformers' ``Trainer`` and every trainer built on it (TRL's ``SFTTrainer``, ``DPOTrainer``...).

The step is the trainer's own: ``get_train_dataloader`` and ``get_batch_samples`` for one
optimizer step's micro-batches, the model prepared by its ``accelerator``, ``training_step``
for each (``compute_loss`` under ``compute_loss_context_manager``, gradient-accumulation
scaling, ``accelerator.backward``), with ``no_sync`` on all but the last micro-batch.
Checkpointing is switched on the way ``Trainer.train`` switches it on, which is the one
piece of ``train`` that cannot be called alone: with the ``TrainingArguments`` settings
(``activation_checkpointing``/``_kwargs`` from transformers 5.2x, ``gradient_checkpointing``/
``_kwargs`` before; TRL's ``SFTConfig`` inherits them), on the trainer's ``model``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from pytest_gradckpt import outcomes
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.trainers.adapter import Configuration, TrainerAdapter, kwargs_advice
from pytest_gradckpt.trainers.preserve import restored_attributes


def _fields(args: Any) -> tuple[str, str]:
    """The names of the switch and its keyword arguments in this transformers release."""
    if hasattr(args, "activation_checkpointing"):
        return "activation_checkpointing", "activation_checkpointing_kwargs"
    return "gradient_checkpointing", "gradient_checkpointing_kwargs"


def _kwargs(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    return dict(value or {})


class HFTrainer(TrainerAdapter):
    """``transformers.Trainer`` and its subclasses.

    Example:
        >>> HFTrainer().matches(object())
        False
    """

    name = "transformers.Trainer"

    def matches(self, trainer: Any) -> bool:
        transformers = sys.modules.get("transformers")
        return transformers is not None and isinstance(trainer, transformers.Trainer)

    def configuration(self, trainer: Any) -> Configuration:
        args = trainer.args
        switch, kwargs_name = _fields(args)
        settings = type(args).__name__
        enabled = bool(getattr(args, switch))
        kwargs = _kwargs(getattr(args, kwargs_name))
        label = f"{switch}={enabled}" + (f", {kwargs_name}={kwargs}" if kwargs else "")
        return Configuration(enabled, label, f"{settings}.{switch}", kwargs, f"{settings}.{kwargs_name}")

    @contextlib.contextmanager
    def preserved(self, trainer: Any) -> Iterator[None]:
        accelerator = getattr(trainer, "accelerator", None)
        with restored_attributes(trainer, trainer.args, trainer.state, trainer.control, accelerator,
                                 getattr(accelerator, "gradient_state", None), getattr(accelerator, "state", None)):
            yield

    def model(self, trainer: Any) -> nn.Module:
        if trainer.model is None:
            raise GradckptUsageError("check_trainer: the Trainer has no model (model_init is not supported: "
                                     "build the trainer with a model)")
        return trainer.model

    def batches(self, trainer: Any) -> Any:
        if trainer.train_dataset is None:
            raise GradckptUsageError("check_trainer: the Trainer has no train_dataset; pass one, since the "
                                     "check runs one step on a batch from the trainer's own dataloader")
        iterator = iter(trainer.get_train_dataloader())
        samples, items = trainer.get_batch_samples(iterator, trainer.args.gradient_accumulation_steps,
                                                   trainer.args.device)
        close = getattr(iterator, "close", None)
        if callable(close):
            close()
        if not samples:
            raise GradckptUsageError("check_trainer: the trainer's train dataloader yields no batch")
        return samples, items

    def set_checkpointing(self, trainer: Any, model: nn.Module, enabled: bool) -> None:
        if not enabled:
            disable = getattr(model, "activation_checkpointing_disable", None) or getattr(
                model, "gradient_checkpointing_disable", None)
            if getattr(model, "is_gradient_checkpointing", False) and disable is not None:
                disable()
            return
        switch, kwargs_name = _fields(trainer.args)
        kwargs = _kwargs(getattr(trainer.args, kwargs_name))
        if switch == "gradient_checkpointing":  # transformers 4.x: Trainer._inner_training_loop
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=getattr(trainer.args, kwargs_name))
            return
        # transformers 5.2x: Trainer.train takes every_n_layers and offload out of the kwargs
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None,
                                                  every_n_layers=every_n_layers, offload=offload)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None,
                                                every_n_layers=every_n_layers, offload=offload)

    def step(self, trainer: Any, model: nn.Module, batches: Any) -> torch.Tensor:
        samples, items = batches
        prepared = trainer.accelerator.prepare_model(model)
        with restored_attributes(trainer):  # compute_loss may look at self.model: it sees the copy
            trainer.model = trainer.model_wrapped = prepared
            trainer.current_gradient_accumulation_steps = len(samples)
            total = torch.zeros((), device=trainer.args.device)
            for index, inputs in enumerate(samples):
                last = index == len(samples) - 1
                sync = contextlib.nullcontext() if last else trainer.accelerator.no_sync(model=prepared)
                with sync:
                    total = total + trainer.training_step(prepared, inputs, items).detach().float()
        return total

    def compute_dtype(self, trainer: Any, model: nn.Module) -> torch.dtype:
        if trainer.args.bf16:
            return torch.bfloat16
        if trainer.args.fp16:
            return torch.float16
        return super().compute_dtype(trainer, model)

    def advice(self, configuration: Configuration, outcome: str, message: str) -> str:
        kwargs, where = configuration.kwargs, configuration.kwargs_field
        specific = kwargs_advice(kwargs, where, outcome)
        if specific:
            return specific
        if outcome == outcomes.NOT_APPLIED:
            return (f"{configuration.field}=True changes nothing in this model's step: it has no layer the "
                    "switch checkpoints; drop the setting or checkpoint the model another way")
        return (f"The step with {configuration.label} differs from the step with {configuration.field}=False; "
                f"change {where} or set {configuration.field}=False")


#: The adapters this module provides (read by the registry).
ADAPTERS: list[TrainerAdapter] = [HFTrainer()]
