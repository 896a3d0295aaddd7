"""DeepSpeed: a transformers ``Trainer`` configured with a ZeRO config, a raw engine from
``deepspeed.initialize``, and accelerate with its DeepSpeed plugin.

A DeepSpeed step is the engine's: ``deepspeed.initialize`` wraps a model and its optimizer, and
``engine.backward`` reduces (ZeRO-1/2) or reduce-scatters (ZeRO-3) the gradients into partitions
that the optimizer owns, so ``parameter.grad`` stays empty. Every run here builds a fresh engine
on its private copy of the model the way the trainer builds its own, runs ``engine.backward``
for every micro-batch of one optimizer step with the accumulation boundary on the last, and
gathers the partitioned gradients with ``deepspeed.utils.safe_get_full_grad`` (a collective:
every rank calls it in the same order) into the copy's parameters, where the comparison reads
them. ``engine.step`` (the optimizer step) never runs. A model that ZeRO-3 already partitioned
(built under ``zero.Init``, e.g. ``from_pretrained`` with a ZeRO-3 ``TrainingArguments`` alive)
(or an engine's module) is first gathered into a plain copy without ZeRO's hooks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.pipeline.subject import default_loss
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.pipeline.units import transformers_model_in
from pytest_gradckpt.trainers.adapter import Configuration, TrainerAdapter, kwargs_advice
from pytest_gradckpt.trainers.hf import HFTrainer
from pytest_gradckpt.trainers.preserve import restored_attributes


#: What ZeRO-3 sets on the modules it manages (deepspeed/runtime/zero/parameter_offload.py); a copy drops them.
_ZERO_MODULE_ATTRIBUTES = frozenset({
    "_original_parameters", "_external_params", "ds_external_parameters", "all_parameters", "ds_inflight_param_registry",
    "ds_id", "ds_recompute_parameters", "ds_grads_remaining", "applied_pre_backward_ref_cnt", "pre_bwd_fn",
    "post_bwd_fn", "to_empty", "_ds_child_entered"})


def is_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 has partitioned ``model``'s parameters (they carry a ``ds_id``).

    Example:
        >>> is_partitioned(torch.nn.Linear(2, 2))
        False
    """
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _managed(model: nn.Module) -> bool:
    """Whether an engine has managed ``model`` (partitioned it, hooked it, mapped its parameters)."""
    return is_partitioned(model) or any(hasattr(p, "_hp_mapping") for p in model.parameters()) or any(
        key in _ZERO_MODULE_ATTRIBUTES for m in model.modules() for key in vars(m))


def plain_copy(model: nn.Module, always: bool = False) -> nn.Module:
    """``model`` if no DeepSpeed engine has managed it (and not ``always``); otherwise a copy with
    ordinary, full parameters and without ZeRO's hooks and module attributes (parameters gathered on
    every rank when ZeRO-3 partitioned them: call it on all ranks together).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> plain_copy(net) is net, plain_copy(net, always=True) is net
        (True, False)
    """
    if not always and not _managed(model):
        return model
    parameters = list(model.parameters())
    gathered: Any = contextlib.nullcontext()
    if is_partitioned(model):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
    with gathered:
        memo: dict[int, Any] = {id(p): nn.Parameter(p.data.detach().clone(), p.requires_grad) for p in parameters}
        for module in model.modules():
            memo.update({id(value): None for key, value in vars(module).items() if key in _ZERO_MODULE_ATTRIBUTES})
        twin = copy.deepcopy(model, memo=memo)
    for module in twin.modules():
        _drop_zero_state(module)
    return twin


def _drop_zero_state(module: nn.Module) -> None:
    for key in [k for k in vars(module) if k in _ZERO_MODULE_ATTRIBUTES]:
        delattr(module, key)
    module._parameters = dict(dict.items(module._parameters))  # ZeRO-3 swaps in its own ordered dict
    for key, hooks in list(vars(module).items()):
        if key.endswith(("hooks", "hooks_with_kwargs", "always_called")) and isinstance(hooks, dict):
            for handle in [h for h, fn in hooks.items() if _from_deepspeed(fn)]:
                del hooks[handle]
                for other in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(module, other, {}).pop(handle, None)


def _from_deepspeed(hook: Any) -> bool:
    function = getattr(hook, "hook", hook)
    function = getattr(function, "func", function)
    return str(getattr(function, "__module__", "")).startswith("deepspeed")


