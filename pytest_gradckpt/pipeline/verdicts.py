"""From a run and its baseline to a verdict: the evidence, then the rules in one ordered table.

:func:`gather` compares what can be compared (loss, outputs, gradients, buffers, recompute
counts) and lets each registered probe (:mod:`pytest_gradckpt.probes.registry`) add the evidence
it declares (memory cuts, say); :meth:`Evidence.metrics` is the comparison's metrics plus each
probe's. :data:`RULES` reads the evidence: the first rule that fires gives the
outcome. The table is sorted by :data:`pytest_gradckpt.outcomes.SEVERITY`, the one place the
severity policy lives (a lost gradient is never reported as a mere mismatch, a mismatch never
hides behind a memory complaint); rules of one outcome keep the order they are listed in. Where
one finding explains another (a step that does not apply also "raises"; nothing recomputed is
also a wrong count), the milder rule's condition excludes it, so each rule means one thing.
A new rule is one function and one row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from pytest_gradckpt import outcomes
from pytest_gradckpt.pipeline.baselines import Baseline
from pytest_gradckpt.errors import GradckptUsageError, StrategyNotApplicable, describe_error
from pytest_gradckpt.probes import registry
from pytest_gradckpt.probes.backward_calls import BackwardCallsProbe
from pytest_gradckpt.probes.compiled_regions import CompiledRegionsProbe
from pytest_gradckpt.pipeline.comparison import NOISE_FACTOR, Comparison, Noise, compare, noise_cap
from pytest_gradckpt.probes.recompute_counts import RecomputeProbe
from pytest_gradckpt.probes.op_counts import OpCountProbe
from pytest_gradckpt.probes.phases import PhasesProbe
from pytest_gradckpt.probes.unit_counter import recompute_verdict
from pytest_gradckpt.probes.saved_elsewhere import SavedElsewhereProbe
from pytest_gradckpt.probes.warnings import WarningsProbe, silent_warning
from pytest_gradckpt.pipeline.promises import OpsSeen, broken, recomputed_units
from pytest_gradckpt.report import Metrics, UnknownMetric
from pytest_gradckpt.pipeline.runs import Run
from pytest_gradckpt.strategies import Strategy, units_of


@dataclasses.dataclass
class Limits:
    """Tolerances and required memory cuts for one scenario."""

    rtol: float
    atol: float
    min_memory_reduction: float | None = None
    min_cuda_memory_reduction: float | None = None


@dataclasses.dataclass
class Evidence:
    """Everything the rules may read about one strategy's run."""

    strategy: Strategy
    run: Run
    baseline: Baseline
    lost_warning: str | None = None
    loss: Comparison | None = None
    outputs: Comparison | None = None
    grads: Comparison | None = None
    buffers: Comparison | None = None
    recomputed: int = 0
    checkpointable: int = 0
    recompute_problems: list[str] = dataclasses.field(default_factory=list)
    #: the tolerance of a strategy that compiled code itself on an eager model (:func:`own_compile_cap`)
    own_compile_tolerance: float | None = None
    activation_reduction: float | None = None
    cuda_reduction: float | None = None

    @property
    def compared(self) -> bool:
        """Whether the run completed and was compared with the baseline."""
        return self.grads is not None

    @property
    def values_equal(self) -> bool:
        return all(c is None or c.equal for c in (self.loss, self.outputs, self.grads))

    @property
    def within_noise(self) -> list[str]:
        return [n for c in (self.loss, self.outputs, self.grads) if c is not None for n in c.within_noise]

    def metrics(self) -> Metrics:
        """The measured facts a :class:`~pytest_gradckpt.report.Result` carries: the comparison's,
        then each registered probe's (only the keys it declares)."""
        metrics = Metrics()
        if self.grads is not None:
            metrics.update(max_grad_diff=self.grads.max_abs, worst_parameter=self.grads.worst,
                           baseline=self.baseline.kind)
        for kind in registry.registered():
            found = kind.metrics(self)
            undeclared = sorted(set(found) - set(kind.metric_keys))
            if undeclared:
                raise UnknownMetric(f"probe {kind.name!r} wrote metric(s) {', '.join(undeclared)} it does not declare "
                                    f"in metric_keys ({', '.join(kind.metric_keys) or 'none'}): declare them, or fix "
                                    "the key")
            metrics.update(found)
        if self.grads is not None and self.baseline.noisy:
            metrics.update(baseline_noise=self.baseline.noise, within_noise=self.within_noise)
        return metrics


