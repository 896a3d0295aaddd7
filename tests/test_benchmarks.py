"""The benchmark runner (``python -m benchmarks``): its envelope on a small case that really runs, its
suites' declarations, and that no benchmark reaches another through ``sys.path``."""

from __future__ import annotations

import ast
import datetime
import importlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import runner
from benchmarks.case import NEEDS, Case
from benchmarks.envelope import ENVELOPE_KEYS, SCHEMA
from benchmarks.suites import SUITES

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_envelope_of_a_tiny_check_cost_case_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    assert runner.main(["check-cost", "--case", "tiny-cpu", "--repeats", "1", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert tuple(document) == ENVELOPE_KEYS
    assert (document["schema"], document["suite"], document["case"]) == (SCHEMA, "check-cost", "tiny-cpu")
    assert document["params"] == {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "length": 32,
                                  "repeats": 1}
    assert document["commit"] == git("rev-parse", "HEAD")
    assert document["dirty"] == bool(git("status", "--porcelain", "--untracked-files=no"))
    assert datetime.datetime.fromisoformat(document["date"]).tzinfo is not None
    assert document["machine"]["cpus"] >= 1 and isinstance(document["machine"]["gpus"], int)
    assert {"python", "torch", "transformers", "peft"} <= set(document["versions"])
    (row,) = document["rows"]
    assert row["repeats"] == 1 and row["identical_outcomes"]
    assert set(row["outcomes"]) == {"non_reentrant", "hf_non_reentrant", "hf_reentrant", "selective", "offload",
                                    "sequential"}
    assert row["check_seconds"] > 0 and row["raw_seconds"] > 0


def test_the_envelope_names_the_commit_given_where_the_tree_has_no_git(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.envelope import source

    monkeypatch.setenv("GRADCKPT_COMMIT", "a" * 40)
    monkeypatch.setenv("GRADCKPT_DIRTY", "0")
    assert source() == ("a" * 40, False)
    monkeypatch.setenv("GRADCKPT_COMMIT", "HEAD")
    with pytest.raises(ValueError, match="is not a commit"):
        source()


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_declares_its_cases_as_data(suite: str) -> None:
    module = importlib.import_module(SUITES[suite])
    assert module.ABOUT and callable(module.run) and module.CASES
    for name, case in module.CASES.items():
        assert isinstance(case, Case) and case.needs in NEEDS and case.repeats >= 1 and case.about, name


def test_the_cases_other_branches_name_are_kept() -> None:
    cases = {suite: set(importlib.import_module(SUITES[suite]).CASES) for suite in ("check-cost", "dist-cost")}
    assert {"1b-full-bf16", "1b-lora-bf16", "7b-lora-bf16"} <= cases["check-cost"]
    assert {"1b-full-fsdp2", "1b-lora-fsdp2", "1b-lora-ddp"} <= cases["dist-cost"]


def test_list_names_every_suite(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{suite}: " in listed for suite in SUITES)


@pytest.mark.parametrize(("argv", "says"), [
    (["no-such-suite"], "no suite 'no-such-suite'"),
    (["check-cost", "--case", "nothing-*"], "no case matches nothing-*"),
    (["check-cost", "--case", "tiny-cpu", "--set", "colour=red"], "has no such parameter"),
    (["check-cost", "--case", "tiny-cpu", "--set", "hidden"], "write KEY=VALUE"),
])
def test_bad_input_names_the_problem(argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit, match=says):
        runner.main(argv)


def _python_files() -> list[Path]:
    return [p for folder in ("benchmarks", "tests/gpu") for p in sorted((ROOT / folder).rglob("*.py"))]


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_benchmark_changes_sys_path(path: Path) -> None:
    """Benchmarks import one another as modules of the ``benchmarks`` package, never through ``sys.path``
    (a string of code handed to a fresh interpreter is its own program and is not parsed here)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name):
            assert node.value.id != "sys", f"{path.relative_to(ROOT)}:{node.lineno} changes sys.path"


def test_engine_internals_are_imported_in_one_module() -> None:
    """Only benchmarks/common.py reads pytest_gradckpt's modules: a move of them is a one-file fix there
    (the suites use the public ``import pytest_gradckpt as gc``; frozen evidence is left as it ran)."""
    readers = set()
    for path in (ROOT / "benchmarks").rglob("*.py"):
        if "evidence" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytest_gradckpt"):
                readers.add(str(path.relative_to(ROOT)))
    assert readers == {"benchmarks/common.py"}


@pytest.mark.parametrize("name", ["benchmarks.case", "benchmarks.common", "benchmarks.envelope", "benchmarks.runner"])
def test_docstring_examples_run(name: str) -> None:
    """benchmarks/ is not among the doctest paths (its suites import GPU-only stacks): its shared modules' examples
    run here."""
    import doctest

    found = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert found.attempted > 0 and found.failed == 0


TIMED_TEST = """import torch
import pytest_gradckpt as gc
from pytest_gradckpt.zoo.plain import TanhNet


def test_distributed(gradckpt):
    gradckpt.check(TanhNet, torch.ones(2, 16), device="cpu", scenarios=["fsdp2"], strategies=["non_reentrant"],
                   distributed={"world_size": 1, "timeout": 60})
"""


def test_pytest_timers_write_where_a_sessions_checks_spent_their_time(pytester: pytest.Pytester,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``-p benchmarks.pytest_timers``: the checking process's parts and each forked rank's, at the session's end."""
    pytester.makepyfile(test_timed=TIMED_TEST)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("GRADCKPT_TIMERS_OUT", str(pytester.path / "parts.json"))
    monkeypatch.delenv("GRADCKPT_PROFILE_DIR", raising=False)
    result = pytester.runpytest_subprocess("-p", "benchmarks.pytest_timers", "-p", "no:cacheprovider", "--gradckpt")
    result.assert_outcomes(passed=1)
    parts = json.loads((pytester.path / "parts.json").read_text())
    assert parts["parent"]["parent: waiting for ranks (incl. transfer)"] > 0
    ranks = [name for name in parts if name.startswith("rank ")]
    assert len(ranks) == 1 and parts[ranks[0]]["rank: step commands"] > 0
