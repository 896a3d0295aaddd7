"""Which checkpointing should I use? Rank the correct configurations by memory saved against time
added, and recommend the fastest that fits a memory budget.

:func:`plan` first judges every candidate with :func:`pytest_gradckpt.pipeline.engine.check`: a
configuration whose verdict is not ``pass`` (a mismatch, a broken promise, an error, skipped) is
never ranked, however good its numbers. It then times each correct one, and the step without
checkpointing, in warmed steps of their own (no probe attached, so nothing but the model runs),
and reads the step's peak memory:

- on CUDA, the allocator's peak during those steps above what was allocated before the
  configuration's copy was made (its weights, gradients and activations: what has to fit on the
  device; the caller's own model is not counted);
- on CPU, the weights, their gradients and the saved-activation peak the check measured.

The configurations that no other beats on both memory and time are the front; the
recommendation is the fastest correct configuration whose peak fits ``memory_budget``.
:meth:`Plan.save` writes the JSON and draws the front as a PNG beside it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import pathlib
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pytest_gradckpt import outcomes
from pytest_gradckpt.pipeline.subject import Subject, tensor_bytes
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.probes import registry
from pytest_gradckpt.probes.recompute_counts import RecomputeProbe
from pytest_gradckpt.report import Report, Result
from pytest_gradckpt.pipeline.runs import prepare_copy
from pytest_gradckpt.strategies import Strategy, resolve_strategies

#: What :func:`plan` ranks when no strategies are named: per-layer full checkpointing, selective
#: (matmuls saved), layer inputs offloaded to the host, and every second layer.
DEFAULT_CANDIDATES = ("non_reentrant", "sac", "offload", "selective", "hf_every_2")

NONE = "none"  # the row of the step without checkpointing

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(budget: int | float | str | None) -> int | None:
    """Bytes from ``budget``: a number of bytes, or a string such as ``"40GiB"`` or ``"512 MB"``.

    Example:
        >>> parse_budget("40GiB"), parse_budget(1e9), parse_budget(None)
        (42949672960, 1000000000, None)
        >>> parse_budget("forty")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: memory_budget='forty': pass bytes (an int) or a size such as '40GiB' or '512MB'
    """
    if budget is None:
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0:
        return int(budget)
    if isinstance(budget, str):
        text = budget.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):] or "b"
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if unit in _UNITS and value > 0:
            return int(value * _UNITS[unit])
    raise GradckptUsageError(f"memory_budget={budget!r}: pass bytes (an int) or a size such as '40GiB' or '512MB'")


@dataclasses.dataclass
class Option:
    """One configuration: its verdict, its step's peak memory and its warmed step time."""

    strategy: str
    outcome: str
    message: str = ""
    peak_bytes: int | None = None
    seconds: float | None = None
    #: the measured steps' times, each a warmed step (their median is ``seconds``)
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    memory_saved: float | None = None  # fraction of the no-checkpointing peak
    time_added: float | None = None  # fraction of the no-checkpointing step time
    recomputed_flops: int | None = None
    on_front: bool = False
    fits: bool | None = None

    @property
    def correct(self) -> bool:
        return self.outcome == outcomes.PASS

    @property
    def point(self) -> tuple[int, float] | None:
        """``(peak_bytes, seconds)`` of a correct, measured configuration; None otherwise."""
        if not self.correct or self.peak_bytes is None or self.seconds is None:
            return None
        return self.peak_bytes, self.seconds


