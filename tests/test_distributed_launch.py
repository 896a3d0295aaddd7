"""One launch per check, any factory, time limits that scale (gloo on CPU, tiny models)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import time

import pytest
import torch

import pytest_gradckpt as gc
from pytest_gradckpt.ranks import rank_group
from pytest_gradckpt.zoo.plain import TanhNet, tanh_net


def outcomes(report):
    return {(r.strategy, r.scenario): r.outcome for r in report.results}


@pytest.fixture
def processes_started(monkeypatch):
    """Every process started from here on, counted where multiprocessing starts them."""
    started: list[str] = []
    real_start = multiprocessing.process.BaseProcess.start
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        lambda self: started.append(self.name) or real_start(self))
    return started


def test_one_launch_of_world_size_ranks_runs_the_baselines_every_strategy_and_every_scenario(processes_started):
    model, inputs = tanh_net()
    report = gc.check(model, inputs, scenarios=["ddp", "fsdp2"], strategies=["non_reentrant", "reentrant", "offload"])
    assert set(outcomes(report).values()) == {"pass"} and len(report.results) == 6
    assert len(processes_started) == 2  # 10 steps (2 baselines of 2 runs, 6 strategy runs), one launch of 2 ranks
    assert multiprocessing.active_children() == []


def test_isolated_steps_share_one_child_process(processes_started):
    model, inputs = tanh_net()
    report = gc.check(model, inputs, strategies=["non_reentrant", "offload"], isolate=True)
    assert set(outcomes(report).values()) == {"pass"}
    assert len(processes_started) == 1


def sleeps_on_rank_one(function, *args):
    if torch.distributed.get_rank() == 1:
        time.sleep(120)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def test_a_rank_past_the_limit_scaled_from_measured_steps_is_error_not_judged(monkeypatch):
    # Floors shrunk so the test is quick; the limit is then 5 x the slowest step measured.
    monkeypatch.setattr(rank_group, "FLOOR", 2.0)
    model, inputs = tanh_net()
    strategy = gc.Strategy.from_checkpoint_fn("sleeps", sleeps_on_rank_one)
    report = gc.check(model, inputs, scenarios=["ddp"], strategies=[strategy, "non_reentrant"], timeout=None)
    by = {r.strategy: r for r in report.results}
    assert by["sleeps"].outcome == "error"
    assert by["sleeps"].message.startswith("not judged: rank(s) [0, 1] did not finish the step of 'sleeps' under ddp")
    assert "5 x the slowest step so far" in by["sleeps"].message
    assert by["non_reentrant"].outcome == "pass"  # the next step got a fresh group
    assert multiprocessing.active_children() == []


class SleepyOnRankOne(TanhNet):
    """Hangs on rank 1 in every step: even the step without checkpointing cannot finish."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            time.sleep(120)
        return super().forward(features)


def test_a_baseline_that_outlives_its_limit_is_error_never_skipped(monkeypatch):
    monkeypatch.setattr(rank_group, "FIRST_FLOOR", 6.0)  # what starting ranks and a tiny build may take
    _, inputs = tanh_net()
    report = gc.check(SleepyOnRankOne(), inputs, scenarios=["ddp"], strategies=["non_reentrant", "offload"])
    assert [r.outcome for r in report.results] == ["error", "error"]
    assert report.results[0].message.startswith(
        "not judged: rank(s) [0, 1] did not finish the step without checkpointing under ddp within 6 s")
    assert report.baseline["ddp"]["judged"] is False
    assert multiprocessing.active_children() == []


def _first_half_loss(model: torch.nn.Module, features: torch.Tensor) -> float:
    """Rank 0's loss in plain torch: the default loss on the first half of the global batch."""
    with torch.no_grad():
        return float(model(features[:2]).float().square().mean())


def cpu_factory() -> torch.nn.Module:
    torch.manual_seed(5)
    return TanhNet()


def test_a_factory_that_builds_on_the_cpu(processes_started):
    _, features = tanh_net()
    report = gc.check(cpu_factory, features, scenarios=["ddp", "fsdp2"], strategies=["non_reentrant"])
    assert set(outcomes(report).values()) == {"pass"}
    expected = _first_half_loss(cpu_factory(), features)
    assert report.baseline["ddp"]["loss"] == pytest.approx(expected, rel=1e-6)
    assert report.baseline["fsdp2"]["loss"] == pytest.approx(expected, rel=1e-6)
    assert len(processes_started) == 2


