"""check_trainer on DeepSpeed ZeRO (CPU, gloo) under torchrun, against plain DeepSpeed's ground truth.

Each launch runs ``tests/deepspeed_cases.py`` under ``torchrun --standalone``: for every case, one
plain DeepSpeed step with transformers' checkpointing and one without (same seed, gradients read
with ``safe_get_full_grad``, no part of pytest_gradckpt), then ``gc.check_trainer`` on a ``Trainer``
built with the case's ZeRO config (or on the raw engine). The check's verdict must be what the
ground truth says: ``pass`` where plain DeepSpeed's gradients and loss are equal, ``mismatch`` where
they differ (the planted hazard, ``preserve_rng_state=False`` with dropout), on every rank, with
the trainer's model left untouched. The ``dsckpt`` cases judge DeepSpeed's own checkpoint functions
(``deepspeed.checkpointing``) against plain torch steps with them wrapped around each layer by hand. ``make test`` runs four cases on two ranks; the whole set
(ZeRO-2/3 x full/LoRA x reentrant/non-reentrant, the hazards, one and two ranks) is
``make test-deepspeed``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make setup installs it)")

ROOT = Path(__file__).resolve().parent.parent

#: cheap enough for make test: ZeRO-3 on a model zero.Init partitioned, the ZeRO-2 hazard, the raw engine,
#: DeepSpeed's own checkpoint functions on a LoRA
QUICK = ["z3-full-nonreentrant-fromconfig", "z2-full-nonreentrant-dropout-norng", "z2-lora-reentrant-engine",
         "dsckpt-lora"]

FULL = [f"z{stage}-{kind}-{mode}" for stage in (2, 3) for kind in ("full", "lora")
        for mode in ("reentrant", "nonreentrant")] + [
    "z2-full-reentrant-dropout-norng", "z3-full-nonreentrant-dropout-norng", "z2-lora-nonreentrant-dropout-norng",
    "z3-lora-reentrant-dropout-norng", "z3-full-nonreentrant-dropout", "z3-lora-nonreentrant-fromconfig",
    "z2-lora-nonreentrant-engine", "z3-full-nonreentrant-dropout-norng-engine", "dsckpt-full-dropout", "dsckpt-lora",
    "dsckpt-lora-dropout"]


def launch(tmp_path: Path, cases: list[str], ranks: int) -> list[dict]:
    out = tmp_path / f"cases-{ranks}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                           str(ROOT / "tests" / "deepspeed_cases.py"), str(out), *cases], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def expected_outcome(truth: dict) -> str:
    """What plain DeepSpeed says: the step with checkpointing trains like the step without, or not."""
    differs = truth["max_grad_diff"] > 1e-6 * max(truth["grad_scale"], 1.0) or truth["loss_diff"] > 1e-6
    return "mismatch" if differs else "pass"


def expected_strategy_outcome(truth: dict) -> str:
    """What plain DeepSpeed's checkpoint function, wrapped around each layer by hand, says."""
    if "error" in truth:
        return "error"
    if truth["lost"]:
        return "silent"
    return "mismatch" if truth["max_grad_diff"] > 1e-6 else "pass"


def assert_strategies_agree(row: dict) -> None:
    verdicts, truth = row["verdicts"], row["truth"]
    assert verdicts["deepspeed_checkpoint"]["outcome"] == expected_strategy_outcome(truth["checkpoint"]), row
    assert verdicts["deepspeed_non_reentrant"]["outcome"] == expected_strategy_outcome(
        truth["non_reentrant_checkpoint"]), row
    if "lora" in row["case"]:  # DeepSpeed's reentrant function with frozen inputs: plain DeepSpeed fails too
        assert "error" in truth["checkpoint"], truth
    # settings that cannot do what they say on a CPU model without model parallelism are named, not passed
    for name, setting in [("deepspeed_checkpoint_in_cpu", "checkpoint_in_cpu"),
                          ("deepspeed_partition_activations", "partition_activations"),
                          ("deepspeed_contiguous", "partition_activations")]:
        assert verdicts[name]["outcome"] == "skipped" and setting in verdicts[name]["message"], verdicts[name]


def assert_agrees(row: dict) -> None:
    if row["case"].startswith("dsckpt"):
        assert_strategies_agree(row)
        return
    truth, verdicts, case = row["truth"], row["verdicts"], row["case"]
    # The planted hazard is real in plain DeepSpeed (a test that cannot fail is a bug), and only it
    assert expected_outcome(truth) == ("mismatch" if "norng" in case else "pass"), (case, truth)
    assert len(verdicts) == row["world"]
    for verdict in verdicts:
        assert verdict["outcome"] == expected_outcome(truth), (case, truth, verdict)
        assert verdict["untouched"] is True, (case, "the trainer's model or state changed", verdict["untouched"])
        assert "DeepSpeed ZeRO-" + case[1] in verdict["strategy"], verdict["strategy"]
        layers = [u.rsplit(".", 1)[-1] for u in verdict["recomputed_units"] or []]
        assert layers == ["0", "1"], (case, verdict["recomputed_units"])
        if verdict["outcome"] == "mismatch":
            assert "Remove preserve_rng_state=False" in verdict["message"], verdict["message"]
            assert verdict["max_grad_diff"] > 0  # the gathered ZeRO gradients were compared, not only the loss
    if "fromconfig" in case:  # the Trainer's model was built under zero.Init: the check gathered it
        assert all(v["partitioned"] for v in verdicts)
    if "engine" in case and "dropout" not in case:  # the adapter's gathered gradients are plain DeepSpeed's
        assert truth["adapter_vs_plain_grad_diff"] == 0.0, truth


def test_zero_verdicts_agree_with_plain_deepspeed_on_two_ranks(tmp_path):
    rows = launch(tmp_path, QUICK, ranks=2)
    assert [r["case"] for r in rows] == QUICK
    for row in rows:
        assert_agrees(row)


@pytest.mark.deepspeed_full
@pytest.mark.parametrize("ranks", [1, 2])
def test_every_zero_case_agrees_with_plain_deepspeed(tmp_path, ranks):
    rows = launch(tmp_path, FULL, ranks=ranks)
    for row in rows:
        assert_agrees(row)


@pytest.mark.deepspeed_full
@pytest.mark.parametrize("case", ["z3-lora-nonreentrant-accelerate", "z2-full-nonreentrant-dropout-norng-accelerate"])
def test_accelerates_deepspeed_plugin_agrees_with_plain_deepspeed(tmp_path, case):
    # a launch per case: accelerate takes one DeepSpeed plugin per process (its first Accelerator's)
    rows = launch(tmp_path, [case], ranks=2)
    for row in rows:
        assert all(v["adapter"].startswith("accelerate with DeepSpeedPlugin") for v in row["verdicts"]), row
        assert_agrees(row)
