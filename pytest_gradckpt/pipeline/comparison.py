"""Compares named tensors (gradients, outputs, buffers) with the baseline's, on the device.

Per tensor the test is :func:`torch.isclose`'s (the one :func:`torch.testing.assert_close`
applies): ``|actual - expected| <= atol + rtol * |expected|``, NaN never equal; and, since
``atol`` alone waves through any change to a tensor whose elements are all below it (bf16's
1e-5 is above most elements of a large model's gradients), the error norm must also stay
within ``rtol`` of the tensor's norm plus the norm a tensor of its size would have at the
comparison's root-mean-square scale: ``||a - e|| <= rtol * (||e|| + rms * sqrt(numel))``.
The second term keeps tensors whose true value is zero (rounding noise only) from failing
on their own vanishing norm. The figures a
report needs (max abs diff, worst tensor, relative error norm) come from the same pass.
Everything is reduced where the tensors live, in float32, and all the scalars of one
comparison reach the host in a single transfer: on a billion-parameter model a host-side
float64 copy of every gradient costs far more than the training steps themselves.

Two facts :func:`~torch.testing.assert_close` cannot give are added: a gradient that
*vanished* (non-zero in the baseline, None or all zero here: a silent failure), and a
judgement against measured run-to-run *noise* (see :class:`Noise`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from pytest_gradckpt.ranks import held

#: (rtol, atol) per compute dtype: torch.testing's own defaults. Recomputation repeats the
#: same kernels on the same inputs, so float32 is held tight; bf16 and fp16 allow for the
#: rounding of a different accumulation order (autograd may sum the gradients reaching a
#: tensor in another order once a checkpoint's backward is in the graph).
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}

#: A tensor that fails the elementwise test still matches when its relative error norm
#: ``||actual - expected|| / ||expected||`` is at most this many times the baseline's own
#: run-to-run relative error norm. Two runs of a nondeterministic kernel differ by a draw of
#: the same size as a third run differs from either; norms over many elements vary little
#: between draws, so 3x separates noise from a fault: a 1% error in a layer's output shows
#: as a 1-2% error norm in the gradients before it, far above 3 x the ~0.3% of bf16 noise.
NOISE_FACTOR = 3.0

#: Run-to-run noise larger than this many units of the compute dtype's epsilon (relative
#: error norm) is not numerical noise but a model that draws randomness outside torch's
#: seeded generators: nothing can be judged then. bf16: 0.125, fp32: 1.9e-6.
NOISE_CAP_EPS = 16


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``; float32's for anything unlisted.

    Example:
        >>> default_tolerances(torch.bfloat16)
        (0.016, 1e-05)
    """
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])


def noise_cap(dtype: torch.dtype) -> float:
    """The largest run-to-run relative error norm still taken for numerical noise in ``dtype``.

    Example:
        >>> noise_cap(torch.bfloat16)
        0.125
    """
    return NOISE_CAP_EPS * torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps


@dataclasses.dataclass
class TensorDiff:
    """How one tensor differs from its expected value."""

    close: bool            # every element within atol + rtol * |expected|, no NaN
    max_abs: float         # max |actual - expected|
    score: float           # max |actual - expected| / (atol + rtol * |expected|); > 1 fails
    rel_norm: float        # ||actual - expected|| / ||expected|| (inf when expected is zero and actual is not)


@dataclasses.dataclass
class Comparison:
    """What differs between two sets of named tensors."""

    vanished: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    #: names that failed the elementwise test but are within the baseline's measured noise
    within_noise: list[str] = dataclasses.field(default_factory=list)
    diffs: dict[str, TensorDiff] = dataclasses.field(default_factory=dict)
    worst: str | None = None
    worst_abs: float = 0.0
    worst_rel: float = 0.0
    max_abs: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.vanished and not self.mismatched

    def describe(self, what: str) -> str:
        """One sentence naming the worst tensor, e.g. for a ``mismatch`` message."""
        text = (f"{len(self.mismatched)} {what} differ; worst {self.worst}: max abs diff {self.worst_abs:.3g}, "
                f"relative error norm {self.worst_rel:.3g}")
        return text + "".join(f" ({note})" for note in self.notes)


@dataclasses.dataclass
class Noise:
    """The baseline's own run-to-run difference, per tensor: the relative error norm between
    two runs without checkpointing. Empty when the two runs were identical.

    Example:
        >>> Noise({"w": 0.004}).allows("w", 0.01), Noise({"w": 0.004}).allows("w", 0.02)
        (True, False)
    """

    rel_norm: dict[str, float] = dataclasses.field(default_factory=dict)

    def allows(self, name: str, rel_norm: float) -> bool:
        noise = self.rel_norm.get(name, 0.0)
        return noise > 0 and rel_norm <= NOISE_FACTOR * noise

    @property
    def largest(self) -> float:
        return max(self.rel_norm.values(), default=0.0)