class _BackwardWithoutStep:
    """Stands in for accelerate's ``DeepSpeedEngineWrapper`` during a check: the same
    ``set_gradient_accumulation_boundary`` + ``engine.backward``, without ``engine.step``
    (the optimizer step, which would also zero the gradients the check reads)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def backward(self, loss: torch.Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary=sync_gradients)
        self.engine.backward(loss, **kwargs)


def gather_gradients(engine: Any, model: nn.Module) -> None:
    """Put the full fp32 gradient of every trainable parameter of ``model`` (the engine's module)
    into ``parameter.grad``, with the parameter's full fp32 value as its data, then release the
    engine's hooks. A collective under ZeRO-3: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    gathered = []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        grad = safe_get_full_grad(parameter)
        value = safe_get_full_fp32_param(parameter)
        gathered.append((parameter, None if value is None else value.detach().clone(),
                         None if grad is None else grad.detach().float().clone()))
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        destroy()
    for parameter, value, grad in gathered:
        if value is not None:
            parameter.data = value.float()
        elif grad is not None:
            parameter.data = parameter.data.float()
        parameter.grad = grad


def is_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (``DeepSpeedEngine`` or a subclass), without importing DeepSpeed.

    Example:
        >>> is_engine(torch.nn.Linear(2, 2))
        False
    """
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def zero_stage(config: Mapping[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no ``zero_optimization``).

    Example:
        >>> zero_stage({"zero_optimization": {"stage": 3}}), zero_stage({})
        (3, 0)
    """
    return int((config.get("zero_optimization") or {}).get("stage", 0) or 0)


def config_dtype(config: Mapping[str, Any]) -> torch.dtype | None:
    """The compute dtype a DeepSpeed config turns on (``bf16``/``fp16`` enabled); None: neither.

    Example:
        >>> config_dtype({"bf16": {"enabled": True}}), config_dtype({"zero_optimization": {"stage": 3}})
        (torch.bfloat16, None)
    """
    if (config.get("bf16") or {}).get("enabled") is True:
        return torch.bfloat16
    if (config.get("fp16") or {}).get("enabled") is True:
        return torch.float16
    return None


class DeepSpeedTrainer(HFTrainer):
    """A transformers ``Trainer`` (TRL's included) whose ``TrainingArguments.deepspeed`` holds a
    DeepSpeed config: the engine is built as ``Trainer.train`` builds it (``deepspeed_init``, then
    ``accelerator.prepare``), and each micro-batch runs ``training_step``, whose
    ``accelerator.backward`` is ``engine.backward`` (without the optimizer step).

    Example:
        >>> DeepSpeedTrainer().matches(object())
        False
    """

    name = "transformers.Trainer with DeepSpeed (TrainingArguments.deepspeed)"

    def matches(self, trainer: Any) -> bool:
        return super().matches(trainer) and bool(getattr(trainer, "is_deepspeed_enabled", False))

    def _config(self, trainer: Any) -> dict[str, Any]:
        return dict(trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config)

    def configuration(self, trainer: Any) -> Configuration:
        configuration = super().configuration(trainer)
        stage = zero_stage(self._config(trainer))
        configuration.label += f" (DeepSpeed ZeRO-{stage})"
        return configuration

    def preserved(self, trainer: Any) -> Any:
        plugin = trainer.accelerator.state.deepspeed_plugin
        stack = contextlib.ExitStack()
        stack.enter_context(super().preserved(trainer))
        stack.enter_context(restored_attributes(plugin, getattr(plugin, "hf_ds_config", None)))
        return stack

    def model(self, trainer: Any) -> nn.Module:
        return plain_copy(super().model(trainer))

    def step(self, trainer: Any, model: nn.Module, batches: Any) -> torch.Tensor:
        from transformers.integrations.deepspeed import deepspeed_init

        samples, items = batches
        accelerator = trainer.accelerator
        # every run builds its engine on a trainer and accelerator as they were before the first
        with restored_attributes(trainer, accelerator, accelerator.gradient_state):
            trainer.model = trainer.model_wrapped = model
            max_steps = max(int(trainer.args.max_steps), 1)
            trainer.optimizer, trainer.lr_scheduler = deepspeed_init(trainer, num_training_steps=max_steps)
            trainer.create_optimizer()
            if type(trainer.lr_scheduler).__name__ == "DummyScheduler":
                engine, trainer.optimizer, trainer.lr_scheduler = accelerator.prepare(
                    model, trainer.optimizer, trainer.lr_scheduler)
            else:
                engine, trainer.optimizer = accelerator.prepare(model, trainer.optimizer)
            trainer.model_wrapped = trainer.deepspeed = engine
            accelerator.deepspeed_engine_wrapped = _BackwardWithoutStep(engine)
            trainer.current_gradient_accumulation_steps = len(samples)
            total = torch.zeros((), device=trainer.args.device)
            for index, inputs in enumerate(samples):
                accelerator.gradient_state._set_sync_gradients(index == len(samples) - 1)
                total = total + trainer.training_step(engine, inputs, items).detach().float()
            gather_gradients(engine, model)
        return total

    def compute_dtype(self, trainer: Any, model: nn.Module) -> torch.dtype:
        return config_dtype(self._config(trainer)) or super().compute_dtype(trainer, model)


@dataclasses.dataclass
class DeepSpeedEngine:
    """What ``check_trainer`` needs of a hand-written DeepSpeed loop: the engine
    ``deepspeed.initialize`` returned and the batches of one optimizer step.

    Checkpointing is what the engine's module carries (transformers' switch, or torch's checkpoint
    wrappers); the check builds a fresh engine with the same config and optimizer class for every
    run on a copy of the module, and never steps the given engine.

    Example:
        >>> DeepSpeedEngine(engine=None, batches=[]).loss is None
        True
    """

    engine: Any
    #: the micro-batches (a DataLoader or any iterable): the first ``gradient_accumulation_steps`` are used
    batches: Iterable[Any]
    #: ``loss(output, batch) -> scalar``; default ``output.loss``, else a sum of squares of the outputs
    loss: Callable[[Any, Any], torch.Tensor] | None = None


def _engine_config(engine: Any) -> dict[str, Any]:
    return copy.deepcopy(dict(engine.config))


def _fresh_optimizer(engine: Any, model: nn.Module) -> torch.optim.Optimizer | None:
    """An optimizer of the engine's client optimizer's class with its defaults, over ``model``'s
    trainable parameters; None when the config names the optimizer (DeepSpeed builds it)."""
    if "optimizer" in engine.config:
        return None
    basic = getattr(engine, "client_optimizer", None) or getattr(engine, "basic_optimizer", None)
    if basic is None:
        raise GradckptUsageError("check_trainer(DeepSpeedEngine(...)): the engine has no optimizer; build it with "
                                 "deepspeed.initialize(model=..., optimizer=... or a config with 'optimizer')")
    accepted = inspect.signature(type(basic).__init__).parameters
    defaults = {k: v for k, v in basic.defaults.items() if k in accepted}  # AdamW's defaults hold more than it takes
    return type(basic)([p for p in model.parameters() if p.requires_grad], **defaults)


class DeepSpeedEngineAdapter(TrainerAdapter):
    """A :class:`DeepSpeedEngine`: forward, loss and ``engine.backward`` per micro-batch, the
    accumulation boundary on the last, on a fresh engine of the same config."""

    name = "DeepSpeed engine (pytest_gradckpt.trainers.deepspeed.DeepSpeedEngine)"

    def matches(self, trainer: Any) -> bool:
        return isinstance(trainer, DeepSpeedEngine)

    def _engine(self, trainer: Any) -> Any:
        return trainer.engine

    def _source(self, trainer: Any) -> Iterable[Any]:
        return trainer.batches

    def configuration(self, trainer: Any) -> Configuration:
        from pytest_gradckpt.trainers.accelerate import _hf_checkpoint_kwargs

        module = self._engine(trainer).module
        kwargs = _hf_checkpoint_kwargs(module)
        stage = zero_stage(self._engine(trainer).config)
        if kwargs is None:
            return Configuration(False, f"no checkpointing in the engine's module (DeepSpeed ZeRO-{stage})",
                                 "model.gradient_checkpointing_enable() before deepspeed.initialize")
        label = f"model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={kwargs}) (DeepSpeed ZeRO-{stage})"
        field = "the gradient_checkpointing_kwargs given to model.gradient_checkpointing_enable before deepspeed.initialize"
        return Configuration(True, label, field, kwargs, field)

    def preserved(self, trainer: Any) -> Any:
        return restored_attributes(self._engine(trainer))

    def model(self, trainer: Any) -> nn.Module:
        return plain_copy(self._engine(trainer).module, always=True)

    def batches(self, trainer: Any) -> Any:
        steps = int(self._engine(trainer).gradient_accumulation_steps() or 1)
        iterator = iter(self._source(trainer))
        batches = list(itertools.islice(iterator, steps))
        close = getattr(iterator, "close", None)
        if callable(close):
            close()
        if not batches:
            raise GradckptUsageError(f"check_trainer: the batches of {type(trainer).__name__}(...) yield no batch")
        return batches

    def set_checkpointing(self, trainer: Any, model: nn.Module, enabled: bool) -> None:
        if enabled:
            return  # the copy carries the engine module's checkpointing as configured
        hf = transformers_model_in(model)
        if hf is not None and getattr(hf, "is_gradient_checkpointing", False):
            disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
            disable()

    def step(self, trainer: Any, model: nn.Module, batches: Any) -> torch.Tensor:
        import deepspeed

        given = self._engine(trainer)
        optimizer = _fresh_optimizer(given, model)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_engine_config(given),
                                          model_parameters=None if optimizer else
                                          [p for p in model.parameters() if p.requires_grad])
        engine.train()
        total = self._micro_batches(trainer, engine, batches)
        gather_gradients(engine, model)
        return total

    def _micro_batches(self, trainer: Any, engine: Any, batches: list[Any]) -> torch.Tensor:
        """Forward, loss and ``engine.backward`` per micro-batch, the accumulation boundary on the last."""
        loss_fn = trainer.loss or default_loss
        total = torch.zeros(())
        for index, batch in enumerate(batches):
            batch = _to(batch, engine.device)
            output = engine(**batch) if isinstance(batch, Mapping) else engine(*_positional(batch))
            loss = loss_fn(output, batch)
            engine.set_gradient_accumulation_boundary(is_boundary=index == len(batches) - 1)
            engine.backward(loss)
            total = total + loss.detach().float().cpu()
        return total

    def compute_dtype(self, trainer: Any, model: nn.Module) -> torch.dtype:
        return config_dtype(self._engine(trainer).config) or super().compute_dtype(trainer, model)

    def advice(self, configuration: Configuration, outcome: str, message: str) -> str:
        return kwargs_advice(configuration.kwargs, configuration.kwargs_field, outcome) or (
            f"The engine's module ({configuration.label}) trains differently from the same engine without "
            f"checkpointing; change {configuration.field}")


