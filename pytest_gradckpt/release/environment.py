"""Versions of everything that decides how checkpointing behaves, without importing it."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def package_versions() -> dict[str, str]:
    """Installed versions from package metadata (nothing is imported); absent packages are left out.

    Example:
        >>> "python" in package_versions()
        True
    """
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def device_versions() -> dict[str, str]:
    """CUDA and device facts; imports torch only if the caller already did.

    Example:
        >>> isinstance(device_versions(), dict)
        True
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    from pytest_gradckpt.pipeline.process_state import cuda_present  # torch is imported by now

    facts = {"cuda": str(torch.version.cuda or "none")}
    if cuda_present():  # asked without initialising CUDA here (the check forks its GPU ranks)
        facts["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_initialized() else _nvml_name(torch)
    else:
        facts["device"] = "cpu"
    return facts


def _nvml_name(torch: Any) -> str:
    """The first visible GPU's name from NVML, which leaves CUDA uninitialised in this process
    (``torch.cuda.get_device_name`` initialises it); through CUDA where NVML cannot tell."""
    from ctypes import CDLL, byref, c_void_p, create_string_buffer

    try:
        nvml = CDLL("libnvidia-ml.so.1")
        handle, name = c_void_p(), create_string_buffer(96)
        if nvml.nvmlInit() == 0 and nvml.nvmlDeviceGetHandleByIndex_v2(
                torch.cuda._get_nvml_device_index(0), byref(handle)) == 0 and nvml.nvmlDeviceGetName(
                handle, name, 96) == 0:
            return name.value.decode()
    except Exception:  # noqa: BLE001 - no NVML, or torch's private helper moved: ask CUDA
        pass
    return str(torch.cuda.get_device_name(0))


def versions() -> dict[str, str]:
    """:func:`package_versions` plus :func:`device_versions`."""
    return {**package_versions(), **device_versions()}
