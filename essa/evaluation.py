"""Evaluating a population: every chunk of rows is generated, then scored beside the engine that
generated it.

Scoring a chunk where it was generated means a distributed evaluator sends back rewards (a float
per row) rather than completions (kilobytes per row), and a custom reward runs wherever the
engine does. The local evaluator runs the same `evaluate_chunk` over the same chunks as the
workers of `essa.distributed`, which is why one process and N workers agree row for row.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from essa.data import Dataset, render
from essa.engines.rows import Engine, OnChunk, OnRows, Rows, add_up, chunk_rows, prompt_lengths
from essa.recipe import DataSection
from essa.scoring import Scorer
from essa.svd import SVDSpace


@dataclass(frozen=True)
class Task:
    """The prompts of one evaluation: rendered for the model, and as the reward sees them."""

    rendered: list[str]
    prompts: list[str]
    columns: dict[str, list[Any]]
    lengths: list[int]  # tokens of each rendered prompt, which chunks are planned by

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, data: Dataset, section: DataSection) -> "Task":
        rendered = render(tokenizer, data.prompts(), section)
        return cls(rendered, data.prompts(), data.columns(), prompt_lengths(tokenizer, rendered))

    def rows(self, prompts: tuple[int, ...]) -> tuple[list[str], dict[str, list[Any]]]:
        return [self.prompts[j] for j in prompts], {k: [v[j] for j in prompts] for k, v in self.columns.items()}


@dataclass
class ChunkResult:
    scores: np.ndarray          # one reward per row
    failures: int               # rows whose reward failed (scored 0)
    first_error: str | None
    tokens: int
    seconds_generate: float
    seconds_score: float
    phases: dict[str, float]
    texts: list[str] | None     # the completions, when asked for
    digests: np.ndarray         # one 64-bit hash per row's completion: which rows agree, in 8 bytes each


def evaluate_chunk(engine: Engine, scorer: Scorer, candidates: torch.Tensor, task: Task, rows: Rows,
                   keep_texts: bool, on_rows: OnRows | None = None, drafts: list[str] | None = None) -> ChunkResult:
    out = engine.generate_rows(candidates, task.rendered, rows, on_rows, drafts)
    start = time.perf_counter()
    prompts, columns = task.rows(rows.prompts)
    scores, failures = scorer(prompts, out.texts, columns)
    return ChunkResult(scores, failures, scorer.first_error, out.tokens, out.seconds, time.perf_counter() - start,
                       out.phases, out.texts if keep_texts else None, digests(out.texts))


def digests(texts: list[str]) -> np.ndarray:
    """A 64-bit hash of each text, the same in every process (Python's `hash` of a str is not)."""
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little", signed=True) for t in texts], dtype=np.int64)


@dataclass
class Evaluation:
    scores: np.ndarray                    # [candidate, prompt]
    failures: int
    first_error: str | None
    tokens: int
    seconds: float                        # wall-clock, generation and scoring of every chunk
    seconds_generate: float               # summed over chunks (over workers, when distributed)
    seconds_score: float
    phases: dict[str, float]
    completions: list[list[str]] | None   # [candidate][prompt], when asked for
    digests: np.ndarray                   # [candidate, prompt]: a hash of each completion
    extra: dict[str, float] = field(default_factory=dict)  # evaluator-specific metrics (wire bytes, ...)

    def metrics(self) -> dict[str, float]:
        return {"generated_tokens": self.tokens, "seconds_generate": self.seconds_generate,
                "seconds_score": self.seconds_score, **self.phases, **self.extra}


def assemble(chunks: list[Rows], results: list[ChunkResult], n_candidates: int, n_prompts: int,
             seconds: float) -> Evaluation:
    """One evaluation from its chunks' results, in chunk order whichever worker produced them."""
    scores = np.zeros((n_candidates, n_prompts))
    hashes = np.zeros((n_candidates, n_prompts), dtype=np.int64)
    texts = [[""] * n_prompts for _ in range(n_candidates)]
    for rows, result in zip(chunks, results):
        scores[list(rows.members), list(rows.prompts)] = result.scores
        hashes[list(rows.members), list(rows.prompts)] = result.digests
        for m, j, text in zip(rows.members, rows.prompts, result.texts or ()):
            texts[m][j] = text
    kept = all(r.texts is not None for r in results)
    return Evaluation(scores, sum(r.failures for r in results), next((r.first_error for r in results if r.first_error),
                                                                      None),
                      sum(r.tokens for r in results), seconds, sum(r.seconds_generate for r in results),
                      sum(r.seconds_score for r in results), add_up(r.phases for r in results),
                      texts if kept else None, hashes)


class Evaluator(Protocol):
    space: SVDSpace

    def evaluate(self, candidates: np.ndarray, task: Task, keep_texts: bool = False,
                 on_chunk: OnChunk | None = None, on_rows: OnRows | None = None,
                 draft: int | None = None) -> Evaluation: ...

    def close(self) -> None: ...


# Drafting pays where verifying a draft costs less than decoding it: on a GPU a decode step is bound
# by reading the weights, and a pass over a whole draft costs about one step; on 2 CPU cores a
# population's decode is already compute-bound, a pass over a draft runs only about twice as fast
# per token, and the center's rows decode alone first: drafted populations ran at 0.46-0.67x
# (benchmarks/drafted-members/). So the evaluator measures instead of assuming: it keeps the way
# that was faster and tries the other every `RETRY`-th population (the population's spread, and so
# the drafts' acceptance, changes as the search goes). An engine that `drafts_first` tries both ways
# at once; one that does not (on a CPU) starts undrafted, as if drafting had been measured slower,
# so a run shorter than `RETRY` populations never pays for the try.
RETRY = 32


def renumbered(chunks: list[Rows], candidates: list[int]) -> list[Rows]:
    """Chunks planned over `len(candidates)` candidates, with member i standing for `candidates[i]`."""
    return [Rows(tuple(candidates[m] for m in rows.members), rows.prompts) for rows in chunks]


class LocalEvaluator:
    """This process's engine and scorer, chunk after chunk. `speculative` (`generation.speculative`):
    whether populations are drafted from their center, where the engine `drafts`: always (True),
    never (False), or where measured faster ("auto", `drafts`)."""

    def __init__(self, engine: Engine, scorer: Scorer, speculative: bool | str = "auto") -> None:
        self.engine, self.scorer, self.space, self.speculative = engine, scorer, engine.space, speculative
        # tokens/s of the latest drafted (True) and undrafted population
        self.pace: dict[bool, float] = {} if engine.drafts_first else {True: 0.0}
        self.choices = 0

    def drafts(self) -> bool:
        """Whether the next population is drafted: as `speculative` says; for "auto", each way not yet
        timed is tried, then the faster one is kept and the other tried again every `RETRY`-th time."""
        if self.speculative != "auto":
            return bool(self.speculative)
        for way in (True, False):
            if way not in self.pace:
                return way
        self.choices += 1
        return (self.pace[True] >= self.pace[False]) != (self.choices % RETRY == 0)

    def evaluate(self, candidates: np.ndarray, task: Task, keep_texts: bool = False,
                 on_chunk: OnChunk | None = None, on_rows: OnRows | None = None,
                 draft: int | None = None) -> Evaluation:
        """`draft`: the candidate whose completions may draft every other's, where the engine `drafts`
        (essa/engines/draft.py) and `drafts()` says so: its rows go first, and the others verify its
        completions."""
        start = time.perf_counter()
        candidates = torch.atleast_2d(torch.as_tensor(np.asarray(candidates, dtype=np.float32)))  # dim may be 0
        n, chunking = len(task.prompts), self.engine.chunking(len(task.prompts))
        timed = draft is not None and self.engine.drafts and len(candidates) > 1 and self.speculative is not False
        drafted = timed and self.drafts()
        if drafted:
            others = [m for m in range(len(candidates)) if m != draft]
            first = renumbered(chunk_rows(1, task.lengths, chunking), [draft])
            chunks = first + renumbered(chunk_rows(len(others), task.lengths, chunking), others)
        else:
            chunks = chunk_rows(len(candidates), task.lengths, chunking)
        results, texts, member_tokens = [], [""] * n, 0
        if on_chunk:
            on_chunk(0, len(chunks))
        for i, rows in enumerate(chunks):
            leads = drafted and i < len(first)
            drafts = [texts[j] for j in rows.prompts] if drafted and not leads else None
            result = evaluate_chunk(self.engine, self.scorer, candidates, task, rows, keep_texts or leads, on_rows,
                                    drafts)
            if leads:
                for j, text in zip(rows.prompts, result.texts):
                    texts[j] = text
                result.texts = result.texts if keep_texts else None
            else:
                member_tokens += result.tokens
            results.append(result)
            if on_chunk:
                on_chunk(len(results), len(chunks))
        evaluation = assemble(chunks, results, len(candidates), n, time.perf_counter() - start)
        if timed:
            self.pace[drafted] = evaluation.tokens / evaluation.seconds
        if drafted:
            evaluation.extra["member_tokens"] = member_tokens
        return evaluation

    def close(self) -> None:
        self.engine.close()
