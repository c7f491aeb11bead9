"""Reward functions, with TRL's signature: fn(prompts, completions, **dataset_columns) -> list[float]."""

from __future__ import annotations

from typing import Callable

from rewards import conciseness, countdown, format_instructions, gsm8k, ifeval, math_answers

RewardFn = Callable[..., list]

REGISTRY: dict[str, RewardFn] = {
    "conciseness": conciseness.reward,
    "countdown": countdown.reward,
    "format-instructions": format_instructions.reward,
    "gsm8k": gsm8k.reward,
    "ifeval": ifeval.reward,
    "math": math_answers.reward,
}
