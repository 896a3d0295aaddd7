"""Tensors a run keeps in the process that ran it (rank 0 of a distributed scenario, an isolated
step's child), and the work on them done there.

A 1.1B-parameter model's gradients are 2.2 GB in bf16: copying them to the host, serialising them
through a pipe and comparing them on the judging process's CPU cost many times the step itself.
So rank 0 keeps every run's gradients, outputs and buffers where they are, and sends back a
:class:`Held` per tensor: its name, shape and dtype, enough for everything that does not read
values. Functions that read values (:func:`pytest_gradckpt.pipeline.comparison.compare`,
``measure_noise``, ``nonfinite``, ``norms``) ask :func:`holder_of` first; when their tensors are
held, the holder (the :class:`~pytest_gradckpt.ranks.launcher.Launcher`) runs the same function in the
process that holds them and only its small result travels back.

Imports torch only, so any module may import it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

#: The fields of a run whose tensors are held.
FIELDS = ("outputs", "grads", "buffers")


class Holder(Protocol):
    """What keeps held tensors: runs ``function(*args)`` where they live, once every
    :class:`Held` in ``args`` is resolved there to its tensor."""

    def call(self, function: Callable[..., Any], *args: Any) -> Any: ...


@dataclasses.dataclass(eq=False)
class Token:
    """One held run in the judging process: which run (``run_id``), and who holds it. When the
    last :class:`Held` of the run is gone here, ``released`` is told, so the holder can free it."""

    run_id: int
    holder: Holder | None = None


@dataclasses.dataclass(eq=False)
class Held:
    """A tensor kept where its run ran: enough of it to name, size and count it here.

    Example:
        >>> held = Held(3, "grads", "w", (2, 4), torch.bfloat16)
        >>> held.numel(), held.element_size(), held.dim()
        (8, 2, 2)
    """

    run_id: int
    field: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str = "cpu"
    token: Token | None = dataclasses.field(default=None, repr=False)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "token": None}  # the holder stays in the judging process


#: Below this many bytes of gradients, outputs and buffers a run's tensors travel whole: for a small
#: model one transfer through the pipe costs less than the round trips of judging where the tensors
#: are (the packaged suite's tiny models ran their isolated scenarios about twice as slowly held).
#: ``GRADCKPT_HOLD_ABOVE_BYTES`` overrides it (0 holds every run; the tests of holding use that).
HOLD_ABOVE_BYTES = 16 * 2**20


def worth_holding(run: Any) -> bool:
    """Whether ``run``'s tensors are big enough to keep where they ran (:data:`HOLD_ABOVE_BYTES`).

    Example:
        >>> class Run: grads, outputs, buffers = {"w": torch.zeros(4)}, {}, {}
        >>> worth_holding(Run())
        False
    """
    limit = int(os.environ.get("GRADCKPT_HOLD_ABOVE_BYTES", HOLD_ABOVE_BYTES))
    return sum(t.numel() * t.element_size() for field in FIELDS for t in getattr(run, field).values()
               if isinstance(t, torch.Tensor)) > limit


def keep(run_id: int, tensors: Mapping[str, Mapping[str, torch.Tensor | None]]) -> dict[str, dict[str, Any]]:
    """In the process that ran the step: the stand-ins to send for ``tensors`` (field -> name -> tensor).

    Example:
        >>> keep(1, {"grads": {"w": torch.zeros(2, 3), "frozen": None}})["grads"]["w"].shape
        (2, 3)
    """
    return {field: {name: None if t is None else Held(run_id, field, name, tuple(t.shape), t.dtype, t.device.type)
                    for name, t in named.items()}
            for field, named in tensors.items()}


def host_copies(named: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """In the holding process: the tensors, copied to host memory to travel (see :func:`bring_home`)."""
    return {n: None if t is None else t.detach().to("cpu", copy=True) for n, t in named.items()}


def bring_home(run: Any) -> bool:
    """Replace the stand-ins of ``run`` (a :class:`~pytest_gradckpt.pipeline.runs.Run`) by their tensors,
    copied here, when every one of them is in host memory where it is held (a CPU model: cheap to
    move, and then the run outlives the process that holds it, e.g. in a baseline cache).
    Returns whether ``run`` holds nothing elsewhere now."""
    fields = {field: getattr(run, field) for field in FIELDS}
    stand_ins = [h for named in fields.values() for h in named.values() if isinstance(h, Held)]
    if not stand_ins:
        return True
    if any(h.device != "cpu" or h.token is None or h.token.holder is None for h in stand_ins):
        return False
    holder = holder_of(*fields.values())
    assert holder is not None  # every stand-in has one (checked above)
    for field, named in fields.items():
        setattr(run, field, holder.call(host_copies, named) if holder_of(named) is not None else named)
    return True


def attach(token: Token, fields: Mapping[str, Mapping[str, Any]], released: Callable[[int], None]) -> None:
    """In the judging process: tie every received stand-in to ``token``; ``released(run_id)`` runs
    once none of them is left."""
    for named in fields.values():
        for held in named.values():
            if isinstance(held, Held):
                held.token = token
    weakref.finalize(token, released, token.run_id)


def holder_of(*mappings: Any) -> Holder | None:
    """The holder of the first held tensor among the values of ``mappings``; None when every
    tensor is here (then the caller computes as usual).

    Example:
        >>> holder_of({"w": torch.ones(1)}, {"w": None}) is None
        True
    """
    for mapping in mappings:
        if isinstance(mapping, Mapping):
            for value in mapping.values():
                if isinstance(value, Held) and value.token is not None:
                    return value.token.holder
    return None


def resolve(value: Any, store: Mapping[int, Mapping[str, Mapping[str, torch.Tensor | None]]]) -> Any:
    """In the holding process: ``value`` (an argument of a held call) with every :class:`Held`
    (itself, or a value of a mapping) replaced by its tensor.

    Example:
        >>> store = {1: {"grads": {"w": torch.ones(2)}}}
        >>> resolve({"w": Held(1, "grads", "w", (2,), torch.float32), "b": None}, store)
        {'w': tensor([1., 1.]), 'b': None}
    """
    if isinstance(value, Held):
        return store[value.run_id][value.field][value.name]
    if isinstance(value, Mapping) and any(isinstance(v, Held) for v in value.values()):
        return {k: resolve(v, store) for k, v in value.items()}
    return value


def run_ids(args: Any) -> set[int]:
    """Every run an argument list refers to."""
    found: set[int] = set()
    for value in args:
        items = value.values() if isinstance(value, Mapping) else [value]
        found.update(v.run_id for v in items if isinstance(v, Held))
    return found
