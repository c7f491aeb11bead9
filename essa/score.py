"""`essa score`: score existing completions (rows with `prompt`, `response` and dataset columns)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from essa.data import read_file
from essa.errors import EssaError
from essa.files import check_output_file, write_text
from essa.scoring import Scorer

VERDICTS = "rewards.ifeval:instruction_verdicts"


def ifeval_verdicts(scorer: Scorer, rows: list[dict[str, Any]]) -> list[dict[str, list[bool]]]:
    """Strict and loose verdicts per row, computed in the reward process; a row whose check fails
    counts as following none of its instructions."""
    columns = {k: [r[k] for r in rows] for k in ("instruction_id_list", "kwargs")}
    values = scorer.rows(VERDICTS, [r["prompt"] for r in rows], [r["response"] for r in rows], columns, {})
    out = []
    for row, value in zip(rows, values):
        valid = isinstance(value, dict) and all(isinstance(value.get(f"follow_instruction_list_{m}"), list)
                                                 for m in ("strict", "loose"))
        none = [False] * len(row["instruction_id_list"])
        out.append(value if valid else {"follow_instruction_list_strict": none, "follow_instruction_list_loose": none})
    return out


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
    """IFEval's four accuracies (prompt level: all followed; instruction level; strict and loose),
    then the strict accuracy of each instruction type (`strict <type>`), so a user sees what moved.
    Rows hold `instruction_id_list` and the verdict lists."""
    metrics = {}
    for mode in ("strict", "loose"):
        lists = [r[f"follow_instruction_list_{mode}"] for r in rows]
        metrics[f"prompt_level_{mode}"] = sum(all(v) for v in lists) / len(lists)
        metrics[f"instruction_level_{mode}"] = sum(map(sum, lists)) / max(1, sum(map(len, lists)))
    by_type: dict[str, list[bool]] = {}
    for r in rows:
        for kind, followed in zip(r["instruction_id_list"], r["follow_instruction_list_strict"]):
            by_type.setdefault(kind, []).append(followed)
    return metrics | {f"strict {kind}": sum(v) / len(v) for kind, v in sorted(by_type.items())}


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


def check_ifeval_rows(rows: list[dict[str, Any]], source: Path) -> None:
    for n, row in enumerate(rows, 1):
        ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
        if "instruction_id_list" in row and not (
                isinstance(ids, list) and isinstance(kwargs, list) and len(ids) == len(kwargs) and ids
                and all(isinstance(i, str) for i in ids) and all(k is None or isinstance(k, dict) for k in kwargs)):
            raise EssaError(f"--input: row {n} of {source}: 'instruction_id_list' must be a non-empty list of "
                            "strings and 'kwargs' a list of objects (or null) of the same length")


def score_file(reward: str, kwargs: dict[str, Any], source: Path, out: Path, timeout_s: float = 60.0,
               memory_gb: float = 4.0) -> dict[str, float]:
    check_output_file(out, "--output")
    rows = read_rows(source)
    if reward == "ifeval":
        rows = with_ifeval_instructions(rows)
        check_ifeval_rows(rows, source)
    # Output keeps the input's order; IFEval rows without instructions are reported, not scored.
    scorable = [i for i, r in enumerate(rows) if reward != "ifeval" or "instruction_id_list" in r]
    if not scorable:
        raise EssaError(f"--input: no row of {source} is an IFEval prompt or has 'instruction_id_list'")
    batch = [rows[i] for i in scorable]
    names = sorted({k for r in batch for k in r} - {"prompt", "response"})
    columns = {k: [r.get(k) for r in batch] for k in names}
    scorer = Scorer.from_recipe(reward, [], kwargs, timeout_s, memory_gb, names)
    try:
        scores, failures = scorer([r["prompt"] for r in batch], [r["response"] for r in batch], columns)
        if failures == len(batch):
            raise EssaError(f"reward {reward!r} failed on every row ({scorer.first_error}); check --reward-kwargs "
                            f"and the columns of {source}")
        verdicts = ifeval_verdicts(scorer, batch) if reward == "ifeval" else [{}] * len(batch)
    finally:
        scorer.close()
    out_rows = [dict(r, reward=None, skipped="not an IFEval prompt: no instructions to check") for r in rows]
    for i, score, verdict in zip(scorable, scores, verdicts):
        out_rows[i] = dict(rows[i], reward=float(score), **verdict)
    write_text(out, "".join(json.dumps(r) + "\n" for r in out_rows))
    scored = [out_rows[i] for i in scorable]
    metrics = {"rows": len(rows), "scored_rows": len(scored), "reward_mean": float(scores.mean()),
               "reward_failures": failures}
    return metrics | (ifeval_metrics(scored) if reward == "ifeval" else {})
