"""Throwaway virtual environments that differ from this one in a few pinned releases.

A new environment has its own site-packages first, then, for a torch release other than the
installed one, a cached *torch layer* (an environment holding only that torch and what it needs
differently: a CUDA build is several GB, so it is installed once and reused), then this
environment's site-packages. So everything not pinned is exactly what runs here, and only the
pinned releases and whatever they require differently are installed. The cache lives in
``$GRADCKPT_CACHE`` (default ``~/.cache/pytest-gradckpt``): ``torch-<version>/`` per torch
release, and ``wheels/``, which pip searches first (put downloaded wheels there to install offline).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path


class BuildError(Exception):
    """An environment could not be built; the message says why."""


def cache_root() -> Path:
    """Where torch layers and wheels are kept between runs.

    Example:
        >>> cache_root() == Path(os.environ.get("GRADCKPT_CACHE") or Path.home() / ".cache" / "pytest-gradckpt")
        True
    """
    configured = os.environ.get("GRADCKPT_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "pytest-gradckpt"


def installed(name: str) -> str | None:
    """The version of ``name`` installed here, or None.

    Example:
        >>> installed("pytest") is not None, installed("no-such-package-here")
        (True, None)
    """
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def same_release(wanted: str, have: str | None) -> bool:
    """``2.13.0`` is the release ``2.13.0+cpu`` is a build of.

    Example:
        >>> same_release("2.13.0", "2.13.0+cpu"), same_release("2.15.0", "2.13.0+cpu")
        (True, False)
    """
    return have is not None and (have == wanted or have.split("+")[0] == wanted)


def size_bytes(folder: Path) -> int:
    """Bytes under ``folder`` (links not followed)."""
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _own_site(folder: Path) -> Path:
    found = subprocess.run([str(folder / "bin" / "python"), "-c",
                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True)
    return Path(found.stdout.strip())


def make_venv(folder: Path, behind: list[Path], mirror: bool = True) -> Path:
    """A virtual environment in ``folder`` whose packages come first, then ``behind``'s, then (with
    ``mirror``) this environment's; returns its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    own = _own_site(folder)
    if not mirror:
        return own
    # site.addsitedir also reads those folders' .pth files: editable installs (this project's
    # own, say) and a torch layer's own mirror of this environment work there too.
    mirrored = [*map(str, behind), sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    lines = [f"import site; site.addsitedir({path!r})" for path in dict.fromkeys(mirrored)]
    (own / "_gradckpt_mirror.pth").write_text("\n".join(lines) + "\n")
    return own


def pip_install(folder: Path, requirements: list[str], torch: str | None, log: Callable[[str], None]) -> None:
    """``pip install`` ``requirements`` into ``folder``'s environment with torch held at ``torch``."""
    pins = folder / "constraints.txt"
    pins.write_text(f"torch=={torch}\n" if torch else "")
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"venv: installing {' '.join(requirements)} ...")
    done = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "--find-links", str(wheels), *requirements, "-c", str(pins)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "pip failed"
        raise BuildError(last)


def torch_layer(version: str, log: Callable[[str], None]) -> Path | None:
    """The cached site-packages holding torch ``version`` (built on first use); None when that
    release is the one installed here."""
    if same_release(version, installed("torch")):
        return None
    folder = cache_root() / f"torch-{version}"
    complete = folder / ".complete"
    if complete.exists():
        return _own_site(folder)
    shutil.rmtree(folder, ignore_errors=True)  # a half-built layer from an interrupted run
    started = time.perf_counter()
    # Self-contained (torch and everything it needs), so one layer serves every environment.
    make_venv(folder, [], mirror=False)
    pip_install(folder, [f"torch=={version}"], None, log)
    seconds = time.perf_counter() - started
    complete.write_text(f"{seconds:.0f} s, {size_bytes(folder)} bytes\n")
    log(f"venv: torch {version} layer built in {seconds:.0f} s, {size_bytes(folder) / 1e9:.2f} GB, "
        f"cached in {folder}")
    return _own_site(folder)


class Environment:
    """A throwaway environment with ``pins`` (``{"transformers": "5.24.0", "torch": "2.15.0"}``)
    installed on top of this one; torch stays at the installed release unless pinned."""

    def __init__(self, pins: dict[str, str], folder: Path):
        self.pins, self.folder = pins, folder
        self.python = folder / "bin" / "python"

    def create(self, log: Callable[[str], None]) -> None:
        torch = self.pins.get("torch")
        layer = torch_layer(torch, log) if torch else None
        make_venv(self.folder, [layer] if layer else [])
        # A pin this environment already meets needs no install: the mirror provides it.
        rest = [f"{name}=={version}" for name, version in self.pins.items()
                if name != "torch" and not same_release(version, installed(name))]
        if rest:
            pip_install(self.folder, rest, torch or installed("torch"), log)

    def run_pytest(self, pytest_args: list[str], cwd: Path) -> tuple[int, str]:
        """Run ``pytest --gradckpt --gradckpt-bisect PYTEST_ARGS`` there: (exit status, output)."""
        command = [str(self.python), "-m", "pytest", "--gradckpt", "--gradckpt-bisect", "-p", "no:cacheprovider",
                   "-q", *pytest_args]
        finished = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return finished.returncode, (finished.stdout + finished.stderr)
