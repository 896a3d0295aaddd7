"""Ranks that build the model (issue 30): a check whose every step runs on ranks it starts lets
each rank build the model once and reads the layers from a skeleton, never building it here.

On the CPU the check shares its own build with forked ranks instead (``launcher.BUILD_ON_RANKS``
holds only ``cuda``); these tests add ``cpu`` to run the GPU design on gloo.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

import pytest_gradckpt as gc
from pytest_gradckpt.pipeline import process_state
from pytest_gradckpt.ranks import launcher, rank_group
from pytest_gradckpt.zoo.plain import TanhNet

FAST = {"timeout": 60}


def built_here(path: str) -> torch.nn.Module:
    """The factory: notes which process built the model, one line per build."""
    with open(path, "a") as log:
        log.write(f"{os.getpid()}\n")
    torch.manual_seed(0)
    return TanhNet()


class Unpicklable(TanhNet):
    """A model whose skeleton cannot travel (a lambda among its attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.hook = lambda value: value


def built_unpicklable(path: str) -> torch.nn.Module:
    built_here(path)
    torch.manual_seed(0)
    return Unpicklable()


def builders(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def check(factory, path: Path, scenario: str = "ddp", world_size: int = 2, **distributed):
    inputs = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    return gc.check(functools.partial(factory, str(path)), inputs, device="cpu", scenarios=[scenario],
                    strategies=["non_reentrant", "reentrant"], distributed={**FAST, "world_size": world_size,
                                                                         **distributed})


@pytest.fixture
def on_ranks(monkeypatch):
    monkeypatch.setattr(launcher, "BUILD_ON_RANKS", ("cuda", "cpu"))
    monkeypatch.setattr(process_state._ForkRefusal, "refused", False)


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_each_rank_builds_the_model_once_and_this_process_never(on_ranks, tmp_path, scenario):
    log = tmp_path / "builds"
    report = check(built_here, log, scenario)
    assert {r.strategy: r.outcome for r in report.results} == {"non_reentrant": "pass", "reentrant": "pass"}
    pids = builders(log)
    assert os.getpid() not in pids  # the checking process read a skeleton, never the factory's model
    assert len(pids) == len(set(pids)) == 2  # one build per rank, for the baseline's two runs and both strategies
    assert report.model == "TanhNet" and report.baseline["layers"]


def test_spawned_ranks_build_it_too(on_ranks, tmp_path):
    log = tmp_path / "builds"
    report = check(built_here, log, scenario="fsdp2", world_size=1, start_method="spawn")
    assert {r.outcome for r in report.results} == {"pass"}
    pids = builders(log)
    assert os.getpid() not in pids and len(pids) == 1
    said = "1 rank started by the check, gloo; spawned, as distributed={'start_method': 'spawn'} asks"
    assert {r.metrics["ranks"] for r in report.results} == {report.baseline["fsdp2"]["ranks"]} == {said}


def test_forked_ranks_are_reported_as_started_by_the_check_nothing_more(on_ranks, tmp_path):
    report = check(built_here, tmp_path / "builds", scenario="fsdp2", world_size=1)
    assert {r.metrics["ranks"] for r in report.results} == {"1 rank started by the check, gloo"}


def test_the_report_says_why_gpu_ranks_were_spawned_and_what_saves_it(monkeypatch):
    """Spawning re-imports torch and the model's library in every rank; the reason names the cause."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(rank_group, "cuda_fork_refused", lambda: True)
    assert rank_group.why_spawned("fork", cuda=True) is None  # asked to fork: the user's word
    refused = rank_group.why_spawned("auto", cuda=True)
    assert refused.startswith("spawned: a forked rank could not use CUDA") and "device_count()" in refused
    assert rank_group.why_spawned("auto", cuda=False) is None  # a CPU group is never refused
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert "this process had used CUDA" in rank_group.why_spawned("auto", cuda=True)
    assert "this process had used CUDA" in rank_group.why_spawned("auto", cuda=False)  # CPU ranks too


def test_on_the_cpu_the_check_builds_once_and_its_ranks_share_it(tmp_path):
    log = tmp_path / "builds"
    report = check(built_here, log)
    assert {r.outcome for r in report.results} == {"pass"}
    assert builders(log) == [os.getpid()]


def test_a_skeleton_that_cannot_travel_is_built_here_instead(on_ranks, tmp_path):
    log = tmp_path / "builds"
    report = check(built_unpicklable, log, world_size=1)
    assert {r.outcome for r in report.results} == {"pass"}
    pids = builders(log)
    assert pids.count(os.getpid()) == 1 and len(pids) == 2  # here (to read it) and on the rank


def refuse_first_fork(device: torch.device) -> str | None:
    """Stands in for a parent that initialised CUDA before forking: the first forked rank cannot
    use its device (the marker names it), the next one can."""
    marker = Path(os.environ["GRADCKPT_TEST_REFUSE"])
    if marker.exists():
        marker.unlink()
        return rank_group.FORK_REFUSED
    return None


def test_a_refused_fork_is_retried_and_nothing_is_built_twice(on_ranks, tmp_path, monkeypatch):
    marker = tmp_path / "refuse"
    marker.touch()
    monkeypatch.setenv("GRADCKPT_TEST_REFUSE", str(marker))
    monkeypatch.setattr(rank_group, "_fork_unusable", refuse_first_fork)
    log = tmp_path / "builds"
    report = check(built_here, log, scenario="fsdp2", world_size=1)
    assert {r.outcome for r in report.results} == {"pass"}
    assert process_state.cuda_fork_refused()  # later GPU groups of this process are spawned
    assert not marker.exists() and len(builders(log)) == 1 and os.getpid() not in builders(log)


def test_the_skeleton_keeps_names_shapes_ties_and_what_trains():
    net = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    net[1].weight = net[0].weight  # tied, as input and output embeddings often are
    net[0].weight.requires_grad_(False)
    net.register_buffer("scale", torch.ones(2))
    copy = pickle.loads(rank_group.skeleton(net))
    assert copy[1].weight is copy[0].weight and not copy[0].weight.requires_grad
    assert {n: (t.device.type, tuple(t.shape)) for n, t in copy.state_dict().items()} == {
        "scale": ("meta", (2,)), "0.weight": ("meta", (5, 3)), "1.weight": ("meta", (5, 3))}
    assert len(rank_group.skeleton(torch.nn.Linear(1000, 1000))) < 4096  # no weights travel


def test_the_warm_up_asks_for_an_accelerator_through_nvml_so_gpu_ranks_can_still_be_forked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On an H200 the check's warm-up (a checkpoint of CPU tensors) asked the CUDA runtime which
    accelerator there is, and every GPU rank forked after it was refused CUDA (spawned instead,
    7-10 s more per check). The question must be asked through NVML: torch's switch set while asked."""
    from torch.utils.checkpoint import DefaultDeviceType

    from pytest_gradckpt.pipeline.process_state import NVML_BASED_CUDA_CHECK
    from pytest_gradckpt.strategies.checkpoint_functions import warm_up

    asked_with: list[str | None] = []

    def current_accelerator(check_available: bool = False) -> None:
        asked_with.append(os.environ.get(NVML_BASED_CUDA_CHECK))
        return None

    monkeypatch.delenv(NVML_BASED_CUDA_CHECK, raising=False)
    monkeypatch.setattr(DefaultDeviceType, "_default_device_type", None)  # as in a fresh process
    monkeypatch.setattr(torch.accelerator, "current_accelerator", current_accelerator)
    warm_up.__wrapped__()  # the function itself, not its once-per-process cache
    assert asked_with and set(asked_with) == {"1"}
    assert NVML_BASED_CUDA_CHECK not in os.environ  # put back after


def fail_to_set_up(*args: object) -> None:
    raise RuntimeError("CUDA error: initialization error (planted)")


def test_a_rank_that_cannot_set_up_is_a_harness_error_never_a_skip(on_ranks, tmp_path, monkeypatch):
    """On an H200 a forked rank whose set-up raised left with exit code 0 and no word; the check
    called every strategy ``skipped`` ("the model itself fails under fsdp2"). The forked rank now
    answers with the error, and nothing is judged."""
    monkeypatch.setattr(rank_group, "_set_up", fail_to_set_up)  # inherited by forked ranks only
    report = check(built_here, tmp_path / "builds", scenario="fsdp2", world_size=1)
    assert {r.outcome for r in report.results} == {"error"}
    assert all("initialization error (planted)" in r.message for r in report.results)


def test_the_model_a_rank_builds_is_left_out_of_the_collectors_passes():
    """A GPU rank may run a full collection between runs; it must not pass over the template the
    rank built (a 1.1B PEFT model is a few hundred thousand objects). Run here, as a rank would."""
    import gc as collector

    from pytest_gradckpt.pipeline.runs import Stepper
    from pytest_gradckpt.pipeline.subject import Subject

    def make() -> Stepper:
        return Stepper(Subject(TanhNet, torch.ones(2, 16), None, "cpu"), None, seed=0, timeout=None)

    state = {"stepper": rank_group.StepperRecipe(make)}
    frozen_before = collector.get_freeze_count()
    try:
        rank_group._build({}, 1, "", state, lambda news: None)
        template = state["stepper"].subject.peek()
        tracked = {id(o) for generation in range(3) for o in collector.get_objects(generation)}
        assert collector.get_freeze_count() > frozen_before
        assert id(template) not in tracked and not {id(m) for m in template.modules()} & tracked
    finally:
        collector.unfreeze()  # this test process is not a rank: hand everything back


def slow_module(label: str, seconds: float, body: str = "") -> str:
    """A module's text: its import notes process, ``label``, start and end in ``$GRADCKPT_TEST_IMPORTS``
    around ``seconds`` of sleep (a model library's own imports, as transformers' utilities take seconds)."""
    return (f"import os, time\n"
            f"def _note(what):\n"
            f"    with open(os.environ['GRADCKPT_TEST_IMPORTS'], 'a') as log:\n"
            f"        log.write(f'{{os.getpid()}} {label}-{{what}} {{time.time()}}\\n')\n"
            f"_note('start')\ntime.sleep({seconds})\n{body}_note('end')\n")


MODEL_CLASS = """from pytest_gradckpt.zoo.plain import TanhNet
class SlowLibraryNet(TanhNet):
    pass
"""


def built_from_slow_library(name: str) -> torch.nn.Module:
    """The factory imports its library's modules inside itself, as the benchmarks' factories do."""
    import importlib

    importlib.import_module(f"{name}.models")
    library = importlib.import_module(f"{name}.layers")
    torch.manual_seed(0)
    return library.SlowLibraryNet()


@pytest.fixture
def slow_library(on_ranks, tmp_path, monkeypatch) -> str:
    """A fresh package, importable here and on the ranks, whose import takes 1.5 s before its
    ``models`` module (as transformers' utilities come before ``modeling_utils``), and whose model
    class lives in ``layers``, 2 s more (the margin this process has to follow it), which ``models`` does not import."""
    name = f"slow_library_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(slow_module("package", 1.5))
    (tmp_path / name / "models.py").write_text("")
    (tmp_path / name / "layers.py").write_text(slow_module("layers", 2.0, MODEL_CLASS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRADCKPT_TEST_IMPORTS", str(tmp_path / "imports"))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def imports_by_process(path: Path) -> dict[int, dict[str, float]]:
    """process -> ``<module label>-start``/``-end`` -> when."""
    seen: dict[int, dict[str, float]] = {}
    for line in path.read_text().split("\n"):
        if line:
            pid, what, when = line.split()
            seen.setdefault(int(pid), {})[what] = float(when)
    return seen


def check_slow_library(name: str):
    inputs = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    return gc.check(functools.partial(built_from_slow_library, name), inputs, device="cpu", scenarios=["fsdp2"],
                    strategies=["non_reentrant"], distributed={**FAST, "world_size": 1})


def test_this_process_imports_the_models_library_while_the_rank_does(slow_library, tmp_path, monkeypatch):
    """The package's import starting on the rank is the word: this process imports the library's
    main module (``models``) at once, while the rank still runs the package's own slow imports, then
    each module the rank went on to import (``layers``, where the model's class lives)."""
    from pytest_gradckpt.ranks import overlapped_imports

    monkeypatch.setattr(overlapped_imports, "OVERLAPPED", {slow_library: f"{slow_library}.models"})
    report = check_slow_library(slow_library)
    assert [r.outcome for r in report.results] == ["pass"] and report.model == "SlowLibraryNet"
    seen = imports_by_process(tmp_path / "imports")
    rank = next(pid for pid in seen if pid != os.getpid())
    assert set(seen) == {os.getpid(), rank}  # once here (the skeleton needs the class), once on the rank
    here = seen[os.getpid()]
    assert here["package-start"] < seen[rank]["package-end"]  # overlapped, not one after the other
    assert here["layers-start"] < seen[rank]["layers-end"]


def test_a_library_not_listed_is_imported_here_only_when_the_skeleton_needs_it(slow_library, tmp_path,
                                                                                monkeypatch):
    """The counterpart: without the rank's word this process imports after the build (the cost the
    overlap removes); a library not listed (one that patches others when imported) is not imported early."""
    from pytest_gradckpt.ranks import overlapped_imports

    monkeypatch.setattr(overlapped_imports, "OVERLAPPED", {})
    report = check_slow_library(slow_library)
    assert [r.outcome for r in report.results] == ["pass"]
    seen = imports_by_process(tmp_path / "imports")
    rank = next(pid for pid in seen if pid != os.getpid())
    assert seen[os.getpid()]["package-start"] >= seen[rank]["layers-end"]


NAMING_FACTORY = """import time


def build():
    time.sleep({delay})  # what a GPU rank does before the factory runs: start CUDA
    from {name} import layers
    import torch

    torch.manual_seed(0)
    return layers.SlowLibraryNet()
"""


def test_this_process_begins_the_library_the_factory_names_before_the_rank_does(slow_library, tmp_path,
                                                                                monkeypatch):
    """A factory whose code names its library (``from <library> import layers``): this process
    imports it from the ranks' fork on, in a thread, not when the rank's word comes, which is
    later by the rank's own start (here 1 s); the thread is done when the check returns."""
    import threading

    from pytest_gradckpt.ranks import overlapped_imports

    monkeypatch.setattr(overlapped_imports, "OVERLAPPED", {slow_library: f"{slow_library}.models"})
    (tmp_path / f"make_{slow_library}.py").write_text(NAMING_FACTORY.format(name=slow_library, delay=1.0))
    try:
        factory = __import__(f"make_{slow_library}").build
        report = gc.check(factory, torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), device="cpu",
                          scenarios=["fsdp2"], strategies=["non_reentrant"], distributed={**FAST, "world_size": 1})
    finally:
        sys.modules.pop(f"make_{slow_library}", None)
    assert [r.outcome for r in report.results] == ["pass"] and report.model == "SlowLibraryNet"
    seen = imports_by_process(tmp_path / "imports")
    rank = next(pid for pid in seen if pid != os.getpid())
    assert seen[os.getpid()]["package-start"] < seen[rank]["package-start"] - 0.5  # not on the rank's word
    assert seen[os.getpid()]["layers-start"] < seen[rank]["layers-end"]
    assert "gradckpt-overlapped-imports" not in {thread.name for thread in threading.enumerate()}


def built_slowly(path: str) -> torch.nn.Module:
    """A factory that takes at least 0.4 s (a big model's build)."""
    import time

    time.sleep(0.4)
    return built_here(path)


@pytest.mark.parametrize("where", ["ranks", "here"])
def test_every_result_says_how_long_the_factory_took(tmp_path, monkeypatch, where):
    """``factory_seconds``: the factory's time in this check, where it ran (a rank that built the model,
    or this process); a check given a built model has none."""
    if where == "ranks":
        monkeypatch.setattr(launcher, "BUILD_ON_RANKS", ("cuda", "cpu"))
        monkeypatch.setattr(process_state._ForkRefusal, "refused", False)
    report = check(built_slowly, tmp_path / "builds", scenario="fsdp2", world_size=1)
    seconds = {r.metrics["factory_seconds"] for r in report.results}
    assert len(seconds) == 1 and 0.4 <= seconds.pop() < 30
    assert (os.getpid() in builders(tmp_path / "builds")) == (where == "here")
    given = gc.check(built_here(str(tmp_path / "given")), torch.randn(4, 16), device="cpu",
                     strategies=["non_reentrant"])
    assert "factory_seconds" not in given.results[0].metrics
