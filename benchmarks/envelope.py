"""The one result envelope every suite's rows are written in, and the one function that writes it.

Every file the runner writes has the same shape (``SCHEMA`` names its version)::

    {"schema": "gradckpt-benchmark/1", "suite": ..., "case": ..., "params": {...},
     "commit": "<40 hex>", "dirty": false, "date": "2026-12-02T19:00:00+00:00",
     "machine": {"device": ..., "cpus": ..., "gpus": ...}, "versions": {"python": ..., "torch": ...},
     "rows": [...]}

Historic files in ``results/`` predate it (``results/README.md`` lists their shapes).

Example:
    >>> document = envelope("check-cost", "tiny-cpu", {"repeats": 1}, rows=[{"case": "tiny-cpu"}])
    >>> sorted(document) == sorted(ENVELOPE_KEYS)
    True
    >>> document["schema"], document["suite"], len(document["commit"])
    ('gradckpt-benchmark/1', 'check-cost', 40)
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

SCHEMA = "gradckpt-benchmark/1"
ENVELOPE_KEYS = ("schema", "suite", "case", "params", "commit", "dirty", "date", "machine", "versions", "rows")
ROOT = Path(__file__).resolve().parents[1]
#: distributions whose versions every envelope records (absent ones are left out)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "lightning", "trl", "bitsandbytes",
            "diffusers", "timm", "torchvision", "unsloth", "unsloth_zoo", "llamafactory", "pytest-gradckpt")


def _git(*args: str) -> str:
    """A git command's output in this checkout; a checkout copied without ``.git`` has no commit to name."""
    found = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if found.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {ROOT}: {found.stderr.strip()}. The envelope names the "
                           f"commit measured: run from a git checkout, or set GRADCKPT_COMMIT and GRADCKPT_DIRTY "
                           f"(0 or 1) when the tree was copied without .git")
    return found.stdout.strip()


def source() -> tuple[str, bool]:
    """The commit measured and whether the tree differed from it (``GRADCKPT_COMMIT``/``GRADCKPT_DIRTY``
    name them where the tree travelled without ``.git``, as on the GPU machine)."""
    given = os.environ.get("GRADCKPT_COMMIT")
    if given:
        if not (7 <= len(given) <= 40 and all(c in "0123456789abcdef" for c in given)):
            raise ValueError(f"GRADCKPT_COMMIT={given!r} is not a commit: give git rev-parse HEAD of the tree copied")
        return given, os.environ.get("GRADCKPT_DIRTY", "1") != "0"
    return _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--untracked-files=no"))


def machine() -> dict[str, Any]:
    """The device the rows were measured on (the first GPU's name, or the CPU's), CPU and GPU counts."""
    import torch

    from benchmarks.common import gpu_name

    # Asked without initialising CUDA here (NVML): the next case's check may still fork its GPU ranks.
    gpus = torch.cuda.device_count()
    device = gpu_name() if gpus else (platform.processor() or platform.machine())
    return {"device": device, "cpus": os.cpu_count(), "gpus": gpus, "platform": platform.platform()}


def versions() -> dict[str, str]:
    """Python's version and every installed distribution of ``PACKAGES``."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def envelope(suite: str, case: str, params: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The document for one case's rows (see the module's docstring)."""
    commit, dirty = source()
    return {"schema": SCHEMA, "suite": suite, "case": case, "params": params, "commit": commit, "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(), "rows": rows}


def default_path(suite: str, case: str, folder: Path | None = None) -> Path:
    """``<suite>-<case>-<device>-<date>.json`` in ``folder``, else ``$OUT``, else ``benchmarks/results/``."""
    folder = folder or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    device = machine()["device"].replace(" ", "-") or "cpu"
    return folder / f"{suite}-{case}-{device}-{datetime.date.today().isoformat()}.json"


def write_envelope(path: Path, suite: str, case: str, params: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """Write one case's envelope (the whole file, rewritten after each row, so a run cut short keeps what it
    measured). Only the first rank of a torchrun world writes.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "out.json"
        >>> json.loads(write_envelope(path, "zoo-sweep", "all", {}, [{"a": 1}]).read_text())["rows"]
        [{'a': 1}]
    """
    if os.environ.get("RANK", "0") != "0":
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(envelope(suite, case, params, rows), indent=1) + "\n")
    return path
