"""The recompute probe: how many times each checkpoint unit's forward ran, and how many of those
calls backward reached (:class:`~pytest_gradckpt.probes.unit_counter.LayerCounter`, filled by the
units the engine instruments on its private copy before any strategy is applied).

It lives apart from :mod:`pytest_gradckpt.probes.unit_counter` because instrumenting needs
:mod:`pytest_gradckpt.pipeline.units`, which itself imports the counter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pytest_gradckpt.pipeline.units import instrument
from pytest_gradckpt.probes.protocol import Column, Probe, ProbeEvidence, ProbeStep
from pytest_gradckpt.probes.unit_counter import LayerCounter


def _recomputed(done: Any, total: Any) -> str:
    return "" if total is None else f"{done}/{total}"


@dataclasses.dataclass
class LayerCalls:
    """Per checkpoint unit: forward calls, calls whose output joined the graph, and calls whose
    output backward really reached (a gradient arrived; None: not measured)."""

    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    graph_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    reached_calls: dict[str, int] | None = None


class RecomputeProbe(Probe[LayerCalls]):
    """Counts each unit's forward calls; the recompute rules read them (``verdicts.gather``)."""

    name = "recompute"
    measurement = LayerCalls
    metric_keys = ("recomputed_layers", "checkpointable_layers", "layers", "layer_calls")
    columns = (Column("recomp", ("recomputed_layers", "layers"), _recomputed),)

    def __init__(self, step: ProbeStep) -> None:
        super().__init__(step)
        self.counter = LayerCounter()
        for name, layer in zip(step.layer_names, step.layers, strict=True):
            instrument(layer, name, self.counter)

    def read(self) -> LayerCalls:
        counter = self.counter
        return LayerCalls(dict(counter.counts), dict(counter.graph_calls), dict(counter.reached_calls))

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        if not evidence.compared:
            return {}
        base = evidence.baseline.run.of(cls)
        return {"recomputed_layers": evidence.recomputed, "checkpointable_layers": evidence.checkpointable,
                "layers": sum(1 for c in base.calls.values() if c), "layer_calls": evidence.run.of(cls).calls}
