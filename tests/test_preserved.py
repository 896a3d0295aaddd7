"""benchmarks/preserved.py's comparison of two sweeps, on hand-built records (the sweeps themselves
take minutes; the committed result in benchmarks/results/ is what one run found)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from benchmarks import preserved

ROOT = Path(__file__).resolve().parents[1]


def entry(outcome: str, loss: float = 1.0, norm: float = 0.5, peak: int = 1000) -> dict[str, Any]:
    return {"outcome": outcome, "fingerprint": {"loss": loss, "grad_norms": {"w": norm}, "activation_bytes": peak}}


def sweep(record: dict[str, Any], messages: dict[str, str] | None = None) -> dict[str, Any]:
    return {"record": record, "messages": messages or {}}


def explained(differences: list[dict[str, Any]], step_limited: frozenset[str] = frozenset()) -> list[str | None]:
    return [preserved._why(d, set(step_limited)) for d in differences]


def test_a_changed_outcome_is_unexplained_unless_the_model_was_over_the_step_limit() -> None:
    before = sweep({"t [sac/train] llama": entry("pass"), "t [all/train] hiera": entry("skipped")},
                   {"t [all/train] hiera": "one tiny training step takes 2.7 s (limit 1.0 s)"})
    after = sweep({"t [sac/train] llama": entry("mismatch"), "t [sac/train] hiera": entry("pass")})
    differences = preserved.outcome_differences(before, after)
    assert [(d["key"], d["before"], d["after"]) for d in differences] == [
        ("t [all/train] hiera", "skipped", None), ("t [sac/train] hiera", None, "pass"),
        ("t [sac/train] llama", "pass", "mismatch")]
    limited = preserved.step_limit_skips(before)
    assert limited == {"hiera"}
    assert explained(differences, limited) == ["step-time-limit", "step-time-limit", None]


def test_fingerprints_beyond_the_golden_tolerance_are_lines_and_within_it_fields() -> None:
    before = sweep({"t [sac/train] a": entry("pass"), "t [sac/train] b": entry("pass"),
                    "t [offload/train] c": entry("pass"), "t [sac/train] d": entry("silent")})
    after = sweep({"t [sac/train] a": entry("pass"), "t [sac/train] b": entry("pass", norm=0.6),
                   "t [offload/train] c": entry("pass", peak=1010), "t [sac/train] d": entry("pass")})
    compared, identical, differences = preserved.fingerprint_differences(before, after)
    assert (compared, identical) == (3, 1)  # d changed its outcome: an outcome difference, not a fingerprint one
    by_key = {d["key"]: d for d in differences}
    assert by_key["t [sac/train] b"]["lines"] == ["t [sac/train] b: grad norm of w 0.5 -> 0.6"]
    assert by_key["t [offload/train] c"]["fields"] == {"activation_bytes": [1000, 1010]}
    assert explained(differences) == ["offload-peak", None]  # sorted by key: offload before sac


def test_big_bird_gradient_norms_are_explained_but_its_loss_is_not() -> None:
    before = sweep({"t [sac/train] big_bird": entry("pass")})
    norms = sweep({"t [sac/train] big_bird": entry("pass", norm=0.7)})
    loss = sweep({"t [sac/train] big_bird": entry("pass", loss=2.0, norm=0.7)})
    assert explained(preserved.fingerprint_differences(before, norms)[2]) == ["big-bird-fresh-build"]
    assert explained(preserved.fingerprint_differences(before, loss)[2]) == [None]


def test_the_table_counts_differences_by_kind_and_reason() -> None:
    differences = [{"model": m, "before": None, "after": "pass", "explained_by": "step-time-limit"} for m in "ab"]
    differences.append({"model": "c", "before": "pass", "after": "silent", "explained_by": None})
    assert [line.split() for line in preserved.table(differences, [])] == [
        ["2", "outcome", "None", "->", "pass", "step-time-limit", "a,", "b"],
        ["1", "outcome", "pass", "->", "silent", "UNEXPLAINED", "c"]]


def test_a_snapshot_is_the_committed_package_only(tmp_path: Path) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    preserved.snapshot(head.stdout.strip(), tmp_path)
    assert (tmp_path / "pytest_gradckpt" / "__init__.py").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytest_gradckpt"]
