"""Prompt datasets: built-in generators, local files, hub datasets; train/held-out split; minibatches."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from essa.errors import EssaError
from essa.recipe import DataSection
from essa.rewards import GENERATORS, TASKS

# Hub datasets whose files ../shared/data (or $ESSA_DATA_DIR) may hold, as the tasks name them.
LOCAL_COPIES = {key: file for task in TASKS.values() for key, file in task.local_copies.items()}
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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


def data_dirs() -> list[Path]:
    """Where local copies of hub datasets are looked for, first match wins."""
    dirs = [Path(os.environ["ESSA_DATA_DIR"])] if os.environ.get("ESSA_DATA_DIR") else []
    return dirs + [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]


def _read_jsonl(path: Path, option: str) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EssaError(f"{option}: {path} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise EssaError(f"{option}: cannot read {path} ({err.strerror})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise EssaError(f"{option}: {path}:{n}: not valid JSON ({getattr(err, 'msg', 'nested too deeply')})"
                                ) from None
            if not isinstance(row, dict):
                raise EssaError(f"{option}: {path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_file(path: Path, option: str = "data.source") -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, option)
    if path.suffix not in FILE_TYPES:
        raise EssaError(f"{option}: {path} is not one of {', '.join(FILE_TYPES)}")
    import datasets

    try:
        return list(datasets.load_dataset(FILE_TYPES[path.suffix], data_files=str(path), split="train"))
    except Exception as err:  # malformed file: one line, not a traceback
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise EssaError(f"{option}: cannot read {path} ({type(err).__name__}: {first})") from None


def read_hub(name: str, config: str, split: str) -> list[dict[str, Any]]:
    for root in data_dirs():
        local = LOCAL_COPIES.get((name, split))
        if local and (root / local).is_file():
            return _read_jsonl(root / local, "data.source")
    import datasets

    try:
        return list(datasets.load_dataset(name, config or None, split=split))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EssaError(f"data.source: cannot load hub dataset {name!r} (config {config!r}, split {split!r}): "
                        f"{first}; offline? download it once and point data.source at a local "
                        ".jsonl/.json/.parquet/.csv file") from None


def is_hub(source: str) -> bool:
    """Neither a built-in generator nor something that looks like a local file: a hub dataset id."""
    path = Path(source).expanduser()
    return not (source in GENERATORS or path.suffix in FILE_TYPES or source.startswith((".", "/", "~"))
                or path.exists())


def read_rows(cfg: DataSection, split: str) -> list[dict[str, Any]]:
    path = Path(cfg.source).expanduser()
    looks_local = not is_hub(cfg.source)
    if looks_local and not path.is_file():
        raise EssaError(f"data.source: file {cfg.source!r} not found (nor a built-in generator: "
                        f"{', '.join(sorted(GENERATORS))})")
    rows = read_file(path) if looks_local else read_hub(cfg.source, cfg.config, split)
    # data.columns maps a reward's argument name to the dataset column that feeds it.
    absent = next((col for col in cfg.columns.values() if rows and col not in rows[0]), None)
    if absent is not None:
        raise EssaError(f"data.columns: {cfg.source} has no column {absent!r} (columns: {', '.join(rows[0])})")
    rows = [{**row, **{arg: row[col] for arg, col in cfg.columns.items() if col in row}} for row in rows]
    missing = next((i for i, r in enumerate(rows) if cfg.prompt_field not in r), None)
    if missing is not None:
        raise EssaError(f"data.prompt_field: row {missing + 1} of {cfg.source} has no field {cfg.prompt_field!r}")
    return rows


def shuffled_rows(cfg: DataSection, seed: int) -> list[dict[str, Any]]:
    """The rows of a file or hub source's training split, in the seed's order."""
    rows = read_rows(cfg, cfg.split)
    random.Random(seed).shuffle(rows)
    return rows


def load_splits(cfg: DataSection, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out), deterministic in the seed. Held-out prompts never appear in training."""
    if cfg.heldout_source:
        # e.g. train on generated IFEval-style prompts, evaluate on the real IFEval prompts
        # (a file or hub source then keeps every row for training)
        train = (Dataset(shuffled_rows(cfg, seed)[: cfg.train_size], cfg.prompt_field) if cfg.source not in GENERATORS
                 else load_splits(replace(cfg, heldout_source=""), seed)[0])
        other = replace(cfg, source=cfg.heldout_source, heldout_source="", train_size=0)
        if other.source in GENERATORS:
            heldout = GENERATORS[other.source].splits(other, seed)[1]
        else:
            heldout = read_rows(other, cfg.heldout_split or "train")
            random.Random(seed + 1).shuffle(heldout)
        return train, Dataset(heldout[: cfg.heldout_size], cfg.prompt_field)
    if cfg.source in GENERATORS:
        train, heldout = GENERATORS[cfg.source].splits(cfg, seed)
        return Dataset(train, "prompt"), Dataset(heldout, "prompt")
    rows = shuffled_rows(cfg, seed)
    if cfg.heldout_split:
        heldout = read_rows(cfg, cfg.heldout_split)
        random.Random(seed + 1).shuffle(heldout)
        heldout = heldout[: cfg.heldout_size]
    else:
        if len(rows) <= cfg.heldout_size:
            raise EssaError(f"data.heldout_size: {cfg.source} has {len(rows)} rows, need more than "
                            f"{cfg.heldout_size}")
        heldout, rows = rows[: cfg.heldout_size], rows[cfg.heldout_size:]
    return Dataset(rows[: cfg.train_size], cfg.prompt_field), Dataset(heldout, cfg.prompt_field)


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
