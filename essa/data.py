"""Prompt datasets: the built-in generator or a local JSONL file; train/held-out split; minibatches."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from essa.errors import EssaError
from essa.recipe import DataSection
from rewards import format_instructions

GENERATORS = {"format-instructions"}


@dataclass(frozen=True)
class Dataset:
    """Rows of prompt + reference columns; `columns` is what a reward receives besides prompts."""

    rows: list[dict[str, Any]]
    prompt_field: str

    def __len__(self) -> int:
        return len(self.rows)

    def prompts(self) -> list[str]:
        return [r[self.prompt_field] for r in self.rows]

    def columns(self) -> dict[str, list[Any]]:
        keys = [k for k in self.rows[0] if k != self.prompt_field] if self.rows else []
        return {k: [r.get(k) for r in self.rows] for k in keys}

    def subset(self, indices: np.ndarray) -> "Dataset":
        return Dataset([self.rows[i] for i in indices], self.prompt_field)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EssaError(f"data.source: {path}:{n}: not valid JSON ({err.msg})") from None
    return rows


def load_splits(cfg: DataSection, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out). Held-out prompts never appear in training minibatches."""
    if cfg.source == "format-instructions":
        topics = format_instructions.TOPICS
        # Held-out prompts use topics never seen in training, so a gain is not memorization.
        heldout_topics, train_topics = topics[::4], [t for i, t in enumerate(topics) if i % 4]
        train = format_instructions.generate_examples(cfg.train_size, seed, train_topics)
        heldout = format_instructions.generate_examples(cfg.heldout_size, seed + 1, heldout_topics)
        return Dataset(train, "prompt"), Dataset(heldout, "prompt")
    path = Path(cfg.source).expanduser()
    if not path.is_file():
        raise EssaError(f"data.source: {cfg.source!r} is neither a built-in generator "
                        f"({', '.join(sorted(GENERATORS))}) nor an existing .jsonl file")
    rows = _read_jsonl(path)
    missing = [i for i, r in enumerate(rows) if cfg.prompt_field not in r]
    if missing:
        raise EssaError(f"data.prompt_field: row {missing[0] + 1} of {path} has no field {cfg.prompt_field!r}")
    if len(rows) <= cfg.heldout_size:
        raise EssaError(f"data.heldout_size: {path} has {len(rows)} rows, need more than {cfg.heldout_size}")
    random.Random(seed).shuffle(rows)
    heldout, train = rows[: cfg.heldout_size], rows[cfg.heldout_size:][: cfg.train_size]
    return Dataset(train, cfg.prompt_field), Dataset(heldout, cfg.prompt_field)


def minibatch(n_rows: int, size: int, seed: int, iteration: int) -> np.ndarray:
    """Prompt indices for an iteration, a pure function of (seed, iteration): resumes need no sampler state."""
    rng = np.random.default_rng([seed, iteration, 0x6D62])
    return rng.choice(n_rows, size=min(size, n_rows), replace=False)


def render(tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: DataSection) -> list[str]:
    """Prompts as the model sees them: the chat template with the system prompt, or raw text."""
    if not cfg.chat_template or tokenizer.chat_template is None:
        return [f"{cfg.system_prompt}\n\n{p}" if cfg.system_prompt else p for p in prompts]
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]
