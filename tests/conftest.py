"""Test-suite setup.

The plugin tests run pytest in subprocesses (``runpytest_subprocess``), as a
downstream repository would: in-process runs restore ``sys.modules`` afterwards,
and torch's lazily imported submodules do not survive being imported twice.
"""
