"""Compares named tensors (gradients, outputs, buffers) with the baseline's.

The verdict for each tensor is :func:`torch.testing.assert_close`'s; this
module adds the figures a report needs (worst tensor, max abs and rel diff)
and the one check assert_close cannot make: a gradient that vanished.
"""

from __future__ import annotations

import dataclasses

import torch

#: (rtol, atol) per compute dtype: torch.testing's own defaults. Recomputation
#: repeats the same kernels on the same inputs, so float32 is held tight; bf16
#: and fp16 allow their rounding noise.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``; float32's for anything unlisted.

    Example:
        >>> default_tolerances(torch.bfloat16)
        (0.016, 1e-05)
    """
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])


@dataclasses.dataclass
class Comparison:
    """What differs between two sets of named tensors."""

    vanished: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    worst: str | None = None
    worst_abs: float = 0.0
    worst_rel: float = 0.0
    max_abs: float = 0.0

    @property
    def equal(self) -> bool:
        return not self.vanished and not self.mismatched

    def describe(self, what: str) -> str:
        """One sentence naming the worst tensor, e.g. for a ``mismatch`` message."""
        return (f"{len(self.mismatched)} {what} differ; worst {self.worst}: max abs diff {self.worst_abs:.3g}, "
                f"max rel diff {self.worst_rel:.3g}")


def _is_zero_or_none(tensor: torch.Tensor | None) -> bool:
    return tensor is None or not bool(torch.count_nonzero(tensor))


def compare(expected: dict[str, torch.Tensor | None], actual: dict[str, torch.Tensor | None],
            rtol: float, atol: float) -> Comparison:
    """Compare ``actual`` with ``expected`` name by name.

    A name whose expected tensor is non-zero but whose actual one is None or all
    zero is *vanished* (a silent failure), never merely mismatched.

    Example:
        >>> a = {"w": torch.ones(3)}
        >>> compare(a, {"w": torch.ones(3) * 1.001}, 1.3e-6, 1e-5).mismatched
        ['w']
        >>> compare(a, {"w": None}, 1.3e-6, 1e-5).vanished
        ['w']
    """
    result = Comparison()
    worst_score = -1.0
    for name, want in expected.items():
        got = actual.get(name)
        if want is None or _is_zero_or_none(want):
            if got is not None and not _is_zero_or_none(got):
                result.mismatched.append(name)
            continue
        if _is_zero_or_none(got):
            result.vanished.append(name)
            continue
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
            ok = True
        except AssertionError:
            ok = False
        diff = (got.double() - want.double()).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        result.max_abs = max(result.max_abs, max_abs)
        if ok:
            continue
        result.mismatched.append(name)
        score = float((diff / (atol + rtol * want.double().abs())).max())
        if score > worst_score:
            worst_score = score
            result.worst, result.worst_abs = name, max_abs
            result.worst_rel = float((diff / want.double().abs().clamp_min(1e-30)).max())
    return result
