"""The release bisect's search, without touching the package index."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.version import Version

from pytest_gradckpt.release.bisect import (BAD, GOOD, SKIP, BisectError, Outcome, between, bisect, direction, make_tester,
                                    search)

VERSIONS = [Version(v) for v in ("5.15.0", "5.15.1", "5.16.0", "5.17.0", "5.18.0rc1", "5.18.0", "5.19.0",
                                 "5.20.0", "5.21.0", "5.22.0", "5.22.1", "5.23.0")]


def fake(first_bad, skip=()):
    tested = []

    def test(version):
        tested.append(version)
        if str(version) in skip:
            return Outcome(version, SKIP, 0.0)
        return Outcome(version, BAD if version >= Version(first_bad) else GOOD, 0.0)

    return test, tested


@pytest.mark.parametrize("first_bad", ["5.15.1", "5.18.0", "5.22.1", "5.23.0"])
def test_finds_the_first_bad_release(first_bad):
    candidates = between(VERSIONS, Version("5.15.0"), Version("5.23.0"))
    test, tested = fake(first_bad)
    found, last_good, untested = search(candidates, test, lambda line: None)
    assert str(found) == first_bad and untested == []
    assert last_good == candidates[candidates.index(found) - 1]
    assert len(tested) <= 4  # log2 of 10 candidates, rounded up


def test_pre_releases_are_left_out_unless_an_end_is_one():
    assert Version("5.18.0rc1") not in between(VERSIONS, Version("5.15.0"), Version("5.23.0"))
    assert Version("5.18.0rc1") in between(VERSIONS, Version("5.18.0rc1"), Version("5.23.0"))


def test_untestable_releases_are_skipped_and_named():
    candidates = between(VERSIONS, Version("5.15.0"), Version("5.23.0"))
    test, _ = fake("5.20.0", skip={"5.19.0", "5.20.0"})
    found, last_good, untested = search(candidates, test, lambda line: None)
    assert (str(found), str(last_good)) == ("5.21.0", "5.18.0")
    assert [str(v) for v in untested] == ["5.19.0", "5.20.0"]


def test_good_must_be_older_than_bad():
    with pytest.raises(BisectError, match="must be older"):
        between(VERSIONS, Version("5.23.0"), Version("5.15.0"))


# --------------------------------------------------------------------------- both directions, fake installer

TORCH = [Version(v) for v in ("2.12.0", "2.12.1", "2.13.0", "2.14.0", "2.14.1", "2.15.0")]


class FakeInstaller:
    """Stands in for :class:`Candidate`: "installs" instantly and "runs pytest" as a table says."""

    def __init__(self, passes_from=None, fails_from=None, uninstallable=()):
        self.passes_from, self.fails_from, self.uninstallable = passes_from, fails_from, set(uninstallable)
        self.installed = []

    def __call__(self, package, version, folder):
        installer = self

        class Fake:
            def create(self, log):
                if str(version) in installer.uninstallable:
                    raise BisectError(f"No matching distribution found for {package}=={version}")
                installer.installed.append(str(version))

            def run_pytest(self, args, cwd):
                if installer.fails_from is not None:
                    failed = version >= Version(installer.fails_from)
                else:
                    failed = version < Version(installer.passes_from)
                return (1, "1 failed in 0.1s") if failed else (0, "1 passed in 0.1s")

        return Fake()


def run(installer, versions=TORCH, **kwargs):
    lines = []
    test = make_tester("torch", ["-k", "x"], Path("/nonexistent"), lines.append, installer=installer)
    return bisect(versions, test, lines.append, **kwargs), lines


@pytest.mark.parametrize("fails_from", ["2.12.1", "2.14.0", "2.15.0"])
def test_old_good_new_bad_finds_the_break(fails_from):
    installer = FakeInstaller(fails_from=fails_from)
    conclusion, lines = run(installer)
    previous = TORCH[TORCH.index(Version(fails_from)) - 1]
    assert conclusion == f"first bad: {fails_from} (last good: {previous})"
    assert installer.installed[:2] == ["2.12.0", "2.15.0"]  # the two verifying runs come first
    assert any("looking for the first bad release (a break)" in line for line in lines)


@pytest.mark.parametrize("passes_from", ["2.12.1", "2.13.0", "2.15.0"])
def test_old_bad_new_good_finds_the_fix(passes_from):
    installer = FakeInstaller(passes_from=passes_from)
    conclusion, lines = run(installer)
    previous = TORCH[TORCH.index(Version(passes_from)) - 1]
    assert conclusion == f"first good: {passes_from} (last bad: {previous})"
    assert any("looking for the first good release (a fix)" in line for line in lines)
    assert len(installer.installed) <= 2 + 3  # two ends, then log2 of the four between


def test_a_fix_with_an_uninstallable_release_in_the_way_names_the_range():
    installer = FakeInstaller(passes_from="2.14.0", uninstallable={"2.13.0", "2.14.0"})
    conclusion, lines = run(installer)
    assert conclusion == "first good: 2.14.1 (last bad: 2.12.1)"
    assert any(line.startswith("could not test: 2.13.0, 2.14.0; the first good release") for line in lines)


def test_ends_with_the_same_verdict_are_refused_with_what_to_do():
    with pytest.raises(BisectError, match="both 2.12.0 and 2.15.0 are good: nothing changed"):
        run(FakeInstaller(fails_from="9.0"))
    with pytest.raises(BisectError, match="both 2.12.0 and 2.15.0 are bad"):
        run(FakeInstaller(passes_from="9.0"))


def test_an_end_that_cannot_be_installed_is_refused():
    with pytest.raises(BisectError, match=r"NEW \(2.15.0\) cannot be tested: cannot install it: No matching"):
        run(FakeInstaller(fails_from="2.14.0", uninstallable={"2.15.0"}))


def test_without_verifying_the_direction_is_the_one_declared():
    installer = FakeInstaller(passes_from="2.14.1")
    conclusion, _ = run(installer, verify=False, old=BAD)
    assert conclusion == "first good: 2.14.1 (last bad: 2.14.0)"
    assert "2.12.0" not in installer.installed and "2.15.0" not in installer.installed


def test_direction_is_told_from_outcomes_not_from_version_order():
    v = Version("1.0")
    assert direction(Outcome(v, BAD, 0.0), Outcome(v, GOOD, 0.0)) == BAD
    with pytest.raises(BisectError, match=r"OLD \(1.0\) cannot be tested"):
        direction(Outcome(v, SKIP, 0.0), Outcome(v, GOOD, 0.0))
