"""`essa score`: score existing completions (rows with `prompt`, `response` and dataset columns)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from essa.data import read_file, read_hub
from essa.errors import EssaError
from essa.files import check_output_file, write_text
from essa.rewards import task_named
from essa.scoring import Scorer


def read_rows(source: Path) -> list[dict[str, Any]]:
    """Rows of --input: JSON objects whose `prompt` and `response` are strings."""
    if not source.is_file():
        raise EssaError(f"--input: {source} not found")
    rows = read_file(source, "--input")
    if not rows:
        raise EssaError(f"--input: {source} has no rows")
    for n, row in enumerate(rows, 1):
        if not all(isinstance(row.get(k), str) for k in ("prompt", "response")):
            raise EssaError(f"--input: row {n} of {source} needs fields 'prompt' and 'response' holding strings")
    return rows


def score_file(reward: str, kwargs: dict[str, Any], source: Path, out: Path, timeout_s: float = 60.0,
               memory_gb: float = 4.0) -> dict[str, float]:
    check_output_file(out, "--output")
    rows = read_rows(source)
    task = task_named(reward)
    if task and task.prepare:  # e.g. IFEval's instructions filled in from the IFEval prompt of the same text
        try:
            rows = task.prepare(rows, str(source), read_hub)
        except ValueError as err:
            raise EssaError(f"--input: {err}") from None
    # Output keeps the input's order; rows the task cannot judge are reported, not scored.
    scorable = [i for i, r in enumerate(rows) if not (task and task.scorable) or task.scorable(r)]
    if not scorable:
        raise EssaError(f"--input: no row of {source} can be scored by {reward!r}: {task.skipped}")
    batch = [rows[i] for i in scorable]
    names = sorted({k for r in batch for k in r} - {"prompt", "response"})
    columns = {k: [r.get(k) for r in batch] for k in names}
    scorer = Scorer.from_recipe(reward, [], kwargs, timeout_s, memory_gb, names)
    try:
        scores, failures = scorer([r["prompt"] for r in batch], [r["response"] for r in batch], columns)
        if failures == len(batch):
            raise EssaError(f"reward {reward!r} failed on every row ({scorer.first_error}); check --reward-kwargs "
                            f"and the columns of {source}")
        verdicts = task.verdicts(scorer.rows, batch) if task and task.verdicts else [{}] * len(batch)
        extra = task.metrics(scorer.rows, batch, [float(x) for x in scores]) if task and task.metrics else {}
    finally:
        scorer.close()
    out_rows = [dict(r, reward=None, skipped=task.skipped if task else "") for r in rows]  # all replaced without a task
    for i, score, verdict in zip(scorable, scores, verdicts):
        out_rows[i] = dict(rows[i], reward=float(score), **verdict)
    write_text(out, "".join(json.dumps(r) + "\n" for r in out_rows))
    return {"rows": len(rows), "scored_rows": len(batch), "reward_mean": float(scores.mean()),
            "reward_failures": failures} | extra
