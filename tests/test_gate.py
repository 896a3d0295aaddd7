"""The gate cannot pass without checking, validates its marker once, and survives a crash.

Each case runs a downstream test file under pytester, as a user's repository would."""

from __future__ import annotations

import json

import pytest

CONFTEST = '''
import os
import pytest_gradckpt as gc


def crashing_checkpoint(function, *args):
    os.abort()  # what a fault in native code does to the process: SIGABRT


gc.register_strategy(gc.Strategy.from_checkpoint_fn("crashing", crashing_checkpoint,
                                                    description="aborts its process"), replace=True)


def tanh_net():
    from pytest_gradckpt.zoo.plain import tanh_net
    return tanh_net()
'''


@pytest.fixture
def downstream(pytester):
    pytester.makeconftest(CONFTEST)
    return pytester


def test_a_marked_test_without_the_fixture_fails_and_names_it(downstream):
    downstream.makepyfile(test_forgot='''
import pytest

@pytest.mark.gradckpt(strategies=["non_reentrant"], scenarios=["frozen_inputs"])
def test_forgot_the_fixture():
    assert True
''')
    result = downstream.runpytest_subprocess("--gradckpt")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*test_forgot_the_fixture is marked @pytest.mark.gradckpt but does not use the 'gradckpt' fixture, "
        "so nothing was checked. Add the fixture and call it: def test_...(gradckpt): gradckpt.check(model, inputs)*"])


def test_a_test_that_never_calls_check_fails(downstream):
    downstream.makepyfile(test_never='''
import pytest

@pytest.mark.gradckpt(strategies=["non_reentrant"])
def test_marked(gradckpt):
    pass

def test_unmarked(gradckpt):
    pass
''')
    result = downstream.runpytest_subprocess("--gradckpt")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*test_marked requested the 'gradckpt' fixture but never called gradckpt.check(model, inputs)*",
        "*test_unmarked requested the 'gradckpt' fixture but never called gradckpt.check(model, inputs)*"])


def test_normal_use_passes_and_unrelated_tests_are_untouched(downstream):
    downstream.makepyfile(test_fine='''
import pytest
from conftest import tanh_net

@pytest.mark.gradckpt(strategies=["non_reentrant"])
def test_checked(gradckpt):
    gradckpt.check(*tanh_net())

def test_each(gradckpt, gradckpt_strategy):
    gradckpt.check(*tanh_net())

def test_unrelated():
    pass
''')
    result = downstream.runpytest_subprocess("--gradckpt", "--gradckpt-strategies=non_reentrant,reentrant")
    result.assert_outcomes(passed=4)


def test_a_check_that_judges_nothing_is_skipped_not_passed(downstream):
    downstream.makepyfile(test_nothing='''
import pytest
from conftest import tanh_net

@pytest.mark.gradckpt(strategies=["native"], scenarios=["train"])
def test_no_switch(gradckpt):
    gradckpt.check(*tanh_net())  # a plain torch model has no checkpointing switch: native does not apply

@pytest.mark.gradckpt(strategies=["native", "non_reentrant"], scenarios=["train"])
def test_one_judged(gradckpt):
    gradckpt.check(*tanh_net())
''')
    result = downstream.runpytest_subprocess("--gradckpt", "-rs")
    result.assert_outcomes(skipped=1, passed=1)
    result.stdout.fnmatch_lines(["*nothing was judged, every result is skipped: native/train: TanhNet has no "
                                 "checkpointing switch of its own*"])


def test_a_gate_whose_ranks_cannot_start_fails_never_skips(downstream):
    # Spawned ranks import the model's class by module name; a module only the pytest process has ends
    # them before they serve: the harness failed, nothing was judged, and the gate must say so.
    downstream.makepyfile(test_spawned='''
import sys
import types

import pytest
import torch

only_here = types.ModuleType("gradckpt_only_in_the_pytest_process")
exec("import torch\\nclass Net(torch.nn.Module):\\n    def __init__(self):\\n        super().__init__()\\n"
     "        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())"
     " for _ in range(2))\\n    def forward(self, x):\\n        for block in self.blocks:\\n"
     "            x = block(x)\\n        return x\\n", only_here.__dict__)
sys.modules[only_here.__name__] = only_here


@pytest.mark.gradckpt(strategies=["non_reentrant"], scenarios=["ddp"], layers="blocks")
def test_spawned(gradckpt):
    gradckpt.check(only_here.Net(), torch.randn(2, 4), distributed={"world_size": 1, "start_method": "spawn", "timeout": 60})
''')
    result = downstream.runpytest_subprocess("--gradckpt")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*not judged: rank 0 ended before it could start serving the check (exit code 1)*"])