@dataclasses.dataclass
class Plan:
    """The ranked configurations and the recommendation (see :func:`plan`)."""

    model: str
    device: str
    memory_budget: int | None
    options: list[Option]
    recommended: str | None
    why: str
    check: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the check's verdict for every candidate
    results: list[Result] = dataclasses.field(default_factory=list)

    def option(self, name: str) -> Option:
        """The row of configuration ``name`` (``"none"``: no checkpointing)."""
        found = {o.strategy: o for o in self.options}
        if name not in found:
            raise KeyError(f"no configuration {name!r} in this plan: {', '.join(found)}")
        return found[name]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "device": self.device, "memory_budget": self.memory_budget,
                "recommended": self.recommended, "why": self.why,
                "options": [dataclasses.asdict(o) for o in self.options], "check": self.check}

    def table(self) -> str:
        """One line per configuration: verdict, peak, memory saved, time added, front, fits."""
        rows = [("strategy", "outcome", "peak", "saved", "step", "added", "front", "fits")]
        for o in self.options:
            rows.append((o.strategy + (" *" if o.strategy == self.recommended else ""), o.outcome,
                         _size(o.peak_bytes),
                         "" if o.memory_saved is None else f"{o.memory_saved:+.0%}",
                         "" if o.seconds is None else f"{o.seconds * 1e3:.1f} ms",
                         "" if o.time_added is None else f"{o.time_added:+.0%}",
                         "yes" if o.on_front else "", "" if o.fits is None else ("yes" if o.fits else "no")))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                         for row in rows) + f"\n{self.why}"

    def save(self, path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
        """Write the JSON to ``path`` and the front as a PNG beside it (same name, ``.png``);
        the PNG is None where matplotlib is not installed."""
        json_path = pathlib.Path(path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(self.to_dict(), indent=2))
        return json_path, draw(self, json_path.with_suffix(".png"))


def draw(found: Plan, path: pathlib.Path) -> pathlib.Path | None:
    """Peak memory against step time, one point per correct configuration, the front joined."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    points = {o.strategy: (o, o.point) for o in found.options if o.point is not None}
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for index, (name, (o, (peak, seconds))) in enumerate(points.items()):
        color = "tab:green" if name == found.recommended else ("tab:blue" if o.on_front else "tab:gray")
        axes.scatter(seconds * 1e3, peak / 2**30, color=color, zorder=3)
        # labels alternate above and below their point, so two configurations that measure alike stay readable
        axes.annotate(name, (seconds * 1e3, peak / 2**30), textcoords="offset points",
                      xytext=(4, 4 if index % 2 else -11), fontsize=8)
    front = sorted(point for o, point in points.values() if o.on_front and point is not None)
    axes.plot([seconds * 1e3 for _, seconds in front], [peak / 2**30 for peak, _ in front], color="tab:blue",
              linewidth=1, zorder=2)
    if found.memory_budget is not None:
        axes.axhline(found.memory_budget / 2**30, color="tab:red", linestyle="--", linewidth=1, label="budget")
        axes.legend(loc="upper right", fontsize=8)
    axes.set_xlabel("warmed step time (ms)")
    axes.set_ylabel("peak memory (GiB)")
    axes.set_title(f"{found.model} on {found.device}: correct configurations", fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plan(model: nn.Module | Callable[[], nn.Module], inputs: Any, *, memory_budget: int | float | str | None = None,
         strategies: Iterable[str | Strategy] | None = None, loss: Callable[[Any, Any], torch.Tensor] | None = None,
         layers: Any = None, device: str | torch.device | None = None, warmup: int = 1, repeats: int = 3,
         name: str | None = None, report: str | pathlib.Path | None = None) -> Plan:
    """Judge each candidate configuration, measure the correct ones, rank them, recommend one.

    ``model``, ``inputs``, ``loss``, ``layers``, ``device`` and ``name`` are as for
    :func:`pytest_gradckpt.check`.

    Args:
        memory_budget: the most the step's peak may take (bytes, or ``"40GiB"``); None: no limit,
            the fastest correct configuration is recommended.
        strategies: the candidates (default :data:`DEFAULT_CANDIDATES`; those that do not apply
            are listed ``skipped`` and never ranked).
        warmup: untimed steps per configuration.
        repeats: timed steps per configuration (their median counts).
        report: where to write the JSON; the PNG of the front goes beside it.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh())
        ...                             for _ in range(4)])
        >>> found = plan(net, torch.randn(32, 64, requires_grad=True), strategies=["non_reentrant", "sac"])
        >>> [o.strategy for o in found.options], found.recommended in ("none", "non_reentrant", "sac")
        (['none', 'non_reentrant', 'sac'], True)
    """
    from pytest_gradckpt.pipeline.engine import check

    budget = parse_budget(memory_budget)
    if warmup < 0 or repeats < 1:
        raise GradckptUsageError(f"plan: warmup={warmup!r} must be >= 0 and repeats={repeats!r} >= 1")
    candidates = resolve_strategies(list(strategies) if strategies is not None else list(DEFAULT_CANDIDATES))
    with registry.asking("ops"):  # every candidate's recomputed FLOPs, promised or not
        judged = check(model, inputs, loss=loss, strategies=candidates, layers=layers, device=device, name=name)
    subject = Subject(model, inputs, loss, device)
    layer_names = judged.baseline["layers"]
    options = [Option(NONE, outcomes.PASS, "no checkpointing")]
    options += [Option(r.strategy, r.outcome, r.message, recomputed_flops=r.metrics.get("recomputed_flops"))
                for r in judged.results]
    by_name = {s.name: s for s in candidates}
    activation = {r.strategy: r.metrics.get("activation_bytes") for r in judged.results}
    if judged.results:
        activation[NONE] = judged.results[0].metrics.get("baseline_activation_bytes")
    for option in options:
        if option.correct:
            _measure(option, subject, layer_names, judged.baseline.get("layers_found_by", "path"),
                     by_name.get(option.strategy), warmup, repeats, activation.get(option.strategy))
    _rank(options, budget)
    recommended, why = _recommend(options, budget)
    return _finished(Plan(judged.model, str(subject.device), budget, options, recommended, why,
                          {"versions": judged.versions, "layers": layer_names}), report, judged)


def _finished(found: Plan, report: str | pathlib.Path | None, judged: Report) -> Plan:
    found.results = judged.results
    found.check["results"] = [r.to_dict() for r in judged.results]
    if report is not None:
        found.save(report)
    return found


def _measure(option: Option, subject: Subject, layer_names: list[str], found_by: str, strategy: Strategy | None,
             warmup: int, repeats: int, activation_bytes: int | None) -> None:
    """Warmed steps of one configuration on a fresh copy, nothing but the model running."""
    device = subject.device
    cuda = device.type == "cuda"
    # On CUDA the step's own peak: its copy's weights, their gradients, activations (not the caller's
    # model). The last configuration's copy sits in reference cycles: collected first, or it is counted.
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device) if cuda else 0
    with registry.using(RecomputeProbe, only=True):  # the units instrumented, no probe entered
        prepared = prepare_copy(subject.fresh_model(), layer_names, found_by, device)
    model = prepared.model
    model.train()
    if strategy is not None:
        strategy.apply(prepared.info)
    trainable = [p for p in model.parameters() if p.requires_grad]
    times: list[float] = []
    peak = 0
    for index in range(warmup + repeats):
        for param in trainable:
            param.grad = None
        inputs = subject.fresh_inputs()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        output = subject.call(model, inputs)
        subject.loss(output, inputs).backward()
        if cuda:
            torch.cuda.synchronize(device)
            peak = max(peak, torch.cuda.max_memory_allocated(device))
        if index >= warmup:
            times.append(time.perf_counter() - started)
        del output
    option.step_seconds, option.seconds = times, statistics.median(times)
    if cuda:
        option.peak_bytes = peak - before
    elif activation_bytes is not None:
        weights = tensor_bytes(model.parameters())
        option.peak_bytes = weights + tensor_bytes(trainable) + activation_bytes
    prepared.probes.detach()
    del prepared, model, trainable
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _rank(options: Sequence[Option], budget: int | None) -> None:
    base = options[0].point
    measured = [(o, o.point) for o in options if o.point is not None]
    for o, (peak, seconds) in measured:
        if base is not None and base[0] and base[1]:
            o.memory_saved, o.time_added = 1 - peak / base[0], seconds / base[1] - 1
        o.fits = None if budget is None else peak <= budget
        o.on_front = not any(_beats(p, (peak, seconds)) for other, p in measured if other is not o and p is not None)


def _beats(a: tuple[int, float], b: tuple[int, float]) -> bool:
    """``a`` (peak, seconds) is no worse than ``b`` on memory and time, and better on one."""
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def _recommend(options: Sequence[Option], budget: int | None) -> tuple[str | None, str]:
    measured = [o for o in options if o.point is not None]
    fitting = [o for o in measured if budget is None or (o.peak_bytes or 0) <= budget]
    left_out = [f"{o.strategy} ({o.outcome})" for o in options if not o.correct]
    excluded = f"; never ranked, their verdict is not pass: {', '.join(left_out)}" if left_out else ""
    if not fitting:
        smallest = min(measured, key=lambda o: o.peak_bytes or 0, default=None)
        least = "" if smallest is None or smallest.peak_bytes is None else (
            f"; the smallest peak is {smallest.strategy}'s, {_size(smallest.peak_bytes)}")
        return None, f"no correct configuration fits the budget of {_gib(budget)}{least}{excluded}"
    best = min(fitting, key=lambda o: o.seconds or 0.0)
    fits = "" if budget is None else f" within the budget of {_gib(budget)}"
    return best.strategy, (f"recommended: {best.strategy}, the fastest correct configuration{fits} "
                           f"(peak {_size(best.peak_bytes)}, step {best.seconds * 1e3 if best.seconds else math.nan:.1f} ms)"
                           f"{excluded}")


def _size(size: int | None) -> str:
    if size is None:
        return ""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"


def _gib(size: int | None) -> str:
    return "none" if size is None else _size(size)
