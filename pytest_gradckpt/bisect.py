"""Find the release of a package that changed a checkpointing verdict.

``python -m pytest_gradckpt bisect PACKAGE GOOD BAD [-- PYTEST_ARGS...]`` lists the released
versions of PACKAGE between GOOD and BAD on the package index, and binary-searches them.
Each candidate is installed into a throwaway virtual environment that otherwise mirrors the
current one: the current environment's site-packages are on its path, behind its own, so
everything else (the pinned torch included) is exactly what you run now, and only the
candidate and whatever it requires differently are installed. In it, ``pytest --gradckpt
--gradckpt-bisect PYTEST_ARGS`` runs in the current directory: exit 0 is good, 1 bad, 125
"cannot test this one" (skipped, as ``git bisect`` does). The last lines say
``first bad: X (last good: Y)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

GOOD, BAD, SKIP = "good", "bad", "skip"


class BisectError(Exception):
    """The bisect cannot go on; the message says why and what to do."""


def released_versions(package: str, python: str = sys.executable) -> list[Version]:
    """Every version of ``package`` the package index offers, oldest first (``pip index versions``)."""
    found = subprocess.run([python, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"],
                           capture_output=True, text=True)
    match = re.search(r"Available versions:\s*(.+)", found.stdout)
    if found.returncode != 0 or not match:
        raise BisectError(f"could not list the versions of {package!r} on the package index: "
                          f"{(found.stderr or found.stdout).strip()[:300]}")
    versions = []
    for text in match.group(1).split(","):
        try:
            versions.append(Version(text.strip()))
        except InvalidVersion:
            continue
    return sorted(versions)


def between(versions: list[Version], good: Version, bad: Version) -> list[Version]:
    """GOOD, every release strictly between, BAD, in order; pre-releases only if an end is one.

    Example:
        >>> between([Version(v) for v in ["5.0.0", "5.1.0rc1", "5.1.0", "5.2.0", "5.3.0"]],
        ...         Version("5.0.0"), Version("5.2.0"))
        [<Version('5.0.0')>, <Version('5.1.0')>, <Version('5.2.0')>]
    """
    if not good < bad:
        raise BisectError(f"GOOD ({good}) must be older than BAD ({bad})")
    pre = good.is_prerelease or bad.is_prerelease
    inside = [v for v in versions if good < v < bad and (pre or not v.is_prerelease)]
    return [good, *inside, bad]


@dataclasses.dataclass
class Outcome:
    version: Version
    verdict: str
    seconds: float
    detail: str = ""


def search(versions: list[Version], test: Callable[[Version], Outcome], log: Callable[[str], None]
           ) -> tuple[Version | None, Version | None, list[Version]]:
    """Binary search for the first bad version, given ``versions[0]`` good and ``versions[-1]`` bad.

    Returns (first bad, last good, versions between them that could not be tested). With
    skips, the first bad is only known to lie in a range, which the third item names.

    Example:
        >>> vs = [Version(f"1.{i}") for i in range(8)]
        >>> bad_from = Version("1.5")
        >>> fake = lambda v: Outcome(v, BAD if v >= bad_from else GOOD, 0.0)
        >>> search(vs, fake, lambda line: None)[:2]
        (<Version('1.5')>, <Version('1.4')>)
    """
    good, bad = 0, len(versions) - 1
    skipped: set[int] = set()
    while True:
        untested = [i for i in range(good + 1, bad) if i not in skipped]
        if not untested:
            between_skipped = [versions[i] for i in range(good + 1, bad)]
            return versions[bad], versions[good], between_skipped
        middle = (good + bad) // 2
        index = min(untested, key=lambda i: (abs(i - middle), i))
        steps = max(1, len(untested).bit_length())
        log(f"bisect: {len(untested)} release(s) left to test (about {steps} more step(s)); "
            f"testing {versions[index]}")
        outcome = test(versions[index])
        log(f"bisect: {versions[index]} is {outcome.verdict} ({outcome.seconds:.0f} s){outcome.detail}")
        if outcome.verdict == GOOD:
            good = index
        elif outcome.verdict == BAD:
            bad = index
        else:
            skipped.add(index)


class Candidate:
    """A throwaway environment: this one's packages, with ``package==version`` installed on top."""

    def __init__(self, package: str, version: Version, folder: Path):
        self.package, self.version, self.folder = package, version, folder
        self.python = folder / "bin" / "python"

    def create(self, log: Callable[[str], None]) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(self.folder)], check=True, capture_output=True)
        own = Path(subprocess.run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
        # This environment's packages, behind the candidate's own: site.addsitedir also reads
        # their .pth files, so editable installs (this project's own, say) work there too.
        mirrored = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
        lines = [f"import site; site.addsitedir({path!r})" for path in dict.fromkeys(mirrored)]
        (own / "_gradckpt_mirror.pth").write_text("\n".join(lines) + "\n")
        pins = self.folder / "constraints.txt"
        pins.write_text("".join(f"{name}=={metadata.version(name)}\n" for name in ("torch",)
                                if _installed(name) and name != self.package))
        log(f"bisect: installing {self.package}=={self.version} ...")
        installed = subprocess.run([str(self.python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                    f"{self.package}=={self.version}", "-c", str(pins)],
                                   capture_output=True, text=True)
        if installed.returncode != 0:
            raise BisectError(installed.stderr.strip().splitlines()[-1] if installed.stderr.strip() else "pip failed")

    def run_pytest(self, pytest_args: list[str], cwd: Path) -> tuple[int, str]:
        command = [str(self.python), "-m", "pytest", "--gradckpt", "--gradckpt-bisect", "-p", "no:cacheprovider",
                   "-q", *pytest_args]
        finished = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return finished.returncode, (finished.stdout + finished.stderr)


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def tester(package: str, pytest_args: list[str], workspace: Path, log: Callable[[str], None]
           ) -> Callable[[Version], Outcome]:
    cwd = Path.cwd()

    def test(version: Version) -> Outcome:
        started = time.perf_counter()
        candidate = Candidate(package, version, workspace / f"{package}-{version}")
        try:
            candidate.create(log)
        except BisectError as error:
            return Outcome(version, SKIP, time.perf_counter() - started, f": cannot install it: {error}")
        code, output = candidate.run_pytest(pytest_args, cwd)
        summary = next((line for line in reversed(output.splitlines()) if line.strip()), "")
        seconds = time.perf_counter() - started
        if code == 0:
            return Outcome(version, GOOD, seconds, f": {summary}")
        if code == 1:
            return Outcome(version, BAD, seconds, f": {summary}")
        if code == 125:
            return Outcome(version, SKIP, seconds, f": cannot be tested with it ({summary})")
        raise BisectError(f"pytest exited {code} under {package}=={version}, a setup problem rather than a verdict; "
                          f"its output ended with:\n{output[-2000:]}")

    return test


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_gradckpt bisect",
                                     description="Find the release of PACKAGE that changed a checkpointing verdict.")
    parser.add_argument("package", help="e.g. transformers, torch, peft, bitsandbytes")
    parser.add_argument("good", help="a version whose run passes")
    parser.add_argument("bad", help="a later version whose run fails")
    parser.add_argument("--no-verify", action="store_true", help="trust GOOD and BAD instead of running them first")
    parser.add_argument("--keep", metavar="DIR", help="keep the environments in DIR (default: a temporary folder)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments for pytest")
    args = parser.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        good, bad = Version(args.good), Version(args.bad)
        versions = between(released_versions(args.package), good, bad)
        log(f"bisect: {args.package}: {len(versions) - 2} release(s) between {good} and {bad}")
        with tempfile.TemporaryDirectory(prefix="gradckpt-bisect-") as temporary:
            workspace = Path(args.keep or temporary)
            workspace.mkdir(parents=True, exist_ok=True)
            test = tester(args.package, pytest_args, workspace, log)
            if not args.no_verify:
                for version, wanted in ((good, GOOD), (bad, BAD)):
                    log(f"bisect: checking that {version} is {wanted}")
                    outcome = test(version)
                    log(f"bisect: {version} is {outcome.verdict} ({outcome.seconds:.0f} s){outcome.detail}")
                    if outcome.verdict != wanted:
                        raise BisectError(f"{args.package} {version} is {outcome.verdict}, not {wanted}: pick "
                                          f"{'an older GOOD' if wanted == GOOD else 'a later BAD'} version")
            first_bad, last_good, untested = search(versions, test, log)
    except (BisectError, InvalidVersion) as error:
        print(f"bisect: error: {error}", file=sys.stderr)
        return 2
    if untested:
        log(f"could not test: {', '.join(map(str, untested))}; the first bad release is one of them or {first_bad}")
    log(f"first bad: {first_bad} (last good: {last_good})")
    return 0
