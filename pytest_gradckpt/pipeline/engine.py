"""The check engine: a short pipeline, one room per stage.

    subject (:mod:`arguments`) -> runs, each with its probes (:mod:`runs`)
    -> baseline (:mod:`baselines`) -> evidence -> verdict rules in one ordered table (:mod:`verdicts`)

:func:`check` validates its options once into a :class:`~pytest_gradckpt.spec.CheckSpec` and hands
it to :func:`check_spec`, a list of named stages: the strategies and scenarios resolved (:class:`_Plan`), the
stepper (:func:`_stepper`), then per scenario (:func:`_check_scenario`) the baseline, built or
cached (:func:`_baseline`), and every strategy judged against it (:func:`_judge_one`).

Knows nothing of pytest. Distributed scenarios run the same step inside ranks that
:mod:`distributed` starts; this module only chooses which step function a scenario uses.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import torch
import torch.utils.checkpoint  # noqa: F401 - imported up front so its import time is not billed to a strategy
from torch import nn

from pytest_gradckpt.pipeline import baselines, verdicts
from pytest_gradckpt.compilation import compiled
from pytest_gradckpt.ranks import held
from pytest_gradckpt.pipeline.subject import Subject, tensor_bytes
from pytest_gradckpt.ranks.distributed import describe_ranks, device_before_build, launched_from_outside, refuse_unrunnable_world
from pytest_gradckpt.release.environment import versions
from pytest_gradckpt.pipeline.process_state import (
    deterministic_kernels,
    older_objects_left_to_refcounting,
    preserved_global_state,
)
from pytest_gradckpt.ranks.launcher import Launcher, build_on_ranks
from pytest_gradckpt.pipeline.units import unit_stacks
from pytest_gradckpt.probes.cuda import CudaProbe
from pytest_gradckpt.pipeline.comparison import default_tolerances, noise_cap, norms
from pytest_gradckpt.probes import registry
from pytest_gradckpt.probes.memory import MemoryProbe
from pytest_gradckpt.report import Report, Result
from pytest_gradckpt.pipeline.runs import Run, Stepper
from pytest_gradckpt.pipeline.scenarios import Scenario, resolve_scenarios
from pytest_gradckpt.spec import DEFAULT_TIMEOUT, CheckSpec
from pytest_gradckpt.strategies import Strategy, resolve_strategies
from pytest_gradckpt.strategies.checkpoint_functions import warm_up


def _fingerprint(run: Run, scenario: Scenario) -> dict[str, Any]:
    """The numbers a golden record keeps of one run: only reproducible ones. Under FSDP2 the
    all-gathered parameter buffers come and go at timing-dependent moments, so the saved-bytes
    peak varies between identical runs and is left out there."""
    return {"loss": None if run.loss is None else float(run.loss),
            "grad_norms": norms(run.grads),
            "activation_bytes": None if scenario.distributed == "fsdp2" else run.of(MemoryProbe).activation_bytes}


def check(model: nn.Module | Callable[[], nn.Module], inputs: Any, *,
          loss: Callable[[Any, Any], torch.Tensor] | None = None,
          strategies: Iterable[str | Strategy] | str | Strategy | None = None,
          layers: Any = None,
          scenarios: Iterable[str] | str | None = None,
          rtol: float | None = None,
          atol: float | None = None,
          min_memory_reduction: float | None = None,
          seed: int = 0,
          min_cuda_memory_reduction: float | None = None,
          device: str | torch.device | None = None,
          timeout: float | None = DEFAULT_TIMEOUT,
          name: str | None = None,
          cache: MutableMapping[Any, Any] | None = None,
          distributed: Mapping[str, Any] | None = None,
          fingerprint: bool = False,
          baseline: str = "auto",
          isolate: bool | str = False,
          compile_order: str | None = None) -> Report:
    """Check gradient checkpointing on ``model``: every strategy against the no-checkpoint baseline.

    Args:
        model: an ``nn.Module`` (never modified: the check works on deep copies) or a
            zero-argument factory returning a fresh one.
        inputs: a mapping (keyword arguments), a tuple/list (positional), one tensor,
            or a zero-argument callable returning one of those.
        loss: ``callable(output, inputs) -> scalar``; default ``output.loss`` if present,
            else the sum of ``t.float().square().mean()`` over the output's float tensors.
        strategies: names or :class:`Strategy` objects; None = every registered strategy
            (those that do not apply to the model are reported ``skipped``).
        layers: the checkpoint units: None (automatic), a dotted path, a module class,
            or a list of the model's modules.
        scenarios: names from :data:`pytest_gradckpt.pipeline.scenarios.SCENARIOS`; None = ``("train",)``.
        rtol: relative tolerance; None = per compute dtype (float32: 1.3e-6, bf16: 1.6e-2, fp16: 1e-3).
        atol: absolute tolerance; None = per compute dtype (1e-5 for float32, bf16 and fp16).
        min_memory_reduction: fraction in [0, 1): every checkpointing strategy must cut
            the saved-activation peak by at least this much, else ``not_applied``.
        seed: reseeds torch before every run so all runs draw the same numbers.
        min_cuda_memory_reduction: like ``min_memory_reduction``, for the CUDA allocator
            peak above weights and gradients (CUDA only).
        device: None (where the model is), ``"cpu"``, ``"cuda"`` or ``"auto"``.
        timeout: seconds one run may take before it ends as ``error``; None = no limit.
        name: the model's name in reports (default: its class name).
        cache: a dict shared by calls that check the same model and inputs under the
            same ``name``; baselines found in it are reused instead of recomputed.
        distributed: settings for the ``ddp``/``fsdp2`` scenarios: ``world_size`` (2),
            ``find_unused_parameters`` and ``static_graph`` (DDP, both False), ``micro_batches``
            (1; more accumulates with gradient sync only on the last: DDP ``no_sync``) and
            ``timeout`` (seconds per step on the ranks; None, the default, scales with the measured model
            build and step times: see ``docs/multi-gpu.md``). The ranks start once per check.
        baseline: what strategies are compared with: ``"whole-model"`` (the step without
            checkpointing), ``"layerwise"`` (the same gradients computed one checkpoint unit at a
            time, in about the memory of a checkpointed step; memory reductions are not judged),
            or ``"auto"`` (whole-model, and layerwise when that step runs out of device memory).
            ``report.baseline[scenario]["kind"]`` and ``["why"]`` say which was used.
        isolate: run every step in a child process, so a step that crashes the interpreter (a
            segmentation fault in native code) ends as ``error`` (``the step crashed its process:
            SIGSEGV``) instead of ending the caller's process. One child serves the whole check
            (a new one after a crash). ``"auto"`` (the pytest plugin's default): isolated where a
            forked child is cheap (a CPU model in a process that has not used CUDA), else in this
            process. False, the default here, runs in this process: a direct caller owns it, and
            many calls would each pay the fork (measured in docs/crash-safety.md).
        compile_order: for a model with compiled blocks, where checkpoints sit: ``"compile_outside"``
            (default: each compiled name is compiled after the strategy, its checkpoint wrapper included)
            or ``"checkpoint_outside"`` (the blocks' own forwards are compiled, checkpoints run eager
            around them). See docs/compile.md.
        fingerprint: add ``metrics["fingerprint"]`` (loss, every parameter's gradient norm,
            saved-activation peak) for golden records; see :mod:`pytest_gradckpt.release.golden`.

    On CUDA the check runs with deterministic kernels and restores every setting after
    (:func:`~pytest_gradckpt.pipeline.process_state.deterministic_kernels`); where the baseline still
    differs from itself by rounding noise, strategies are judged against that measured
    noise (:mod:`pytest_gradckpt.pipeline.baselines`). Gradients are compared on the device.

    Returns:
        A :class:`~pytest_gradckpt.report.Report`.

    Example:
        >>> import torch, pytest_gradckpt as gc
        >>> net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        ...                             for _ in range(3)])
        >>> report = gc.check(net, torch.randn(4, 8, requires_grad=True), strategies=["non_reentrant"])
        >>> [(r.strategy, r.outcome) for r in report.results]
        [('non_reentrant', 'pass')]
    """
    spec = CheckSpec.of(strategies=strategies, layers=layers, scenarios=scenarios, rtol=rtol, atol=atol,
                        min_memory_reduction=min_memory_reduction, seed=seed,
                        min_cuda_memory_reduction=min_cuda_memory_reduction, device=device, timeout=timeout,
                        distributed=distributed, fingerprint=fingerprint, baseline=baseline, isolate=isolate,
                        compile_order=compile_order)
    return check_spec(model, inputs, spec, loss=loss, name=name, cache=cache)


def check_spec(model: nn.Module | Callable[[], nn.Module], inputs: Any, spec: CheckSpec, *,
               loss: Callable[[Any, Any], torch.Tensor] | None = None, name: str | None = None,
               cache: MutableMapping[Any, Any] | None = None) -> Report:
    """:func:`check` with its options given as one validated :class:`~pytest_gradckpt.spec.CheckSpec`
    (the plugin's way in); ``model``, ``inputs``, ``loss``, ``name`` and ``cache`` as :func:`check`'s.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
        >>> spec = CheckSpec.of(strategies=["non_reentrant"], layers=torch.nn.Linear)
        >>> [r.outcome for r in check_spec(net, torch.randn(2, 4, requires_grad=True), spec).results]
        ['pass']
    """
    plan = _Plan(spec, resolve_strategies(spec.strategies), resolve_scenarios(spec.scenarios), cache)
    if any(s.distributed for s in plan.scenarios):  # before any model is built
        refuse_unrunnable_world(spec.distributed.as_dict(), device_before_build(model, spec.device))
    # The per-op probes only where a judged promise reads them: their dispatch modes cost more than the steps.
    with preserved_global_state(), registry.using(*registry.lean(_read_per_op(plan.strategies)), only=True), \
            older_objects_left_to_refcounting():
        catalog = [*plan.strategies, *plan.scenarios]
        # Every step on ranks the check starts: they start now and build the model, not this process.
        built = build_on_ranks(model, functools.partial(_rank_stepper, model, inputs, loss,
                                                        dataclasses.replace(plan, cache=None)),
                               spec.device, spec.distributed.as_dict(), all(s.distributed for s in plan.scenarios),
                               catalog)
        if built is None:  # else the ranks step and warmed up themselves: autograd here would stop forking
            warm_up()
        try:
            stepper, isolated = _stepper(model if built is None else built.model(model), inputs, loss, plan)
        except BaseException:
            if built is not None:
                built.group.close(wait=False)
            raise
        report = _new_report(name or stepper.subject.name, stepper)
        if not isinstance(model, nn.Module):  # a factory ran: on the ranks that built, or here
            report.baseline["factory_seconds"] = built.limit.build_seconds if built else stepper.subject.build_seconds
        # Ranks (distributed scenarios, isolated steps) start once and serve the whole check.
        launcher = Launcher(stepper, catalog, built)
        compiled_subject = stepper.subject.compilation is not None
        # Code a checkpoint function compiles itself draws random numbers as eager too (compiled.eager_random).
        with deterministic_kernels(stepper.subject.device, compiled_subject) as determinism, launcher, \
                compiled.eager_random("inductor"):
            for scenario in plan.scenarios:
                step = determinism.retrying(_step_function(stepper, launcher, scenario, isolated))
                _check_scenario(report, step, scenario, stepper, plan, determinism, launcher)
    return report


def _read_per_op(strategies: Iterable[Strategy]) -> set[str]:
    """The per-op measurements (:data:`~pytest_gradckpt.probes.registry.PER_OP`) the strategies'
    promises read: ``"ops"`` for kept ops, ``"host_copies"`` for host-resident activations. A strategy
    that decides its promise per run (its own ``promise`` method) may read either.

    Example:
        >>> from pytest_gradckpt.strategies import get_strategy
        >>> sorted(_read_per_op([get_strategy("non_reentrant")])), sorted(_read_per_op([get_strategy("sac")]))
        ([], ['ops'])
    """
    read: set[str] = set()
    for strategy in strategies:
        if type(strategy).promise is not Strategy.promise:
            return set(registry.PER_OP)
        promise = strategy.promised
        if promise is not None and promise.kept_ops:
            read.add("ops")
        if promise is not None and promise.activations == "host":
            read.add("host_copies")
    return read


@dataclasses.dataclass
class _Plan:
    """What one check runs: its spec, the strategies and scenarios the spec names (resolved once),
    and the caller's baseline cache."""

    spec: CheckSpec
    strategies: list[Strategy]
    scenarios: list[Scenario]
    cache: MutableMapping[Any, Any] | None


def limits(spec: CheckSpec, dtype: torch.dtype) -> verdicts.Limits:
    """What a strategy is judged within: ``spec``'s tolerances (else ``dtype``'s defaults) and memory cuts.

    Example:
        >>> limits(CheckSpec.of(atol=0.5), torch.float32).atol, limits(CheckSpec.of(), torch.float32).rtol
        (0.5, 1.3e-06)
    """
    default_rtol, default_atol = default_tolerances(dtype)
    return verdicts.Limits(rtol=default_rtol if spec.rtol is None else spec.rtol,
                           atol=default_atol if spec.atol is None else spec.atol, **spec.memory_cuts())


def _stepper(model: Any, inputs: Any, loss: Any, plan: _Plan) -> tuple[Stepper, bool]:
    """The subject and its stepper, and whether steps run isolated in a child process."""
    spec = plan.spec
    subject = Subject(model, inputs, loss, spec.device)
    isolated = _isolated(spec.isolate, subject.device, compiled=subject.compilation is not None)
    subject.order_compilation(spec.compile_order, elsewhere=isolated or any(
        s.distributed for s in plan.scenarios))
    return Stepper(subject, spec.layers, spec.seed, spec.timeout, spec.distributed.as_dict()), isolated


def _rank_stepper(model: Any, inputs: Any, loss: Any, plan: _Plan) -> Stepper:
    """The check's stepper as a rank that builds the model makes it (:func:`~pytest_gradckpt.ranks.launcher.build_on_ranks`)."""
    return _stepper(model, inputs, loss, plan)[0]


def _new_report(model: str, stepper: Stepper) -> Report:
    report = Report(model=model, versions=versions())
    report.baseline["layers"] = stepper.layer_names
    report.baseline["layers_found_by"] = stepper.found_by  # which units were chosen, and why
    report.baseline["unit_stacks"] = unit_stacks(stepper.layer_names)  # per tower / stack
    return report


def _check_scenario(report: Report, step: Callable[..., Run], scenario: Scenario, stepper: Stepper,
                    plan: _Plan, determinism: Any, launcher: Launcher) -> None:
    """One scenario: its baseline (built, or found in the cache), then every strategy judged against
    it; ``launcher`` tells how the scenario's ranks started."""
    subject = stepper.subject
    dtype = torch.bfloat16 if scenario.autocast else subject.compute_dtype
    reference = _baseline(report.model, step, scenario, stepper, dtype, plan)
    summary = report.baseline[scenario.name] = reference.summary()
    if scenario.distributed:
        summary["ranks"] = _ranks(plan, subject, launcher)
    if determinism.note:  # read after the baseline: building it may have relaxed the kernels
        summary["determinism"] = determinism.note
    scenario_limits = limits(plan.spec, dtype)
    for strategy in plan.strategies:
        result = _judge_one(step, scenario, strategy, reference, scenario_limits, report.model, plan.spec.fingerprint)
        if scenario.distributed:  # read again: a cached baseline started no ranks, a broken group was replaced
            result.metrics["ranks"] = summary["ranks"] = _ranks(plan, subject, launcher)
        if "factory_seconds" in report.baseline:  # what the check paid before any step: the user's to cut
            result.metrics["factory_seconds"] = round(report.baseline["factory_seconds"], 3)
        report.results.append(result)


def _ranks(plan: _Plan, subject: Subject, launcher: Launcher) -> str:
    """Where the distributed scenario's ranks run, and why they were spawned if they were."""
    return describe_ranks(plan.spec.distributed.as_dict(), subject.device, launcher.spawned(True))


def _baseline(model: str, step: Callable[..., Run], scenario: Scenario, stepper: Stepper, dtype: torch.dtype,
              plan: _Plan) -> baselines.Baseline | baselines.NotJudged:
    """The scenario's baseline: from ``plan.cache`` when an equal check built it, else built here."""
    subject, cache = stepper.subject, plan.cache
    key = (model, scenario.name, str(subject.device), tuple(stepper.layer_names),
           *plan.spec.baseline_key(bool(scenario.distributed)),
           # an eager and a compiled model of one name, or two compile orders, have other baselines
           None if subject.compilation is None else (subject.compilation.kind, subject.compilation.order),
           registry.registered())  # a baseline measured without the per-op probes cannot serve a promise that reads them
    if cache is not None and key in cache:
        return cache[key]
    reference = baselines.build(step, scenario, subject.name, dtype, plan.spec.baseline)
    if subject.compilation is not None and isinstance(reference, baselines.Baseline):
        _judge_under_compile(step, subject, scenario, reference, dtype, stepper.layer_names)
    _make_room(reference, subject)
    # Tensors held elsewhere live only as long as this check's ranks: a CPU baseline comes here to be
    # cached (cheap), one on a GPU is not cached (moving it would cost more than running it again).
    if cache is not None and (not _held(reference) or held.bring_home(reference.run)):  # type: ignore[union-attr]
        cache[key] = reference
    return reference


def _held(reference: baselines.Baseline | baselines.NotJudged) -> bool:
    return isinstance(reference, baselines.Baseline) and held.holder_of(reference.run.grads) is not None


def _judge_under_compile(step: Callable[..., Run], subject: Subject, scenario: Scenario,
                         reference: baselines.Baseline, dtype: torch.dtype, layer_names: list[str]) -> None:
    """Compiled strategies are compared with the compiled baseline, within compile's own measured
    distance from eager, and judged by memory only where checkpointing has room to cut (docs/compile.md)."""
    distance = compiled.measure_distance(step, subject, scenario, reference.run)
    tolerance = compiled.tolerate_distance(reference, distance, noise_cap(dtype))
    reference.compile_distance, reference.compile_tolerance = distance.largest, tolerance
    if reference.run.compiled is not None:  # read by verdicts.recompute_unobserved
        reference.run.compiled.checkpoint_room_bytes = compiled.checkpoint_room(
            reference.run.of(MemoryProbe).activation_bytes, compiled.try_boundary_bytes(subject, layer_names, scenario.autocast))
    reference.why = (f"compiled ({subject.compilation.kind}); compile's distance from eager: "  # type: ignore[union-attr]
                     f"relative error norm up to {distance.largest:.3g}, tolerated up to {tolerance:.3g}")


def _make_room(baseline: baselines.Baseline | baselines.NotJudged, subject: Subject) -> None:
    """Keep the baseline's tensors on the device when the next run still fits beside them,
    else park them in pinned host memory (comparisons then bring them back tensor by tensor)."""
    if not isinstance(baseline, baselines.Baseline) or subject.device.type != "cuda" or _held(baseline):
        return
    run = baseline.run
    free, _ = torch.cuda.mem_get_info(subject.device)
    free += torch.cuda.memory_reserved(subject.device) - torch.cuda.memory_allocated(subject.device)
    needed = tensor_bytes(subject.peek().parameters()) + (run.of(CudaProbe).cuda_peak_bytes or 0) + tensor_bytes(run.grads.values())
    if free < 1.1 * needed:
        baseline.park()


def _isolated(isolate: bool | str, device: torch.device, compiled: bool = False) -> bool:
    """``isolate="auto"``: a child process where forking is cheap and safe (a CPU model, CUDA not yet
    used in this process, no outside process group); spawning a fresh interpreter per step is not.
    A compiled model stays here: its compiled code must run in the process that judges it."""
    if isolate != "auto":
        return bool(isolate)
    cuda_used = torch.cuda.is_initialized()
    return (device.type == "cpu" and not compiled and not cuda_used
            and "fork" in multiprocessing.get_all_start_methods() and not launched_from_outside())


def _step_function(stepper: Stepper, launcher: Launcher, scenario: Scenario, isolate: bool) -> Callable[..., Run]:
    """``step(scenario, strategy, grad_targets=None) -> Run``: here, on the ranks of a distributed
    launch, or (``isolate``) in a child process that may crash without taking this one along."""
    if not scenario.distributed and not isolate:
        return stepper.step
    return launcher.step


def _judge_one(step: Callable[..., Run], scenario: Scenario, strategy: Strategy,
               baseline: baselines.Baseline | baselines.NotJudged, limits: verdicts.Limits, model: str,
               fingerprint: bool) -> Result:
    if isinstance(baseline, baselines.NotJudged):
        return Result(strategy.name, scenario.name, baseline.outcome, baseline.reason, model=model)
    targets = {n for n, g in baseline.run.grads.items() if g is not None}
    run = step(scenario, strategy, targets if scenario.autograd_grad else None)
    evidence = verdicts.gather(strategy, baseline, run, limits)
    outcome, message = verdicts.judge(evidence, limits)
    metrics = evidence.metrics()
    if run.compiled is not None:
        compared = [d.rel_norm for c in (evidence.loss, evidence.outputs, evidence.grads) if c is not None
                    for d in c.diffs.values()]
        metrics["compiled"] = {**run.compiled.metrics(), "max_rel_err": max(compared, default=None)}
    if fingerprint:
        metrics["fingerprint"] = _fingerprint(run, scenario)
    run.drop_tensors()
    return Result(strategy.name, scenario.name, outcome, message, metrics, model=model)
