"""How long the step's micro-batches took (on CUDA, until the device finished them)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from pytest_gradckpt.probes.cuda import CudaProbe
from pytest_gradckpt.probes.protocol import Column, Probe, ProbeEvidence, ProbeStep


@dataclasses.dataclass
class Timed:
    """Wall-clock seconds of one step's forward and backward passes."""

    seconds: float = 0.0


class StepTime(Probe[Timed]):
    """The step's wall time. Registered last, so it is entered innermost: the other probes'
    setup is not billed to the step.

    Example:
        >>> StepTime.merge(Timed(2.0), [Timed(2.0), Timed(3.0)])
        Timed(seconds=2.0)
    """

    name = "seconds"
    measurement = Timed
    metric_keys = ("seconds", "baseline_seconds", "time_ratio")
    columns = (Column("time", ("time_ratio",), lambda ratio: "" if ratio is None else f"{ratio:.2f}x"),)

    def __init__(self, step: ProbeStep) -> None:
        super().__init__(step)
        self.seconds = 0.0

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if self.step.device.type == "cuda":
            torch.cuda.synchronize(self.step.device)
        self.seconds = time.perf_counter() - started

    def read(self) -> Timed:
        return Timed(self.seconds)

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        run, base = evidence.run.of(cls).seconds, evidence.baseline.run.of(cls).seconds
        if not evidence.compared:
            return {"seconds": run}
        found: dict[str, Any] = {"seconds": run, "baseline_seconds": base}
        # One unwarmed CUDA step says little about steady-state speed (first-call kernel
        # selection, allocator growth), so no ratio is shown there; see benchmarks/ for timings.
        on_cuda = evidence.run.of(CudaProbe).cuda_peak_bytes is not None
        if not on_cuda and base > 0 and evidence.baseline.measures_cost:
            found["time_ratio"] = run / base
        return found

