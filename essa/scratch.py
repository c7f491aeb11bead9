"""Scratch directories (/dev/shm where it exists) named after the process that made them.

A killed process cannot tidy up after itself, so each new scratch directory first sweeps those of
the same kind whose process is gone: a kill -9, a lost Ray worker or a Ctrl-C costs at most one
directory, until the next run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def scratch_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(kind: str) -> None:
    """Remove the directories of `kind` whose process is gone."""
    for stale in scratch_root().glob(f"{kind}-*"):
        pid = stale.name[len(kind) + 1:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def make_scratch(kind: str) -> Path:
    """A fresh directory `<kind>-<pid>-*`, after sweeping those of `kind` whose process is gone."""
    sweep(kind)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=scratch_root()))
