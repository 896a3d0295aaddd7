"""The pytest surface, tested with pytester as a downstream repository would use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

DOWNSTREAM_CONFTEST = '''
import functools
import torch
import torch.utils.checkpoint as cp
import pytest_gradckpt as gc


def losing_checkpoint(function, *args):
    # Broken on purpose: the layer output leaves the graph, so earlier weights get no gradient.
    return function(*args).detach()


gc.register_strategy(gc.Strategy.from_checkpoint_fn(
    "ours", functools.partial(cp.checkpoint, use_reentrant=False)), replace=True)
gc.register_strategy(gc.Strategy.from_checkpoint_fn("ours_broken", losing_checkpoint), replace=True)


def tanh_net():
    from pytest_gradckpt.zoo.plain import tanh_net
    return tanh_net()
'''

DOWNSTREAM_TEST = '''
import pytest
from conftest import tanh_net


@pytest.mark.gradckpt(strategies=["ours", "ours_broken"])
def test_checkpointing(gradckpt):
    gradckpt.check(*tanh_net())


def test_unrelated():
    assert True
'''


@pytest.fixture
def downstream(pytester):
    pytester.makeconftest(DOWNSTREAM_CONFTEST)
    pytester.makepyfile(test_model=DOWNSTREAM_TEST)
    return pytester


def test_marked_tests_are_skipped_without_the_flag(downstream):
    result = downstream.runpytest_subprocess("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*run pytest with --gradckpt*"])


def test_ini_switch_enables_checks(downstream):
    downstream.makeini("[pytest]\ngradckpt = true\n")
    result = downstream.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)


def test_downstream_gate_passes_good_fails_silent_and_reports_json(downstream):
    result = downstream.runpytest_subprocess("--gradckpt", "--gradckpt-report=out/report.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*gradient checkpointing check failed*",
        "*ours_broken/train: silent*got None or all zeros*",
        "*= gradient checkpointing =*",
        "*ours *pass*",
        "*ours_broken*silent*",
    ])
    document = json.loads((downstream.path / "out" / "report.json").read_text())
    assert {"torch", "python"} <= set(document["versions"])
    rows = {(r["strategy"], r["outcome"]) for r in document["results"]}
    assert rows == {("ours", "pass"), ("ours_broken", "silent")}
    assert all(r["test"] == "test_model.py::test_checkpointing" and r["scenario"] == "train"
               for r in document["results"])


def test_expect_documents_a_known_hazard(downstream):
    downstream.makepyfile(test_expect='''
import pytest
from conftest import tanh_net

@pytest.mark.gradckpt(strategies=["ours_broken"], expect={"ours_broken": "silent"})
def test_known(gradckpt):
    gradckpt.check(*tanh_net())

@pytest.mark.gradckpt(strategies=["ours"], expect={"ours/train": "silent"})
def test_hazard_gone(gradckpt):
    gradckpt.check(*tanh_net())
''')
    result = downstream.runpytest_subprocess("--gradckpt", "test_expect.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*ours/train: expected silent, got pass*"])


def test_strategy_fixture_makes_one_item_per_strategy(downstream):
    downstream.makepyfile(test_param='''
import pytest
from conftest import tanh_net

@pytest.mark.gradckpt(strategies=["ours", "non_reentrant"])
def test_each(gradckpt, gradckpt_strategy):
    report = gradckpt.check(*tanh_net())
    assert [r.strategy for r in report.results] == [gradckpt_strategy]
''')
    result = downstream.runpytest_subprocess("--gradckpt", "-v", "test_param.py")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_each[[]ours[]] PASSED*", "*test_each[[]non_reentrant[]] PASSED*"])


@pytest.mark.parametrize(("marker", "message"), [
    ('strategies=["nope"]', "unknown strategy 'nope'; available: reentrant, non_reentrant*"),
    ('scenarios=["sideways"]', "unknown scenario 'sideways'; available: train*"),
    ("colour='red'", "*unknown argument(s) colour; accepted: strategies*"),
    ("min_memory_reduction=1.5", "*min_memory_reduction=1.5 is out of range*"),
    ('expect={"ours": "fine"}', "*expect*'fine' is not an outcome*"),
    ('"positional"', "*takes keyword arguments only*"),
    ("baseline='per-layer'", "*baseline='per-layer' is not a baseline kind; pass one of auto, whole-model, layerwise*"),
])
def test_marker_validation_is_a_usage_error(downstream, marker, message):
    downstream.makepyfile(test_bad=f'''
import pytest

@pytest.mark.gradckpt({marker})
def test_bad(gradckpt):
    pass
''')
    result = downstream.runpytest_subprocess("--gradckpt", "test_bad.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}"])


@pytest.mark.parametrize(("option", "message"), [
    ("--gradckpt-strategies=ours,bogus", "*unknown strategy 'bogus'*"),
    ("--gradckpt-scenarios=bogus", "*unknown scenario 'bogus'*"),
    ("--gradckpt-min-memory-reduction=2", "*out of range*"),
    ("--gradckpt-device=tpu", "*--gradckpt-device='tpu': not a device; pass auto, cpu or cuda*"),
    ("--gradckpt-baseline=local", "*--gradckpt-baseline='local' is not a baseline kind*"),
    ("--gradckpt-model=nowhere:factory", "*--gradckpt-model='nowhere:factory': cannot load it*"),
])
def test_bad_options_are_usage_errors(downstream, option, message):
    result = downstream.runpytest_subprocess("--gradckpt", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_layerwise_baseline_from_the_ini_file_reaches_the_json_report(downstream):
    downstream.makeini("[pytest]\ngradckpt_baseline = layerwise\n")
    result = downstream.runpytest_subprocess("--gradckpt", "--gradckpt-report=report.json", "-k", "checkpointing")
    result.assert_outcomes(failed=1)  # ours_broken is still caught against the layer-local baseline
    results = json.loads((downstream.path / "report.json").read_text())["results"]
    assert {r["strategy"]: (r["outcome"], r["metrics"]["baseline"]) for r in results} == {
        "ours": ("pass", "layerwise"), "ours_broken": ("silent", "layerwise")}


def test_generated_items_from_a_factory(downstream):
    downstream.makepyfile(models='''
from pytest_gradckpt.zoo.plain import dropout_mask_net

def dropout_net():
    return dropout_mask_net()
''')
    result = downstream.runpytest_subprocess("--gradckpt", "--gradckpt-model=models:dropout_net", "-v",
                                  "--gradckpt-strategies=non_reentrant,reentrant",
                                  "--gradckpt-scenarios=train,frozen_inputs", "-k", "dropout_net", "-p", "no:randomly")
    result.stdout.fnmatch_lines([
        "*gradckpt::dropout_net[[]non_reentrant-train[]] PASSED*",
        "*gradckpt::dropout_net[[]reentrant-frozen_inputs[]] FAILED*",
    ])
    result.assert_outcomes(passed=3, failed=1)


def test_report_header_lists_versions(downstream):
    result = downstream.runpytest_subprocess("--gradckpt", "-k", "unrelated")
    result.stdout.fnmatch_lines(["gradckpt: python *, torch *device cpu*"])


def test_junit_xml_carries_results(downstream):
    result = downstream.runpytest_subprocess("--gradckpt", "--junitxml=junit.xml")
    result.assert_outcomes(passed=1, failed=1)
    xml = (downstream.path / "junit.xml").read_text()
    assert '<property name="gradckpt"' in xml and "ours_broken" in xml


def test_xdist_gives_the_same_outcomes_and_report(downstream):
    pytest.importorskip("xdist")
    downstream.makepyfile(test_param='''
import pytest
from conftest import tanh_net

def test_each(gradckpt, gradckpt_strategy):
    gradckpt.check(*tanh_net())
''')
    serial = downstream.runpytest_subprocess("--gradckpt", "--gradckpt-report=serial.json", "-p", "no:cacheprovider")
    parallel = downstream.runpytest_subprocess("--gradckpt", "--gradckpt-report=parallel.json", "-n", "2",
                                               "-p", "no:cacheprovider")
    assert serial.parseoutcomes() == parallel.parseoutcomes()

    def stable(name):
        document = json.loads((downstream.path / name).read_text())
        return [(r["test"], r["strategy"], r["scenario"], r["outcome"], r["message"]) for r in document["results"]]

    assert stable("serial.json") == stable("parallel.json")
    assert len(stable("serial.json")) > 8


def test_loading_the_plugin_does_not_import_torch():
    code = ("import sys, pytest_gradckpt.plugin, pytest_gradckpt.settings, pytest_gradckpt.strategies; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


ASKED_AT_IMPORT = """import os

