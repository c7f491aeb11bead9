"""Rows and chunks: the unit of work of every engine, in one process or spread over workers.

A population evaluation is the (candidate × prompt) rows, candidate-major. An engine generates
them in fixed chunks (one batched decode each), and the distributed evaluator hands out exactly
the same chunks, so every chunk is decoded as the same batch, with the same padding and the same
numerics, wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from torch import Tensor

from essa.svd import SVDSpace


@dataclass(frozen=True)
class Rows:
    """One chunk: row i is candidate `members[i]` on prompt `prompts[i]`."""

    members: tuple[int, ...]
    prompts: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.members)


@dataclass
class RowsOutput:
    texts: list[str]   # one completion per row
    tokens: int        # generated tokens, up to and including each row's end token
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # engine-specific timings, in seconds


def add_up(timings: Iterable[dict[str, float]]) -> dict[str, float]:
    """Key-wise sums of timing dicts (keys missing from some count as 0)."""
    total: dict[str, float] = {}
    for timing in timings:
        for key, value in timing.items():
            total[key] = total.get(key, 0.0) + value
    return total


def chunk_rows(n_candidates: int, n_prompts: int, size: int) -> list[Rows]:
    """The rows of a population in chunks of at most `size`."""
    rows = [(m, j) for m in range(n_candidates) for j in range(n_prompts)]
    return [Rows(tuple(m for m, _ in rows[lo:lo + size]), tuple(j for _, j in rows[lo:lo + size]))
            for lo in range(0, len(rows), size)]


@dataclass
class Generation:
    completions: list[list[str]]  # [candidate][prompt]
    tokens: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    """What every engine offers: its search space, its chunking and the generation of one chunk."""

    space: SVDSpace

    def chunk_size(self, n_prompts: int) -> int: ...

    def generate_rows(self, candidates: Tensor, prompts: list[str], rows: Rows) -> RowsOutput: ...

    def close(self) -> None: ...


OnChunk = Callable[[int, int], None]  # (chunks done, chunks in all), for progress


def generate(engine: Engine, candidates: Tensor | np.ndarray, prompts: list[str],
             on_chunk: OnChunk | None = None) -> Generation:
    """Every candidate on every prompt, chunk after chunk."""
    candidates = torch.as_tensor(candidates, dtype=torch.float32).reshape(-1, engine.space.dim)
    chunks = chunk_rows(len(candidates), len(prompts), engine.chunk_size(len(prompts)))
    outputs = []
    for rows in chunks:
        outputs.append(engine.generate_rows(candidates, prompts, rows))
        if on_chunk:
            on_chunk(len(outputs), len(chunks))
    texts = [t for out in outputs for t in out.texts]
    n = len(prompts)
    return Generation([texts[i * n:(i + 1) * n] for i in range(len(candidates))], sum(o.tokens for o in outputs),
                      sum(o.seconds for o in outputs), add_up(o.phases for o in outputs))
