"""The one registry idiom: an ordered table of named things, built-ins first, held in a
:class:`contextvars.ContextVar`.

The probes, the strategies and the trainer adapters each keep one :class:`Registry`. Its
built-ins are an explicit table in the module that owns it (nothing registers by being
imported); ``register``/``unregister`` change what is in force for the rest of the current
context (a test module's or a conftest's own strategy, say), and :meth:`Registry.using` only
inside a ``with`` block. Nothing else holds the table, so no module shares registry state with
another through a global that import order fills. Standard library only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named things in order: ``builtins`` first, then those registered.

    Example:
        >>> numbers = Registry("numbers", ["one", "two"], name_of=str)
        >>> numbers.register("three")
        'three'
        >>> numbers.names(), numbers.is_builtin("one")
        (['one', 'two', 'three'], True)
        >>> numbers.unregister("three"), numbers.names()
        ('three', ['one', 'two'])
        >>> with numbers.using("four", only=True):
        ...     numbers.names()
        ['four']
        >>> numbers.names()
        ['one', 'two']
    """

    def __init__(self, what: str, builtins: Iterable[T], name_of: Callable[[T], str]) -> None:
        self.what, self.name_of = what, name_of
        self.builtins: tuple[T, ...] = tuple(builtins)
        self._active: contextvars.ContextVar[tuple[T, ...]] = contextvars.ContextVar(
            f"pytest_gradckpt_{what}", default=self.builtins)

    def registered(self) -> tuple[T, ...]:
        """Everything in force here, in order."""
        return self._active.get()

    def names(self) -> list[str]:
        """The names of :meth:`registered`, in order."""
        return [self.name_of(item) for item in self.registered()]

    def find(self, name: str) -> T | None:
        """The registered item called ``name``, or None."""
        return next((item for item in self.registered() if self.name_of(item) == name), None)

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is one of the built-ins (which stay registered)."""
        return any(self.name_of(item) == name for item in self.builtins)

    def register(self, item: T, *, first: bool = False) -> T:
        """Put ``item`` in force for the rest of this context: in place of one of the same name,
        else last; ``first``: before everything (and out of the place of one of the same name)."""
        name = self.name_of(item)
        current = self.registered()
        if first:
            self._active.set((item, *(found for found in current if self.name_of(found) != name)))
        elif any(self.name_of(found) == name for found in current):
            self._active.set(tuple(item if self.name_of(found) == name else found for found in current))
        else:
            self._active.set((*current, item))
        return item

    def unregister(self, name: str) -> T:
        """Take ``name`` out of force for the rest of this context and return it (KeyError if absent)."""
        found = self.find(name)
        if found is None:
            raise KeyError(name)
        self._active.set(tuple(item for item in self.registered() if item is not found))
        return found

    def unregister_refusal(self, name: str, caller: str, noun: str, nouns: str) -> str | None:
        """Why ``caller`` may not unregister ``name`` (a built-in, or nothing of that name), or None.

        Example:
            >>> Registry("numbers", [1], name_of=str).unregister_refusal("1", "forget", "number", "numbers")
            "forget: '1' is built in; built-in numbers stay registered"
        """
        if self.is_builtin(name):
            return f"{caller}: {name!r} is built in; built-in {nouns} stay registered"
        if self.find(name) is None:
            return f"{caller}: no {noun} named {name!r} is registered; registered: {', '.join(self.names()) or '(none)'}"
        return None

    @contextlib.contextmanager
    def using(self, *items: T, only: bool = False) -> Iterator[tuple[T, ...]]:
        """Run the block with ``items`` added after those in force (``only``: exactly these);
        nothing outlives the block."""
        token = self._active.set(tuple(items) if only else (*self.registered(), *items))
        try:
            yield self.registered()
        finally:
            self._active.reset(token)