ASKED = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")  # what torch.cuda.is_available() would read now
"""


@pytest.mark.parametrize("args, environment, asked", [
    (["--gradckpt"], None, "1"),  # CUDA asked through NVML: forked GPU ranks can still use it
    (["-o", "gradckpt=true"], None, "1"),  # the ini twin
    ([], None, "None"),  # no checks in the session: nothing changed
    (["--gradckpt"], "0", "0"),  # the user's word stands
])
def test_a_gradckpt_session_asks_cuda_through_nvml_from_its_first_conftest_on(pytester, monkeypatch, args,
                                                                               environment, asked):
    """``DEVICE = "cuda" if torch.cuda.is_available() else "cpu"`` in a conftest or test module asks the
    CUDA runtime unless PYTORCH_NVML_BASED_CUDA_CHECK is set; a forked GPU rank then cannot use CUDA and
    the check spawns its ranks (issue 21's gate on an H200: 15.3-17.8 s spawned, 7.6-8.8 s forked)."""
    if environment is None:
        monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", environment)
    pytester.makeconftest(ASKED_AT_IMPORT + "\n\ndef pytest_report_header():\n    return f'conftest at import: {ASKED}'\n")
    pytester.makepyfile(test_module=ASKED_AT_IMPORT + "\n\ndef test_asked():\n    print('module at import:', ASKED)\n")
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"conftest at import: {asked}", f"*module at import: {asked}*"])


def test_the_environment_is_put_back_when_the_session_ends(pytester, monkeypatch):
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    config = pytester.parseconfigure("--gradckpt")
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1"
    config._ensure_unconfigure()
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
