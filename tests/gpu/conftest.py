"""GPU verdict campaigns as tests: ``make test-gpu`` (``pytest -m gpu tests/gpu``) on a CUDA machine.

A test marked ``@pytest.mark.gpu(gpus=N, needs=("module", ...))`` is skipped, with a reason naming
what it needs, where fewer than N CUDA devices are visible or a module it needs is missing; so on
the CPU CI (``make test``) these are collected and skipped, never failed. The campaigns themselves
(``campaigns/``, the scripts that produced the committed results) are run in subprocesses and not
collected for doctests.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

collect_ignore_glob = ["campaigns/*"]
ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def missing(gpus: int, needs: tuple[str, ...]) -> str | None:
    """Why a GPU test cannot run here, or ``None`` when it can.

    Example:
        >>> missing(0, ("json",)) is None
        True
        >>> missing(0, ("no_such_module_here",))
        'needs the Python module no_such_module_here (not importable here)'
    """
    absent = [name for name in needs if importlib.util.find_spec(name) is None]
    if absent:
        return f"needs the Python module{'s' * (len(absent) > 1)} {', '.join(absent)} (not importable here)"
    if gpus:
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < gpus:
            return (f"needs {gpus} CUDA GPU{'s' * (gpus > 1)}; this machine has {found} "
                    f"(make test-gpu PYTHON=python on a machine with {gpus})")
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        reason = missing(marker.kwargs.get("gpus", 1), tuple(marker.kwargs.get("needs", ())))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def recorded(name: str) -> Any:
    """A committed result file: what the campaign found when its result was committed."""
    return json.loads((RESULTS / name).read_text())
