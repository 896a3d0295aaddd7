"""The CUDA caching allocator's peak during a step, above what was allocated before it."""

from __future__ import annotations

from typing import Any

import torch


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
