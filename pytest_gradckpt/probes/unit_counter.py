"""Counts how many times each checkpoint unit's forward really ran."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from pytest_gradckpt.pipeline.tensors import tensors_in


class CompiledCallsSeen(Protocol):
    """What a run's backward-calls probe takes from compiled code
    (:class:`pytest_gradckpt.probes.backward_calls.BackwardCalls`)."""

    def note_compiled_call(self, module: nn.Module) -> None:
        """Record one call of ``module``'s compiled ``__call__`` made from eager code."""


class LayerCounter:
    """Per-layer execution counts, filled by instrumented layers.

    ``memory`` is the saved-activation probe that layer calls report their
    inputs to while it is active (None otherwise). ``backward_calls`` is the
    run's backward-calls probe while its step runs (None otherwise): a compiled
    block of the run's copy reports its eager calls to it
    (``compiled.Compilation.apply``). Both belong to the run that owns the counter.

    Example:
        >>> c = LayerCounter()
        >>> c.hit("layers.0"); c.hit("layers.0")
        >>> c.counts["layers.0"]
        2
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.graph_calls: Counter[str] = Counter()
        self.reached_calls: Counter[str] = Counter()
        self.memory: Any = None
        self.backward_calls: CompiledCallsSeen | None = None
        self._paused = 0

    def hit(self, name: str) -> None:
        """Record one execution of ``name``'s forward."""
        if not self._paused:
            self.counts[name] += 1

    def saw_output(self, name: str, output: Any) -> None:
        """Count calls of ``name`` whose output joins the autograd graph: backward reaches those.
        (Calls under ``torch.no_grad()``, or of a frozen layer fed grad-free inputs, do not.)"""
        tracked = [t for t in tensors_in(output) if t.requires_grad]
        if self._paused or not tracked:
            return
        self.graph_calls[name] += 1
        # ... and whether backward really reaches it: an output nothing downstream uses (LLaVA's
        # last vision layer, whose hidden state is not the one taken) joins the graph but never
        # gets a gradient, so it is never recomputed either.
        reached = [False]

        def count_once(gradient: torch.Tensor) -> None:
            if not reached[0]:
                reached[0] = True
                self.reached_calls[name] += 1

        for tensor in tracked:
            tensor.register_hook(count_once)

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Executions in the block are not counted: the engine's own replays
        (:mod:`pytest_gradckpt.pipeline.replay`) are not the model's.

        Example:
            >>> c = LayerCounter()
            >>> with c.uncounted():
            ...     c.hit("layers.0")
            >>> c.counts["layers.0"]
            0
        """
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


def recompute_verdict(baseline: dict[str, int], actual: dict[str, int], expected: dict[str, bool],
                      graph_calls: dict[str, int], own_units: bool = False,
                      reached_calls: dict[str, int] | None = None) -> tuple[int, int, list[str]]:
    """Compare counts with the rules, where ``b`` is a layer's run count without checkpointing
    and ``g`` how many of those runs backward reached (joined the autograd graph and, where
    ``reached_calls`` says so, got a gradient):

    - a layer the strategy checkpoints runs ``b + g`` times: every call backward reaches is
      recomputed once (``2b`` for a plain layer);
    - one that backward never reaches (``g == 0``: frozen with grad-free inputs) may run ``b``
      or ``2b`` times: not recomputing it is correct, recomputing it is waste, not a broken promise;
    - a layer a ``skips_frozen`` strategy must skip runs exactly ``b`` times;
    - with ``own_units`` (a strategy that chooses its own checkpoint units, e.g. a library's
      switch) a layer may run ``b`` times (not one of its units) or ``b + g``, never more.

    Returns (layers recomputed, layers that had to be, one line per broken rule).

    Example:
        >>> recompute_verdict({"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": True, "b": True}, {"a": 1, "b": 1})
        (1, 2, ['b ran 1 time(s), expected 2 (forward + one recompute)'])
    """
    recomputed, required, problems = 0, 0, []
    for name, runs in baseline.items():
        if runs == 0:
            continue
        got = actual.get(name, 0)
        recomputed += got > runs
        if not expected.get(name, True):
            if got != runs:
                problems.append(f"{name} ran {got} time(s), expected {runs}: the strategy promises not to recompute "
                                "it (it has no trainable parameters and the strategy skips such layers, or the "
                                "strategy keeps activations instead of recomputing)")
            continue
        reached = graph_calls.get(name, 0)
        if reached_calls is not None:
            reached = min(reached, reached_calls.get(name, 0))
        if own_units:
            required += reached > 0
            if got not in ((runs, runs + reached) if reached else (runs, 2 * runs)):
                problems.append(f"{name} ran {got} time(s), expected {runs} or {runs + reached} "
                                "(not checkpointed, or forward + one recompute)")
            continue
        allowed = (runs + reached,) if reached else (runs, 2 * runs)
        required += reached > 0
        if got not in allowed:
            problems.append(f"{name} ran {got} time(s), expected {allowed[0]} (forward + one recompute)")
    return recomputed, required, problems
