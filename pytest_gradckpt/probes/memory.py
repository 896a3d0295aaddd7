"""Saved-activation memory: the high-water mark of bytes kept alive for backward.

Counted: every tensor autograd saves for backward (``saved_tensors_hooks``),
every tensor handed into a checkpoint unit (a checkpoint keeps those alive
until backward), the matmul outputs selective activation checkpointing
keeps, and what a recompute materialises during backward (a segment of four
layers recomputed at once costs four layers' activations at that moment). Each is counted once per storage, while that storage is alive: liveness
is read from a weak reference to the storage, not from who holds it, so the
peak is a true high-water mark. Parameters and tensors a strategy moved to
host memory (:meth:`SavedActivationProbe.mark_offloaded`) are not activation memory and are left out.

There is no module-level state: a probe belongs to one run. Code running inside a checkpoint
unit (a strategy's checkpoint function, built-in or a user's) reaches that run's probe through
the unit, :func:`pytest_gradckpt.pipeline.units.memory_probe_of`, so both are measured the same way.
:class:`MemoryProbe` is the probe (:mod:`pytest_gradckpt.probes.protocol`) that hands the units
their run's :class:`SavedActivationProbe`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_gradckpt.probes.recompute_counts import RecomputeProbe
from pytest_gradckpt.probes.protocol import Column, Probe, ProbeEvidence

def _storage_key(tensor: torch.Tensor) -> tuple[Any, int, int] | None:
    found = _storage_and_key(tensor)
    return None if found is None else found[1]


def _storage_and_key(tensor: torch.Tensor) -> tuple[torch.UntypedStorage, tuple[Any, int, int]] | None:
    try:
        storage = tensor.untyped_storage()
        return storage, (tensor.device, storage.data_ptr(), storage.nbytes())
    except (RuntimeError, NotImplementedError):  # sparse, nested, meta, DTensor, or storage FSDP freed
        return None


#: torch's own test of a storage weak reference (what ``StorageWeakRef.expired`` calls through two
#: Python frames): the live set is scanned at every possible new peak, so each test counts.
_expired: Any = getattr(torch.UntypedStorage, "_expired", None)


class SavedActivationProbe:
    """Context manager that measures the saved-activation peak of the code it wraps.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4, 4))
        >>> with SavedActivationProbe(torch.device("cpu"), [w]) as probe:
        ...     (torch.ones(8, 4) @ w).tanh().sum().backward()
        >>> probe.peak_bytes > 0
        True
    """

    def __init__(self, device: torch.device, parameters: Any = ()):
        self.device = torch.device(device)
        #: storage address -> the excluded storage; an exclusion ends with its storage, so a later
        #: tensor that reuses the address of a freed host copy is counted.
        self.excluded: dict[int, StorageWeakRef] = {}
        for param in parameters:
            self.exclude_storage(getattr(param, "_local_tensor", param))
        self.live: dict[tuple[Any, int, int], StorageWeakRef] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks: Any = None

    def mark_offloaded(self, tensor: torch.Tensor) -> None:
        """Declare ``tensor`` host-resident offload storage, not device activation memory.

        On a CUDA device this is implied by the tensor living on the CPU; on a CPU
        device it is how the probe predicts what offloading would save on a GPU.

        Example:
            >>> probe = SavedActivationProbe(torch.device("cpu"))
            >>> host = torch.zeros(4)
            >>> probe.mark_offloaded(host)
            >>> probe.add(host)
            >>> probe.peak_bytes
            0
        """
        self.exclude_storage(tensor)

    def exclude_storage(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key is not None:
            try:
                self.excluded[key[1]] = StorageWeakRef(tensor.untyped_storage())
            except RuntimeError:
                return

    def _is_excluded(self, address: int) -> bool:
        ref = self.excluded.get(address)
        if ref is None:
            return False
        if ref.expired():
            del self.excluded[address]
            return False
        return True

    def _prune(self) -> None:
        if _expired is None:
            dead = [k for k, ref in self.live.items() if ref.expired()]
        else:
            dead = [k for k, ref in self.live.items() if _expired(ref.cdata)]
        for key in dead:
            del self.live[key]
            self.live_bytes -= key[2]

    def add(self, tensor: Any) -> None:
        """Count ``tensor``'s storage as alive for backward until it is freed."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device.type:
            return
        if isinstance(tensor, torch.nn.Parameter):
            return
        found = _storage_and_key(tensor)
        if found is None:
            return
        storage, key = found
        if key[2] == 0 or self._is_excluded(key[1]):
            return
        known = self.live.get(key)
        if known is not None:
            if not known.expired():
                return
            del self.live[key]  # a dead storage's address, reused by a new one of the same size
            self.live_bytes -= key[2]
        try:
            self.live[key] = StorageWeakRef(storage)
        except RuntimeError:
            return
        self.live_bytes += key[2]
        if self.live_bytes > self.peak_bytes:
            # Only a possible new peak needs the exact live set: the count includes storages that
            # may have died since the last look, so it can only overstate what is alive.
            self._prune()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def hold(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count the tensors handed to a checkpoint unit (a checkpoint keeps them alive)."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.add(value)

    def recompute(self) -> _NoteSavedOutputs:
        """A context that counts every op output made inside it (used around recomputes)."""
        return _NoteSavedOutputs(self, None)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return tensor  # a fake tensor while a compiler traces; the compiled step packs the real ones
        self.add(tensor)
        # A detached alias, not the tensor itself: a saved *output* packed as itself holds its own
        # grad_fn, a cycle through autograd's C++ graph that Python's collector cannot break. A
        # step that fails before backward (out of memory, say) would then keep its whole graph,
        # model copy's weights included, for the rest of the process.
        return tensor.detach()

    def __enter__(self) -> SavedActivationProbe:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None  # it holds this probe's bound methods: a cycle only the cyclic collector frees


class _NoteSavedOutputs(TorchDispatchMode):
    """Reports op outputs to ``probe``: those of ``ops``, or all when ``ops`` is None."""

    def __init__(self, probe: SavedActivationProbe, ops: frozenset[Any] | None):
        super().__init__()
        self.probe, self.ops = probe, ops

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.ops is None or func in self.ops:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                self.probe.add(tensor)
        return out


@contextlib.contextmanager
def note_sac_saved_outputs(probe: SavedActivationProbe, forward_context: Any,
                           ops: frozenset[Any]) -> Iterator[None]:
    """Wrap SAC's forward context so ``probe`` sees the outputs of ``ops`` that SAC keeps."""
    with forward_context, _NoteSavedOutputs(probe, ops):
        yield


@dataclasses.dataclass
class SavedMemory:
    """The saved-activation peak of one step, in bytes."""

    activation_bytes: int = 0


class MemoryProbe(Probe[SavedMemory]):
    """The saved-activation peak of the micro-batches (:class:`SavedActivationProbe`), parameters
    excluded. Its :class:`SavedActivationProbe` exists from the start of the step (the units report
    what they hold to it through the recompute probe's counter) and counts inside the micro-batches."""

    name = "memory"
    measurement = SavedMemory
    metric_keys = ("activation_bytes", "baseline_activation_bytes", "activation_reduction")
    columns = (Column("act.mem", ("activation_reduction",), lambda cut: "" if cut is None else f"{-cut * 100:.0f}%"),)

    saved: SavedActivationProbe

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        # After the strategy and the parallel wrap: FSDP2 swaps the parameter objects.
        self.saved = SavedActivationProbe(self.step.device, [p for _, p in self.step.model.named_parameters()])
        counter = self.step.probe(RecomputeProbe).counter
        counter.memory = self.saved
        try:
            yield
        finally:
            counter.memory = None

    def around_batches(self) -> SavedActivationProbe:
        return self.saved

    def read(self) -> SavedMemory:
        return SavedMemory(self.saved.peak_bytes)

    @classmethod
    def evidence(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        run, base = evidence.run.of(cls).activation_bytes, evidence.baseline.run.of(cls).activation_bytes
        if not evidence.baseline.measures_cost or not base:
            return {}
        return {"activation_reduction": 1 - run / base}

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        if not evidence.compared:
            return {}
        found: dict[str, Any] = {"activation_bytes": evidence.run.of(cls).activation_bytes,
                                 "baseline_activation_bytes": evidence.baseline.run.of(cls).activation_bytes}
        if evidence.activation_reduction is not None:
            found["activation_reduction"] = evidence.activation_reduction
        return found
