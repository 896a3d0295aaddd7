"""The check engine: run a model without checkpointing and under each strategy, then judge.

Knows nothing of pytest. One *run* is one training step (per the scenario) on
a private copy of the model; the baseline runs twice per scenario to prove the
model itself is reproducible before any strategy is blamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

import torch
import torch.utils.checkpoint  # noqa: F401 - imported up front so its import time is not billed to a strategy
from torch import nn

from pytest_gradckpt import outcomes
from pytest_gradckpt.arguments import Subject, tensor_leaves
from pytest_gradckpt.settings import check_fraction, check_timeout, check_tolerance
from pytest_gradckpt.environment import versions
from pytest_gradckpt.errors import GradckptUsageError, StrategyNotApplicable, StrategyTimeout
from pytest_gradckpt.isolation import deadline, preserved_global_state, seed_everything
from pytest_gradckpt.layers import ModelInfo, find_layers, instrument
from pytest_gradckpt.probes.cuda import CudaPeak
from pytest_gradckpt.probes.gradients import compare, default_tolerances
from pytest_gradckpt.probes.memory import SavedActivationProbe
from pytest_gradckpt.probes.recompute import LayerCounter, recompute_verdict
from pytest_gradckpt.probes.warnings import capture_warnings, silent_warning
from pytest_gradckpt.report import Report, Result
from pytest_gradckpt.scenarios import Scenario, resolve_scenarios
from pytest_gradckpt.strategies import Strategy, resolve_strategies

#: Default per-run time limit in seconds: far above any tiny model's step.
DEFAULT_TIMEOUT = 300.0


_warmed_up = False


def _warm_up() -> None:
    """Run each checkpoint mechanism once on a toy layer.

    torch's first non-reentrant checkpoint in a process takes about a second
    (lazy imports); without this the first strategy checked would be billed for it.
    """
    global _warmed_up
    if _warmed_up:
        return
    from pytest_gradckpt.strategies import non_reentrant_checkpoint, reentrant_checkpoint, sac_checkpoint

    layer = nn.Linear(2, 2)
    for checkpoint_fn in (non_reentrant_checkpoint, reentrant_checkpoint, sac_checkpoint):
        checkpoint_fn(layer, torch.ones(1, 2, requires_grad=True)).sum().backward()
    _warmed_up = True


@dataclasses.dataclass
class Run:
    """Everything measured in one step."""

    loss: torch.Tensor | None = None
    outputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    grads: dict[str, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    graph_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    expected_recompute: dict[str, bool] = dataclasses.field(default_factory=dict)
    activation_bytes: int = 0
    cuda_peak_bytes: int | None = None
    seconds: float = 0.0
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: BaseException | None = None
    rank_disagreement: str | None = None  # distributed runs: ranks must hold the same gradients


def _freeze_input_embeddings(model: nn.Module) -> None:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = [get()] if callable(get) else [m for m in model.modules() if isinstance(m, nn.Embedding)]
    embeddings = [e for e in embeddings if e is not None]
    if not embeddings:
        raise StrategyNotApplicable("frozen_inputs: the model has no input embedding (nn.Embedding) to freeze")
    for embedding in embeddings:
        embedding.requires_grad_(False)


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", copy=True)


class _Session:
    """One check: the subject, its settings, and the step runner."""

    def __init__(self, subject: Subject, layers: Any, seed: int, timeout: float | None,
                 distributed: dict[str, Any] | None = None):
        self.subject, self.seed, self.timeout = subject, seed, timeout
        self.distributed = distributed
        self.layer_names, self.found_by = find_layers(subject.first, layers, reference=subject.reference)

    def step(self, scenario: Scenario, strategy: Strategy | None, grad_targets: set[str] | None = None,
             parallel: Any = None) -> Run:
        """One training step on a fresh copy. ``grad_targets``: for ``autograd_grad``, the parameters
        that had a gradient in the baseline; they are requested with ``allow_unused=False`` so that a
        strategy hiding them from autograd fails loudly, as torch intends, instead of yielding None.

        Distributed scenarios run this in every rank, in processes the launcher in
        :mod:`pytest_gradckpt.distributed` starts; ``parallel`` then wraps the model (DDP,
        FSDP2), shards the inputs and gathers full gradients."""
        if scenario.distributed and parallel is None:
            from pytest_gradckpt.distributed import launch

            return launch(self, scenario, strategy, grad_targets)
        run = Run()
        subject = self.subject
        try:
            model = subject.fresh_model()
            if scenario.freeze_input_embeddings:
                _freeze_input_embeddings(model)
            model.train(scenario.train_mode)
            info = ModelInfo(model, self.layer_names, self.found_by)
            counter = LayerCounter()
            for name, layer in zip(info.layer_names, info.layers):
                instrument(layer, name, counter)
            if strategy is not None:
                reason = strategy.applies_to(info)
                if reason:
                    raise StrategyNotApplicable(reason)
                strategy.apply(info)
                run.expected_recompute = {n: strategy.expects_recompute(info, layer)
                                          for n, layer in zip(info.layer_names, info.layers)}
            runner = model if parallel is None else parallel.wrap(model, info)
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            targets = [(n, p) for n, p in trainable if grad_targets is None or n in grad_targets]
            inputs = subject.fresh_inputs() if parallel is None else parallel.shard(subject.fresh_inputs())
            device = subject.device
            memory = SavedActivationProbe(device, [p for _, p in model.named_parameters()])
            counter.memory = memory
            autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if scenario.autocast
                        else contextlib.nullcontext())
            seed_everything(self.seed, device)
            grads: dict[str, torch.Tensor | None] = {n: None for n, _ in trainable}
            with capture_warnings() as run.warnings, deadline(self.timeout), CudaPeak(device) as cuda:
                started = time.perf_counter()
                with memory:
                    micro_batches = scenario.micro_batches if parallel is None else parallel.micro_batches(scenario)
                    for micro_batch in range(micro_batches):
                        last = micro_batch == micro_batches - 1
                        sync = contextlib.nullcontext() if parallel is None else parallel.sync(runner, last)
                        with sync:  # DDP's no_sync must cover forward and backward of a micro-batch
                            with autocast:
                                output = subject.call(runner, inputs)
                                loss = subject.loss(output, inputs)
                            if strategy is not None:
                                strategy.after_forward(info)
                            if scenario.autograd_grad:
                                found = torch.autograd.grad(loss, [p for _, p in targets],
                                                            allow_unused=grad_targets is None)
                                for (name, _), grad in zip(targets, found):
                                    if grad is not None:
                                        grads[name] = grad if grads[name] is None else grads[name] + grad
                            else:
                                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                run.seconds = time.perf_counter() - started
            counter.memory = None
            run.loss = _cpu(loss.detach().float())
            run.outputs = {k: _cpu(v) for k, v in tensor_leaves(output).items()}
            run.grads = grads if scenario.autograd_grad else {n: p.grad for n, p in trainable}
            full = (lambda g: g) if parallel is None else parallel.full_tensor
            run.grads = {n: _cpu(None if g is None else full(g)) for n, g in run.grads.items()}
            run.buffers = {n: _cpu(b) for n, b in model.named_buffers()}
            run.calls = dict(counter.counts)
            run.graph_calls = dict(counter.graph_calls)
            run.activation_bytes = memory.peak_bytes
            if cuda.peak_bytes is not None:
                grad_bytes = sum(p.numel() * p.element_size() for _, p in trainable)
                run.cuda_peak_bytes = max(0, cuda.peak_bytes - grad_bytes)
        except GradckptUsageError:
            raise
        except (Exception, StrategyTimeout) as exc:  # noqa: BLE001 - every failure is a verdict
            run.error = exc
        return run


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _baseline(session: _Session, scenario: Scenario) -> tuple[Run | None, str, str]:
    """Two baseline runs. Returns (the first run, "", "") or, when no strategy can be judged,
    (None, the outcome every strategy gets, why)."""
    first = session.step(scenario, None)
    if isinstance(first.error, StrategyNotApplicable):
        return None, outcomes.SKIPPED, str(first.error)
    if first.error is not None:
        if scenario.name == "train":
            raise GradckptUsageError(
                f"the model fails without checkpointing ({_describe_error(first.error)}); check that the inputs "
                f"fit {session.subject.name}.forward and that loss= returns a scalar") from first.error
        return None, outcomes.SKIPPED, (f"the model itself fails under {scenario.name} without "
                                        f"checkpointing: {_describe_error(first.error)}")
    if first.loss is None or not math.isfinite(float(first.loss)):
        raise GradckptUsageError(
            f"baseline loss under {scenario.name} is {float(first.loss) if first.loss is not None else None}, not "
            "finite; the model diverges without checkpointing, so nothing can be compared (check the inputs, "
            "dtype and initialisation)")
    bad = [n for n, g in first.grads.items() if g is not None and not torch.isfinite(g).all()]
    if bad:
        raise GradckptUsageError(
            f"baseline gradients under {scenario.name} are not finite for {len(bad)} parameter(s), e.g. {bad[0]}; "
            "fix the model or inputs first (lower the learning signal, check the dtype)")
    if not any(g is not None for g in first.grads.values()):
        raise GradckptUsageError(
            f"the loss does not reach any trainable parameter under {scenario.name}: every gradient is None; "
            "pass a loss= that depends on the model's output")
    second = session.step(scenario, None)
    rtol, atol = default_tolerances(torch.float32)
    again = compare(first.grads, second.grads, rtol, atol)
    loss_again = compare({"loss": first.loss}, {"loss": second.loss}, rtol, atol)
    if second.error is not None or not again.equal or not loss_again.equal:
        detail = _describe_error(second.error) if second.error else (again if not again.equal else loss_again
                                                                      ).describe("values")
        # Not skipped: a gate must not go green when nothing was judged.
        return None, outcomes.ERROR, (f"not judged: the model is not reproducible under {scenario.name}: two runs "
                                      f"without checkpointing differ ({detail}). Make it deterministic (randomness "
                                      "only from torch's seeded generator)")
    first.seconds = min(first.seconds, second.seconds)
    return first, "", ""


@dataclasses.dataclass
class _Limits:
    rtol: float
    atol: float
    min_memory_reduction: float | None
    min_cuda_memory_reduction: float | None


def _judge(strategy: Strategy, scenario: Scenario, base: Run, run: Run, limits: _Limits
           ) -> tuple[str, str, dict[str, Any]]:
    """The verdict for one run against its baseline. Severity order is in :mod:`outcomes`."""
    metrics: dict[str, Any] = {"warnings": run.warnings, "seconds": run.seconds}
    if isinstance(run.error, StrategyNotApplicable):
        return outcomes.SKIPPED, str(run.error), metrics
    lost = silent_warning(run.warnings)
    if lost and run.error is not None:
        return outcomes.SILENT, (f"torch warned '{lost}': parameters inside that layer get no gradient; the step "
                                 f"then raised {_describe_error(run.error)}"), metrics
    if run.error is not None:
        return outcomes.ERROR, _describe_error(run.error), metrics
    if run.rank_disagreement:
        return outcomes.MISMATCH, run.rank_disagreement, metrics

    grads = compare(base.grads, run.grads, limits.rtol, limits.atol)
    loss = compare({"loss": base.loss}, {"loss": run.loss}, limits.rtol, limits.atol)
    out = compare(base.outputs, {k: run.outputs.get(k) for k in base.outputs}, limits.rtol, limits.atol)
    metrics.update(max_grad_diff=grads.max_abs, worst_parameter=grads.worst, baseline_seconds=base.seconds,
                   time_ratio=run.seconds / base.seconds if base.seconds > 0 else None,
                   activation_bytes=run.activation_bytes, baseline_activation_bytes=base.activation_bytes)
    if base.activation_bytes:
        metrics["activation_reduction"] = 1 - run.activation_bytes / base.activation_bytes
    if run.cuda_peak_bytes is not None and base.cuda_peak_bytes:
        metrics.update(cuda_peak_bytes=run.cuda_peak_bytes, baseline_cuda_peak_bytes=base.cuda_peak_bytes,
                       cuda_reduction=1 - run.cuda_peak_bytes / base.cuda_peak_bytes)
    recomputed, checkpointable, recompute_problems = recompute_verdict(
        base.calls, run.calls, run.expected_recompute, base.graph_calls)
    metrics.update(recomputed_layers=recomputed, checkpointable_layers=checkpointable,
                   layers=sum(1 for c in base.calls.values() if c), layer_calls=run.calls)

    if lost and not (grads.equal and loss.equal):
        # The warning is harmless only when every gradient still equals the baseline's
        # (it is also raised for calls under torch.no_grad(), where there is nothing to lose).
        return outcomes.SILENT, (f"torch warned '{lost}': {len(grads.vanished) + len(grads.mismatched)} "
                                 "parameter gradient(s) lost or wrong, with no error"), metrics
    if grads.vanished:
        names = ", ".join(grads.vanished[:3]) + (f" and {len(grads.vanished) - 3} more" if len(grads.vanished) > 3 else "")
        return outcomes.SILENT, (f"{len(grads.vanished)} parameter(s) that have a gradient without checkpointing got "
                                 f"None or all zeros, with no error: {names}"), metrics
    for comparison, what in ((loss, "loss"), (out, "outputs"), (grads, "gradients")):
        if not comparison.equal:
            return outcomes.MISMATCH, comparison.describe(what), metrics
    buffers = compare(base.buffers, run.buffers, limits.rtol, limits.atol)
    if not buffers.equal:
        return outcomes.BUFFERS, (buffers.describe("buffers") + " after the step (e.g. BatchNorm statistics updated "
                                  "again during recompute)"), metrics
    if checkpointable and recomputed == 0:
        return outcomes.NOT_APPLIED, (f"no layer was recomputed: checkpointing is switched on but never ran "
                                      f"({checkpointable} layer(s) expected to run twice)"), metrics
    if recompute_problems:
        more = f" (+{len(recompute_problems) - 1} more)" if len(recompute_problems) > 1 else ""
        return outcomes.RECOMPUTE, recompute_problems[0] + more, metrics
    reduction = metrics.get("activation_reduction")
    if limits.min_memory_reduction is not None and checkpointable and (
            reduction is None or reduction < limits.min_memory_reduction):
        return outcomes.NOT_APPLIED, (f"saved-activation memory fell by {0 if reduction is None else reduction:.0%}, "
                                      f"below min_memory_reduction={limits.min_memory_reduction:.0%}"), metrics
    cuda_reduction = metrics.get("cuda_reduction")
    if limits.min_cuda_memory_reduction is not None and cuda_reduction is not None and checkpointable and \
            cuda_reduction < limits.min_cuda_memory_reduction:
        return outcomes.NOT_APPLIED, (f"CUDA peak above weights and gradients fell by {cuda_reduction:.0%}, below "
                                      f"min_cuda_memory_reduction={limits.min_cuda_memory_reduction:.0%}"), metrics
    return outcomes.PASS, "", metrics


def _fingerprint(run: Run, scenario: Scenario) -> dict[str, Any]:
    """The numbers a golden record keeps of one run: only reproducible ones. Under FSDP2 the
    all-gathered parameter buffers come and go at timing-dependent moments, so the saved-bytes
    peak varies between identical runs and is left out there."""
    return {"loss": None if run.loss is None else float(run.loss),
            "grad_norms": {n: float(g.double().norm()) for n, g in run.grads.items() if g is not None},
            "activation_bytes": None if scenario.distributed == "fsdp2" else run.activation_bytes}


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
          fingerprint: bool = False) -> Report:
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
        scenarios: names from :data:`pytest_gradckpt.scenarios.SCENARIOS`; None = ``("train",)``.
        rtol, atol: tolerances; None = per compute dtype (float32: 1.3e-6 / 1e-5,
            bf16: 1.6e-2 / 1e-5, fp16: 1e-3 / 1e-5).
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
            ``timeout`` (60 s for all ranks together).
        fingerprint: add ``metrics["fingerprint"]`` (loss, every parameter's gradient norm,
            saved-activation peak) for golden records; see :mod:`pytest_gradckpt.golden`.

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
    limits = _Limits(
        rtol=check_tolerance("rtol", rtol) if rtol is not None else -1.0,
        atol=check_tolerance("atol", atol) if atol is not None else -1.0,
        min_memory_reduction=check_fraction("min_memory_reduction", min_memory_reduction),
        min_cuda_memory_reduction=check_fraction("min_cuda_memory_reduction", min_cuda_memory_reduction),
    )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GradckptUsageError(f"seed={seed!r}: pass an int")
    timeout = check_timeout(timeout)
    chosen = resolve_strategies(strategies)
    chosen_scenarios = resolve_scenarios(scenarios)
    with preserved_global_state():
        _warm_up()
        subject = Subject(model, inputs, loss, device)
        from pytest_gradckpt.distributed import options as distributed_options

        session = _Session(subject, layers, seed, timeout, distributed_options(distributed))
        report = Report(model=name or subject.name, versions=versions())
        report.baseline["layers"] = session.layer_names
        for scenario in chosen_scenarios:
            dtype = torch.bfloat16 if scenario.autocast else subject.compute_dtype
            default_rtol, default_atol = default_tolerances(dtype)
            scenario_limits = dataclasses.replace(
                limits, rtol=default_rtol if limits.rtol < 0 else limits.rtol,
                atol=default_atol if limits.atol < 0 else limits.atol)
            key = (report.model, scenario.name, seed, str(subject.device), tuple(session.layer_names),
                   tuple(sorted(session.distributed.items())) if scenario.distributed else ())
            if cache is not None and key in cache:
                base, verdict, reason = cache[key]
            else:
                base, verdict, reason = _baseline(session, scenario)
                if cache is not None:
                    cache[key] = (base, verdict, reason)
            report.baseline[scenario.name] = {"judged": False, "reason": reason} if base is None else {
                "judged": True,
                "loss": float(base.loss), "activation_bytes": base.activation_bytes,
                "cuda_peak_bytes": base.cuda_peak_bytes, "seconds": base.seconds}
            for strategy in chosen:
                if base is None:
                    report.results.append(Result(strategy.name, scenario.name, verdict, reason,
                                                 model=report.model))
                    continue
                targets = {n for n, g in base.grads.items() if g is not None}
                run = session.step(scenario, strategy, targets if scenario.autograd_grad else None)
                outcome, message, metrics = _judge(strategy, scenario, base, run, scenario_limits)
                if fingerprint:
                    metrics["fingerprint"] = _fingerprint(run, scenario)
                report.results.append(Result(strategy.name, scenario.name, outcome, message, metrics,
                                             model=report.model))
    return report
