"""Run test files under another transformers release, in a throwaway environment built as
``make matrix`` builds them (this environment's packages behind the release's own, torch pinned).

``python tests/release_line.py 4.57.6 [--with PKG==VER ...] TESTS...`` (``make trainers-4.57``): ``--with``
installs more pins beside that release (4.57's older huggingface_hub needs an older ``datasets``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.version import Version

from pytest_gradckpt.release.bisect import Candidate


def main(argv: list[str]) -> int:
    """Build the environment, run pytest on ``argv[1:]`` there, return pytest's exit status."""
    release, rest = argv[0], argv[1:]
    extra = [rest[i + 1] for i, arg in enumerate(rest) if arg == "--with"]
    tests = [arg for i, arg in enumerate(rest) if arg != "--with" and (i == 0 or rest[i - 1] != "--with")]
    with tempfile.TemporaryDirectory(prefix="gradckpt-line-") as scratch:
        candidate = Candidate("transformers", Version(release), Path(scratch) / f"transformers-{release}")
        candidate.create(print)
        if extra:
            pins = [f"transformers=={release}", *extra]
            subprocess.run([str(candidate.python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            *pins], check=True)
        command = [str(candidate.python), "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", *tests]
        return subprocess.run(command, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
