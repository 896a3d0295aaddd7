"""Leaving a trainer exactly as it was: its attributes, and the containers they hold, restored in place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_CONTAINERS = (dict, list, set)


def _structure(value: Any) -> Any:
    """A copy of the container structure of ``value`` (dicts, lists, sets, nested), sharing the leaves.

    Leaves (tensors, modules, numbers) are kept by reference: the trainer's step never mutates
    them in place except through the model, which the check never steps (it runs on a copy).
    """
    if isinstance(value, dict):
        copied = value.copy()  # keeps the type (defaultdict, OrderedDict) and a defaultdict's factory
        for key, item in value.items():
            copied[key] = _structure(item)
        return copied
    if isinstance(value, list):
        return [_structure(item) for item in value]
    if isinstance(value, set):
        return set(value)
    return value


def _restore_in_place(current: Any, saved: Any) -> Any:
    """Put ``saved``'s contents back into ``current`` when both are the same kind of container
    (so references others hold to ``current`` see the old contents); otherwise ``saved``."""
    if type(current) is type(saved) and isinstance(current, _CONTAINERS) and current is not saved:
        current.clear()
        if isinstance(current, dict):
            current.update(saved)
        elif isinstance(current, list):
            current.extend(saved)
        else:
            current.update(saved)
        return current
    return saved


@contextlib.contextmanager
def restored_attributes(*objects: Any) -> Iterator[None]:
    """On exit, give every object in ``objects`` back its attributes as they were on entry:
    changed ones reset, added ones removed, the contents of dicts, lists and sets restored in place.

    Example:
        >>> class Box: pass
        >>> box = Box(); box.log = [1]; box.step = 0
        >>> with restored_attributes(box):
        ...     box.log.append(2); box.step = 5; box.extra = True
        >>> box.log, box.step, hasattr(box, "extra")
        ([1], 0, False)
    """
    saved = [(obj, {key: (value, _structure(value)) for key, value in vars(obj).items()})
             for obj in objects if obj is not None and hasattr(obj, "__dict__")]
    try:
        yield
    finally:
        for obj, attributes in saved:
            state = vars(obj)
            for key in [k for k in state if k not in attributes]:
                del state[key]
            for key, (original, structure) in attributes.items():
                state[key] = _restore_in_place(original, structure)