def own_compile_cap(baseline: Baseline, run: Run) -> float | None:
    """The tolerance of a strategy whose checkpoint function compiled code itself on an eager model
    (``checkpoint(torch.compile(layer), ...)``, pytorch issue 147565): the run built compiled graphs
    (:class:`~pytest_gradckpt.probes.compiled_regions.CompiledRegionsProbe`) where the baseline and the
    model built none. Compiled code rounds otherwise than eager (an H200, bf16, the 1.1B layer under
    inductor: 0.039 from eager in plain torch), and the eager baseline cannot measure that distance for
    the strategy's own compile, so such a run may differ from it by up to the dtype's noise cap, the
    bound of compile's distance for compiled models (docs/compile.md). None for any other run.

    Example:
        >>> from pytest_gradckpt.probes.compiled_regions import CompiledRegions
        >>> grads = {"w": torch.ones(2, dtype=torch.bfloat16)}
        >>> own = Run(grads=grads, measured={"compiled_regions": CompiledRegions(graphs=1)})
        >>> own_compile_cap(Baseline(Run(grads=grads)), own), own_compile_cap(Baseline(Run(grads=grads)), Run(grads=grads))
        (0.125, None)
    """
    if run.compiled is not None or baseline.run.compiled is not None:
        return None
    if not run.of(CompiledRegionsProbe).graphs or baseline.run.of(CompiledRegionsProbe).graphs:
        return None
    return max((noise_cap(g.dtype) for g in baseline.run.grads.values() if g is not None), default=None)


def _at_least(noise: Noise, names: Any, rel_norm: float) -> Noise:
    return Noise({name: max(noise.rel_norm.get(name, 0.0), rel_norm) for name in {*noise.rel_norm, *names}})


def gather(strategy: Strategy, baseline: Baseline, run: Run, limits: Limits) -> Evidence:
    """Compare ``run`` with ``baseline`` (on the device where they live), then let each
    registered probe add its evidence.

    Example:
        >>> import torch
        >>> from pytest_gradckpt.probes.recompute_counts import LayerCalls
        >>> from pytest_gradckpt.strategies import get_strategy
        >>> base = Run(loss=torch.ones(()), grads={"w": torch.ones(3)},
        ...            measured={"recompute": LayerCalls(calls={"0": 1}, graph_calls={"0": 1})})
        >>> lost = Run(loss=torch.ones(()), grads={"w": None}, measured={"recompute": LayerCalls(calls={"0": 2})})
        >>> evidence = gather(get_strategy("non_reentrant"), Baseline(base), lost, Limits(1.3e-6, 1e-5))
        >>> evidence.grads.vanished, judge(evidence, Limits(1.3e-6, 1e-5))[0]
        (['w'], 'silent')
    """
    evidence = Evidence(strategy, run, baseline, lost_warning=silent_warning(run.of(WarningsProbe).warnings))
    if run.error is not None:
        return evidence
    base = baseline.run
    grad_noise, loss_noise, output_noise = baseline.grad_noise, baseline.loss_noise, baseline.output_noise
    evidence.own_compile_tolerance = own_compile_cap(baseline, run)
    if evidence.own_compile_tolerance is not None:
        floor = evidence.own_compile_tolerance / NOISE_FACTOR
        grad_noise, loss_noise = _at_least(grad_noise, base.grads, floor), _at_least(loss_noise, ("loss",), floor)
        output_noise = _at_least(output_noise, base.outputs, floor)
    evidence.grads = compare(base.grads, run.grads, limits.rtol, limits.atol, grad_noise)
    evidence.loss = compare({"loss": base.loss}, {"loss": run.loss}, limits.rtol, limits.atol, loss_noise)
    evidence.outputs = compare(base.outputs, {k: run.outputs.get(k) for k in base.outputs}, limits.rtol,
                               limits.atol, output_noise)
    evidence.buffers = compare(base.buffers, run.buffers, limits.rtol, limits.atol, Noise())
    base_calls, run_calls = base.of(RecomputeProbe), run.of(RecomputeProbe)
    evidence.recomputed, evidence.checkpointable, evidence.recompute_problems = recompute_verdict(
        base_calls.calls, run_calls.calls, _expected_recompute(strategy, base, run), base_calls.graph_calls,
        own_units=not units_of(strategy).engine_chosen, reached_calls=base_calls.reached_calls)
    fields = {field.name for field in dataclasses.fields(Evidence)}
    for kind in registry.registered():
        for name, value in kind.evidence(evidence).items():
            if name not in fields:
                raise AttributeError(f"probe {kind.name!r} adds evidence {name!r}, which Evidence has no field "
                                     f"for; a probe's own facts stay in its measurement (evidence.run.of(probe))")
            setattr(evidence, name, value)
    return evidence


