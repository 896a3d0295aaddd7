"""Baselines: what a strategy's run is compared with.

Two kinds, chosen by :func:`build`:

- ``whole-model`` (:func:`whole_model`): the training step without checkpointing. Exact, and
  the only one that can judge memory, but it needs the memory of an uncheckpointed step.
- ``layerwise`` (:func:`layerwise`): the same gradients computed one checkpoint unit at a time
  by the engine's own replay (:mod:`pytest_gradckpt.pipeline.replay`), in about the memory of a
  checkpointed step: for models that only fit with checkpointing. Used on request, and
  automatically when the whole-model step runs out of device memory.

The whole-model baseline is the same training step without checkpointing, run twice. The
second run proves the model reproducible before any strategy is blamed, and measures its
run-to-run noise: on CUDA a few kernels have no deterministic implementation, so two
identical steps can differ in their last bits. Differences up to a bound set by the compute
dtype (:func:`~pytest_gradckpt.pipeline.comparison.noise_cap`) are numerical noise, and
strategies are judged against it; larger ones mean randomness outside torch's seeded
generators, and nothing is judged.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable

import torch

from pytest_gradckpt import outcomes
from pytest_gradckpt.errors import (
    GradckptUsageError, HarnessFailure, NotReplayable, StrategyNotApplicable, describe_error)
from pytest_gradckpt.probes.cuda import CudaProbe
from pytest_gradckpt.pipeline.comparison import Noise, compare, measure_noise, noise_cap, nonfinite
from pytest_gradckpt.probes.memory import MemoryProbe
from pytest_gradckpt.probes.timing import StepTime, Timed
from pytest_gradckpt.pipeline.runs import Run
from pytest_gradckpt.strategies import Strategy
from pytest_gradckpt.pipeline.replay import LAYER_REPLAY
from pytest_gradckpt.pipeline.scenarios import Scenario
from pytest_gradckpt.settings import BASELINE_KINDS

#: ``step(scenario, strategy)``: a local step or a distributed launch.
StepFn = Callable[..., Run]

AUTO, WHOLE_MODEL, LAYERWISE = BASELINE_KINDS


@dataclasses.dataclass
class Baseline:
    """A judged baseline: the first run, and the noise measured against the second."""

    run: Run
    kind: str = WHOLE_MODEL
    #: why this kind was used (shown in the report)
    why: str = ""
    grad_noise: Noise = dataclasses.field(default_factory=Noise)
    loss_noise: Noise = dataclasses.field(default_factory=Noise)
    output_noise: Noise = dataclasses.field(default_factory=Noise)
    #: a compiled subject's baseline: compile's distance from eager, and what is tolerated for it
    compile_distance: float | None = None
    compile_tolerance: float | None = None

    @property
    def noisy(self) -> bool:
        return bool(self.grad_noise.rel_norm or self.loss_noise.rel_norm or self.output_noise.rel_norm)

    @property
    def noise(self) -> float:
        """The largest relative error norm between the two baseline runs (0 when identical)."""
        return max(self.grad_noise.largest, self.loss_noise.largest, self.output_noise.largest)

    def summary(self) -> dict[str, object]:
        """What the report says of this baseline."""
        run, cuda = self.run, self.run.of(CudaProbe)
        summary: dict[str, object] = {
            "judged": True, "kind": self.kind, "loss": None if run.loss is None else float(run.loss), "noise": self.noise,
            "activation_bytes": run.of(MemoryProbe).activation_bytes, "cuda_peak_bytes": cuda.cuda_peak_bytes,
            "seconds": run.of(StepTime).seconds}
        if cuda.rank_cuda_peak_bytes:
            summary["rank_cuda_peak_bytes"] = cuda.rank_cuda_peak_bytes
        if self.why:
            summary["why"] = self.why
        if self.compile_distance is not None:
            summary.update(compile_distance=self.compile_distance, compile_tolerance=self.compile_tolerance,
                           checkpoint_room_bytes=None if run.compiled is None else run.compiled.checkpoint_room_bytes)
        if not self.measures_cost:
            summary["memory"] = ("not judged: the layer-local baseline has no peak or time without "
                                 "checkpointing to compare with")
        return summary

    @property
    def measures_cost(self) -> bool:
        """Only a step without checkpointing says how much memory checkpointing saves, and what it costs in time."""
        return self.kind == WHOLE_MODEL

    def park(self) -> None:
        """Move the kept tensors to pinned host memory, for a device too full to hold them
        beside the next run; comparisons bring them back one tensor at a time."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or not isinstance(t, torch.Tensor):  # held where the run ran: that process's memory
                return t
            return t.to("cpu", copy=True).pin_memory()

        self.run.grads = {n: pin(g) for n, g in self.run.grads.items()}
        self.run.outputs = {n: pin(t) for n, t in self.run.outputs.items()}


