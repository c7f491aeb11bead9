"""What the model said: the prompts, completions and per-row rewards of every held-out evaluation.

Each evaluation is one file, `completions/iter-NNNNNN.jsonl` in the run directory (iteration 0 is
the initial adapter), so any two evaluations, such as the base and the best center, can be compared
row by row. Rows that a task can judge one by one (IFEval's, with `instruction_id_list`) also carry
what that task says of them (essa.rewards.task.Task.details: its strict and loose verdict per instruction).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from essa.evaluation import Evaluation, Task
from essa.files import write_text
from essa.rewards import judging
from essa.run_dir import COMPLETIONS
from essa.scoring import Scorer


def heldout_rows(task: Task, evaluation: Evaluation, scorer: Scorer) -> list[dict[str, Any]]:
    """One row per held-out prompt: prompt, completion, reward, and a task's per-row details where they apply."""
    texts = evaluation.completions[0] if evaluation.completions else [""] * len(task.prompts)
    rows = [{"prompt": p, "completion": c, "reward": float(r)}
            for p, c, r in zip(task.prompts, texts, evaluation.scores[0])]
    judge = judging(task.columns)
    if judge and judge.details:
        checked = [{"prompt": p, "response": c} | {k: task.columns[k][i] for k in judge.verdict_columns}
                   for i, (p, c) in enumerate(zip(task.prompts, texts))]
        for row, details in zip(rows, judge.details(scorer.rows, checked)):
            row |= details
    return rows


def path_for(run_dir: Path, iteration: int) -> Path:
    return run_dir / COMPLETIONS / f"iter-{iteration:06d}.jsonl"


def write(run_dir: Path, iteration: int, rows: list[dict[str, Any]]) -> Path:
    path = path_for(run_dir, iteration)
    path.parent.mkdir(exist_ok=True)
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read(run_dir: Path, iteration: int) -> list[dict[str, Any]] | None:
    path = path_for(run_dir, iteration)
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
