"""Calling reward functions safely: a reward that raises or returns NaN/None scores 0 and is counted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console

from essa.errors import EssaError
from rewards import REGISTRY, RewardFn


@dataclass
class Scorer:
    name: str
    fn: RewardFn
    console: Console = field(default_factory=lambda: Console(stderr=True))
    warned: bool = False

    @classmethod
    def from_name(cls, name: str) -> "Scorer":
        if name not in REGISTRY:
            raise EssaError(f"reward.name: unknown reward {name!r}; available: {', '.join(sorted(REGISTRY))}")
        return cls(name, REGISTRY[name])

    def _warn(self, message: str) -> None:
        if not self.warned:
            self.console.print(f"[yellow]warning:[/] reward {self.name!r}: {message} "
                               "(scored 0; counted as reward_failures in metrics.jsonl; warned once)")
            self.warned = True

    def __call__(self, prompts: list[str], completions: list[str],
                 columns: dict[str, list[Any]]) -> tuple[np.ndarray, int]:
        """Scores and the number of completions whose score failed."""
        try:
            raw = list(self.fn(prompts, completions, **columns))
            if len(raw) != len(completions):
                raise ValueError(f"returned {len(raw)} scores for {len(completions)} completions")
        except Exception as err:  # a user's reward must never stop a run
            self._warn(f"raised {type(err).__name__}: {err}")
            return np.zeros(len(completions)), len(completions)
        bad = [v is None or not isinstance(v, (int, float)) or not math.isfinite(v) for v in raw]
        if any(bad):
            self._warn("returned None or a non-finite value")
        scores = np.array([0.0 if b else float(v) for v, b in zip(raw, bad)])
        return scores, sum(bad)
