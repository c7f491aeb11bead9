"""Rows and chunks: the unit of work of every engine, in one process or spread over workers.

A population evaluation is the (candidate × prompt) rows. An engine generates them in chunks (one
batched decode each), planned by `chunk_rows` from the prompts' token lengths alone, and the
distributed evaluator hands out exactly the same chunks, so every chunk is decoded as the same
batch, with the same padding and the same numerics, wherever it runs.

The HF engine's chunks hold rows of similar prompt length (rows sorted by length, a deterministic
order) under a token budget: every row of a batch is left-padded to its longest prompt and carries
that padding in its KV cache and attention at every decode step, so a chunk that mixes a 37-token
prompt with a 381-token one (IFEval) pays for 381 in every row, and a fixed row count lets a
chunk of long prompts take gigabytes of cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

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
    phases: dict[str, float] = field(default_factory=dict)  # engine-specific seconds and token counts


def add_up(timings: Iterable[dict[str, float]]) -> dict[str, float]:
    """Key-wise sums of timing dicts (keys missing from some count as 0)."""
    total: dict[str, float] = {}
    for timing in timings:
        for key, value in timing.items():
            total[key] = total.get(key, 0.0) + value
    return total


@dataclass(frozen=True)
class Chunking:
    """How an engine wants a population's rows split into batched decodes."""

    rows: int                # at most this many rows per chunk
    by_length: bool = False  # rows sorted by prompt length, each chunk within `tokens`; else candidate-major
    tokens: int = 2**62      # rows × (longest prompt + new_tokens) at most this, a row alone excepted
    new_tokens: int = 0


def chunk_rows(n_candidates: int, lengths: Sequence[int], chunking: Chunking) -> list[Rows]:
    """The rows of a population (every candidate on every prompt; `lengths` are the prompts' token
    counts) in chunks, as `chunking` says. A pure function of its arguments, so every process plans
    the same chunks."""
    if not chunking.by_length:
        rows = [(m, j) for m in range(n_candidates) for j in range(len(lengths))]
        size = chunking.rows
        return [Rows(tuple(m for m, _ in rows[lo:lo + size]), tuple(j for _, j in rows[lo:lo + size]))
                for lo in range(0, len(rows), size)]
    order = sorted(range(len(lengths)), key=lambda j: (lengths[j], j))
    chunks: list[list[tuple[int, int]]] = [[]]
    for j in order:
        for m in range(n_candidates):
            chunk = chunks[-1]
            # sorted ascending, so this row's prompt is the chunk's longest
            if chunk and (len(chunk) == chunking.rows
                          or (len(chunk) + 1) * (lengths[j] + chunking.new_tokens) > chunking.tokens):
                chunk = []
                chunks.append(chunk)
            chunk.append((m, j))
    return [Rows(tuple(m for m, _ in chunk), tuple(j for _, j in chunk)) for chunk in chunks if chunk]


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[int]:
    """Token counts of rendered prompts, as an engine tokenizes them."""
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


@dataclass
class Generation:
    completions: list[list[str]]  # [candidate][prompt]
    tokens: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)


class Engine(Protocol):
    """What every engine offers: its search space, its chunking and the generation of one chunk, with
    drafts of the rows' completions where it `drafts` (essa/engines/draft.py)."""

    space: SVDSpace
    drafts: bool        # can verify drafts of its rows' completions
    drafts_first: bool  # and is expected to gain by it before that is measured

    def chunking(self, n_prompts: int) -> Chunking: ...

    def generate_rows(self, candidates: Tensor, prompts: list[str], rows: Rows, on_rows: OnRows | None = None,
                      drafts: list[str] | None = None) -> RowsOutput: ...

    def close(self) -> None: ...


OnChunk = Callable[[int, int], None]  # (chunks done, chunks in all), for progress; (0, n) before the first
OnRows = Callable[[int, int, int], None]  # within a chunk: (rows finished, rows in the chunk, tokens so far)


def generate(engine: Engine, candidates: Tensor | np.ndarray, prompts: list[str], lengths: Sequence[int],
             on_chunk: OnChunk | None = None, on_rows: OnRows | None = None) -> Generation:
    """Every candidate on every prompt, chunk after chunk."""
    candidates = torch.atleast_2d(torch.as_tensor(candidates, dtype=torch.float32))  # [P, dim]; dim may be 0
    chunks = chunk_rows(len(candidates), lengths, engine.chunking(len(prompts)))
    outputs = []
    if on_chunk:
        on_chunk(0, len(chunks))
    for rows in chunks:
        outputs.append(engine.generate_rows(candidates, prompts, rows, on_rows))
        if on_chunk:
            on_chunk(len(outputs), len(chunks))
    completions = [[""] * len(prompts) for _ in range(len(candidates))]
    for rows, out in zip(chunks, outputs):
        for m, j, text in zip(rows.members, rows.prompts, out.texts):
            completions[m][j] = text
    return Generation(completions, sum(o.tokens for o in outputs), sum(o.seconds for o in outputs),
                      add_up(o.phases for o in outputs))
