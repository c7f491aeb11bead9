"""A pytest plugin: the test suite must leave the working tree as it found it.

A test or a script that writes into the repository (a default output path such as eval-report.json,
a tracker's default location such as MLflow's ./mlruns) fails the run at its end, naming the files.
tests/conftest.py loads it for every run of the suite.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

TREE_BEFORE = pytest.StashKey[str | None]()


def tree_state(root: Path) -> str | None:
    """`git status --porcelain` of the working tree (untracked files included); None outside a git checkout."""
    try:
        proc = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[TREE_BEFORE] = tree_state(session.config.rootpath)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite must leave the working tree as it found it: a test or a script that writes into the
    repository (a default output path, a tracker's default location) fails the run here."""
    before, after = session.config.stash.get(TREE_BEFORE, None), tree_state(session.config.rootpath)
    if before is None or after is None or before == after:
        return
    changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("the test suite changed the working tree (git status --porcelain):", red=True)
        for line in changed:
            reporter.write_line(f"  {line}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