def _expected_recompute(strategy: Strategy, base: Run, run: Run) -> dict[str, bool]:
    """Which units must recompute. Where the strategy does not say (``recomputes`` None), a unit it
    made keep its activations elsewhere (run under saved-tensor hooks the baseline did not have) and
    that it did not recompute is not expected to."""
    if strategy.recomputes is not None:
        return run.expected_recompute
    offloaded = (set(run.of(SavedElsewhereProbe).saved_elsewhere_units)
                 - set(base.of(SavedElsewhereProbe).saved_elsewhere_units))
    run_calls, base_calls = run.of(RecomputeProbe).calls, base.of(RecomputeProbe).calls
    return {**run.expected_recompute, **{name: False for name in offloaded
                                         if run_calls.get(name, 0) == base_calls.get(name, 0)}}


# --------------------------------------------------------------------------- the rules
# Each returns the message when it fires, None otherwise.

Rule = Callable[[Evidence, Limits], "str | None"]


def not_applicable(e: Evidence, limits: Limits) -> str | None:
    return str(e.run.error) if isinstance(e.run.error, StrategyNotApplicable) else None


def _raised(e: Evidence) -> BaseException | None:
    """What the step raised (a strategy that does not apply is not a failure of the step)."""
    return None if isinstance(e.run.error, StrategyNotApplicable) else e.run.error


def warned_then_raised(e: Evidence, limits: Limits) -> str | None:
    error = _raised(e)
    if e.lost_warning and error is not None:
        return (f"torch warned '{e.lost_warning}': parameters inside that layer get no gradient; the step then "
                f"raised {describe_error(error)}")
    return None


def raised(e: Evidence, limits: Limits) -> str | None:
    error = _raised(e)
    return describe_error(error) if error is not None else None


def ranks_disagree(e: Evidence, limits: Limits) -> str | None:
    return e.run.rank_disagreement


def warned_and_lost(e: Evidence, limits: Limits) -> str | None:
    # The warning is harmless only when every value still equals the baseline's
    # (it is also raised for calls under torch.no_grad(), where there is nothing to lose).
    if e.lost_warning and not e.values_equal:
        assert e.grads is not None
        return (f"torch warned '{e.lost_warning}': {len(e.grads.vanished) + len(e.grads.mismatched)} parameter "
                "gradient(s) lost or wrong, with no error")
    return None


def gradients_vanished(e: Evidence, limits: Limits) -> str | None:
    vanished = e.grads.vanished if e.grads is not None else []
    if not vanished:
        return None
    names = ", ".join(vanished[:3]) + (f" and {len(vanished) - 3} more" if len(vanished) > 3 else "")
    return (f"{len(vanished)} parameter(s) that have a gradient without checkpointing got None or all zeros, "
            f"with no error: {names}")


def values_differ(e: Evidence, limits: Limits) -> str | None:
    for comparison, what in ((e.loss, "loss"), (e.outputs, "outputs"), (e.grads, "gradients")):
        if comparison is not None and not comparison.equal:
            noise = (f"; the baseline's own run-to-run noise is {e.baseline.noise:.3g} (relative error norm), "
                     f"tolerated up to {NOISE_FACTOR:g}x" if e.baseline.noisy else "")
            return comparison.describe(what) + _gradient_damage(e, what) + noise
    return None


def _gradient_damage(e: Evidence, what: str) -> str:
    """What a differing loss or output did to the gradients: the damage a user ships. A loss off
    by 0.2% can come with gradients off by 5x, and the loss alone would hide it."""
    if what == "gradients" or e.grads is None:
        return ""
    if e.grads.equal:
        return "; every gradient equals the baseline's"
    return "; also " + e.grads.describe("gradients")


def buffers_differ(e: Evidence, limits: Limits) -> str | None:
    if e.buffers is not None and not e.buffers.equal:
        return (e.buffers.describe("buffers") + " after the step (e.g. BatchNorm statistics updated again during "
                "recompute)")
    return None


