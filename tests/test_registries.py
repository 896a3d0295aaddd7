"""The registries' one idiom: explicit built-in tables, register/unregister, scoped ``using``,
nothing registered by importing a module; and a strategy's ``units`` read as a :class:`Units`."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch.utils.checkpoint as cp

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.strategies import (
    BUILTIN_OPT_IN,
    Strategy,
    Units,
    available_strategies,
    get_strategy,
    register_strategy,
    unregister_strategy,
    units_of,
    using_strategies,
)


def test_compile_budget_is_a_listed_built_in_not_an_import_side_effect() -> None:
    # A fresh interpreter that imports the registry alone already has it (before, only a module
    # that imported compile_budget for its side effect did), and unregistering it is refused.
    code = ("import sys; from pytest_gradckpt.strategies import available_strategies as a; "
            "print('compile_budget' in a(opt_in=True), 'compile_budget' in a())")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.split() == ["True", "False"]
    assert "compile_budget" in BUILTIN_OPT_IN
    with pytest.raises(GradckptUsageError, match="built in"):
        unregister_strategy("compile_budget")


def test_a_scoped_strategy_leaves_nothing_behind_and_a_registered_one_stays_until_unregistered() -> None:
    mine = Strategy.from_checkpoint_fn("scoped_mine", functools.partial(cp.checkpoint, use_reentrant=False))
    with using_strategies(mine):
        assert get_strategy("scoped_mine") is mine
    assert "scoped_mine" not in available_strategies()
    register_strategy(mine)
    try:
        assert available_strategies()[-1] == "scoped_mine"
        with pytest.raises(GradckptUsageError, match="already registered"):
            register_strategy(Strategy.from_checkpoint_fn("scoped_mine", cp.checkpoint))
    finally:
        assert unregister_strategy("scoped_mine") is mine
    with pytest.raises(GradckptUsageError, match="no strategy named 'scoped_mine'"):
        unregister_strategy("scoped_mine")


def test_units_are_an_enum_and_a_string_naming_one_is_read_as_it() -> None:
    class Declared(Strategy):
        units = "own"  # type: ignore[assignment]  # what a user's strategy may write

    assert Declared.units is Units.OWN and not units_of(Declared()).engine_chosen
    assert units_of(get_strategy("non_reentrant")) is Units.CHOSEN and units_of(Strategy()) is Units.OBSERVED
    with pytest.raises(GradckptUsageError, match="units='yes' is not one of 'chosen', 'own', 'observed'"):
        class Mistyped(Strategy):
            units = "yes"  # type: ignore[assignment]
