"""The process-wide state a check touches: put back exactly afterwards (RNGs, autocast, grad mode,
warning filters), made deterministic for the check (CUDA kernels, seeds), and bounded in time.

(Named ``isolation`` before: running a step in a child process, which is isolation, lives in
:mod:`pytest_gradckpt.ranks.launcher` and :mod:`pytest_gradckpt.ranks.rank_group`.)
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from pytest_gradckpt.errors import StrategyTimeout
from pytest_gradckpt.ranks.forkable import NVML_BASED_CUDA_CHECK


def cuda_present() -> bool:
    """Whether CUDA devices are visible, asked without initialising CUDA in this process.

    ``torch.cuda.is_available()`` initialises the CUDA driver here, after which a forked process
    can no longer use CUDA; ``torch.cuda.device_count()`` asks NVML first. The check forks its
    GPU ranks where it can (no re-import, no second build), so it asks this way.

    Example:
        >>> cuda_present() == (torch.cuda.device_count() > 0)
        True
    """
    return torch.cuda.device_count() > 0


@contextlib.contextmanager
def cuda_asked_through_nvml() -> Iterator[None]:
    """Within the block, ``torch.cuda.is_available()`` asks NVML, as :func:`cuda_present` does; the
    environment is put back after. torch's checkpoint asks it when every argument is on the CPU
    (``torch.accelerator.current_accelerator()``, which picks the device whose random state it
    keeps); asked of the CUDA runtime, a GPU rank forked after it cannot use CUDA, and the check
    would spawn its ranks (7-10 s more per check on an H200) for its own warm-up's sake.

    Example:
        >>> before = os.environ.get(NVML_BASED_CUDA_CHECK)
        >>> with cuda_asked_through_nvml():
        ...     os.environ[NVML_BASED_CUDA_CHECK]
        '1'
        >>> os.environ.get(NVML_BASED_CUDA_CHECK) == before
        True
    """
    before = os.environ.get(NVML_BASED_CUDA_CHECK)
    os.environ[NVML_BASED_CUDA_CHECK] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NVML_BASED_CUDA_CHECK, None)
        else:
            os.environ[NVML_BASED_CUDA_CHECK] = before


class _ForkRefusal:
    """Whether a GPU rank forked from this process was refused CUDA or autograd (its parent had asked
    the CUDA runtime something before the fork): true for the rest of the process, so later groups
    are spawned at once instead of paying for a refused fork first. One fact about this process,
    kept here with the others; :func:`note_cuda_fork_refused` and :func:`cuda_fork_refused` read and
    write it."""

    refused = False


def note_cuda_fork_refused() -> None:
    """Remember for the rest of this process that its forked GPU ranks cannot use CUDA.

    Example:
        >>> _ForkRefusal.refused, before = False, _ForkRefusal.refused
        >>> note_cuda_fork_refused(); cuda_fork_refused()
        True
        >>> _ForkRefusal.refused = before
    """
    _ForkRefusal.refused = True


def cuda_fork_refused() -> bool:
    """Whether a GPU rank forked from this process found it could not use CUDA (see
    :func:`note_cuda_fork_refused`).

    Example:
        >>> isinstance(cuda_fork_refused(), bool)
        True
    """
    return _ForkRefusal.refused


@contextlib.contextmanager
def older_objects_left_to_refcounting() -> Iterator[None]:
    """For the block, the cyclic collector passes over every object that existed before it (``gc.freeze``):
    the caller's model, the libraries' modules. A full collection then costs what the check made, not
    the whole heap (a 1.1B PEFT model is a few hundred thousand objects). Nothing is lost: the objects are
    handed back to the collector after. Left alone when something else froze objects already.

    Example:
        >>> with older_objects_left_to_refcounting():
        ...     gc.get_freeze_count() > 0
        True
        >>> gc.get_freeze_count()
        0
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def leave_to_refcounting_for_good() -> None:
    """In a process that ends when its work does (a rank), every object alive now is passed over by the
    cyclic collector from now on: the model it built, the libraries. The collections a GPU rank may run
    between runs then cost what the runs made, not the model's heap (on one H200 a 1.1B LoRA check's
    rank spent 0.09 s collecting; its step commands, unexplained by 2.3 s before this and the reused
    copy, now add up). The objects are never handed back: the process exits instead. Only for ranks:
    in the caller's process this would keep cyclic garbage made before it for good.

    Example:
        >>> import subprocess, sys
        >>> code = ("from pytest_gradckpt.pipeline.process_state import leave_to_refcounting_for_good as f; "
        ...         "import gc; f(); print(gc.get_freeze_count() > 0)")
        >>> subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
        'True'
    """
    gc.freeze()


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    devices = ["cpu"] + (["cuda"] if cuda_present() else [])  # asked without initialising CUDA (forked ranks)
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
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
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
        if state["numpy_rng"] is not None and numpy is not None:
            numpy.random.set_state(state["numpy_rng"])
        torch.set_grad_enabled(state["grad"])
        for device, enabled, dtype in state["autocast"]:
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)
        torch.set_default_dtype(state["dtype"])
        torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
        warnings.filters[:] = state["filters"]  # type: ignore[index]  # a list at run time; typeshed: Sequence
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
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if seconds is None or not usable:
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


