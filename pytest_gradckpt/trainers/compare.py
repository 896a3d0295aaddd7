"""A trainer's checkpointing configuration against the same trainer with checkpointing off.

Each run takes a private copy of the trainer's model, prepared (named, probes attached) by the
engine's own :func:`~pytest_gradckpt.pipeline.runs.prepare_copy`, switches checkpointing on (as the
trainer would) or off, and runs one step through the trainer's own code under
:func:`~pytest_gradckpt.pipeline.runs.probed`; the engine's baseline and verdict rules then judge it like any strategy.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from pytest_gradckpt import outcomes
from pytest_gradckpt.pipeline import baselines, engine, verdicts
from pytest_gradckpt.errors import GradckptUsageError, StrategyTimeout
from pytest_gradckpt.pipeline.process_state import deadline, seed_everything
from pytest_gradckpt.pipeline.units import ModelInfo, find_layers
from pytest_gradckpt.report import Result
from pytest_gradckpt.pipeline.runs import Run, prepare_copy, probed
from pytest_gradckpt.pipeline.scenarios import SCENARIOS
from pytest_gradckpt.spec import CheckSpec
from pytest_gradckpt.strategies import Strategy, Units
from pytest_gradckpt.trainers.adapter import Configuration, TrainerAdapter

#: The scenario a trainer's step is reported under: the trainer decides everything else.
SCENARIO = SCENARIOS["train"]


class Configured(Strategy):
    """The trainer's configuration, as a strategy the verdict rules can read. It chooses its
    own checkpoint units (whatever the trainer's switch wraps) and is applied by the adapter.

    Example:
        >>> Configured("gradient_checkpointing=True").units
        <Units.OWN: 'own'>
    """

    units = Units.OWN

    def __init__(self, label: str):
        self.name, self.description = label, f"the trainer as configured: {label}"

    def apply(self, info: ModelInfo) -> None:
        raise GradckptUsageError("a trainer's configuration is applied by its adapter, not by check()")


class TrainerStepper:
    """Runs the trainer's own step on fresh copies of its model, with checkpointing on or off.

    ``step(scenario, strategy)`` has the engine's step signature: ``strategy`` None means off.
    """

    def __init__(self, adapter: TrainerAdapter, trainer: Any, batches: Any, seed: int, timeout: float | None):
        self.adapter, self.trainer, self.batches = adapter, trainer, batches
        self.seed, self.timeout = seed, timeout
        self.model = adapter.model(trainer)  # taken once: the trainer's step may point the trainer at its copy
        self.device = adapter.device(trainer, self.model)  # Lightning moves its copies to the GPU
        self.layer_names, self.found_by = find_layers(self.model)

    def step(self, scenario: Any, strategy: Strategy | None, grad_targets: Any = None) -> Run:
        run = Run()
        grads = [p.grad for p in self.model.parameters()]
        try:
            self._step(run, strategy is not None)
        except GradckptUsageError:
            raise
        except (Exception, StrategyTimeout) as exc:  # noqa: BLE001 - every failure is a verdict
            run.error = exc.with_traceback(None)
        finally:
            self._keep_original_untouched(grads)
        return run

    def _keep_original_untouched(self, grads: list[Any]) -> None:
        """A copy whose forward was patched with a closure over the original model (TRL's fused LM head
        keeps the original ``forward`` for calls without ``fused_lm_head``) trains the original instead:
        give the original its gradients back and refuse, since the copy's gradients would say nothing."""
        touched = [p for p, g in zip(self.model.parameters(), grads, strict=True) if p.grad is not g]
        for parameter, grad in zip(self.model.parameters(), grads, strict=True):
            parameter.grad = grad
        if touched:
            raise GradckptUsageError(
                f"check_trainer: a step on a copy of the trainer's model changed {len(touched)} gradient(s) of the "
                "trainer's own model: something in the model (a forward patched with a closure over the original "
                "module) calls the original instead of the copy; the trainer's model was left as it was, but it "
                "cannot be checked until that patch is applied to the module it wraps")

    def _fresh_model(self) -> nn.Module:
        model = copy.deepcopy(self.model)
        for parameter in model.parameters():
            parameter.grad = None
        return model

    def _step(self, run: Run, checkpointing: bool) -> None:
        # Named and probed before checkpointing is switched, as the engine's copies are (runs.prepare_copy).
        prepared = prepare_copy(self._fresh_model(), self.layer_names, self.found_by, self.device)
        model = prepared.model
        self.adapter.set_checkpointing(self.trainer, model, checkpointing)
        if checkpointing:
            run.expected_recompute = {name: True for name in prepared.info.layer_names}
        trainable = [(prepared.param_names.get(id(p), n), p) for n, p in model.named_parameters() if p.requires_grad]
        prepared.view.trainable = trainable
        batches = copy.deepcopy(self.batches)  # the trainer's step may pop keys from its inputs
        seed_everything(self.seed, self.device)
        with probed(run, prepared, deadline(self.timeout)):
            loss = self.adapter.step(self.trainer, model, batches)
        run.loss = loss.detach().float()
        run.grads = {n: None if p.grad is None else p.grad.detach() for n, p in trainable}
        run.buffers = {prepared.buffer_names.get(id(b), n): b.detach().clone() for n, b in model.named_buffers()}


def compare_configuration(adapter: TrainerAdapter, trainer: Any, configuration: Configuration, spec: CheckSpec, *,
                          model_name: str) -> tuple[Result, dict[str, Any]]:
    """The verdict on ``configuration`` and the baseline's summary (call inside ``adapter.preserved``);
    ``spec`` gives the tolerances, the memory cut, the seed and the time limit."""
    strategy = Configured(configuration.label)
    batches = adapter.batches(trainer)
    stepper = TrainerStepper(adapter, trainer, batches, spec.seed, spec.timeout)
    dtype = adapter.compute_dtype(trainer, adapter.model(trainer))
    limits = engine.limits(spec, dtype)
    reference = baselines.whole_model(stepper.step, SCENARIO, model_name, dtype)
    assert not isinstance(reference, baselines.OutOfMemory)  # only returned when a fallback is asked for
    summary = reference.summary()
    summary["layers"] = stepper.layer_names
    if isinstance(reference, baselines.NotJudged):
        return Result(strategy.name, SCENARIO.name, reference.outcome, reference.reason, model=model_name), summary
    assert isinstance(reference, baselines.Baseline)
    run = stepper.step(SCENARIO, strategy)
    evidence = verdicts.gather(strategy, reference, run, limits)
    outcome, message = verdicts.judge(evidence, limits)
    if outcome != outcomes.PASS:
        advice = adapter.advice(configuration, outcome, message)
        message = f"{message}. {advice}" if advice else message
    metrics = evidence.metrics()
    metrics["setting"] = dataclasses.asdict(configuration)
    return Result(strategy.name, SCENARIO.name, outcome, message, metrics, model=model_name), summary
