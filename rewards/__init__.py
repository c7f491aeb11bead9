"""Reward functions, with TRL's signature: fn(prompts, completions, **dataset_columns) -> list[float]."""

from __future__ import annotations

from typing import Callable

from rewards import format_instructions

RewardFn = Callable[..., list]

REGISTRY: dict[str, RewardFn] = {
    "format-instructions": format_instructions.reward,
}
