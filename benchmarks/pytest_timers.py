"""The benchmarks' part timers in a pytest session, to see where a ``pytest --gradckpt`` run's checks
spend their time (issue 30: issue 21's gate, three strategies, self-started in pytest took
22.9-35.4 s on an H200, where a check of six strategies of that model outside pytest took 6-9 s;
these timers showed its rank spawned, after the test module's ``torch.cuda.is_available()``, until
the plugin asked CUDA through NVML: 7.6-8.8 s forked, docs/multi-gpu.md, session eight)::

    GRADCKPT_TIMERS_OUT=parts.json python -m pytest -p benchmarks.pytest_timers --gradckpt tests/gpu/campaigns/dist_gate.py

At the session's end ``$GRADCKPT_TIMERS_OUT`` holds ``{"parent": {part: seconds}, "rank <pid>":
{...}}`` (:func:`benchmarks.common.collect_timers`), summed over the session's checks. Forked ranks
inherit the timers; spawned ones do not import this module and report no parts (a result's
``metrics["ranks"]`` says when and why they were spawned).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    from benchmarks import common  # imports torch and the engine: not before pytest asks

    os.environ.setdefault("GRADCKPT_PROFILE_DIR", tempfile.mkdtemp(prefix="gradckpt-profile-"))
    os.environ["GRADCKPT_PROFILE_PARENT"] = str(os.getpid())
    common.install_timers()


def pytest_unconfigure(config: pytest.Config) -> None:
    from benchmarks import common

    out = os.environ.get("GRADCKPT_TIMERS_OUT")
    if out:
        parts = common.collect_timers(os.environ["GRADCKPT_PROFILE_DIR"])
        Path(out).write_text(json.dumps(parts, indent=1, sort_keys=True) + "\n")
