"""Check the checkpointing a trainer really runs, as configured, through the trainer's own step.

``check_trainer(trainer)`` finds the adapter for the trainer's library in one registry
(:data:`BUILTIN_ADAPTERS`, then :func:`register_trainer_adapter`), runs one training step of
the trainer's own code on a batch from its own data pipeline with its checkpointing
configuration and again with checkpointing off, and judges the difference with the engine's
rules. The trainer is left exactly as it was: its model is copied for every run, no
optimizer steps, and every attribute it holds is restored. Adapter modules import their
library only when a trainer of theirs is checked.
"""

from __future__ import annotations

import importlib
from typing import Any

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.pipeline.registries import Registry
from pytest_gradckpt.spec import CheckSpec
from pytest_gradckpt.trainers.adapter import Configuration, TrainerAdapter

#: Modules holding a built-in adapter (each exports ``ADAPTERS``), in the order they are tried.
BUILTIN_ADAPTERS: tuple[str, ...] = ("pytest_gradckpt.trainers.deepspeed", "pytest_gradckpt.trainers.hf", "pytest_gradckpt.trainers.accelerate",
                                     "pytest_gradckpt.trainers.lightning")

#: Adapters registered here, the latest first (:class:`~pytest_gradckpt.pipeline.registries.Registry`; the
#: built-ins are imported from :data:`BUILTIN_ADAPTERS` when a trainer is checked).
_REGISTERED: Registry[TrainerAdapter] = Registry("trainer_adapters", (), name_of=lambda adapter: (
    adapter.name or type(adapter).__qualname__))

__all__ = ["BUILTIN_ADAPTERS", "Configuration", "TrainerAdapter", "adapter_for", "check_trainer",
           "check_trainer_spec", "register_trainer_adapter", "unregister_trainer_adapter"]


def register_trainer_adapter(adapter: TrainerAdapter) -> TrainerAdapter:
    """Make ``check_trainer`` accept the trainers ``adapter.matches``; tried before the built-ins.

    Example:
        >>> class Mine(TrainerAdapter):
        ...     name = "mine"
        ...     def matches(self, trainer): return trainer == "my trainer"
        >>> mine = register_trainer_adapter(Mine())
        >>> adapter_for("my trainer") is mine
        True
        >>> unregister_trainer_adapter("mine") is mine
        True
    """
    if not isinstance(adapter, TrainerAdapter):
        raise GradckptUsageError(f"register_trainer_adapter({adapter!r}): subclass "
                                 "pytest_gradckpt.trainers.TrainerAdapter")
    return _REGISTERED.register(adapter, first=True)


def unregister_trainer_adapter(name: str) -> TrainerAdapter:
    """Remove the adapter called ``name`` that :func:`register_trainer_adapter` added, and return it.

    Example:
        >>> unregister_trainer_adapter("nobody")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: unregister_trainer_adapter: no adapter named 'nobody' is registered; registered: (none)
    """
    refusal = _REGISTERED.unregister_refusal(name, "unregister_trainer_adapter", "adapter", "adapters")
    if refusal:
        raise GradckptUsageError(refusal)
    return _REGISTERED.unregister(name)


def _adapters() -> list[TrainerAdapter]:
    found = list(_REGISTERED.registered())
    for module in BUILTIN_ADAPTERS:
        found += importlib.import_module(module).ADAPTERS
    return found


def adapter_for(trainer: Any) -> TrainerAdapter:
    """The adapter that runs ``trainer``; a usage error naming the supported trainers otherwise.

    Example:
        >>> adapter_for(object())
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: check_trainer: no adapter for object; supported: ...
    """
    adapters = _adapters()
    for adapter in adapters:
        if adapter.matches(trainer):
            return adapter
    raise GradckptUsageError(
        f"check_trainer: no adapter for {type(trainer).__name__}; supported: "
        f"{', '.join(a.name for a in adapters)} (add one with register_trainer_adapter)")


def check_trainer(trainer: Any, *, rtol: float | None = None, atol: float | None = None,
                  min_memory_reduction: float | None = None, seed: int = 0, timeout: float | None = 300.0,
                  name: str | None = None) -> Any:
    """Judge ``trainer``'s checkpointing configuration against the same trainer with it off.

    One step (every micro-batch of one optimizer step) runs through the trainer's own code
    twice without checkpointing (the baseline and its noise) and once as configured. The
    report has one result; a result that is not ``pass`` names the setting to change. A
    trainer whose checkpointing is off gets ``skipped`` (nothing to check).

    Args:
        trainer: a ``transformers.Trainer`` (TRL's ``SFTTrainer`` included), or one a
            registered adapter runs. Never modified.
        rtol: relative tolerance; None = per compute dtype (bf16 under the trainer's bf16 autocast).
        atol: absolute tolerance; None = per compute dtype, as ``rtol``.
        min_memory_reduction: fraction in [0, 1): required cut of the saved-activation peak.
        seed: reseeds torch before every run.
        timeout: seconds one run may take.
        name: the name in reports (default: trainer and model class names).

    Returns:
        A :class:`~pytest_gradckpt.report.Report`.

    Example:
        >>> import pytest_gradckpt as gc
        >>> gc.check_trainer("not a trainer")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: check_trainer: no adapter for str; supported: ...
    """
    spec = CheckSpec.of(rtol=rtol, atol=atol, min_memory_reduction=min_memory_reduction, seed=seed, timeout=timeout)
    return check_trainer_spec(trainer, spec, name=name)


def check_trainer_spec(trainer: Any, spec: CheckSpec, *, name: str | None = None) -> Any:
    """:func:`check_trainer` with its options given as one :class:`~pytest_gradckpt.spec.CheckSpec`
    (the plugin's way in); it reads the options in :data:`~pytest_gradckpt.spec.TRAINER_OPTIONS`.

    Example:
        >>> from pytest_gradckpt.spec import CheckSpec
        >>> check_trainer_spec("not a trainer", CheckSpec.of(seed=1))
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: check_trainer: no adapter for str; supported: ...
    """
    from pytest_gradckpt import outcomes
    from pytest_gradckpt.release.environment import versions
    from pytest_gradckpt.pipeline.process_state import preserved_global_state
    from pytest_gradckpt.report import Report, Result
    from pytest_gradckpt.trainers.compare import SCENARIO, compare_configuration

    adapter = adapter_for(trainer)
    configuration = adapter.configuration(trainer)
    model_name = name or f"{type(trainer).__name__}({type(adapter.model(trainer)).__name__})"
    report = Report(model=model_name, versions=versions())
    if not configuration.enabled:
        report.results.append(Result(configuration.label, SCENARIO.name, outcomes.SKIPPED,
                                     f"checkpointing is off ({configuration.label}): nothing to check; set "
                                     f"{configuration.field}=True to check it", model=model_name))
        return report
    with preserved_global_state(), adapter.preserved(trainer):
        result, summary = compare_configuration(adapter, trainer, configuration, spec, model_name=model_name)
    report.baseline[SCENARIO.name] = summary
    report.results.append(result)
    return report
