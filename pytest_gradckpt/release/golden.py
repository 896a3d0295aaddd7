"""Golden records: what a run found, kept to compare a later run (another torch, transformers,
peft or bitsandbytes) against. Plain data, no torch.

A record holds, per (test, model, strategy, scenario), the outcome and a fingerprint of the
numbers: the loss, every parameter's gradient norm, and the saved-activation peak; plus
the versions of everything that matters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_gradckpt.errors import GradckptUsageError

FORMAT = 1
#: Relative tolerance for loss and gradient norms: kernels change between releases, so a
#: last-digit drift is not a change in checkpointing; a lost or altered gradient is far above it.
RTOL = 1e-3
ATOL = 1e-7
#: Relative tolerance for the saved-activation peak: allocator-level noise is none on CPU, but
#: library refactors move a few buffers; doubling memory is far above it.
MEMORY_RTOL = 0.05


def key(result: dict[str, Any]) -> str:
    """``test [strategy/scenario] model``: one entry per result.

    Example:
        >>> key({"test": "t.py::test_a", "model": "llama", "strategy": "sac", "scenario": "train"})
        't.py::test_a [sac/train] llama'
    """
    return f"{result['test']} [{result['strategy']}/{result['scenario']}] {result['model']}"


def build_record(results: Iterable[dict[str, Any]], versions: dict[str, str]) -> dict[str, Any]:
    """A golden record from result dicts (as the JSON report holds them)."""
    entries = {}
    for result in results:
        entries[key(result)] = {"outcome": result["outcome"],
                                "fingerprint": result.get("metrics", {}).get("fingerprint")}
    return {"format": FORMAT, "versions": versions, "results": dict(sorted(entries.items()))}


def write(path: str | Path, record: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def load(path: str | Path) -> dict[str, Any]:
    """Read a record; a missing or foreign file is a usage error that says how to make one."""
    target = Path(path)
    if not target.exists():
        raise GradckptUsageError(f"--gradckpt-compare={path}: no such file; record one first with "
                                 f"--gradckpt-record={path}")
    try:
        record = json.loads(target.read_text())
    except json.JSONDecodeError as error:
        raise GradckptUsageError(f"--gradckpt-compare={path}: not JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise GradckptUsageError(f"--gradckpt-compare={path}: not a pytest-gradckpt golden record "
                                 f"(format {FORMAT}); record one with --gradckpt-record")
    return record


def _close(old: float, new: float, rtol: float) -> bool:
    return math.isclose(old, new, rel_tol=rtol, abs_tol=ATOL)


def differences(record: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """Old and new side by side for one result; empty when nothing changed.

    Example:
        >>> old = {"format": 1, "versions": {}, "results": {"t [r/train] m": {"outcome": "pass",
        ...        "fingerprint": {"loss": 1.0, "grad_norms": {"w": 0.12}, "activation_bytes": 100}}}}
        >>> new = {"test": "t", "strategy": "r", "scenario": "train", "model": "m", "outcome": "silent",
        ...        "metrics": {"fingerprint": {"loss": 1.0, "grad_norms": {"w": 0.0}, "activation_bytes": 100}}}
        >>> differences(old, new)
        ['t [r/train] m: outcome pass -> silent', 't [r/train] m: grad norm of w 0.12 -> 0']
    """
    name = key(result)
    golden = record["results"].get(name)
    if golden is None:
        return [f"{name}: not in the golden record (a new test, model, strategy or scenario); "
                "refresh the record with --gradckpt-record if that is intended"]
    found = []
    if golden["outcome"] != result["outcome"]:
        found.append(f"{name}: outcome {golden['outcome']} -> {result['outcome']}")
    old, new = golden.get("fingerprint") or {}, result.get("metrics", {}).get("fingerprint") or {}
    if old.get("loss") is not None and new.get("loss") is not None and not _close(old["loss"], new["loss"], RTOL):
        found.append(f"{name}: loss {old['loss']:.6g} -> {new['loss']:.6g}")
    old_norms, new_norms = old.get("grad_norms") or {}, new.get("grad_norms") or {}
    for parameter in sorted(set(old_norms) | set(new_norms)):
        before, after = old_norms.get(parameter), new_norms.get(parameter)
        if before is None or after is None:
            found.append(f"{name}: gradient of {parameter} {'absent' if before is None else f'{before:.3g}'} -> "
                         f"{'absent' if after is None else f'{after:.3g}'}")
        elif not _close(before, after, RTOL):
            found.append(f"{name}: grad norm of {parameter} {before:.3g} -> {after:.3g}")
    before, after = old.get("activation_bytes"), new.get("activation_bytes")
    if before and after is not None and not _close(before, after, MEMORY_RTOL):
        found.append(f"{name}: saved-activation peak {before:,} -> {after:,} bytes")
    return found