#: torch's message when an op has no deterministic kernel and determinism is strict.
_NO_DETERMINISTIC_KERNEL = "does not have a deterministic implementation"
#: cuBLAS's deterministic workspace setting (torch raises under strict determinism without it).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


class Determinism:
    """Deterministic CUDA kernels for the duration of a check; see :func:`deterministic_kernels`.

    ``note`` says what had to give way (empty when every op had a deterministic kernel).
    """

    def __init__(self, device: torch.device, compiled: bool = False):
        self.active = device.type == "cuda" and not compiled
        self.warn_only = False
        self.note = COMPILED_NOTE if device.type == "cuda" and compiled else ""

    def retrying(self, step: Any) -> Any:
        """``step`` rerun with ``warn_only=True`` when an op had no deterministic kernel.

        From then on every run of the check uses the relaxed setting, so the baseline and the
        strategies meet the same kernels; the baseline's measured noise covers the rest.
        """
        if not self.active:
            return step

        def run(*args: Any, **kwargs: Any) -> Any:
            result = step(*args, **kwargs)
            error = getattr(result, "error", None)
            if not self.warn_only and error is not None and _NO_DETERMINISTIC_KERNEL in str(error):
                self.warn_only = True
                torch.use_deterministic_algorithms(True, warn_only=True)
                op = str(error).split(" does not")[0].strip()[-120:]
                self.note = (f"{op} has no deterministic CUDA kernel: deterministic algorithms relaxed to "
                             "warn_only, and strategies judged against the baseline's measured run-to-run noise")
                result = step(*args, **kwargs)
            return result

        return run


#: Why a compiled subject's check leaves deterministic algorithms as the caller set them.
COMPILED_NOTE = ("the model is compiled: deterministic algorithms are left as the caller set them (on CUDA they "
                 "change which attention kernel SDPA picks, and so its dropout masks: the check would judge "
                 "another program; docs/compile.md)")


@contextlib.contextmanager
def deterministic_kernels(device: torch.device, compiled: bool = False) -> Iterator[Determinism]:
    """On CUDA, switch on deterministic algorithms for the block and restore every setting after.

    CUDA's default backward kernels (embedding backward, atomics in reductions and attention)
    are not deterministic: two bf16 steps differ in their last bits, and a comparison with the
    baseline would flip between pass and mismatch on unchanged code. So the check runs with
    ``torch.use_deterministic_algorithms(True)``; ``CUBLAS_WORKSPACE_CONFIG`` is set for the
    block because torch reads it at every matmul to decide whether cuBLAS may be used
    deterministically (cuBLAS on one stream, as here, is deterministic whatever the workspace
    size torch fixed when it first used it). ``fill_uninitialized_memory`` is switched off:
    filling every new allocation with NaN costs bandwidth and changes nothing a correct model
    reads. ``cudnn.benchmark`` is off, so convolution algorithms do not vary between runs.
    Elsewhere it does nothing, and so for a ``compiled`` subject: deterministic algorithms change
    which kernels run, and a compiled check judges the caller's compiled program as it runs (on an
    H200, SDPA with dropout picked the cuDNN kernel without them and the efficient or flash kernel
    with them, each drawing other dropout masks; docs/compile.md). Its baseline's second run still
    measures the run-to-run noise.

    Example:
        >>> with deterministic_kernels(torch.device("cpu")) as determinism:
        ...     determinism.active
        False
        >>> with deterministic_kernels(torch.device("cuda"), compiled=True) as determinism:
        ...     determinism.active, torch.are_deterministic_algorithms_enabled(), determinism.note[:22]
        (False, False, 'the model is compiled:')
    """
    determinism = Determinism(torch.device(device), compiled)
    if not determinism.active:
        yield determinism
        return
    import os

    from torch.utils import deterministic

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    if saved[4] not in (":4096:8", ":16:8"):  # the two values torch accepts as deterministic
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.use_deterministic_algorithms(True)
    deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    try:
        yield determinism
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        deterministic.fill_uninitialized_memory = saved[2]
        torch.backends.cudnn.benchmark = saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]
