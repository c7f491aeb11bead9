"""GSM8K answers, extracted the way lm-eval's GSM8K task filters them.

lm-eval's two filters: *strict-match* takes the first `#### <number>`; *flexible-extract* takes
the last number-like run in the text. Both answers and references are then normalized as
lm-eval's exact_match does: commas, `$`, everything up to `#### ` and a trailing period are
removed. essa also reads a LaTeX `\\boxed{...}` answer first, since that is what the math system
prompt asks for.
"""

from __future__ import annotations

import re
from typing import Any

from essa.rewards.task import Task

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
MODES = ("strict", "flexible")
TRAILING_PERIOD = re.compile(r"\.$")


def normalize(answer: str) -> str:
    """lm-eval's exact_match normalization (its regexes_to_ignore `,`, `\\$`, `(?s).*#### `, `\\.$`,
    then strip), in linear time: the `.*#### ` regex backtracks quadratically on long digit runs."""
    answer = answer.replace(",", "").replace("$", "")
    head, sep, tail = answer.rpartition("#### ")
    answer = tail if sep else answer
    return TRAILING_PERIOD.sub("", answer).strip()


def boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract(text: str, mode: str = "flexible") -> str | None:
    """The model's final answer: `strict` (#### n only) or `flexible` (boxed, #### n, else last number)."""
    strict = STRICT.search(text)
    if mode == "strict":
        return strict.group(1) if strict else None
    box = boxed(text)
    if box is not None:
        return box
    if strict:
        return strict.group(1)
    matches = FLEXIBLE.findall(text)
    if not matches:
        return None
    return next(group for group in matches[-1] if group)


def same_number(a: str, b: str) -> bool:
    a, b = normalize(a), normalize(b)
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def reward(prompts: list[str], completions: list[str], answer: list[Any], mode: str = "flexible",
           **_: Any) -> list[float]:
    """1.0 when the extracted answer equals the reference (`... #### n`, or a plain number), else 0.0."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    scores = []
    for text, reference in zip(completions, answer):
        got = extract(text, mode)
        scores.append(float(got is not None and same_number(got, str(reference))))
    return scores


def eval_metrics(score_rows: Any, rows: list[dict[str, Any]], scores: list[float]) -> dict[str, float]:
    """lm-eval reports GSM8K under both of its filters; so does essa eval (rows with an `answer`)."""
    if not rows or "answer" not in rows[0]:
        return {}
    prompts, completions = [r["prompt"] for r in rows], [r["response"] for r in rows]
    columns = {"answer": [r["answer"] for r in rows]}
    return {f"accuracy_{mode}": sum(float(c or 0.0) for c in score_rows("gsm8k", prompts, completions, columns,
                                                                         {"mode": mode})) / len(rows)
            for mode in ("strict", "flexible")}


TASK = Task("gsm8k", reward, metrics=eval_metrics,
            local_copies={("openai/gsm8k", "train"): "gsm8k/train.jsonl", ("openai/gsm8k", "test"): "gsm8k/test.jsonl"})
