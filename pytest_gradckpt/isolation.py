"""Leave no trace: the process-wide state a check touches is put back exactly."""

from __future__ import annotations

import contextlib
import random
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from pytest_gradckpt.errors import StrategyTimeout


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore RNG states (torch, CUDA, random, numpy), grad mode, autocast, default dtype,
    deterministic-algorithm settings and warning filters on exit, however the block ends.

    Example:
        >>> before = torch.get_rng_state()
        >>> with preserved_global_state():
        ...     _ = torch.rand(3); _ = torch.set_grad_enabled(False)
        >>> torch.equal(before, torch.get_rng_state()), torch.is_grad_enabled()
        (True, True)
    """
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy = sys.modules.get("numpy")
    state: dict[str, Any] = {
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": numpy.random.get_state() if numpy is not None else None,
        "grad": torch.is_grad_enabled(),
        "autocast": _autocast_state(),
        "dtype": torch.get_default_dtype(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "filters": list(warnings.filters),
    }
    try:
        yield
    finally:
        torch.set_rng_state(state["torch_rng"])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(state["python_rng"])
        if state["numpy_rng"] is not None:
            numpy.random.set_state(state["numpy_rng"])
        torch.set_grad_enabled(state["grad"])
        for device, enabled, dtype in state["autocast"]:
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)
        torch.set_default_dtype(state["dtype"])
        torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
        warnings.filters[:] = state["filters"]
        warnings._filters_mutated()  # type: ignore[attr-defined]  # invalidates the once/default registries


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed ``random``, torch's CPU generator and, for a CUDA run, the CUDA generators, so
    every run draws the same numbers.

    A CPU run leaves CUDA alone: a rank forked from a process that already used CUDA must
    not touch it (``torch.manual_seed`` would, and fail there).

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0)
        >>> torch.equal(a, torch.rand(1))
        True
    """
    random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`StrategyTimeout` in the block once ``seconds`` have passed.

    Uses ``SIGALRM``, so it works in the main thread on POSIX (pytest and xdist
    workers run tests there) and interrupts Python code and sleeps; elsewhere it
    does nothing. A hang inside one native call is only interrupted when that
    call returns to Python.

    Example:
        >>> import time
        >>> try:
        ...     with deadline(0.05):
        ...         time.sleep(1)
        ... except StrategyTimeout as e:
        ...     print(e)
        timed out after 0.05 s
    """
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise StrategyTimeout(f"timed out after {seconds:g} s")

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer[0] > 0:  # someone else's alarm (e.g. pytest-timeout) keeps running
            signal.setitimer(signal.ITIMER_REAL, *previous_timer)
