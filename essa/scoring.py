"""Scoring completions with reward functions, one bad row or one bad reward at a time.

A reward is a built-in name from `rewards/`, `package.module:function`, or
`path/to/file.py:function`, with TRL's signature `fn(prompts, completions, **columns)`. Several
rewards may be combined with weights. Every call runs in a killable child process
(`essa.reward_process`) under `reward.timeout_s` and `reward.memory_gb`. When a call on a batch
fails, each row is scored again on its own, so one hostile completion or one malformed dataset row
costs only its own score. A row whose reward raises, hangs, crashes or returns something that is
not a finite number scores 0, is counted (`reward_failures` in metrics.jsonl) and is named once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console

from essa.errors import EssaError
from essa.reward_process import RewardFailure, RewardProcess

DEFAULT_TIMEOUT_S, DEFAULT_MEMORY_GB = 60.0, 4.0


def as_score(value: Any) -> float | None:
    """A finite float, or None for anything else (None, NaN, inf, bools, strings, ints beyond float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _row(columns: dict[str, list[Any]], i: int) -> dict[str, list[Any]]:
    return {k: v[i:i + 1] for k, v in columns.items()}


@dataclass
class Scorer:
    """Weighted sum of reward functions named by spec."""

    name: str
    specs: list[tuple[str, float]]
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_gb: float = DEFAULT_MEMORY_GB
    console: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))
    first_error: str | None = None

    def __post_init__(self) -> None:
        self.process = RewardProcess(self.timeout_s, self.memory_gb)

    @classmethod
    def from_recipe(cls, names: str | list[str], weights: list[float], kwargs: dict[str, Any],
                    timeout_s: float = DEFAULT_TIMEOUT_S, memory_gb: float = DEFAULT_MEMORY_GB,
                    columns: list[str] | None = None) -> "Scorer":
        """A scorer whose every reward has been imported (in the child) and whose options, and the
        dataset columns it needs when `columns` is given, were checked."""
        names = [names] if isinstance(names, str) else names
        if not names:
            raise EssaError("reward.name: no reward named; give a name or a non-empty list of names")
        if weights and len(weights) != len(names):
            raise EssaError(f"reward.weights: {len(weights)} weights for {len(names)} rewards")
        scorer = cls(" + ".join(names), list(zip(names, weights or [1.0] * len(names))), kwargs, timeout_s,
                     memory_gb)
        try:
            for spec, _ in scorer.specs:
                scorer.process.check(spec, kwargs, columns)
        except BaseException:
            scorer.close()
            raise
        return scorer

    def close(self) -> None:
        self.process.close()

    def _failed(self, message: str) -> None:
        if self.first_error is None:
            self.first_error = message
            self.console.print(f"[yellow]warning:[/] reward {self.name!r}: {message} (scored 0; counted as "
                               "reward_failures in metrics.jsonl; warned once)", markup=True, highlight=False)

    def rows(self, spec: str, prompts: list[str], completions: list[str], columns: dict[str, list[Any]],
             kwargs: dict[str, Any]) -> list[Any]:
        """One value per row from `spec`, None where it failed: the batch in one call, and when that
        fails, each row on its own."""
        n = len(completions)
        try:
            values = self.process.call(spec, prompts, completions, columns, kwargs)
        except RewardFailure as err:
            if n == 1:
                self._failed(str(err))
                return [None]
            return [v for i in range(n) for v in self.rows(spec, prompts[i:i + 1], completions[i:i + 1],
                                                          _row(columns, i), kwargs)]
        if len(values) != n:
            self._failed(f"returned {len(values)} values for {n} completions")
            return [None] * n
        return values

    def __call__(self, prompts: list[str], completions: list[str],
                 columns: dict[str, list[Any]]) -> tuple[np.ndarray, int]:
        """Scores and the number of completions whose score failed."""
        total, failed = np.zeros(len(completions)), np.zeros(len(completions), dtype=bool)
        for spec, weight in self.specs:
            values = self.rows(spec, prompts, completions, columns, self.kwargs)
            scores = [as_score(v) for v in values]
            if any(s is None for s in scores):  # a failed call was already named; this names a bad value
                self._failed("returned None or a value that is not a finite number")
            bad = np.array([s is None for s in scores])
            total += weight * np.array([0.0 if s is None else s for s in scores])
            failed |= bad
        return np.where(failed, 0.0, total), int(failed.sum())