def meta_factory() -> torch.nn.Module:
    with torch.device("meta"):
        return TanhNet()


def test_a_factory_that_builds_on_meta_is_materialised_identically_in_every_run():
    _, features = tanh_net()
    report = gc.check(meta_factory, features, scenarios=["train", "ddp", "fsdp2"], strategies=["non_reentrant"])
    assert set(outcomes(report).values()) == {"pass"}
    # Ground truth: the same materialisation in plain torch (storage, then seeded reset_parameters).
    model = meta_factory().to_empty(device="cpu")
    torch.manual_seed(0)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert report.baseline["ddp"]["loss"] == pytest.approx(_first_half_loss(model, features), rel=1e-6)
    assert report.baseline["train"]["noise"] == 0.0  # two runs, the same weights


class ScaledTanhNet(TanhNet):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((16,), 0.5))  # only __init__ knows this value

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features * self.scale)


def meta_factory_with_a_computed_buffer() -> torch.nn.Module:
    with torch.device("meta"):
        return ScaledTanhNet()


def test_a_meta_model_whose_values_cannot_be_recreated_is_refused_with_the_fix():
    _, features = tanh_net()
    with pytest.raises(gc.GradckptUsageError, match=r"meta device.*\(scale\).*Build it on the CPU"):
        gc.check(meta_factory_with_a_computed_buffer, features, strategies=["non_reentrant"])


class NestedInputsNet(TanhNet):
    def forward(self, batch: dict) -> torch.Tensor:  # type: ignore[override]
        return super().forward(batch["features"] + batch["extra"][0])


def test_nested_inputs_are_sharded_under_ddp():
    _, features = tanh_net()
    extra = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = NestedInputsNet()
    report = gc.check(model, {"batch": {"features": features, "extra": [extra]}}, scenarios=["ddp"],
                      strategies=["non_reentrant"])
    assert outcomes(report) == {("non_reentrant", "ddp"): "pass"}
    with torch.no_grad():  # rank 0 saw the first half of both nested tensors, not the whole batch
        expected = float(model({"features": features[:2], "extra": [extra[:2]]}).square().mean())
    assert report.baseline["ddp"]["loss"] == pytest.approx(expected, rel=1e-6)


def counted_cpu_factory() -> torch.nn.Module:
    import os

    with open(os.environ["GRADCKPT_TEST_BUILDS"], "a") as builds:
        builds.write(f"{os.getpid()}\n")
    return cpu_factory()


def test_spawned_ranks_copy_the_one_cpu_build_made_here(monkeypatch, tmp_path):
    import os

    log = tmp_path / "builds"
    monkeypatch.setenv("GRADCKPT_TEST_BUILDS", str(log))
    _, features = tanh_net()
    report = gc.check(counted_cpu_factory, features, scenarios=["ddp"], strategies=["non_reentrant", "offload"],
                      distributed={"start_method": "spawn"})
    assert set(outcomes(report).values()) == {"pass"}
    assert log.read_text().split() == [str(os.getpid())]  # 6 steps on 2 ranks, one build (here)
    assert report.baseline["ddp"]["loss"] == pytest.approx(_first_half_loss(cpu_factory(), features), rel=1e-6)


def wide_net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh()) for _ in range(4)])


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_a_rank_sends_the_judge_a_few_kilobytes_per_run_not_its_gradients(monkeypatch, scenario):
    """Rank 0 keeps its gradients, outputs and buffers and the comparisons run there: what crosses
    to the judging process per run is stand-ins, the loss and the probes' measurements."""
    monkeypatch.setenv("GRADCKPT_HOLD_ABOVE_BYTES", "0")  # a 1 MB model is held only when told to
    sizes: list[int] = []
    real_close = rank_group.RankGroup.close
    monkeypatch.setattr(rank_group.RankGroup, "close", lambda self, wait=True: sizes.extend(self.payload_bytes)
                        or real_close(self, wait))
    grad_bytes = sum(p.numel() * 4 for p in wide_net().parameters())  # 1.05 MB of float32 gradients
    report = gc.check(wide_net, torch.randn(4, 256), scenarios=[scenario], strategies=["non_reentrant", "offload"])
    assert set(outcomes(report).values()) == {"pass"}
    assert len(sizes) >= 2 * 4  # 2 ranks x (2 baseline runs + 2 strategies), and the comparisons' answers
    assert max(sizes) < 64 * 1024 < grad_bytes / 16, sizes