def _nothing_recomputed(e: Evidence) -> bool:
    return bool(e.checkpointable) and e.recomputed == 0 and not e.run.of(BackwardCallsProbe).recomputed_units


def never_recomputed(e: Evidence, limits: Limits) -> str | None:
    if _nothing_recomputed(e):
        return (f"no layer was recomputed: checkpointing is switched on but never ran ({e.checkpointable} layer(s) "
                "expected to run twice)")
    return None


def promise_broken(e: Evidence, limits: Limits) -> str | None:
    """The strategy's own promise (which units recompute, which ops it keeps, where activations
    live), against what the probes saw: a configuration can compute the right gradients and still
    not do what the user chose it for."""
    promise = e.run.promise
    if promise is None or not e.compared:
        return None
    base_calls, run_calls = e.baseline.run.of(RecomputeProbe).calls, e.run.of(RecomputeProbe).calls
    run_ops, base_ops = e.run.of(OpCountProbe), e.baseline.run.of(OpCountProbe)
    counted = run_ops.counted and base_ops.counted
    ops = OpsSeen(run_ops.backward_matmuls if counted else None, base_ops.backward_matmuls if counted else None,
                  f"{'compiled' if e.run.compiled is not None else 'eager'} torch {torch.__version__.split('+')[0]}")
    return broken(promise, recomputed_units(base_calls, run_calls) if base_calls else None, ops,
                  _host_bytes(e))


def _host_bytes(e: Evidence) -> int | None:
    """Saved activations in host memory after forward, where host and device are two memories."""
    return e.run.of(PhasesProbe).host_resident_bytes


def wrong_recompute_count(e: Evidence, limits: Limits) -> str | None:
    problems = e.recompute_problems
    if problems and not _nothing_recomputed(e):  # nothing recomputed at all is never_recomputed's finding
        return problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
    return None


def compiled_regions_not_recomputed(e: Evidence, limits: Limits) -> str | None:
    """Verdict rule for compiled runs: AOT autograd's joint graphs were read
    (:mod:`pytest_gradckpt.probes.compiled_regions`) and no checkpoint region in them is recomputed
    in backward, while the strategy promised recompute and no eager recompute was counted: the
    checkpoint never reached the compiled program (a switch that does nothing, a policy that saves
    every op)."""
    run, seen = e.run, e.run.of(CompiledRegionsProbe)
    if (run.compiled is None or not seen.graphs or seen.recomputed_regions or e.checkpointable
            or not any(run.expected_recompute.values()) or run.of(BackwardCallsProbe).recomputed_units
            or run.of(SavedElsewhereProbe).saved_elsewhere_units):
        return None
    return (f"no checkpoint region is recomputed in the compiled backward ({seen.graphs} compiled graph(s), "
            f"{seen.regions} checkpoint region(s) traced, none marked for recompute and used by backward)")


def recompute_unobserved(e: Evidence, limits: Limits) -> str | None:
    """Verdict rule for compiled runs: a checkpoint inside compiled code is recomputed inside the
    compiled backward, where no Python runs and no recompute can be counted. What remains
    observable is memory: the saved activations (autograd still packs what the compiled forward
    saves) must fall below the baseline's, else no checkpointing took effect."""
    run = e.run
    if (run.compiled is None or e.strategy.recomputes is False or e.checkpointable
            or run.of(BackwardCallsProbe).recomputed_units
            or run.of(SavedElsewhereProbe).saved_elsewhere_units  # an offload keeps its activations elsewhere
            or run.of(CompiledRegionsProbe).recomputed_regions):  # the compiled backward recomputes: observed
        return None
    reduction = e.activation_reduction
    if reduction is None or reduction > 0:
        return None
    base_compiled = e.baseline.run.compiled
    room = None if base_compiled is None else base_compiled.checkpoint_room_bytes  # compiled.checkpoint_room
    if room is not None and room <= 0:
        return None  # the compiled baseline keeps only the units' boundaries: no cut possible, no evidence
    return (f"saved activations fell by {reduction:.0%} under compile: no checkpointing took effect (the recompute "
            "runs inside the compiled backward, where it cannot be counted, so memory is the evidence)")


def too_little_saved_memory(e: Evidence, limits: Limits) -> str | None:
    wanted, got = limits.min_memory_reduction, e.activation_reduction
    if wanted is not None and e.checkpointable and e.baseline.measures_cost and (got is None or got < wanted):
        return (f"saved-activation memory fell by {0 if got is None else got:.0%}, below "
                f"min_memory_reduction={wanted:.0%}")
    return None


