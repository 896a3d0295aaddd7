"""What a strategy promises beyond equal gradients, and how a run keeps or breaks it.

Equal gradients are necessary, not sufficient: a configuration also promises *which* units it
recomputes (``every_n_layers=2``: layers 0 and 2), *which* ops it keeps instead of recomputing
(a selective-checkpointing policy that saves or offloads matrix products) and *where* saved
activations live (``offload``: in host memory). A strategy exposes its :class:`Promise`
(:meth:`pytest_gradckpt.strategies.Strategy.promise`); the probes measure; :func:`broken` says,
in one line naming the promise, what the run did instead. The verdict rule that reads it is
``verdicts.promise_broken``.

Plain data, no torch: safe to import anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Promise:
    """What a strategy promises for one run.

    Attributes:
        label: the promise as the user wrote it, e.g. ``"every_n_layers=2"`` or ``"MUST_CPU_OFFLOAD"``.
        units: every checkpoint unit of the run, in order (messages name units by index in it).
        recomputed_units: exactly the units that recompute in backward; None: not promised.
        kept_ops: ops the strategy keeps (saved or offloaded) instead of recomputing, e.g.
            ``"matmuls"``: backward must run no more of them than without checkpointing.
        activations: where saved activations live between forward and backward (``"host"``,
            ``"device"``); None: not promised.

    Example:
        >>> p = Promise("every_n_layers=2", units=("l.0", "l.1", "l.2", "l.3"), recomputed_units=("l.0", "l.2"))
        >>> broken(p, recomputed=["l.0", "l.1", "l.2", "l.3"])
        'every_n_layers=2 promised layers 0, 2; recomputed 0, 1, 2, 3'
        >>> broken(p, recomputed=["l.0", "l.2"]) is None
        True
    """

    label: str
    units: tuple[str, ...] = ()
    recomputed_units: tuple[str, ...] | None = None
    kept_ops: str | None = None
    activations: str | None = None


@dataclasses.dataclass(frozen=True)
class OpsSeen:
    """What backward ran of the promised ops, in the run and without checkpointing (None: not counted)."""

    run: int | None
    baseline: int | None
    where: str = ""  # e.g. "eager torch 2.13.0"


def _indices(promise: Promise, names: Sequence[str]) -> str:
    position = {name: i for i, name in enumerate(promise.units)}
    shown = sorted((position.get(n, -1), n) for n in names)
    return ", ".join(str(i) if i >= 0 else n for i, n in shown) or "none"


def broken(promise: Promise | None, recomputed: Sequence[str] | None = None, ops: OpsSeen | None = None,
           host_bytes: int | None = None) -> str | None:
    """The first promise the run broke, as one line naming it; None when every promise that could be
    judged held. ``recomputed``: the units that ran again in backward; ``ops``: the kept ops counted
    in backward; ``host_bytes``: saved activations resident in host memory after forward (None: not
    measurable here, e.g. on a CPU device, where host and device are one memory).

    Example:
        >>> broken(Promise("MUST_CPU_OFFLOAD", kept_ops="matmuls"), ops=OpsSeen(15, 12, "eager torch 2.13.0"))
        'MUST_CPU_OFFLOAD recomputed matmuls in eager torch 2.13.0 (12 vs 15 matmuls in backward)'
        >>> broken(Promise("offload=True", activations="host"), host_bytes=0)
        'offload=True promised saved activations in host memory; none were there after forward'
    """
    if promise is None:
        return None
    if promise.recomputed_units is not None and recomputed is not None:
        if sorted(promise.recomputed_units) != sorted(recomputed):
            return (f"{promise.label} promised layers {_indices(promise, promise.recomputed_units)}; "
                    f"recomputed {_indices(promise, recomputed)}")
    if promise.kept_ops and ops is not None and ops.run is not None and ops.baseline is not None:
        if ops.run > ops.baseline:
            where = f" in {ops.where}" if ops.where else ""
            return (f"{promise.label} recomputed {promise.kept_ops}{where} ({ops.baseline} vs {ops.run} "
                    f"{promise.kept_ops} in backward)")
    if promise.activations == "host" and host_bytes is not None and host_bytes <= 0:
        return f"{promise.label} promised saved activations in host memory; none were there after forward"
    return None


def recomputed_units(baseline_calls: Mapping[str, int], run_calls: Mapping[str, int]) -> list[str]:
    """Units that ran more often than without checkpointing, in the baseline's order.

    Example:
        >>> recomputed_units({"a": 1, "b": 1}, {"a": 2, "b": 1})
        ['a']
    """
    return [name for name, runs in baseline_calls.items() if runs and run_calls.get(name, 0) > runs]
