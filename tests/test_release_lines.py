"""Release lines: a version newer than every reviewed line is said so, and
``--gradckpt-update-expected`` writes the installed line's verdicts for review."""

from __future__ import annotations

import json
import shutil

import pytest

from pytest_gradckpt.suite import expectations

#: A plugin loaded with -p: the run sees a transformers newer than every reviewed line, and
#: expectation files in the test's own folder, so nothing in the package changes.
PRETEND = """
import os
from pathlib import Path
from pytest_gradckpt.suite import expectations

expectations.FOLDER = Path(os.environ["GRADCKPT_TEST_EXPECTED"])
real = expectations.package_versions
expectations.package_versions = lambda: {**real(), "transformers": "9.1.0"}
expectations.installed_transformers = lambda: "9.1.0"
"""
SMALL = ["--gradckpt", "--pyargs", "pytest_gradckpt.suite", "-p", "no:cacheprovider", "-o", "addopts=",
         "-p", "pretend", "--gradckpt-models=dropout_mask", "--gradckpt-strategies=non_reentrant,sequential",
         "-k", "dropout_mask-train"]


@pytest.fixture
def newer(pytester, monkeypatch):
    folder = pytester.path / "expected"
    shutil.copytree(expectations.FOLDER, folder)
    monkeypatch.setenv("GRADCKPT_TEST_EXPECTED", str(folder))
    pytester.makepyfile(pretend=PRETEND)
    return pytester


def newest_line() -> str:
    return max(expectations._lines(), key=lambda line: expectations._base(
        expectations.reviewed_version(line, "transformers")))


def test_the_report_opens_with_newer_than_every_reviewed_line_and_nothing_is_written(newer):
    result = newer.runpytest_subprocess(*SMALL, "--gradckpt-report=r.json", "-n", "2")  # xdist: the controller reports
    result.assert_outcomes(passed=1)
    lines = result.stdout.lines
    first = lines[next(i for i, line in enumerate(lines) if "gradient checkpointing" in line and "=" in line) + 1]
    assert first.startswith("gradckpt: newer than every reviewed line: transformers 9.1.0 (newest reviewed ")
    assert f"compared against the transformers-{newest_line()} line (reviewed under torch " in first
    notices = json.loads((newer.path / "r.json").read_text())["notices"]
    assert notices == [first.removeprefix("gradckpt: ")]
    assert not (newer.path / "expected" / "transformers-9.1.json").exists()


@pytest.mark.parametrize("how", ["option", "ini"])
def test_update_expected_writes_the_new_line_for_review(newer, how):
    base = json.loads((newer.path / "expected" / f"transformers-{newest_line()}.json").read_text())["expected"]
    if how == "ini":
        newer.makeini("[pytest]\ngradckpt_update_expected = true\n")
    flags = ["--gradckpt-update-expected", "-n", "2"] if how == "option" else []  # xdist: the controller writes
    result = newer.runpytest_subprocess(*SMALL, *flags)
    written = newer.path / "expected" / "transformers-9.1.json"
    result.stdout.fnmatch_lines([f"gradckpt: wrote {written} (* non-pass verdicts): review every change*"])
    document = json.loads(written.read_text())
    assert document["versions"]["transformers"] == "9.1.0"
    # what ran is this run's verdict; what did not run is the compared line's
    assert document["expected"]["dropout_mask"].get("non_reentrant/train", "pass") == "pass"
    assert document["expected"]["batchnorm"] == base["batchnorm"]
    assert {k: v for k, v in document["expected"].items() if k != "dropout_mask"} == \
        {k: v for k, v in base.items() if k != "dropout_mask"}
