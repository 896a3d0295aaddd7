"""What keeps a process able to fork GPU ranks, without importing torch (the pytest plugin uses it
before any test module is imported).

A GPU rank forked from a process that asked the CUDA runtime anything cannot use CUDA; the check
then spawns its ranks instead, which re-imports torch and the model's library and pickles what
the ranks need. ``torch.cuda.is_available()``, the usual first line of a test module
(``DEVICE = "cuda" if torch.cuda.is_available() else "cpu"``), asks the runtime unless
:data:`NVML_BASED_CUDA_CHECK` is set, when it asks NVML and leaves CUDA uninitialised. On one
H200, issue 21's gate, self-started in pytest with that line, took 15.3-17.8 s with its rank
spawned and 7.6-8.8 s forked with the switch set (issue 30, 3 runs each).
"""

from __future__ import annotations

import os
from collections.abc import Callable

#: torch's switch that makes ``torch.cuda.is_available()`` ask NVML instead of the CUDA runtime.
NVML_BASED_CUDA_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def ask_cuda_through_nvml() -> Callable[[], None]:
    """From now on ``torch.cuda.is_available()`` asks NVML (same answer, CUDA left uninitialised),
    unless the environment already says how to ask (a user's ``0`` is kept); returns what puts
    the environment back.

    Example:
        >>> before = os.environ.pop(NVML_BASED_CUDA_CHECK, None)
        >>> put_back = ask_cuda_through_nvml()
        >>> os.environ[NVML_BASED_CUDA_CHECK]
        '1'
        >>> put_back(); NVML_BASED_CUDA_CHECK in os.environ
        False
        >>> os.environ[NVML_BASED_CUDA_CHECK] = "0"
        >>> ask_cuda_through_nvml()(); os.environ[NVML_BASED_CUDA_CHECK]  # the user's word stands
        '0'
        >>> _ = os.environ.pop(NVML_BASED_CUDA_CHECK) if before is None else os.environ.update({NVML_BASED_CUDA_CHECK: before})
    """
    if NVML_BASED_CUDA_CHECK in os.environ:
        return lambda: None
    os.environ[NVML_BASED_CUDA_CHECK] = "1"
    return _unset


def _unset() -> None:
    os.environ.pop(NVML_BASED_CUDA_CHECK, None)
