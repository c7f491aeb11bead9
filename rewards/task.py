"""What essa knows of one task, in one place.

Each task module of this package (format instructions, IFEval, GSM8K, MATH, Countdown, conciseness)
ends with a `TASK`: its reward, and where it has them its prompt generator, the extra it needs and
what `essa eval`, `essa score` and a run's completions report beside the reward. Generic modules
ask `essa.rewards.task_named(name)` or `essa.rewards.generator(source)`, never a task's name.

Task modules are imported in the reward child process too, so a hook that scores rows is handed
the parent's `score_rows` (essa.scoring.Scorer.rows: a function spec run in the child, failures
scored as None) instead of importing essa's scoring itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Rows = list[dict[str, Any]]
# (function spec, prompts, completions, columns, kwargs) -> one value per row, None where it failed
ScoreRows = Callable[[str, list[str], list[str], dict[str, list[Any]], dict[str, Any]], list[Any]]


@dataclass(frozen=True)
class Task:
    name: str                          # the built-in reward's name (`reward.name`)
    reward: Callable[..., list]        # TRL's signature: fn(prompts, completions, **columns) -> list[float]
    generator: str = ""                # the `data.source` name of its prompt generator, if it has one
    splits: Callable[[Any, int], tuple[Rows, Rows]] | None = None  # (train, held-out) rows for a DataSection, seed
    extra: str = ""                    # the optional extra (pyproject) its reward and generator import
    # its hub data sets' local copies: (hub id, split) -> file under ../shared/data or $ESSA_DATA_DIR
    local_copies: dict[tuple[str, str], str] = field(default_factory=dict)
    # `essa eval`'s metrics beside the mean reward: (score_rows, rows with prompt/response/columns, scores)
    metrics: Callable[[ScoreRows, Rows, list[float]], dict[str, float]] | None = None
    # per-row verdicts that `essa score` writes into each row, and the columns they need
    verdicts: Callable[[ScoreRows, Rows], Rows] | None = None
    verdict_columns: tuple[str, ...] = ()
    # `essa score`: the input rows (and their file's name) made scorable, with columns filled in from the
    # task's own hub data (read with the given read_hub(id, config, split)) and checked (ValueError: why
    # not), and why a row that is not scorable is skipped
    prepare: Callable[[Rows, str, Callable[[str, str, str], Rows]], Rows] | None = None
    scorable: Callable[[dict[str, Any]], bool] | None = None
    skipped: str = ""
    # a run's held-out completions: what each row carries beside its reward
    details: Callable[[ScoreRows, Rows], Rows] | None = None
