"""What the model said: the prompts, completions and per-row rewards of every held-out evaluation.

Each evaluation is one file, `completions/iter-NNNNNN.jsonl` in the run directory (iteration 0 is
the initial adapter), so any two evaluations, such as the base and the best center, can be compared
row by row. For IFEval-style rows (with `instruction_id_list`) each row also carries its strict and
loose verdict per instruction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from essa.evaluation import Evaluation, Task
from essa.files import write_text
from essa.score import ifeval_verdicts
from essa.scoring import Scorer

COMPLETIONS = "completions"


def heldout_rows(task: Task, evaluation: Evaluation, scorer: Scorer) -> list[dict[str, Any]]:
    """One row per held-out prompt: prompt, completion, reward, and IFEval verdicts where they apply."""
    texts = evaluation.completions[0] if evaluation.completions else [""] * len(task.prompts)
    rows = [{"prompt": p, "completion": c, "reward": float(r)}
            for p, c, r in zip(task.prompts, texts, evaluation.scores[0])]
    if "instruction_id_list" in task.columns and "kwargs" in task.columns:
        checked = [{"prompt": p, "response": c, "instruction_id_list": i, "kwargs": k}
                   for p, c, i, k in zip(task.prompts, texts, task.columns["instruction_id_list"],
                                         task.columns["kwargs"])]
        for row, ids, verdict in zip(rows, task.columns["instruction_id_list"], ifeval_verdicts(scorer, checked)):
            row["instructions"] = ids
            row["strict"] = verdict["follow_instruction_list_strict"]
            row["loose"] = verdict["follow_instruction_list_loose"]
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
