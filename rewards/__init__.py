"""The tasks essa knows, one module each (essa.rewards.task.Task): their rewards, with TRL's signature
fn(prompts, completions, **dataset_columns) -> list[float], and what else essa knows of them."""

from __future__ import annotations

from typing import Callable

from essa.rewards import conciseness, countdown, format_instructions, gsm8k, ifeval, math_answers
from essa.rewards.task import Task

RewardFn = Callable[..., list]

TASKS: dict[str, Task] = {m.TASK.name: m.TASK for m in (conciseness, countdown, format_instructions, gsm8k, ifeval,
                                                        math_answers)}
REGISTRY: dict[str, RewardFn] = {name: task.reward for name, task in TASKS.items()}
GENERATORS: dict[str, Task] = {task.generator: task for task in TASKS.values() if task.generator}


def task_named(names: str | list[str]) -> Task | None:
    """The built-in task of a single reward name (a combination or a user's function has none)."""
    return TASKS.get(names) if isinstance(names, str) else None


def judging(columns: dict | list) -> Task | None:
    """The task whose per-row verdicts these columns allow (e.g. IFEval's instruction lists), if any."""
    return next((t for t in TASKS.values() if t.verdict_columns and all(c in columns for c in t.verdict_columns)),
                None)