def _stats(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> torch.Tensor | None:
    """Six scalars in one tensor, computed where ``got`` lives without leaving the device:
    want non-zero, got non-zero, max abs diff, score, ||diff||, ||want||. None when the two
    are bitwise equal: one pass that stops at the first difference, the common case
    (deterministic kernels recompute exactly)."""
    if want.device != got.device:
        want = want.to(got.device, non_blocking=True)
    if torch.equal(got, want):
        return None  # the caller still takes the norm of ``want`` for the comparison's scale
    if not (got.is_floating_point() or got.is_complex()):
        got, want = got.double(), want.double()
    a, b = got.float(), want.float()
    diff = torch.sub(a, b).abs_()
    # Clamped so that exact equality scores 0 even at rtol = atol = 0, and any difference then fails.
    allowed = b.abs().mul_(rtol).add_(atol).clamp_min_(torch.finfo(torch.float32).tiny)
    zero = diff.new_zeros(())
    # amax propagates NaN; the scalar NaN is read as a failure on the host, as isclose does.
    return torch.stack([
        b.ne(0).any().float() if b.numel() else zero,
        a.ne(0).any().float() if a.numel() else zero,
        diff.amax() if diff.numel() else zero,
        diff.div_(allowed).amax() if diff.numel() else zero,
        torch.linalg.vector_norm(torch.sub(a, b)),
        torch.linalg.vector_norm(b),
    ])


def compare(expected: Mapping[str, torch.Tensor | None], actual: Mapping[str, torch.Tensor | None],
            rtol: float, atol: float, noise: Noise | None = None) -> Comparison:
    """Compare ``actual`` with ``expected`` name by name.

    A name whose expected tensor is non-zero but whose actual one is None or all zero is
    *vanished* (a silent failure), never merely mismatched. With ``noise``, a tensor that
    fails the elementwise test but whose relative error norm is within
    :data:`NOISE_FACTOR` times its measured run-to-run noise counts as equal (and is listed
    in ``within_noise``).

    Example:
        >>> a = {"w": torch.ones(3)}
        >>> compare(a, {"w": torch.ones(3) * 1.001}, 1.3e-6, 1e-5).mismatched
        ['w']
        >>> compare(a, {"w": None}, 1.3e-6, 1e-5).vanished
        ['w']
        >>> compare(a, {"w": torch.ones(3) * 1.001}, 1.3e-6, 1e-5, Noise({"w": 0.001})).within_noise
        ['w']
    """
    holder = held.holder_of(expected, actual)
    if holder is not None:  # kept where their run ran: compared there, only the result travels
        return holder.call(compare, expected, actual, rtol, atol, noise)
    result, pending = Comparison(), _Pending()
    for name, want in expected.items():
        _compare_on_device(name, want, actual.get(name), rtol, atol, result, pending)
    if not pending.stats:
        return result
    table = _to_host(pending.stats)
    scale = _rms_scale(table, pending)
    worst_score: float | None = None
    for name in pending.stats:
        score = _judge(name, table[name], pending.sizes[name], rtol, scale, noise, result)
        # The worst mismatch by score names the comparison; it replaces a shape or dtype mismatch's name.
        if score is not None and (worst_score is None or score > worst_score):
            worst_score, diff = score, result.diffs[name]
            result.worst, result.worst_abs, result.worst_rel = name, diff.max_abs, diff.rel_norm
    return result


@dataclasses.dataclass
class _Pending:
    """What the device-side pass leaves for the host: the scalars of every tensor that is not
    bitwise equal, and what the comparison's scale needs from all of them."""

    #: name -> the six scalars of :func:`_stats`, still on the tensor's device (insertion order is the names')
    stats: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    #: name -> element count, of every tensor compared numerically (bitwise-equal ones included)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the norm of each bitwise-equal floating tensor: they count in the scale, though nothing differs
    equal_norms: list[torch.Tensor] = dataclasses.field(default_factory=list)


def _compare_on_device(name: str, want: torch.Tensor | None, got: torch.Tensor | None, rtol: float, atol: float,
                       result: Comparison, pending: _Pending) -> None:
    """The decisions that need no scalar on the host: a missing tensor, a changed shape or dtype, a
    bitwise-equal tensor. Anything else leaves its scalars in ``pending``, to be read in one transfer."""
    if want is None:
        if got is not None and bool(got.ne(0).any()):
            result.mismatched.append(name)
        return
    if got is None:
        # None where the baseline had a tensor: vanished if the baseline's was non-zero.
        if bool(want.ne(0).any()):
            result.vanished.append(name)
        return
    if got.shape != want.shape or got.dtype != want.dtype:
        result.mismatched.append(name)
        result.notes.append(f"{name}: {got.dtype} {tuple(got.shape)} where the baseline has "
                            f"{want.dtype} {tuple(want.shape)}")
        result.worst = result.worst or name
        return
    found = _stats(got, want, rtol, atol)
    pending.sizes[name] = want.numel()
    if found is None:
        result.diffs[name] = TensorDiff(close=True, max_abs=0.0, score=0.0, rel_norm=0.0)
        if want.is_floating_point():
            pending.equal_norms.append(torch.linalg.vector_norm(want.float()))
        return
    pending.stats[name] = found


def _to_host(stats: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Every name's scalars as floats, in one transfer per device (a transfer per tensor would
    synchronise the device hundreds of times on a large model)."""
    names = list(stats)
    by_device: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(stats.values()):
        by_device.setdefault(tensor.device, []).append(index)
    table: dict[str, list[float]] = {}
    for indices in by_device.values():
        rows = torch.stack([stats[names[i]] for i in indices]).cpu().tolist()
        for i, row in zip(indices, rows, strict=True):
            table[names[i]] = row
    return table


def _rms_scale(table: dict[str, list[float]], pending: _Pending) -> float:
    """The comparison's scale: the root mean square of every expected element.

    A tensor whose true value is zero (a key bias under softmax) holds only rounding noise, and
    its own norm is no yardstick: its error is measured against the scale of the tensors around it.
    """
    square_sum = sum(row[5] ** 2 for row in table.values())
    square_sum += sum(float(norm) ** 2 for norm in pending.equal_norms)
    return math.sqrt(square_sum / max(1, sum(pending.sizes.values())))


def _judge(name: str, row: list[float], size: int, rtol: float, scale: float, noise: Noise | None,
           result: Comparison) -> float | None:
    """Sort one differing tensor into ``result`` from its scalars; its score when it is a mismatch."""
    want_nonzero, got_nonzero, max_abs, score, diff_norm, want_norm = row
    max_abs, score = (math.inf if math.isnan(v) else v for v in (max_abs, score))
    if not want_nonzero:
        if got_nonzero:
            result.mismatched.append(name)
        return None
    if not got_nonzero:
        result.vanished.append(name)
        return None
    rel_norm = diff_norm / want_norm if want_norm > 0 else math.inf
    within_norm = diff_norm <= rtol * (want_norm + scale * math.sqrt(size))
    diff = TensorDiff(close=score <= 1.0 and within_norm, max_abs=max_abs, score=score, rel_norm=rel_norm)
    result.diffs[name] = diff
    result.max_abs = max(result.max_abs, max_abs)
    if diff.close:
        return None
    if noise is not None and math.isfinite(rel_norm) and noise.allows(name, rel_norm):
        result.within_noise.append(name)
        return None
    result.mismatched.append(name)
    return score


def measure_noise(first: Mapping[str, torch.Tensor | None],
                  second: Mapping[str, torch.Tensor | None]) -> Noise:
    """The relative error norm between two runs without checkpointing, for each tensor
    that differs at all (bitwise-equal tensors have no noise).

    Example:
        >>> noise = measure_noise({"w": torch.ones(4), "b": torch.ones(2)}, {"w": torch.tensor([1., 1., 1., 1.5]),
        ...                                                          "b": torch.ones(2)})
        >>> noise.rel_norm
        {'w': 0.25}
    """
    same = compare(first, second, rtol=0.0, atol=0.0)
    return Noise({name: diff.rel_norm for name, diff in same.diffs.items() if not diff.close})


def nonfinite(named: Mapping[str, torch.Tensor | None]) -> list[str]:
    """The names whose tensor holds an infinity or NaN (one transfer for all of them).

    Example:
        >>> nonfinite({"w": torch.ones(2), "b": torch.tensor([float("nan")]), "frozen": None})
        ['b']
    """
    holder = held.holder_of(named)
    if holder is not None:
        return holder.call(nonfinite, named)
    present = [(n, t) for n, t in named.items() if t is not None]
    if not present:
        return []
    finite = torch.stack([torch.isfinite(t).all() for _, t in present]).cpu().tolist()
    return [n for (n, _), ok in zip(present, finite, strict=True) if not ok]


def norms(named: Mapping[str, torch.Tensor | None]) -> dict[str, float]:
    """Each present tensor's 2-norm, computed in float64 (one transfer for all of them).

    Example:
        >>> norms({"w": torch.tensor([3.0, 4.0]), "frozen": None})
        {'w': 5.0}
    """
    holder = held.holder_of(named)
    if holder is not None:
        return holder.call(norms, named)
    present = [(n, t) for n, t in named.items() if t is not None]
    if not present:
        return {}
    values = torch.stack([t.double().norm() for _, t in present]).cpu().tolist()
    return {n: v for (n, _), v in zip(present, values, strict=True)}
