"""Atomic, verified checkpoints: one directory per iteration, written aside and renamed into place.

A checkpoint holds the strategy state, the best center so far, and the loop's bookkeeping. The
minibatch sampler and the population noise are pure functions of (seed, iteration), so the
iteration number is all the RNG state a resume needs. Each state file's SHA-256 is recorded in
its meta.json; a checkpoint whose hash does not match (a partial or corrupt write) is skipped
in favour of the previous one. A write that fails (a full disk) removes its partial directory and
leaves the previous checkpoints as they were; old checkpoints are renamed aside before they are
deleted, so a kill while pruning never leaves a half-deleted `iter-*` directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from essa.files import disk_error, fsync_dir, remove_tree, write_errors

STATE, META = "state.safetensors", "meta.json"


@dataclass
class Checkpoint:
    iteration: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sweep(root: Path) -> None:
    """Remove what an interrupted save or prune left behind."""
    for leftover in [*root.glob(".tmp-iter-*"), *root.glob(".trash-iter-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _write(tmp: Path, ckpt: Checkpoint) -> None:
    tmp.mkdir()
    save_file({k: np.asarray(v, order="C") for k, v in ckpt.arrays.items()}, str(tmp / STATE))  # keeps 0-d shapes
    meta = dict(ckpt.meta, iteration=ckpt.iteration, sha256=_sha256(tmp / STATE))
    (tmp / META).write_text(json.dumps(meta, indent=1))
    for f in (STATE, META):
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())


def save(root: Path, ckpt: Checkpoint, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    sweep(root)
    final = root / f"iter-{ckpt.iteration:06d}"
    tmp = root / f".tmp-iter-{ckpt.iteration:06d}"
    try:
        _write(tmp, ckpt)
        if final.exists():
            remove_tree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except write_errors() as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(final, err) from None
    for old in sorted(root.glob("iter-*"))[:-keep]:
        remove_tree(old)
    return final


def _read(path: Path) -> Checkpoint | None:
    try:
        meta = json.loads((path / META).read_text())
        if _sha256(path / STATE) != meta["sha256"]:
            return None
        return Checkpoint(int(meta["iteration"]), load_file(str(path / STATE)), meta)
    except Exception:  # noqa: BLE001 - any damage (JSON, hash, safetensors header) means "not this one"
        return None


def latest(root: Path) -> tuple[Checkpoint | None, list[Path]]:
    """The newest valid checkpoint, and the newer ones that were skipped as corrupt."""
    skipped = []
    for path in sorted(root.glob("iter-*"), reverse=True):
        ckpt = _read(path)
        if ckpt is not None:
            return ckpt, skipped
        skipped.append(path)
    return None, skipped
