"""Golden records, comparison, and exit codes for `git bisect run`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

CONFTEST = '''
import os
import torch.utils.checkpoint as cp
import pytest_gradckpt as gc


def ours(function, *args):
    if os.environ.get("GRADCKPT_BREAK"):  # what a bad upgrade looks like: the layer output leaves the graph
        return function(*args).detach()
    return cp.checkpoint(function, *args, use_reentrant=False)


gc.register_strategy(gc.Strategy.from_checkpoint_fn("ours", ours), replace=True)
'''

TEST = '''
import pytest
from pytest_gradckpt.zoo.plain import dropout_mask_net


@pytest.mark.gradckpt(strategies=["ours", "non_reentrant"], scenarios=["train", "accumulate"])
def test_model(gradckpt):
    gradckpt.check(*dropout_mask_net())
'''


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_model=TEST)
    return pytester


def test_record_then_compare_passes(project):
    project.runpytest_subprocess("--gradckpt", "--gradckpt-record=golden.json").assert_outcomes(passed=1)
    record = json.loads((project.path / "golden.json").read_text())
    assert {"torch", "python"} <= set(record["versions"])
    entry = record["results"]["test_model.py::test_model [ours/train] DropoutMaskNet"]
    assert entry["outcome"] == "pass" and entry["fingerprint"]["grad_norms"]["embed.weight"] > 0
    project.runpytest_subprocess("--gradckpt", "--gradckpt-compare=golden.json").assert_outcomes(passed=1)


def test_a_changed_verdict_fails_with_old_and_new_side_by_side(project, monkeypatch):
    project.runpytest_subprocess("--gradckpt", "--gradckpt-record=golden.json")
    monkeypatch.setenv("GRADCKPT_BREAK", "1")
    result = project.runpytest_subprocess("--gradckpt", "--gradckpt-compare=golden.json", "--gradckpt-bisect")
    assert result.ret == 1
    result.stdout.fnmatch_lines([
        "*[[]ours/train[]] DropoutMaskNet: outcome pass -> silent*",
        "*[[]ours/train[]] DropoutMaskNet: gradient of embed.weight * -> absent*",
    ])


def test_golden_fixture_of_the_plain_zoo_still_holds(pytester):
    # fixtures/golden/plain-zoo.json was recorded with the pinned versions; any change in
    # outcomes, loss, gradient norms or activation bytes of the plain zoo fails here.
    shutil.copy(FIXTURES / "golden" / "plain-zoo.json", pytester.path / "golden.json")
    result = pytester.runpytest_subprocess("--gradckpt", "--pyargs", "pytest_gradckpt.suite", "-p", "no:cacheprovider",
                                           "--gradckpt-models=dropout_mask,batchnorm,reused_block",
                                           "--gradckpt-compare=golden.json", "-o", "addopts=")
    result.assert_outcomes(passed=13)


def test_missing_record_is_a_usage_error(project):
    result = project.runpytest_subprocess("--gradckpt", "--gradckpt-compare=nope.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no such file; record one first with --gradckpt-record=nope.json*"])


def test_bisect_exit_code_125_when_the_code_under_test_cannot_be_imported(project):
    project.makepyfile(test_broken="import package_that_is_not_installed\n")
    result = project.runpytest_subprocess("--gradckpt", "--gradckpt-bisect")
    assert result.ret == 125


def test_bisect_exit_codes_good_and_bad(project, monkeypatch):
    assert project.runpytest_subprocess("--gradckpt", "--gradckpt-bisect").ret == 0
    monkeypatch.setenv("GRADCKPT_BREAK", "1")
    assert project.runpytest_subprocess("--gradckpt", "--gradckpt-bisect").ret == 1
