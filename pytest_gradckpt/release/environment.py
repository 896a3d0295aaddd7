"""Versions of everything that decides how checkpointing behaves, without importing it."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

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
    facts = {"cuda": str(torch.version.cuda or "none")}
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name(0)
    else:
        facts["device"] = "cpu"
    return facts


def versions() -> dict[str, str]:
    """:func:`package_versions` plus :func:`device_versions`."""
    return {**package_versions(), **device_versions()}
