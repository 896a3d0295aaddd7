"""One check specification: every front takes its options from the one table, with one message each."""

from __future__ import annotations

import inspect

import pytest

import pytest_gradckpt as gc
from pytest_gradckpt.plugin import marker
from pytest_gradckpt.pipeline.engine import check
from pytest_gradckpt.spec import FLAGS, MARKER_OPTIONS, OPTIONS, TRAINER_OPTIONS, CheckSpec, DistributedSpec
from pytest_gradckpt.trainers import check_trainer

#: check()'s arguments that are the call's own (the subject, its report name, the caller's cache), not options
CALL_ARGUMENTS = {"model", "inputs", "loss", "name", "cache"}


def test_check_takes_every_option_of_the_table_with_the_tables_default():
    parameters = inspect.signature(check).parameters
    assert set(parameters) - CALL_ARGUMENTS == {o.name for o in OPTIONS if o.in_spec}
    assert {name: p.default for name, p in parameters.items() if name not in CALL_ARGUMENTS} == {
        o.name: o.default for o in OPTIONS if o.in_spec}


def test_check_trainer_takes_the_trainer_options_of_the_table():
    parameters = inspect.signature(check_trainer).parameters
    assert set(parameters) - {"trainer", "name"} == TRAINER_OPTIONS
    assert all(parameters[o.name].default == o.default for o in OPTIONS if o.trainer)


def test_the_marker_accepts_the_marker_rows_and_the_spec_has_a_field_for_every_option():
    assert marker.KEYWORDS == tuple(o.name for o in MARKER_OPTIONS)
    fields = [f.name for f in CheckSpec.__dataclass_fields__.values()]
    assert fields == [o.name for o in OPTIONS if o.in_spec]
    assert {f.flag for f in FLAGS} >= {"--gradckpt-strategies", "--gradckpt-timeout", "--gradckpt-device"}


@pytest.mark.parametrize("call", [
    lambda: CheckSpec.of(seed="3"),
    lambda: gc.check(None, None, seed="3"),  # validated before the model is looked at
    lambda: gc.check_trainer(None, seed="3"),
])
def test_the_seed_is_validated_once_with_one_message(call):
    with pytest.raises(gc.GradckptUsageError) as raised:
        call()
    assert str(raised.value) == "seed='3' is not an int; pass an int such as 0"


def test_the_marker_names_the_test_before_the_same_message():
    with pytest.raises(gc.GradckptUsageError) as raised:
        marker.marker_settings((), {"seed": "3"}, "test_x.py::test_x")
    assert str(raised.value) == "test_x.py::test_x: seed='3' is not an int; pass an int such as 0"


def test_a_spec_is_frozen_and_replace_validates():
    spec = CheckSpec.of(rtol=1e-3)
    with pytest.raises(AttributeError):
        spec.rtol = 1.0  # type: ignore[misc]
    with pytest.raises(gc.GradckptUsageError, match="rtol=-1 is not a usable tolerance"):
        spec.replace(rtol=-1)
    assert spec.replace(atol=0.5).rtol == 1e-3


def test_the_specs_own_defaults_are_the_tables():
    """CheckSpec's and DistributedSpec's field defaults repeat the option table's and
    settings.DISTRIBUTED_DEFAULTS: a drift would make check() and a bare CheckSpec() disagree."""
    assert CheckSpec() == CheckSpec.of(**{o.name: o.default for o in OPTIONS if o.in_spec})
    assert CheckSpec().distributed == DistributedSpec.of(None)
