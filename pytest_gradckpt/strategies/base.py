"""What every checkpoint strategy is: :class:`Strategy`, the kinds of checkpoint units it may
declare (:class:`Units`), and the strategy built on a checkpoint function.

Kept apart from the built-ins and their registry (:mod:`pytest_gradckpt.strategies`, which
re-exports all of this) so a built-in that lives in its own module (``compile_budget``) can
subclass :class:`Strategy` while the registry lists it, without an import cycle. torch is
imported only inside functions.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.pipeline.promises import Promise

if TYPE_CHECKING:  # pragma: no cover
    from pytest_gradckpt.pipeline.units import ModelInfo


class Units(str, enum.Enum):
    """Whose checkpoint units a strategy checkpoints, and so how its recompute counts are judged.

    A plain string naming a value (``units = "own"``) is read as that value.

    Example:
        >>> Units("own").engine_chosen, Units.CHOSEN.engine_chosen, Units.OBSERVED == "observed"
        (False, True, True)
    """

    #: exactly the engine's checkpoint units: each must run forward + one recompute
    #: (every strategy built on a checkpoint function)
    CHOSEN = "chosen"
    #: declared: the strategy picks its units itself (a library's switch, a wrapper); the engine
    #: judges the units it observes recomputed and only forbids extra runs
    OWN = "own"
    #: nothing declared (the default): judged as :attr:`OWN`, from what is observed
    OBSERVED = "observed"

    @property
    def engine_chosen(self) -> bool:
        """Whether every one of the engine's units must recompute (else only observed ones are judged)."""
        return self is Units.CHOSEN


def units_of(strategy: Strategy | type[Strategy]) -> Units:
    """``strategy.units`` as a :class:`Units`; a usage error naming the values otherwise.

    Example:
        >>> units_of(CheckpointFunctionStrategy), units_of(Strategy)
        (<Units.CHOSEN: 'chosen'>, <Units.OBSERVED: 'observed'>)
    """
    try:
        return Units(strategy.units)
    except ValueError:
        raise GradckptUsageError(
            f"strategy {getattr(strategy, 'name', strategy)!r}: units={strategy.units!r} is not one of "
            f"{', '.join(repr(u.value) for u in Units)}; see pytest_gradckpt.strategies.Units") from None


class Strategy:
    """A way of checkpointing a model, judged against the no-checkpoint baseline.

    Attributes:
        name: the registry name, used in marker arguments, options and reports.
        skips_frozen: the strategy promises to recompute only layers that have
            trainable parameters; the engine verifies that promise by counting.
        description: one line for ``--gradckpt-strategies=help`` and the README.

    Example:
        >>> import torch.utils.checkpoint as cp, functools
        >>> s = Strategy.from_checkpoint_fn("mine", functools.partial(cp.checkpoint, use_reentrant=False))
        >>> s.name, s.skips_frozen
        ('mine', False)
    """

    name: str = ""
    skips_frozen: bool = False
    description: str = ""
    #: Whose checkpoint units it checkpoints (:class:`Units`; a subclass may name one as a string).
    units: Units = Units.OBSERVED
    #: False for strategies that keep activations elsewhere (e.g. on the host) instead of recomputing;
    #: None (the default): observed, a unit whose forward ran under someone else's saved-tensor hooks
    #: (torch's ``save_on_cpu``, ``offload_wrapper``) is not expected to recompute.
    recomputes: bool | None = None

    #: What the strategy promises beyond equal gradients (which units recompute, which ops it keeps,
    #: where saved activations live); :meth:`promise` returns it. None: nothing beyond the above.
    promised: Promise | None = None
    #: True: runs only when named, never in "every registered strategy".
    opt_in: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "units" in cls.__dict__:
            cls.units = units_of(cls)

    def applies_to(self, info: ModelInfo) -> str | None:
        """Return why this strategy cannot run on ``info.model``, or None if it can."""
        return None

    def promise(self, info: ModelInfo) -> Promise | None:
        """What this strategy promised for the run on ``info`` (asked after the step, so a strategy
        may read what it recorded in ``info.state``); the probes verify it (docs/strategies.md)."""
        return self.promised

    def apply(self, info: ModelInfo) -> None:
        """Switch checkpointing on for the model copy in ``info`` (the engine owns the copy)."""
        raise NotImplementedError

    def after_forward(self, info: ModelInfo) -> None:
        """Called by the engine after each forward pass, before backward: a chance to verify an
        assumption the strategy made about how the model calls its layers. Raise
        :class:`~pytest_gradckpt.errors.StrategyNotApplicable` when it does not hold."""

    def expects_recompute(self, info: ModelInfo, layer: Any) -> bool:
        """Whether ``layer`` must run a second time in backward under this strategy."""
        if self.recomputes is False:
            return False
        return info.has_trainable(layer) if self.skips_frozen else True

    @staticmethod
    def from_checkpoint_fn(name: str, fn: Callable[..., Any], *, skips_frozen: bool = False,
                           description: str = "", promise: Promise | None = None) -> Strategy:
        """Wrap any function with ``torch.utils.checkpoint.checkpoint``'s signature.

        Example:
            >>> import functools, torch.utils.checkpoint as cp
            >>> s = Strategy.from_checkpoint_fn("reent", functools.partial(cp.checkpoint, use_reentrant=True))
            >>> s.description
            'checkpoint function reent'
        """
        if not callable(fn):
            raise GradckptUsageError(
                f"Strategy.from_checkpoint_fn({name!r}, fn={fn!r}): fn is not callable; pass a function "
                "with torch.utils.checkpoint.checkpoint's signature, fn(function, *args, **kwargs)"
            )
        strategy = CheckpointFunctionStrategy(name, fn, skips_frozen=skips_frozen,
                                              description=description or f"checkpoint function {name}")
        strategy.promised = promise
        return strategy

    def __repr__(self) -> str:
        return f"<Strategy {self.name}>"


class CheckpointFunctionStrategy(Strategy):
    """Install one checkpoint function on every checkpoint unit."""

    units = Units.CHOSEN
    recomputes = True  # a checkpoint function recomputes (whatever it does with the saved inputs)

    def __init__(self, name: str, fn: Callable[..., Any], *, skips_frozen: bool = False, description: str = ""):
        self.name, self.fn, self.skips_frozen, self.description = name, fn, skips_frozen, description

    def apply(self, info: ModelInfo) -> None:
        if info.uses_transformers_mechanism:
            hf_model = info.hf_model
            assert hf_model is not None  # uses_transformers_mechanism says there is one
            hf_model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=self.fn)
        else:
            for layer in info.layers:
                install_layer_call(layer, lambda forward, args, kwargs: self.fn(
                    functools.partial(forward, **kwargs), *args))


def install_layer_call(layer: Any, call: Callable[..., Any] | None) -> None:
    """Route an instrumented layer's calls through ``call(forward, args, kwargs)``; None restores it
    (:attr:`pytest_gradckpt.pipeline.units.Instrumented.call`; layers imports torch, so it is imported here)."""
    from pytest_gradckpt.pipeline import units

    units.install_layer_call(layer, call)

