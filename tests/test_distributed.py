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
