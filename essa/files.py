"""Writing run files so that a full disk, a read-only directory or a kill never leaves a half-written
file in the place of a good one: write beside it, fsync, rename over it, fsync the directory."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from essa.errors import EssaError


class DiskError(EssaError):
    """The environment, not the input: a full disk, a read-only or vanished directory."""

    exit_code = 1


def disk_error(path: Path, err: Exception) -> DiskError:
    """One line for a failed write; safetensors reports I/O errors as text, not as OSError."""
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        return DiskError(f"disk full while writing {path}; the previous version is intact and the partial write "
                         "was removed: free some space and run the command again (align: with --resume)")
    reason = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
    return DiskError(f"cannot write {path} ({reason})")


def write_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return OSError, SafetensorError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it replaces `path` durably, on any
    failure it is removed and a write failure becomes a DiskError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except write_errors() as err:
        raise disk_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable_dir(path: Path, option: str) -> None:
    """Create `path` if needed and prove a file can be written there, or say why in one line."""
    if path.exists() and not path.is_dir():
        raise EssaError(f"{option}: {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise EssaError(f"{option}: cannot write to {path} ({err.strerror})") from None


def check_output_file(path: Path, option: str) -> None:
    """An output file's place: not a directory, and its directory writable."""
    if path.is_dir():
        raise EssaError(f"{option}: {path} is a directory; give a file path")
    check_writable_dir(path.parent, option)


def remove_tree(path: Path) -> None:
    """Rename aside first, so a kill mid-delete leaves a `.trash-*` directory (swept later), never a
    half-deleted directory under a name that readers trust."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
