"""Ranks stay forkable in a ``--gradckpt`` session: from before the first conftest is imported,
``torch.cuda.is_available()`` asks NVML (:func:`pytest_gradckpt.ranks.forkable.ask_cuda_through_nvml`),
so a test module that asks it at import leaves CUDA uninitialised and the checks' GPU ranks are
forked, not spawned; the environment is put back when the session ends.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_gradckpt.ranks.forkable import ask_cuda_through_nvml

#: what puts the environment back, where this session changed it
PUT_BACK = pytest.StashKey[Callable[[], None]]()


@pytest.hookimpl(tryfirst=True)  # pytest's own implementation imports the initial conftests
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    namespace = early_config.known_args_namespace
    if getattr(namespace, "gradckpt", False) or early_config.getini("gradckpt"):
        early_config.stash[PUT_BACK] = ask_cuda_through_nvml()


def put_back(config: pytest.Config) -> None:
    """Undo :func:`pytest_load_initial_conftests` (at the session's end)."""
    config.stash.get(PUT_BACK, lambda: None)()
