"""``compile_budget``: torch.compile's own rematerialization as a checkpointing strategy.

AOT autograd's partitioner chooses what to save and what to recompute in backward so that the
saved activations stay within ``torch._functorch.config.activation_memory_budget`` (a fraction of
what saving everything would keep; 1.0 = the default, no rematerialization beyond the usual).
The strategy asks for a budget; the compiled run (:func:`pytest_gradckpt.compilation.compiled.compiled_run`)
sets it while the step compiles and restores it after. It applies to compiled models only, and
is opt-in (not in the default set of strategies): name it, e.g. ``strategies=["compile_budget"]``.
It is one of the built-ins the strategy registry lists (:data:`pytest_gradckpt.strategies.BUILTIN_OPT_IN`).

torch is imported only inside functions, as in :mod:`pytest_gradckpt.strategies`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.strategies.base import Strategy, Units

if TYPE_CHECKING:  # pragma: no cover
    from pytest_gradckpt.pipeline.units import ModelInfo

class CompileBudget(Strategy):
    """Compile with ``activation_memory_budget=budget``; no checkpoint wrapper at all.

    Example:
        >>> s = CompileBudget(0.5)
        >>> s.name, s.opt_in, s.budget
        ('compile_budget', True, 0.5)
        >>> from pytest_gradckpt.strategies import available_strategies
        >>> "compile_budget" in available_strategies(), "compile_budget" in available_strategies(opt_in=True)
        (False, True)
    """

    units = Units.OWN
    opt_in = True

    def __init__(self, budget: float = 0.5, name: str = "compile_budget"):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= budget < 1.0:
            raise GradckptUsageError(f"CompileBudget(budget={budget!r}): pass a fraction in [0, 1), e.g. 0.5")
        self.name, self.budget = name, float(budget)
        self.description = (f"torch.compile's own rematerialization: "
                            f"torch._functorch.config.activation_memory_budget={self.budget:g} (compiled models)")

    def applies_to(self, info: ModelInfo) -> str | None:
        if info.compile_kind is None:
            return ("the model is not compiled: compile_budget is torch.compile's own rematerialization "
                    "(activation_memory_budget); pass torch.compile(model) or a model with compiled blocks")
        return None

    def apply(self, info: ModelInfo) -> None:
        info.activation_memory_budget = self.budget

    def expects_recompute(self, info: ModelInfo, layer: Any) -> bool:
        # The partitioner recomputes inside the compiled backward, where no layer's Python runs:
        # nothing observable runs twice. Memory is the evidence (verdicts.recompute_unobserved).
        return False

