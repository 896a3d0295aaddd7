"""The release bisect's search, without touching the package index."""

from __future__ import annotations

import pytest
from packaging.version import Version

from pytest_gradckpt.bisect import BAD, GOOD, SKIP, BisectError, Outcome, between, search

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
