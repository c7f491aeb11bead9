"""`essa score`: score existing completions (rows with `prompt`, `response` and dataset columns)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from essa.data import read_file
from essa.errors import EssaError
from essa.scoring import Scorer


def ifeval_verdicts(row: dict[str, Any]) -> dict[str, list[bool]]:
    from rewards import ifeval

    args = (row["prompt"], row["response"], row["instruction_id_list"], row["kwargs"])
    return {"follow_instruction_list_strict": ifeval.verdicts(*args, loose=False),
            "follow_instruction_list_loose": ifeval.verdicts(*args, loose=True)}


def with_ifeval_instructions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that lack `instruction_id_list`/`kwargs` take them from the IFEval prompt with the same
    text; rows whose prompt is not an IFEval prompt keep none (they are reported, not scored)."""
    if all("instruction_id_list" in r and "kwargs" in r for r in rows):
        return rows
    from essa.data import read_hub

    by_prompt = {r["prompt"]: r for r in read_hub("google/IFEval", "", "train")}
    filled = []
    for row in rows:
        known = by_prompt.get(row["prompt"])
        if "instruction_id_list" not in row and known:
            row = dict(row, instruction_id_list=known["instruction_id_list"], kwargs=known["kwargs"])
        filled.append(row)
    return filled


def ifeval_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """IFEval's four accuracies: prompt level (all followed) and instruction level, strict and loose."""
    metrics = {}
    for mode in ("strict", "loose"):
        lists = [r[f"follow_instruction_list_{mode}"] for r in rows]
        metrics[f"prompt_level_{mode}"] = sum(all(v) for v in lists) / len(lists)
        metrics[f"instruction_level_{mode}"] = sum(map(sum, lists)) / sum(map(len, lists))
    return metrics


def score_file(reward: str, kwargs: dict[str, Any], source: Path, out: Path) -> dict[str, float]:
    if not source.is_file():
        raise EssaError(f"--input: {source} not found")
    rows = read_file(source)
    missing = next((i for i, r in enumerate(rows) if "prompt" not in r or "response" not in r), None)
    if missing is not None:
        raise EssaError(f"--input: row {missing + 1} of {source} needs fields 'prompt' and 'response'")
    if not rows:
        raise EssaError(f"--input: {source} has no rows")
    if reward == "ifeval":
        rows = with_ifeval_instructions(rows)
    # Output keeps the input's order; IFEval rows without instructions are reported, not scored.
    scorable = [i for i, r in enumerate(rows) if reward != "ifeval" or "instruction_id_list" in r]
    batch = [rows[i] for i in scorable]
    scorer = Scorer.from_recipe(reward, [], kwargs, timeout_s=600)
    columns = {k: [r.get(k) for r in batch] for k in batch[0] if k not in ("prompt", "response")}
    scores, failures = scorer([r["prompt"] for r in batch], [r["response"] for r in batch], columns)
    out_rows = [dict(r, reward=None, skipped="not an IFEval prompt: no instructions to check") for r in rows]
    for i, score in zip(scorable, scores):
        out_rows[i] = dict(rows[i], reward=float(score))
        if reward == "ifeval":
            out_rows[i].update(ifeval_verdicts(rows[i]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in out_rows))
    scored = [out_rows[i] for i in scorable]
    metrics = {"rows": len(rows), "scored_rows": len(scored), "reward_mean": float(scores.mean()),
               "reward_failures": failures}
    return metrics | (ifeval_metrics(scored) if reward == "ifeval" else {})
