"""The one walker over nested tensors: mappings, lists and tuples at any depth.

Every module that looks inside inputs or outputs (arguments, sharding under DDP/FSDP2,
the recompute counter, host copies of a run, a compiled run's outputs) goes through these
functions, so a batch nested as ``({"x": [t]},)`` is seen the same way everywhere. Imports
torch only, so any module may import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def _rebuild_sequence(value: list[Any] | tuple[Any, ...], items: list[Any]) -> Any:
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields as arguments
        return type(value)(*items)
    return type(value)(items)


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in nested mappings and sequences.

    Example:
        >>> map_tensors({"x": torch.ones(1), "n": 3}, lambda t: t * 2)
        {'x': tensor([2.]), 'n': 3}
        >>> map_tensors(({"a": [torch.ones(1)]},), lambda t: t + 1)
        ({'a': [tensor([2.])]},)
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return type(value)(**{k: map_tensors(v, fn) for k, v in value.items()}) if not isinstance(value, dict) \
            else {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuild_sequence(value, [map_tensors(v, fn) for v in value])
    return value


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor in nested mappings and sequences, in the order :func:`map_tensors` visits them.
    Nothing is rebuilt: this is cheap enough to run on every layer's output.

    Example:
        >>> [t.shape[0] for t in tensors_in({"a": torch.zeros(2), "b": [torch.zeros(3), 4]})]
        [2, 3]
        >>> [t.shape[0] for t in tensors_in(([{"deep": (torch.zeros(5),)}],))]
        [5]
    """
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def tensor_bytes(tensors: Any) -> int:
    """Bytes held by the tensors in ``tensors`` (None entries skipped).

    Example:
        >>> tensor_bytes([torch.zeros(4), None, torch.zeros(2, dtype=torch.float64)])
        32
    """
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def tensor_leaves(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Floating-point tensors inside nested mappings/sequences, keyed by their path.

    Example:
        >>> sorted(tensor_leaves({"logits": torch.zeros(1), "ids": torch.zeros(1, dtype=torch.long)}))
        ['logits']
    """
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            found[prefix or "output"] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            found.update(tensor_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found.update(tensor_leaves(item, f"{prefix}[{index}]"))
    return found
