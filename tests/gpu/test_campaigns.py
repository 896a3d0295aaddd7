"""The GPU verdict campaigns, as tests: each runs the campaign that produced a committed result
(``campaigns/``, in a subprocess, as it ran then) and holds its verdicts to the committed ones, or
to its own plain-torch ground truth where none was committed. ``make test-gpu`` runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.conftest import ROOT, recorded


def campaign(tmp_path: Path, *command: str, launcher: tuple[str, ...] = (sys.executable,), timeout: int = 1800,
             **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``-m tests.gpu.campaigns.<command>`` from the repository root, its outputs under ``tmp_path``."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OUT": str(tmp_path), **env}
    done = subprocess.run([*launcher, "-m", *command], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def verdicts(models: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {name: {f"{v['strategy']}/{v['scenario']}": v["outcome"] for v in entry["verdicts"]}
            for name, entry in models.items()}


@pytest.mark.gpu(gpus=1)
def test_compile_faults_are_caught_as_recorded(tmp_path: Path) -> None:
    """1.1B Llama, every block compiled (inductor), both orders: correct passes, each planted fault caught."""
    campaign(tmp_path, "tests.gpu.campaigns.compile_faults_gpu")
    (found,) = tmp_path.glob("compile-faults-*.json")
    rows = {r["order"]: r["outcomes"] for r in json.loads(found.read_text())["rows"]}
    expected = {r["order"]: r["outcomes"] for r in recorded("compile-faults-h200-tolerance-2x-2026-12-01.json")["rows"]}
    assert rows == expected


@pytest.mark.gpu(gpus=2, needs=("transformers",))
def test_fsdp2_at_real_size_passes_as_recorded(tmp_path: Path) -> None:
    """1.1B Llama, bf16, FSDP2 on two GPUs started by the check: every per-layer strategy as recorded, twice alike."""
    campaign(tmp_path, "tests.gpu.campaigns.fsdp2_gpu", "--world-size", "2", "--repeats", "2")
    (found,) = tmp_path.glob("fsdp2-*.json")
    document = json.loads(found.read_text())
    outcomes = [{s: r["outcome"] for s, r in c["results"].items()} for c in document["checks"]]
    expected = {s: r["outcome"] for s, r in recorded("fsdp2-NVIDIA-H200-x2-2026-11-22.json")["checks"][0]["results"].items()}
    assert document["identical"] and outcomes[0] == expected


@pytest.mark.gpu(gpus=2, needs=("transformers",))
@pytest.mark.parametrize("factory", ["cpu", "gpu"])
def test_dist_gate_as_a_user_writes_it(tmp_path: Path, factory: str) -> None:
    """Issue 21's FSDP2 gate (1.1B Llama) through ``pytest --gradckpt``, ranks started by the check."""
    done = campaign(tmp_path, "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "--gradckpt",
                    "tests/gpu/campaigns/dist_gate.py", GATE_FACTORY=factory)
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-2000:]


@pytest.mark.gpu(gpus=1, needs=("llamafactory",))
def test_llamafactory_verdicts_as_recorded(tmp_path: Path) -> None:
    """LLaMA-Factory's checkpointing (use_unsloth_gc needs CUDA): the engine's verdicts as committed."""
    campaign(tmp_path, "tests.gpu.campaigns.llamafactory_gpu", str(tmp_path / "out.json"))
    found = json.loads((tmp_path / "out.json").read_text())
    assert verdicts(found["models"]) == verdicts(recorded("llamafactory-gpu-2026-12-01.json")["models"])


@pytest.mark.gpu(gpus=1, needs=("unsloth_zoo",))
def test_unsloth_verdicts_as_recorded(tmp_path: Path) -> None:
    """Unsloth's offloading checkpoint on CUDA: the engine's verdicts (fp32 mismatch, bf16 pass) as committed."""
    campaign(tmp_path, "tests.gpu.campaigns.unsloth_gpu", str(tmp_path / "out.json"))
    found = json.loads((tmp_path / "out.json").read_text())
    assert verdicts(found["models"]) == verdicts(recorded("unsloth-gpu-2026-12-01.json")["models"])


@pytest.mark.gpu(gpus=1, needs=("lightning", "accelerate"))
def test_trainers_on_real_fsdp_as_recorded(tmp_path: Path) -> None:
    """check_trainer on Lightning's FSDPStrategy and accelerate's FSDP plugin (v1, v2): verdicts as committed."""
    campaign(tmp_path, "tests.gpu.campaigns.trainers_fsdp_gpu", str(tmp_path / "out.json"))
    found = json.loads((tmp_path / "out.json").read_text())
    lightning = recorded("trainers-fsdp-gpu-2026-12-01.json")["lightning"]
    assert {case: found["lightning"][case]["check_trainer"]["outcome"] for case in lightning if case != "lightning"} \
        == {case: entry["check_trainer"]["outcome"] for case, entry in lightning.items() if case != "lightning"}
    accelerate = recorded("accelerate-fsdp-gpu-after-rebind-2026-12-01.json")["runs"]
    assert {v: found["accelerate"][v]["check"]["check_trainer"]["outcome"] for v in accelerate} \
        == {v: entry["check_trainer"]["outcome"] for v, entry in accelerate.items()}


@pytest.mark.gpu(gpus=1, needs=("deepspeed",))
def test_deepspeed_checkpointing_agrees_with_ground_truth(tmp_path: Path) -> None:
    """DeepSpeed's own checkpointing as strategies (never committed from a GPU): no strategy passes whose plain
    DeepSpeed step (DeepSpeed's function around each decoder layer, no engine) fails or loses gradients."""
    out = tmp_path / "out.json"
    campaign(tmp_path, "tests.gpu.campaigns.deepspeed_checkpointing_gpu", str(out),
             launcher=("torchrun", "--standalone", "--nproc-per-node", "1"))
    rows = json.loads(out.read_text())["rows"]
    assert rows
    for row in rows:
        truth = row["ground_truth"]
        wrong = "error" in truth or truth.get("lost", 0) > 0
        assert not (wrong and row["outcome"] == "pass"), row