class AccelerateDeepSpeed(DeepSpeedEngineAdapter):
    """accelerate with its DeepSpeed plugin: a ``Prepared(accelerator, engine, dataloader)`` whose model is the
    engine ``accelerator.prepare`` returned. Each micro-batch runs as an accelerate loop runs it
    (``accelerator.accumulate``, ``accelerator.autocast``, ``accelerator.backward``, which is
    ``engine.backward`` here, without the optimizer step) on a fresh engine of the same config."""

    name = "accelerate with DeepSpeedPlugin (pytest_gradckpt.trainers.accelerate.Prepared)"

    def matches(self, trainer: Any) -> bool:
        from pytest_gradckpt.trainers.accelerate import Prepared

        return isinstance(trainer, Prepared) and is_engine(trainer.model)

    def _engine(self, trainer: Any) -> Any:
        return trainer.model

    def _source(self, trainer: Any) -> Iterable[Any]:
        return trainer.dataloader

    def preserved(self, trainer: Any) -> Any:
        accelerator = trainer.accelerator
        return restored_attributes(trainer.model, accelerator, getattr(accelerator, "gradient_state", None),
                                   getattr(accelerator, "state", None))

    def _micro_batches(self, trainer: Any, engine: Any, batches: list[Any]) -> torch.Tensor:
        accelerator, loss_fn = trainer.accelerator, trainer.loss or default_loss
        total = torch.zeros(())
        with restored_attributes(accelerator, accelerator.gradient_state):
            accelerator.deepspeed_engine_wrapped = _BackwardWithoutStep(engine)
            for index, batch in enumerate(batches):
                accelerator.gradient_state._set_sync_gradients(index == len(batches) - 1)
                with accelerator.autocast():
                    batch = _to(batch, engine.device)
                    output = engine(**batch) if isinstance(batch, Mapping) else engine(*_positional(batch))
                    loss = loss_fn(output, batch)
                accelerator.backward(loss)
                total = total + loss.detach().float().cpu()
        return total


def _to(batch: Any, device: torch.device) -> Any:
    from pytest_gradckpt.pipeline.tensors import map_tensors

    return map_tensors(batch, lambda t: t.to(device))


def _positional(batch: Any) -> tuple[Any, ...]:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


#: The adapters this module provides (read by the registry).
ADAPTERS: list[TrainerAdapter] = [DeepSpeedTrainer(), DeepSpeedEngineAdapter(), AccelerateDeepSpeed()]
