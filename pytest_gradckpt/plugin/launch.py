"""Torchrun membership: ``torchrun -m pytest --gradckpt`` makes every rank a pytest session that
runs the same checks in the launch's process group; rank 0 reports, and all agree on one exit status.
"""

from __future__ import annotations

import os

import pytest

from pytest_gradckpt.plugin.session import GradckptSession


def join(config: pytest.Config, session: GradckptSession, device: str | None) -> None:
    """Under torchrun (its ``RANK`` and ``WORLD_SIZE``, any size), join the launch's process group;
    ranks other than 0 write no JUnit file."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return
    from pytest_gradckpt.ranks.distributed import join_launch

    session.rank = join_launch(device)
    if session.rank is not None and session.rank != 0:
        config.option.xmlpath = None


def leave(session: GradckptSession) -> None:
    if session.under_launch:
        from pytest_gradckpt.ranks.distributed import leave_launch

        leave_launch()


def agreed_exit_status(session: GradckptSession, pytest_session: pytest.Session, exitstatus: int) -> int:
    """The exit status every rank ends with (a rank that failed fails them all); unchanged outside a launch."""
    if not session.under_launch:
        return exitstatus
    from pytest_gradckpt.ranks.distributed import agreed_exit_status as agreed

    pytest_session.exitstatus = agreed(int(exitstatus))
    return int(pytest_session.exitstatus)
