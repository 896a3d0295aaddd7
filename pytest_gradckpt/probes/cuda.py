"""The CUDA caching allocator's peak during a step, above what was allocated before it.

:class:`CudaProbe` is the probe (:mod:`pytest_gradckpt.probes.protocol`): the peak above weights
and gradients, and on a distributed step every rank's peak (the run's is the largest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pytest_gradckpt.pipeline.tensors import tensor_bytes
from pytest_gradckpt.probes.protocol import Column, Probe, ProbeEvidence, ProbeStep


class CudaPeak:
    """Context manager: ``peak_bytes`` is the allocator peak above the bytes allocated on entry.

    Parameters and inputs are allocated before entry, so the figure is the
    activation and gradient memory of the step; the engine subtracts the
    gradients (one per trainable parameter) to get the peak above weights and
    gradients. On a non-CUDA device it measures nothing and ``peak_bytes`` is None.

    Example:
        >>> with CudaPeak(torch.device("cpu")) as peak:
        ...     pass
        >>> peak.peak_bytes is None
        True
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._start = 0

    def __enter__(self) -> CudaPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start


@dataclasses.dataclass
class CudaMemory:
    """The CUDA peak above weights and gradients (None off CUDA); distributed: each rank's."""

    cuda_peak_bytes: int | None = None
    rank_cuda_peak_bytes: list[int] | None = None


class CudaProbe(Probe[CudaMemory]):
    """The allocator peak of the step (:class:`CudaPeak`) less the gradients' bytes.

    Example:
        >>> CudaProbe.merge(CudaMemory(5), [CudaMemory(5), CudaMemory(7)])
        CudaMemory(cuda_peak_bytes=7, rank_cuda_peak_bytes=[5, 7])
        >>> CudaProbe.merge(CudaMemory(), [CudaMemory(), CudaMemory()])
        CudaMemory(cuda_peak_bytes=None, rank_cuda_peak_bytes=None)
    """

    name = "cuda"
    measurement = CudaMemory
    metric_keys = ("cuda_peak_bytes", "rank_cuda_peak_bytes", "baseline_cuda_peak_bytes", "cuda_reduction")
    columns = (Column("cuda.mem", ("cuda_reduction",), lambda cut: "" if cut is None else f"{-cut * 100:.0f}%"),)

    def __init__(self, step: ProbeStep) -> None:
        super().__init__(step)
        self.peak = CudaPeak(step.device)

    def around_step(self) -> CudaPeak:
        return self.peak

    def read(self) -> CudaMemory:
        if self.peak.peak_bytes is None:
            return CudaMemory()
        # A sharded (FSDP2) parameter's gradient on this rank is its local shard, not the whole.
        local = (getattr(p, "_local_tensor", p) for _, p in self.step.trainable)
        return CudaMemory(max(0, self.peak.peak_bytes - tensor_bytes(local)))

    @classmethod
    def merge(cls, mine: CudaMemory, ranks: Sequence[CudaMemory]) -> CudaMemory:
        """Every rank's peak is kept; the run's is the largest, so thresholds hold on every rank."""
        peaks = [r.cuda_peak_bytes for r in ranks]
        known = [p for p in peaks if p is not None]
        if len(known) != len(peaks) or not known:
            return mine
        return CudaMemory(max(known), known)

    @classmethod
    def evidence(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        run, base = evidence.run.of(cls).cuda_peak_bytes, evidence.baseline.run.of(cls).cuda_peak_bytes
        if not evidence.baseline.measures_cost or run is None or not base:
            return {}
        return {"cuda_reduction": 1 - run / base}

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        run = evidence.run.of(cls)
        if not evidence.compared:
            return {}
        found: dict[str, Any] = {}
        if run.cuda_peak_bytes is not None:  # measured whatever the baseline; compared only with a whole-model one
            found["cuda_peak_bytes"] = run.cuda_peak_bytes
        if run.rank_cuda_peak_bytes:
            found["rank_cuda_peak_bytes"] = run.rank_cuda_peak_bytes
        if evidence.cuda_reduction is not None:
            found.update(baseline_cuda_peak_bytes=evidence.baseline.run.of(cls).cuda_peak_bytes,
                         cuda_reduction=evidence.cuda_reduction)
        return found