@dataclasses.dataclass
class NotJudged:
    """No strategy can be judged under this scenario: every one gets ``outcome`` and ``reason``."""

    outcome: str
    reason: str

    def summary(self) -> dict[str, object]:
        return {"judged": False, "reason": self.reason}


def _validate(first: Run, scenario: Scenario, model_name: str) -> NotJudged | None:
    if isinstance(first.error, StrategyNotApplicable):
        return NotJudged(outcomes.SKIPPED, str(first.error))
    if isinstance(first.error, HarnessFailure):  # a hung or unlaunchable rank judged nothing: never skipped
        return NotJudged(outcomes.ERROR, describe_error(first.error))
    if isinstance(first.error, NotReplayable):
        return NotJudged(outcomes.ERROR, f"not judged: the layer-local baseline cannot replay a unit: {first.error}")
    if first.error is not None:
        if out_of_memory(first.error):
            raise GradckptUsageError(
                f"the step without checkpointing ran out of memory under {scenario.name} "
                f"({describe_error(first.error)}); pass baseline='layerwise' (or 'auto', the default) to judge "
                "against the layer-local baseline, which needs about the memory of a checkpointed step"
            ) from first.error
        if scenario.name == "train":
            raise GradckptUsageError(
                f"the model fails without checkpointing ({describe_error(first.error)}); check that the inputs "
                f"fit {model_name}.forward and that loss= returns a scalar") from first.error
        return NotJudged(outcomes.SKIPPED, f"the model itself fails under {scenario.name} without "
                                           f"checkpointing: {describe_error(first.error)}")
    if first.loss is None or not math.isfinite(float(first.loss)):
        raise GradckptUsageError(
            f"baseline loss under {scenario.name} is {float(first.loss) if first.loss is not None else None}, not "
            "finite; the model diverges without checkpointing, so nothing can be compared (check the inputs, "
            "dtype and initialisation)")
    present = [(n, g) for n, g in first.grads.items() if g is not None]
    if not present:
        raise GradckptUsageError(
            f"the loss does not reach any trainable parameter under {scenario.name}: every gradient is None; "
            "pass a loss= that depends on the model's output")
    bad = nonfinite(first.grads)
    if bad:
        raise GradckptUsageError(
            f"baseline gradients under {scenario.name} are not finite for {len(bad)} parameter(s), e.g. {bad[0]}; "
            "fix the model or inputs first (lower the learning signal, check the dtype)")
    return None


def build(step: StepFn, scenario: Scenario, model_name: str, dtype: torch.dtype,
          kind: str = AUTO) -> Baseline | NotJudged:
    """The baseline of ``kind`` (one of :data:`~pytest_gradckpt.settings.BASELINE_KINDS`); ``auto``
    falls back from whole-model to layerwise when the step without checkpointing runs out of
    device memory.

    Example:
        >>> from pytest_gradckpt.pipeline.subject import Subject
        >>> from pytest_gradckpt.pipeline.runs import Stepper
        >>> from pytest_gradckpt.pipeline.scenarios import SCENARIOS
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> stepper = Stepper(Subject(net, torch.ones(1, 2), None, None), None, seed=0, timeout=None)
        >>> baseline = build(stepper.step, SCENARIOS["train"], "net", torch.float32, "layerwise")
        >>> baseline.kind, baseline.why, baseline.measures_cost
        ('layerwise', "requested (baseline='layerwise')", False)
    """
    if kind == LAYERWISE:
        return layerwise(step, scenario, model_name, dtype, why=f"requested (baseline={LAYERWISE!r})")
    baseline = whole_model(step, scenario, model_name, dtype, fall_back=kind == AUTO)
    if isinstance(baseline, OutOfMemory):
        return layerwise(step, scenario, model_name, dtype,
                         why=f"automatic: the step without checkpointing ran out of memory ({baseline.detail})")
    return baseline


@dataclasses.dataclass
class OutOfMemory:
    """The whole-model step did not fit (only returned when a fallback is wanted)."""

    detail: str


def out_of_memory(error: BaseException | None) -> bool:
    """Whether ``error`` is the device running out of memory (CUDA or another accelerator).

    Example:
        >>> out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        True
        >>> out_of_memory(RuntimeError("shape mismatch"))
        False
    """
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _release(device_memory_of: Run) -> None:
    device_memory_of.error = None
    device_memory_of.drop_tensors()
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def whole_model(step: StepFn, scenario: Scenario, model_name: str, dtype: torch.dtype,
                fall_back: bool = False) -> Baseline | NotJudged | OutOfMemory:
    """Two steps without checkpointing; the first is the baseline, the second measures noise.

    ``dtype`` is the compute dtype: it bounds what counts as numerical noise. With
    ``fall_back``, a step that runs out of memory returns :class:`OutOfMemory` instead of failing.

    Example:
        >>> from pytest_gradckpt.pipeline.subject import Subject
        >>> from pytest_gradckpt.pipeline.runs import Stepper
        >>> from pytest_gradckpt.pipeline.scenarios import SCENARIOS
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> stepper = Stepper(Subject(net, torch.ones(1, 2), None, None), None, seed=0, timeout=None)
        >>> baseline = whole_model(stepper.step, SCENARIOS["train"], "net", torch.float32)
        >>> baseline.noisy, sorted(baseline.run.grads)[:2]
        (False, ['0.bias', '0.weight'])
    """
    return _two_runs(step, scenario, model_name, dtype, None, WHOLE_MODEL, "", fall_back)


