"""Find the release of a package that changed a checkpointing verdict, in either direction.

``python -m pytest_gradckpt bisect PACKAGE OLD NEW [-- PYTEST_ARGS...]`` lists the released
versions of PACKAGE between OLD and NEW on the package index, and binary-searches them.
Each candidate is installed into a throwaway virtual environment that otherwise mirrors the
current one (:mod:`pytest_gradckpt.release.venvs`: torch releases, CUDA builds included, come from a
cached layer), so only the candidate and whatever it requires differently change. In it,
``pytest --gradckpt --gradckpt-bisect PYTEST_ARGS`` runs in the current directory: exit 0 is
good, 1 bad, 125 "cannot test this one" (skipped, as ``git bisect`` does). The two ends run
first and tell the direction, in git bisect's old/new terms: OLD good and NEW bad ends with
``first bad: X (last good: Y)`` (the release that broke the check); OLD bad and NEW good ends
with ``first good: X (last bad: Y)`` (the release from which the hazard is gone).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from packaging.version import InvalidVersion, Version

from pytest_gradckpt.release.venvs import BuildError, Environment

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
    """OLD, every release strictly between, NEW, in order; pre-releases only if an end is one.

    Example:
        >>> between([Version(v) for v in ["5.0.0", "5.1.0rc1", "5.1.0", "5.2.0", "5.3.0"]],
        ...         Version("5.0.0"), Version("5.2.0"))
        [<Version('5.0.0')>, <Version('5.1.0')>, <Version('5.2.0')>]
        >>> between([Version(v) for v in ["2.13.0", "2.13.0+cpu", "2.14.1", "2.15.0"]], Version("2.13.0"),
        ...         Version("2.15.0"))
        [<Version('2.13.0')>, <Version('2.14.1')>, <Version('2.15.0')>]
    """
    if not good < bad:
        raise BisectError(f"OLD ({good}) must be older than NEW ({bad})")
    pre = good.is_prerelease or bad.is_prerelease
    # A local build (2.13.0+cpu) is not a release of its own: it sorts after 2.13.0.
    inside = [v for v in versions if good < v < bad and (pre or not v.is_prerelease) and not v.local]
    return [good, *inside, bad]


@dataclasses.dataclass
class Outcome:
    version: Version
    verdict: str
    seconds: float
    detail: str = ""


def search(versions: list[Version], test: Callable[[Version], Outcome], log: Callable[[str], None],
           old: str = GOOD) -> tuple[Version | None, Version | None, list[Version]]:
    """Binary search for the first "new" version, given ``versions[0]`` old and ``versions[-1]`` new.

    ``old`` is the verdict of ``versions[0]`` (git bisect's *old* term): ``good`` looks for the
    first bad release (a break), ``bad`` for the first good one (a fix). Returns (first new,
    last old, versions between them that could not be tested). With skips, the first new is
    only known to lie in a range, which the third item names.

    Example:
        >>> vs = [Version(f"1.{i}") for i in range(8)]
        >>> fake = lambda v: Outcome(v, BAD if v >= Version("1.5") else GOOD, 0.0)
        >>> search(vs, fake, lambda line: None)[:2]
        (<Version('1.5')>, <Version('1.4')>)
        >>> fixed = lambda v: Outcome(v, GOOD if v >= Version("1.3") else BAD, 0.0)
        >>> search(vs, fixed, lambda line: None, old=BAD)[:2]
        (<Version('1.3')>, <Version('1.2')>)
    """
    first_old, first_new = 0, len(versions) - 1
    skipped: set[int] = set()
    while True:
        untested = [i for i in range(first_old + 1, first_new) if i not in skipped]
        if not untested:
            return versions[first_new], versions[first_old], [versions[i] for i in range(first_old + 1, first_new)]
        middle = (first_old + first_new) // 2
        index = min(untested, key=lambda i: (abs(i - middle), i))
        steps = max(1, len(untested).bit_length())
        log(f"bisect: {len(untested)} release(s) left to test (about {steps} more step(s)); "
            f"testing {versions[index]}")
        outcome = test(versions[index])
        log(f"bisect: {versions[index]} is {outcome.verdict} ({outcome.seconds:.0f} s){outcome.detail}")
        if outcome.verdict == SKIP:
            skipped.add(index)
        elif outcome.verdict == old:
            first_old = index
        else:
            first_new = index


def direction(old: Outcome, new: Outcome) -> str:
    """The verdict of the old end (``good``: find a break; ``bad``: find a fix), told from the two
    verifying runs; a clear error when they cannot frame a search.

    Example:
        >>> v = Version("1.0")
        >>> direction(Outcome(v, GOOD, 0), Outcome(v, BAD, 0)), direction(Outcome(v, BAD, 0), Outcome(v, GOOD, 0))
        ('good', 'bad')
    """
    for end, outcome in (("OLD", old), ("NEW", new)):
        if outcome.verdict == SKIP:
            raise BisectError(f"{end} ({outcome.version}) cannot be tested{outcome.detail}: pick another release")
    if old.verdict == new.verdict:
        raise BisectError(f"both {old.version} and {new.version} are {old.verdict}: nothing changed between "
                          "them; pick an OLD where the check behaves differently from NEW")
    return old.verdict


def bisect(versions: list[Version], test: Callable[[Version], Outcome], log: Callable[[str], None],
           verify: bool = True, old: str = GOOD) -> str:
    """Test both ends (unless ``verify`` is False: then ``old`` is the old end's verdict), tell the
    direction, search, and return the conclusion: ``first bad: X (last good: Y)`` for a break,
    ``first good: X (last bad: Y)`` for a fix.

    Example:
        >>> vs = [Version(f"2.{i}") for i in range(6)]
        >>> bisect(vs, lambda v: Outcome(v, GOOD if v >= Version("2.4") else BAD, 0.0), lambda line: None)
        'first good: 2.4 (last bad: 2.3)'
    """
    if verify:
        ends = []
        for version in (versions[0], versions[-1]):
            log(f"bisect: testing {version}")
            outcome = test(version)
            log(f"bisect: {version} is {outcome.verdict} ({outcome.seconds:.0f} s){outcome.detail}")
            ends.append(outcome)
        old = direction(*ends)
        log(f"bisect: {versions[0]} is {old} and {versions[-1]} is {_other(old)}: looking for the first "
            f"{_other(old)} release ({'a fix' if old == BAD else 'a break'})")
    first_new, last_old, untested = search(versions, test, log, old=old)
    new = _other(old)
    if untested:
        log(f"could not test: {', '.join(map(str, untested))}; the first {new} release is one of them or {first_new}")
    return f"first {new}: {first_new} (last {old}: {last_old})"


def _other(verdict: str) -> str:
    return BAD if verdict == GOOD else GOOD


class Candidate(Environment):
    """A throwaway environment: this one's packages, with ``package==version`` installed on top
    (a torch release through the cached torch layer, see :mod:`pytest_gradckpt.release.venvs`)."""

    def __init__(self, package: str, version: Version, folder: Path):
        super().__init__({package: str(version)}, folder)
        self.package, self.version = package, version

    def create(self, log: Callable[[str], None]) -> None:
        try:
            super().create(log)
        except BuildError as error:
            raise BisectError(str(error)) from None


def make_tester(package: str, pytest_args: list[str], workspace: Path, log: Callable[[str], None],
           installer: Callable[[str, Version, Path], Candidate] = Candidate) -> Callable[[Version], Outcome]:
    """``version -> Outcome``: install ``package==version`` with ``installer`` (a :class:`Candidate`
    unless a test passes a fake), run pytest there, and read its exit status."""
    cwd = Path.cwd()

    def test(version: Version) -> Outcome:
        started = time.perf_counter()
        candidate = installer(package, version, workspace / f"{package}-{version}")
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
    parser = argparse.ArgumentParser(
        prog="python -m pytest_gradckpt bisect",
        description="Find the release of PACKAGE that changed a checkpointing verdict: the first bad one when OLD "
                    "passes and NEW fails (a break), the first good one when OLD fails and NEW passes (a fix).")
    parser.add_argument("package", help="e.g. transformers, torch, peft, bitsandbytes")
    parser.add_argument("old", help="the older release")
    parser.add_argument("new", help="a newer release whose run has the other verdict")
    parser.add_argument("--no-verify", action="store_true",
                        help="trust that OLD passes and NEW fails (with --fix: the reverse) instead of running them")
    parser.add_argument("--fix", action="store_true", help="with --no-verify: OLD fails and NEW passes")
    parser.add_argument("--keep", metavar="DIR", help="keep the environments in DIR (default: a temporary folder)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments for pytest")
    args = parser.parse_args(argv)
    pytest_args = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        old, new = Version(args.old), Version(args.new)
        versions = between(released_versions(args.package), old, new)
        log(f"bisect: {args.package}: {len(versions) - 2} release(s) between {old} and {new}")
        with tempfile.TemporaryDirectory(prefix="gradckpt-bisect-") as temporary:
            workspace = Path(args.keep or temporary)
            workspace.mkdir(parents=True, exist_ok=True)
            test = make_tester(args.package, pytest_args, workspace, log)
            conclusion = bisect(versions, test, log, verify=not args.no_verify, old=BAD if args.fix else GOOD)
    except (BisectError, InvalidVersion) as error:
        print(f"bisect: error: {error}", file=sys.stderr)
        return 2
    log(conclusion)
    return 0