def test_a_test_that_skips_or_fails_keeps_its_own_outcome(downstream):
    downstream.makepyfile(test_own='''
import pytest

@pytest.mark.gradckpt
def test_skips(gradckpt):
    gradckpt.skip("big_model", "train", "does not fit here")

@pytest.mark.gradckpt
def test_fails(gradckpt):
    assert 1 == 2
''')
    result = downstream.runpytest_subprocess("--gradckpt")
    result.assert_outcomes(skipped=1, failed=1)
    result.stdout.fnmatch_lines(["*assert 1 == 2*"])
    result.stdout.no_fnmatch_line("*nothing was checked*")


def test_without_the_flag_marked_tests_are_skipped_not_enforced(downstream):
    downstream.makepyfile(test_forgot='''
import pytest

@pytest.mark.gradckpt
def test_forgot_the_fixture():
    pass
''')
    result = downstream.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*run pytest with --gradckpt*"])


def test_a_bad_marker_is_one_clear_usage_error(downstream):
    downstream.makepyfile(test_bad='''
import pytest

@pytest.mark.gradckpt(strategies=["nope"])
def test_bad(gradckpt, gradckpt_strategy):
    gradckpt.check(None, None)
''')
    result = downstream.runpytest_subprocess("--gradckpt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if "unknown strategy 'nope'" in line]
    assert len(errors) == 1, result.stderr.lines
    assert "test_bad.py::test_bad: strategies: unknown strategy 'nope'; available: reentrant" in errors[0]


def test_the_marker_is_validated_once_per_marker(pytester):
    # In a subprocess: a conftest's registrations must not leak into this process's registry.
    pytester.makeconftest('''
import pytest_gradckpt.plugin.marker as marker

calls = []
real = marker.gradckpt


def counting(**kwargs):
    calls.append(kwargs)
    return real(**kwargs)


marker.gradckpt = counting


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"marker validations: {calls}")
''')
    pytester.makepyfile(test_once='''
import pytest
from pytest_gradckpt.zoo.plain import tanh_net

@pytest.mark.gradckpt(scenarios=["train"])
def test_each(gradckpt, gradckpt_strategy):
    gradckpt.check(*tanh_net())
''')
    result = pytester.runpytest_subprocess("--gradckpt", "--gradckpt-strategies=non_reentrant,reentrant,selective")
    result.assert_outcomes(passed=3)
    assert "marker validations: [{'scenarios': ['train']}]" in result.stdout.lines  # once, not per item


def test_marker_help_comes_from_the_marker_function(downstream):
    result = downstream.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gradckpt(strategies=None, *baseline='auto', isolate='auto', compile_order=None): "
                                 "A gradient-checkpointing check*"])


def test_strategies_help_lists_them_and_exits(downstream):
    result = downstream.runpytest_subprocess("--gradckpt-strategies=help")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["strategies (pass names to*", "  reentrant *use_reentrant=True*",
                                 "  crashing *aborts its process"])


def test_a_crashing_strategy_is_an_error_verdict_and_the_session_goes_on(downstream):
    downstream.makepyfile(test_crash='''
import pytest
from conftest import tanh_net

@pytest.mark.gradckpt(strategies=["crashing", "non_reentrant"], expect={"crashing": "error"})
def test_model(gradckpt):
    gradckpt.check(*tanh_net())

def test_after():
    pass
''')
    result = downstream.runpytest_subprocess("--gradckpt", "--gradckpt-report=report.json")
    result.assert_outcomes(passed=2)
    results = json.loads((downstream.path / "report.json").read_text())["results"]
    verdicts = {r["strategy"]: (r["outcome"], r["message"]) for r in results}
    assert verdicts["non_reentrant"] == ("pass", "")
    assert verdicts["crashing"] == ("error", "StepCrashed: the step crashed its process: SIGABRT (a fault in native code)")


def test_auto_isolation_forks_only_where_that_is_cheap():
    import torch

    from pytest_gradckpt.pipeline.engine import _isolated

    assert _isolated("auto", torch.device("cpu")) is True  # this test process has not used CUDA
    assert _isolated("auto", torch.device("cuda")) is False  # a forked child cannot use CUDA
    assert (_isolated(True, torch.device("cuda")), _isolated(False, torch.device("cpu"))) == (True, False)