def test_a_small_run_travels_whole_and_is_judged_here(held_after_each_step):
    """Below the size worth holding, one transfer beats the round trips of judging remotely: the
    isolated child sends the tensors and nothing stays behind in it."""
    kept = held_after_each_step
    model, inputs = tanh_net()
    report = gc.check(model, inputs, strategies=["non_reentrant", "offload"], isolate=True)
    assert [r.outcome for r in report.results] == ["pass", "pass"]
    assert kept and set(kept) == {0}


def crashes(function, *args):
    import ctypes

    ctypes.string_at(0)  # SIGSEGV, as a fault in native code


def test_a_baseline_held_by_a_child_that_crashed_is_run_again_in_the_next_one(processes_started, monkeypatch):
    monkeypatch.setenv("GRADCKPT_HOLD_ABOVE_BYTES", "0")
    model, inputs = tanh_net()
    strategies = [gc.Strategy.from_checkpoint_fn("crashes", crashes), "non_reentrant", "offload"]
    report = gc.check(model, inputs, strategies=strategies, isolate=True)
    assert [(r.strategy, r.outcome) for r in report.results] == [
        ("crashes", "error"), ("non_reentrant", "pass"), ("offload", "pass")]
    assert len(processes_started) == 2  # the first child died with the baseline; the second ran it again


@pytest.fixture
def held_after_each_step(monkeypatch):
    """How many runs rank 0 (or the isolated child) holds after each step, counted there, read here."""
    real_answer, real_run = rank_group._answer, rank_group.RankGroup.run
    kept: list[int] = []

    def answer(rank, world_size, store_path, stepper, catalog, command, settings, store, tell):
        payload = real_answer(rank, world_size, store_path, stepper, catalog, command, settings, store, tell)
        payload["held_runs"] = len(store)
        return payload

    def run(self, command, limit, what):
        payloads = real_run(self, command, limit, what)
        if command[0] == "step":
            kept.append(payloads[0]["held_runs"])
        return payloads

    monkeypatch.setattr(rank_group, "_answer", answer)
    monkeypatch.setattr(rank_group.RankGroup, "run", run)
    return kept


def test_held_runs_are_freed_in_the_rank_once_judged(monkeypatch, held_after_each_step):
    monkeypatch.setenv("GRADCKPT_HOLD_ABOVE_BYTES", "0")  # tanh_net is far below the size held by default
    kept = held_after_each_step
    model, inputs = tanh_net()
    report = gc.check(model, inputs, scenarios=["ddp"], strategies=["non_reentrant", "offload", "reentrant"])
    assert set(outcomes(report).values()) == {"pass"}
    # After each step rank 0 holds the baseline and the new run: each run judged before was freed.
    assert kept == [1, 2, 2, 2, 2]


def test_a_cpu_baseline_held_by_a_child_is_cached_for_the_next_check(monkeypatch):
    """The plugin runs one item per strategy with one baseline cache: a baseline held by an
    isolated CPU child is brought back to be cached, so the next check runs only its strategy."""
    monkeypatch.setenv("GRADCKPT_HOLD_ABOVE_BYTES", "0")
    steps: list[str] = []
    real_run = rank_group.RankGroup.run

    def run(self, command, limit, what):
        if command[0] == "step":
            steps.append(what)
        return real_run(self, command, limit, what)

    monkeypatch.setattr(rank_group.RankGroup, "run", run)
    model, inputs = tanh_net()
    cache: dict = {}
    first = gc.check(model, inputs, strategies=["non_reentrant"], isolate=True, cache=cache, name="tanh")
    second = gc.check(model, inputs, strategies=["offload"], isolate=True, cache=cache, name="tanh")
    assert [r.outcome for r in (*first.results, *second.results)] == ["pass", "pass"]
    assert len(cache) == 1 and steps == ["the step without checkpointing under train"] * 2 + [
        "the step of 'non_reentrant' under train", "the step of 'offload' under train"]
