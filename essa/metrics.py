"""metrics.jsonl (one JSON object per iteration), peak memory, and the reward plot."""

from __future__ import annotations

import contextlib
import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from essa.errors import EssaError
from essa.files import atomic_path, disk_error, write_text


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("iteration"), int) else None


class MetricsLog:
    """One JSON object per line, appended and fsynced after every iteration."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """Every row. A damaged last line is a write cut short by a kill and is dropped; a damaged line
        before it is not something essa wrote, and is an error rather than a silent loss of what follows."""
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError) as err:
            raise EssaError(f"{self.path}: damaged metrics file ({err}); repair or remove it") from None
        rows = [_row(line) for line in lines]
        damaged = next((n for n, row in enumerate(rows[:-1], 1) if row is None), None)
        if damaged is not None:
            raise EssaError(f"{self.path}:{damaged}: damaged metrics line (not a JSON row with an 'iteration'); "
                            "delete or repair that line, then resume")
        return rows[:-1] + ([rows[-1]] if rows and rows[-1] is not None else [])

    def truncate(self, iteration: int) -> None:
        """Keep only rows up to `iteration` (a resume re-logs what came after its checkpoint)."""
        rows = [r for r in self.read() if r["iteration"] <= iteration]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, row: dict[str, Any]) -> None:
        """Append durably; a failed write (a full disk) is cut back off, so the file stays readable."""
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise disk_error(self.path, err) from None


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "reward_mean" in r]
    heldout = [r for r in rows if r.get("heldout_reward") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        its = [r["iteration"] for r in train]
        ax.plot(its, [r["reward_mean"] for r in train], label="population mean (train minibatch)")
        ax.plot(its, [r["reward_max"] for r in train], alpha=0.5, label="population max (train minibatch)")
    if heldout:
        ax.plot([r["iteration"] for r in heldout], [r["heldout_reward"] for r in heldout], "o-",
                label="center, held-out")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
