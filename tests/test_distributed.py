"""DDP and FSDP2 on torch.distributed (gloo on loopback, 2 ranks)."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch

import pytest_gradckpt as gc
from pytest_gradckpt.zoo import plain
from tests.models import TwoBlocks

FAST = {"timeout": 30}


def outcomes(report):
    return {r.strategy: r.outcome for r in report.results}


def test_reused_block_under_reentrant_ddp_is_never_a_pass():
    model, inputs = plain.reused_block_net()
    report = gc.check(model, inputs, scenarios=["ddp"], strategies=["reentrant", "non_reentrant"], distributed=FAST)
    assert outcomes(report) == {"reentrant": "error", "non_reentrant": "pass"}
    assert "Expected to mark a variable ready only once" in report.results[0].message  # torch's own message


def test_static_graph_makes_reentrant_ddp_correct():
    model, inputs = plain.reused_block_net()
    report = gc.check(model, inputs, scenarios=["ddp"], strategies=["reentrant"],
                      distributed={**FAST, "static_graph": True})
    assert outcomes(report) == {"reentrant": "pass"}


def test_ddp_no_sync_accumulation_and_dropout():
    model, inputs = plain.dropout_mask_net()
    report = gc.check(model, inputs, scenarios=["ddp"], strategies=["non_reentrant", "offload"],
                      distributed={**FAST, "micro_batches": 2})
    assert outcomes(report) == {"non_reentrant": "pass", "offload": "pass"}
    assert report.results[0].metrics["layer_calls"]["blocks.0"] == 4  # 2 micro-batches, each recomputed


def test_fsdp2_with_non_reentrant_passes_on_cpu():
    model, inputs = plain.dropout_mask_net()
    report = gc.check(model, inputs, scenarios=["fsdp2"], strategies=["non_reentrant", "reentrant"], distributed=FAST)
    assert outcomes(report) == {"non_reentrant": "pass", "reentrant": "pass"}


def hang_on_rank_one(function, *args):
    if torch.distributed.get_rank() == 1:
        while True:
            time.sleep(0.05)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def test_a_hanging_rank_ends_as_error_and_leaves_no_process():
    model, inputs = plain.tanh_net()
    strategy = gc.Strategy.from_checkpoint_fn("hangs", hang_on_rank_one)
    started = time.monotonic()
    (result,) = gc.check(model, inputs, scenarios=["ddp"], strategies=[strategy], timeout=None,
                         distributed={"timeout": 8}).results
    assert result.outcome == "error"
    assert "did not finish within 8 s" in result.message
    assert time.monotonic() - started < 60
    assert multiprocessing.active_children() == []


def test_uneven_batch_is_a_usage_error():
    model, _ = plain.tanh_net()
    with pytest.raises(gc.GradckptUsageError, match="does not split evenly over 2 ranks"):
        gc.check(model, torch.randn(3, 16), scenarios=["ddp"], strategies=["non_reentrant"], distributed=FAST)


def test_unknown_distributed_option_is_a_usage_error():
    model, inputs = plain.tanh_net()
    with pytest.raises(gc.GradckptUsageError, match="unknown option.*static_grap"):
        gc.check(model, inputs, scenarios=["ddp"], distributed={"static_grap": True})


def test_spawned_ranks_give_the_same_verdicts_as_forked_ones():
    # Spawn is what a process that already used CUDA gets; here it is forced on CPU.
    model, inputs = plain.reused_block_net()
    report = gc.check(model, inputs, scenarios=["ddp"], strategies=["reentrant", "non_reentrant"],
                      distributed={**FAST, "start_method": "spawn"})
    assert outcomes(report) == {"reentrant": "error", "non_reentrant": "pass"}


def test_spawn_needs_a_picklable_model():
    class Local(TwoBlocks):  # a class defined in a function cannot be pickled
        pass

    with pytest.raises(gc.GradckptUsageError, match="picklable model"):
        gc.check(Local(), torch.randn(2, 4), scenarios=["ddp"], strategies=["non_reentrant"],
                 distributed={**FAST, "start_method": "spawn"})


def test_strategy_that_does_not_apply_is_skipped_before_any_rank_starts(monkeypatch):
    from pytest_gradckpt import distributed

    started = []
    real_launch = distributed.launch
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: started.append(a[2]) or real_launch(*a, **k))
    model, inputs = plain.reused_block_net()
    report = gc.check(model, inputs, strategies=["hf_reentrant", "non_reentrant"], scenarios=["ddp"])
    assert [r.outcome for r in report.results] == ["skipped", "pass"]
    assert "not a transformers model" in report.results[0].message
    assert all(s is None or s.name == "non_reentrant" for s in started)  # baselines and non_reentrant only


def test_a_failing_launch_is_retried_and_then_reported_as_the_harness_not_the_strategy(monkeypatch):
    from pytest_gradckpt import distributed
    from pytest_gradckpt.runs import Run

    attempts = []
    real_launch = distributed.launch

    def flaky(stepper, scenario, strategy, grad_targets):
        if strategy is None:
            return real_launch(stepper, scenario, strategy, grad_targets)
        attempts.append(strategy.name)
        if strategy.name == "non_reentrant" and attempts.count("non_reentrant") == 1:
            return Run(error=distributed.LaunchFailure("rank 0: RuntimeError: Gloo connectFullMesh failed"))
        if strategy.name == "reentrant":
            return Run(error=distributed.LaunchFailure("rank 1 died with exit code -9"))
        return real_launch(stepper, scenario, strategy, grad_targets)

    monkeypatch.setattr(distributed, "launch", flaky)
    model, inputs = plain.reused_block_net()
    report = gc.check(model, inputs, strategies=["non_reentrant", "reentrant"], scenarios=["ddp"],
                      distributed={"static_graph": True})
    by = {r.strategy: r for r in report.results}
    assert by["non_reentrant"].outcome == "pass"  # one transport failure, then a real verdict
    assert by["reentrant"].outcome == "error"
    assert "launch itself failed 3 times (a harness failure, not a verdict on the strategy)" in by["reentrant"].message
    assert attempts.count("reentrant") == distributed.LAUNCH_ATTEMPTS


def test_transport_errors_from_a_rank_count_as_launch_failures():
    from pytest_gradckpt import distributed

    assert distributed._is_transport_failure("RuntimeError: Gloo connectFullMesh failed with ... Connection closed by peer")
    assert not distributed._is_transport_failure("RuntimeError: Expected to mark a variable ready only once")
