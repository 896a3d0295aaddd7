"""Matrix products and FLOPs a step runs, in forward and in backward: what recomputation costs.

A dispatch mode (the ground truth torchtitan's selective-checkpointing tests use) counts every
matmul-type aten op, and the FLOPs of every op torch's own FLOP formulas know
(:data:`torch.utils.flop_counter.flop_registry`), split by whether autograd's engine was running.
An op a selective-checkpointing policy keeps is served from its cache during recompute and never
reaches this mode; one it recomputes does. So ``backward_matmuls`` above the baseline's is the
number of matmuls recomputed, and ``backward_flops`` above the baseline's the recomputed FLOPs.

Compiled code is not counted (a mode active while dynamo traces changes what it compiles); the
measurement of a compiled step is empty (``counted`` False).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_gradckpt.pipeline.units import holds_compiled_code
from pytest_gradckpt.probes.backward_calls import in_backward
from pytest_gradckpt.probes.protocol import Column, Probe, ProbeEvidence

_MATMUL_NAMES = ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm")


def _matmuls() -> frozenset[Any]:
    aten = torch.ops.aten
    return frozenset(getattr(aten, n) for n in _MATMUL_NAMES if hasattr(aten, n))


class OpCounter(TorchDispatchMode):
    """Counts matmuls and FLOPs of the ops run inside it, forward and backward apart.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4, 4))
        >>> with OpCounter() as seen:
        ...     (torch.ones(2, 4) @ w).sum().backward()
        >>> seen.matmuls, seen.flops
        ({'forward': 1, 'backward': 1}, {'forward': 64, 'backward': 64})
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.formulas = flop_registry
        self.kinds = _matmuls()
        self.matmuls = {"forward": 0, "backward": 0}
        self.flops = {"forward": 0, "backward": 0}
        #: ops whose FLOP formula failed on their shapes: their FLOPs are not in ``flops``
        self.uncounted: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = self.formulas.get(packet)
        if formula is not None:
            phase = "backward" if in_backward() else "forward"
            self.matmuls[phase] += packet in self.kinds
            try:
                self.flops[phase] += int(formula(*args, **kwargs, out_val=out))
            except Exception:  # noqa: BLE001 - a formula that cannot read these shapes (torch 2.11's sdpa
                self.uncounted.add(str(packet))  # formula and grouped-query attention) must not fail the step
        return out


@dataclasses.dataclass
class OpCounts:
    """Matmuls and FLOPs run in forward and in backward (``counted`` False: not measured)."""

    counted: bool = False
    forward_matmuls: int = 0
    backward_matmuls: int = 0
    forward_flops: int = 0
    backward_flops: int = 0
    #: ops whose FLOPs could not be counted (their formula failed on the shapes seen)
    uncounted_ops: list[str] = dataclasses.field(default_factory=list)


class OpCountProbe(Probe[OpCounts]):
    """The step's matmuls and FLOPs (:class:`OpCounter`), around the micro-batches."""

    name = "ops"
    measurement = OpCounts
    metric_keys = ("forward_flops", "backward_flops", "recomputed_flops", "recomputed_matmuls", "flop_ratio",
                   "uncounted_flop_ops")
    columns = (Column("flops", ("flop_ratio",), lambda ratio: "" if ratio is None else f"{ratio:.2f}x"),)

    #: Whether ops are counted (:class:`OpCounter`, a Python call for every aten op). A check whose
    #: strategies promise no kept ops runs :class:`UncountedOpsProbe` (same name, metrics declared).
    counts_ops: ClassVar[bool] = True

    counter: OpCounter | None = None

    @contextlib.contextmanager
    def around_batches(self) -> Iterator[None]:
        if not self.counts_ops or holds_compiled_code(self.step.model):
            yield
            return
        self.counter = OpCounter()
        with self.counter:
            yield

    def read(self) -> OpCounts:
        seen = self.counter
        if seen is None:
            return OpCounts()
        return OpCounts(True, seen.matmuls["forward"], seen.matmuls["backward"], seen.flops["forward"],
                        seen.flops["backward"], sorted(seen.uncounted))

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        run, base = evidence.run.of(cls), evidence.baseline.run.of(cls)
        if not evidence.compared or not run.counted:
            return {}
        found: dict[str, Any] = {"forward_flops": run.forward_flops, "backward_flops": run.backward_flops}
        if run.uncounted_ops:  # the FLOP figures leave these ops out
            found["uncounted_flop_ops"] = run.uncounted_ops
        if base.counted:
            found.update(recomputed_flops=run.backward_flops - base.backward_flops,
                         recomputed_matmuls=run.backward_matmuls - base.backward_matmuls)
            base_total = base.forward_flops + base.backward_flops
            if base_total:  # the step's FLOPs against the same step without checkpointing
                found["flop_ratio"] = (run.forward_flops + run.backward_flops) / base_total
        return found


class UncountedOpsProbe(OpCountProbe):
    """:class:`OpCountProbe` that counts nothing (``counted`` False): what a check runs where no
    judged strategy promises kept ops."""

    counts_ops = False
