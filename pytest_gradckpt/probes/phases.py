"""Memory in two numbers, on the device and on the host: what stays resident after forward (what
checkpointing and offloading free while backward waits) and the step's peak (often in the
backward recompute, where offloading does not move it).

*Resident after forward* is read when the model's forward returns (a forward hook on the
model; for a transformers model with labels the loss is computed inside that forward):

- device, on CUDA: the allocator's bytes above those allocated when the micro-batches began;
  on CPU: the saved-activation bytes alive then (the memory probe's live set);
- host, on CUDA: host tensors made during the step and still alive (where ``save_on_cpu``,
  ``offload_wrapper`` and transformers' ``offload=True`` put saved activations, pinned or not),
  and the pinned host allocator's peak. On CPU, host and device are one memory: no host figure.

For a decoder (a model with ``config.hidden_size`` called with ``input_ids``) the probe also
gives the arithmetic a user checks against: ``units x tokens x hidden x bytes``, the layer
inputs a full checkpoint keeps (``boundary_bytes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from pytest_gradckpt.pipeline.units import holds_compiled_code
from pytest_gradckpt.probes.memory import MemoryProbe
from pytest_gradckpt.probes.protocol import Column, Probe, ProbeEvidence


def _pinned_bytes(kind: str) -> int | None:
    """The pinned host allocator's ``current`` or ``peak`` bytes; None where torch keeps no such
    statistics (then nothing about the host is judged)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    try:
        found = stats()
    except RuntimeError:
        return None
    for key in (f"allocated_bytes.all.{kind}", f"allocated_bytes.{kind}"):  # the key differs between releases
        if key in found:
            return int(found[key])
    return None


def boundary_bytes(model: torch.nn.Module, units: int, tokens: int, dtype: torch.dtype) -> int | None:
    """``units x tokens x hidden x bytes``: the layer inputs full checkpointing keeps, for a model
    with a ``config.hidden_size``; None otherwise.

    Example:
        >>> class Decoder(torch.nn.Module):
        ...     config = type("Config", (), {"hidden_size": 2048})()
        >>> boundary_bytes(Decoder(), 16, 2 * 2048, torch.bfloat16) / 2**20
        256.0
    """
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int) or not units or not tokens:
        return None
    return units * tokens * hidden * torch.empty((), dtype=dtype).element_size()


class HostCopies(TorchDispatchMode):
    """Host tensors made while a step on an accelerator runs (pinned or pageable: ``save_on_cpu``,
    ``offload_wrapper``, ``.to("cpu")``): :meth:`live_bytes` is what is still alive, counted once
    per storage. Pinned-allocator statistics alone miss a pageable copy (transformers 5.17's
    ``offload=True`` on an H200 held 1 GiB off the device with no pinned byte).

    Example:
        >>> with HostCopies() as copies:
        ...     kept = torch.ones(4, 4).to("cpu", copy=True)
        >>> copies.live_bytes()
        64
    """

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.numel():
                with contextlib.suppress(RuntimeError, NotImplementedError):
                    storage = tensor.untyped_storage()
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self) -> int:
        """Bytes of the host storages made inside that are still alive."""
        return sum(size for ref, size in self.storages.values() if not ref.expired())


@dataclasses.dataclass
class Phases:
    """Resident after forward and peak, on device and host (None: not measurable there)."""

    resident_bytes: int | None = None
    host_resident_bytes: int | None = None
    host_peak_bytes: int | None = None
    boundary_bytes: int | None = None


class PhasesProbe(Probe[Phases]):
    """Memory resident when forward returns, on device and host, and the host peak (the device
    peaks are the memory and CUDA probes')."""

    name = "phases"
    measurement = Phases
    metric_keys = ("resident_bytes", "host_resident_bytes", "host_peak_bytes", "boundary_bytes",
                   "baseline_resident_bytes", "resident_reduction")
    columns = (Column("resident", ("resident_reduction",), lambda cut: "" if cut is None else f"{-cut * 100:.0f}%"),)

    #: Whether host copies are counted (:class:`HostCopies`, a Python call for every aten op). A check
    #: whose strategies promise nothing about where activations live runs :class:`DevicePhasesProbe`.
    counts_host_copies: ClassVar[bool] = True

    seen: Phases | None = None

    @contextlib.contextmanager
    def around_batches(self) -> Iterator[None]:
        device = self.step.device
        cuda = device.type == "cuda"
        start = torch.cuda.memory_allocated(device) if cuda else 0
        host_start = _pinned_bytes("current") if cuda else None
        if cuda:
            with contextlib.suppress(RuntimeError, AttributeError):
                torch.cuda.reset_peak_host_memory_stats()
        saved = self.step.probe(MemoryProbe).saved
        seen = Phases()
        copies = HostCopies() if cuda and self.counts_host_copies and not holds_compiled_code(self.step.model) else None

        def after_forward(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if torch.compiler.is_compiling() or not torch.is_grad_enabled():
                return
            if cuda:
                resident = torch.cuda.memory_allocated(device) - start
                if copies is not None:
                    seen.host_resident_bytes = max(seen.host_resident_bytes or 0, copies.live_bytes())
            else:
                saved._prune()
                resident = saved.live_bytes
            seen.resident_bytes = max(seen.resident_bytes or 0, resident)
            ids = kwargs.get("input_ids") if isinstance(kwargs, dict) else None
            if isinstance(ids, torch.Tensor) and seen.boundary_bytes is None:
                dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
                seen.boundary_bytes = boundary_bytes(module, len(self.step.layers), ids.numel(), dtype)

        handle = self.step.model.register_forward_hook(after_forward, with_kwargs=True)
        try:
            with copies if copies is not None else contextlib.nullcontext():
                yield
        finally:
            handle.remove()
            host_peak = _pinned_bytes("peak") if cuda else None
            if host_peak is not None and host_start is not None:
                seen.host_peak_bytes = max(0, host_peak - host_start)
            self.seen = seen

    def read(self) -> Phases:
        return self.seen or Phases()

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        run, base = evidence.run.of(cls), evidence.baseline.run.of(cls)
        if not evidence.compared:
            return {}
        found = {key: value for key, value in dataclasses.asdict(run).items() if value is not None}
        if run.resident_bytes is not None and base.resident_bytes and evidence.baseline.measures_cost:
            found.update(baseline_resident_bytes=base.resident_bytes,
                         resident_reduction=1 - run.resident_bytes / base.resident_bytes)
        return found


class DevicePhasesProbe(PhasesProbe):
    """:class:`PhasesProbe` without the host copies (``host_resident_bytes`` stays None): what a check
    runs where no judged strategy promises host-resident activations (with the op counter, the
    mode took a 1.1B LoRA check's micro-batches on an H200 from 2.7 s to 6.1 s)."""

    counts_host_copies = False