def layerwise(step: StepFn, scenario: Scenario, model_name: str, dtype: torch.dtype,
              why: str = "") -> Baseline | NotJudged:
    """The no-checkpoint gradients computed one checkpoint unit at a time (two steps, as
    :func:`whole_model`): each unit's forward graph is dropped at once, and the unit is replayed
    from its recorded inputs and RNG state when its output gradient arrives
    (:class:`~pytest_gradckpt.pipeline.replay.LayerReplay`). Peak memory is about that of a checkpointed
    step; it cannot judge memory reductions.

    Example:
        >>> from pytest_gradckpt.pipeline.subject import Subject
        >>> from pytest_gradckpt.pipeline.runs import Stepper
        >>> from pytest_gradckpt.pipeline.scenarios import SCENARIOS
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2))
        >>> stepper = Stepper(Subject(net, torch.ones(1, 2), None, None), torch.nn.Linear, seed=0, timeout=None)
        >>> local = layerwise(stepper.step, SCENARIOS["train"], "net", torch.float32)
        >>> whole = whole_model(stepper.step, SCENARIOS["train"], "net", torch.float32)
        >>> from pytest_gradckpt.probes.recompute_counts import RecomputeProbe
        >>> all(torch.equal(local.run.grads[n], g) for n, g in whole.run.grads.items()), local.run.of(RecomputeProbe).calls
        (True, {'0': 1, '2': 1})
    """
    # The replay runs as a strategy of the step, so local and distributed steps need nothing new.
    baseline = _two_runs(step, scenario, model_name, dtype, LAYER_REPLAY, LAYERWISE, why, False)
    assert not isinstance(baseline, OutOfMemory)  # no fallback was asked for
    return baseline


def _two_runs(step: StepFn, scenario: Scenario, model_name: str, dtype: torch.dtype, replay: Strategy | None,
              kind: str, why: str, fall_back: bool) -> Baseline | NotJudged | OutOfMemory:
    first = step(scenario, replay)
    if fall_back and first.error is not None and out_of_memory(first.error):
        detail = describe_error(first.error)
        _release(first)
        return OutOfMemory(detail)
    refused = _validate(first, scenario, model_name)
    if refused is not None:
        return refused
    second = step(scenario, replay)
    if fall_back and second.error is not None and out_of_memory(second.error):
        detail = describe_error(second.error)
        _release(second)
        _release(first)
        return OutOfMemory(f"the second of two runs, beside the first's gradients: {detail}")
    if isinstance(second.error, HarnessFailure):
        return NotJudged(outcomes.ERROR, describe_error(second.error))
    if second.error is not None:
        return _not_reproducible(scenario, describe_error(second.error))
    baseline = Baseline(first, kind=kind, why=why, grad_noise=measure_noise(first.grads, second.grads),
                        loss_noise=measure_noise({"loss": first.loss}, {"loss": second.loss}),
                        output_noise=measure_noise(first.outputs, second.outputs))
    cap = noise_cap(dtype)
    for noise, what, kept, other in ((baseline.loss_noise, "loss", {"loss": first.loss}, {"loss": second.loss}),
                                     (baseline.grad_noise, "gradients", first.grads, second.grads),
                                     (baseline.output_noise, "outputs", first.outputs, second.outputs)):
        if noise.largest > cap:
            differing = compare(kept, other, rtol=0.0, atol=0.0)
            worst = max(noise.rel_norm, key=noise.rel_norm.__getitem__)
            return _not_reproducible(scenario, f"{len(differing.mismatched)} {what} differ; worst {worst}: relative "
                                               f"error norm {noise.rel_norm[worst]:.3g}, above the {cap:.3g} that "
                                               f"{str(dtype).replace('torch.', '')} rounding can explain")
    first.measured[StepTime.name] = Timed(min(first.of(StepTime).seconds, second.of(StepTime).seconds))
    del second
    return baseline


def _not_reproducible(scenario: Scenario, detail: str) -> NotJudged:
    # Not skipped: a gate must not go green when nothing was judged.
    return NotJudged(outcomes.ERROR, f"not judged: the model is not reproducible under {scenario.name}: two runs "
                                     f"without checkpointing differ ({detail}). Make it deterministic (randomness "
                                     "only from torch's seeded generator)")
