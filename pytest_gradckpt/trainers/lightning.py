"""Lightning: a ``LightningModule`` with the ``activation_checkpointing_policy`` of its strategy.

``FSDPStrategy(activation_checkpointing_policy=...)`` applies checkpointing with Lightning's own
``_setup_activation_checkpointing`` (torch's ``apply_activation_checkpointing`` with
``checkpoint_wrapper``) when it sets the model up. FSDP itself needs GPUs, so the check applies
the policy exactly that way, through Lightning's function, to a copy of the module, and runs the
module's own ``training_step`` under the Lightning precision plugin's context, scaling the loss by
``accumulate_grad_batches`` and calling the module's ``backward`` as Lightning's automatic
optimization does. "Off" is the same module without the policy.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.trainers.adapter import Configuration, TrainerAdapter, unwrap_checkpoint_wrappers
from pytest_gradckpt.trainers.preserve import restored_attributes


@dataclasses.dataclass
class Fit:
    """What ``Trainer(strategy=..., accumulate_grad_batches=..., precision=...).fit(module, train_dataloaders)``
    would train, for ``check_trainer``.

    Example:
        >>> Fit(module=torch.nn.Linear(2, 2), strategy=None, train_dataloaders=[]).precision
        '32-true'
    """

    module: nn.Module
    #: the strategy carrying ``activation_checkpointing_policy`` (``FSDPStrategy``)
    strategy: Any
    train_dataloaders: Iterable[Any]
    accumulate_grad_batches: int = 1
    precision: str = "32-true"
    #: ``Trainer(accelerator=...)``: ``"auto"`` (CUDA when there is one, as Lightning picks), ``"cuda"`` or ``"cpu"``
    accelerator: str = "auto"


def _device(fit: Fit) -> torch.device:
    """Where Lightning would train: the module's copy and its batches are moved there."""
    if fit.accelerator not in ("auto", "cuda", "gpu", "cpu"):
        raise GradckptUsageError(f"check_trainer: Fit(accelerator={fit.accelerator!r}); use 'auto', 'cuda' or 'cpu'")
    if fit.accelerator in ("cuda", "gpu") or (fit.accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _policy_kwargs(strategy: Any) -> dict[str, Any]:
    kwargs = getattr(strategy, "_activation_checkpointing_kwargs", None)
    if kwargs is None:
        raise GradckptUsageError(
            f"check_trainer: {type(strategy).__name__} has no activation_checkpointing_policy; pass the "
            "FSDPStrategy(activation_checkpointing_policy=...) the Trainer is built with")
    return dict(kwargs)


def _policy_label(kwargs: dict[str, Any]) -> str:
    """The policy as the user wrote it: the module classes of Lightning's ``ModuleWrapPolicy``, else its kind."""
    classes = [c for v in kwargs.values() for c in getattr(v, "_module_classes", ())]
    if classes:
        return "{" + ", ".join(sorted(c.__name__ for c in classes)) + "}"
    return ", ".join(f"{k}={getattr(v, '__qualname__', type(v).__name__)}" for k, v in kwargs.items()) or "none"


class LightningAdapter(TrainerAdapter):
    """A :class:`Fit`: a LightningModule, its strategy's checkpointing policy, its data."""

    name = "lightning (pytest_gradckpt.trainers.lightning.Fit)"

    def matches(self, trainer: Any) -> bool:
        return isinstance(trainer, Fit)

    def configuration(self, trainer: Any) -> Configuration:
        kwargs = _policy_kwargs(trainer.strategy)
        strategy = type(trainer.strategy).__name__
        label = f"{strategy}(activation_checkpointing_policy={_policy_label(kwargs)})"
        return Configuration(bool(kwargs), label, f"{strategy}.activation_checkpointing_policy", {}, "")

    def preserved(self, trainer: Any) -> Any:
        return restored_attributes(trainer.module, trainer.strategy)

    def model(self, trainer: Any) -> nn.Module:
        return trainer.module

    def batches(self, trainer: Any) -> Any:
        iterator = iter(trainer.train_dataloaders)
        batches = list(itertools.islice(iterator, max(1, trainer.accumulate_grad_batches)))
        if not batches:
            raise GradckptUsageError("check_trainer: the train_dataloaders of Fit(...) yield no batch")
        return batches

    def set_checkpointing(self, trainer: Any, model: nn.Module, enabled: bool) -> None:
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing

        unwrap_checkpoint_wrappers(model)
        model.to(_device(trainer))
        if enabled:
            _setup_activation_checkpointing(model, _policy_kwargs(trainer.strategy))

    def _precision(self, trainer: Any) -> Any:
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision

        if "mixed" in str(trainer.precision):
            return MixedPrecision(str(trainer.precision), _device(trainer).type)
        return Precision()

    def step(self, trainer: Any, model: nn.Module, batches: Any) -> torch.Tensor:
        from lightning.fabric.utilities.apply_func import move_data_to_device

        precision = self._precision(trainer)
        model.train()
        total = torch.zeros(())
        for index, batch in enumerate(batches):
            batch = move_data_to_device(batch, _device(trainer))
            with precision.train_step_context():
                output = model.training_step(batch, index)
            loss = output["loss"] if isinstance(output, dict) else output
            # Lightning's automatic optimization divides by accumulate_grad_batches before backward
            model.backward(loss / max(1, trainer.accumulate_grad_batches))
            total = total + loss.detach().float().cpu()
        return total

    def device(self, trainer: Any, model: nn.Module) -> torch.device:
        return _device(trainer)

    def compute_dtype(self, trainer: Any, model: nn.Module) -> torch.dtype:
        precision = str(trainer.precision)
        if precision.startswith("bf16"):
            return torch.bfloat16
        if precision.startswith("16"):
            return torch.float16
        return super().compute_dtype(trainer, model)

    def advice(self, configuration: Configuration, outcome: str, message: str) -> str:
        if outcome == "buffers":
            return (f"Leave modules that update buffers in forward (BatchNorm) out of {configuration.field}: "
                    "their recompute updates the running statistics a second time")
        return (f"The module with {configuration.label} trains differently from the same module without it; "
                f"change {configuration.field}")


#: The adapters this module provides (read by the registry).
ADAPTERS: list[TrainerAdapter] = [LightningAdapter()]
