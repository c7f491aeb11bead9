"""metrics.jsonl (one JSON object per iteration), peak memory, and the reward plot."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch


def peak_memory_mb() -> float:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill; everything after it is untrusted
        return rows

    def truncate(self, iteration: int) -> None:
        """Keep only rows up to `iteration` (a resume re-logs what came after its checkpoint)."""
        rows = [r for r in self.read() if r["iteration"] <= iteration]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
