"""The benchmark runner on a GPU: one small case, one repeat, its envelope names the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.envelope import ENVELOPE_KEYS
from benchmarks.runner import main


@pytest.mark.gpu(gpus=1, needs=("transformers",))
def test_check_cost_tiny_cuda_envelope(tmp_path: Path) -> None:
    out = tmp_path / "tiny-cuda.json"
    assert main(["check-cost", "--case", "tiny-cuda", "--repeats", "1", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert tuple(document) == ENVELOPE_KEYS
    assert document["machine"]["gpus"] >= 1 and "cpu" not in document["machine"]["device"].lower()
    (row,) = document["rows"]
    assert row["identical_outcomes"] and set(row["outcomes"].values()) <= {"pass", "skipped"}, row["outcomes"]
    assert row["extra_peak_gib"] is not None