def too_little_cuda_memory(e: Evidence, limits: Limits) -> str | None:
    wanted, got = limits.min_cuda_memory_reduction, e.cuda_reduction
    if wanted is not None and got is not None and e.checkpointable and got < wanted:
        return (f"CUDA peak above weights and gradients fell by {got:.0%}, below "
                f"min_cuda_memory_reduction={wanted:.0%}")
    return None


#: Every rule with the outcome it gives; the order within one outcome is the order they are tried.
_RULES: tuple[tuple[str, Rule], ...] = (
    (outcomes.SILENT, warned_then_raised),
    (outcomes.SILENT, warned_and_lost),
    (outcomes.SILENT, gradients_vanished),
    (outcomes.ERROR, raised),
    (outcomes.MISMATCH, ranks_disagree),
    (outcomes.MISMATCH, values_differ),
    (outcomes.BUFFERS, buffers_differ),
    (outcomes.RECOMPUTE, promise_broken),
    (outcomes.RECOMPUTE, wrong_recompute_count),
    (outcomes.NOT_APPLIED, never_recomputed),
    (outcomes.NOT_APPLIED, compiled_regions_not_recomputed),
    (outcomes.NOT_APPLIED, recompute_unobserved),
    (outcomes.NOT_APPLIED, too_little_saved_memory),
    (outcomes.NOT_APPLIED, too_little_cuda_memory),
    (outcomes.SKIPPED, not_applicable),
)

#: The verdict policy: the first rule that fires decides. Sorted by outcomes.SEVERITY (worst
#: first; a stable sort, so rules of one outcome keep their order above).
RULES: tuple[tuple[str, Rule], ...] = tuple(sorted(_RULES, key=lambda row: outcomes.SEVERITY.index(row[0])))


def rules_in_force() -> tuple[tuple[str, Rule], ...]:
    """:data:`RULES` and the rules of the registered probes (``Probe.judges``), in severity order;
    within one outcome the table's own rules come first, then the probes' in registry order.

    Example:
        >>> rules_in_force() == RULES   # no registered probe brings a rule of its own
        True
    """
    brought = tuple(row for kind in registry.registered() for row in _judges_of(kind))
    if not brought:
        return RULES
    return tuple(sorted(_RULES + brought, key=lambda row: outcomes.SEVERITY.index(row[0])))


def _judges_of(kind: type[Any]) -> tuple[tuple[str, Rule], ...]:
    failing = outcomes.SEVERITY[:-1]  # every outcome but pass
    for outcome, _ in kind.judges:
        if outcome not in failing:
            raise GradckptUsageError(f"probe {kind.name!r} brings a rule whose outcome is {outcome!r}; "
                                     f"a rule's outcome is one of {', '.join(failing)}")
    return tuple(kind.judges)


def judge(evidence: Evidence, limits: Limits) -> tuple[str, str]:
    """``(outcome, message)``: the first rule in force (:func:`rules_in_force`) that fires, else ``pass``.

    A pass that needed the baseline's noise to pass says so.

    Example:
        >>> from pytest_gradckpt.strategies import get_strategy
        >>> e = Evidence(get_strategy("non_reentrant"), Run(error=RuntimeError("boom")), Baseline(Run()))
        >>> judge(e, Limits(1e-6, 1e-5))
        ('error', 'RuntimeError: boom')
    """
    for outcome, rule in rules_in_force():
        message = rule(evidence, limits)
        if message is not None:
            return outcome, message
    if evidence.within_noise and evidence.own_compile_tolerance is not None:
        return outcomes.PASS, (f"the checkpoint function compiled code itself on an eager model: judged within "
                               f"the dtype's noise cap {evidence.own_compile_tolerance:.3g} (relative error norm; "
                               "compiled code rounds otherwise than eager): "
                               f"{len(evidence.within_noise)} tensor(s) differ by more than the dtype's tolerance")
    if evidence.within_noise:
        return outcomes.PASS, (f"judged against the baseline's run-to-run noise (relative error norm up to "
                               f"{evidence.baseline.noise:.3g} between two runs without checkpointing): "
                               f"{len(evidence.within_noise)} tensor(s) differ by more than the dtype's tolerance "
                               f"but within {NOISE_FACTOR:g}x that noise")
    return outcomes.PASS, ""
