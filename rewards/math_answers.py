"""MATH / PRM800K-style LaTeX answers, verified symbolically with math-verify."""

from __future__ import annotations

import threading
from typing import Any

from essa.rewards.task import Task
from math_verify import parse, verify

TIMEOUT_S = 5  # math-verify's default, per parse and per verify


def reward(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 when the completion's final answer (\\boxed{} first) equals the reference `answer`
    (a string or a number).

    math-verify's own timeouts use SIGALRM, which works only on the main thread: essa's reward
    process calls this there, so one slow row times out alone; elsewhere they are off and the
    caller must bound the call (essa's reward process kills it after `reward.timeout_s`)."""
    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    scores = []
    for completion, reference in zip(completions, answer):
        reference = str(reference)
        gold = parse(reference if "$" in reference or "\\boxed" in reference else f"${reference}$",
                     parsing_timeout=timeout)
        predicted = parse(completion, parsing_timeout=timeout)
        scores.append(float(bool(gold) and bool(predicted) and verify(gold, predicted, timeout_seconds=timeout)))
    return scores


TASK = Task("math", reward, metrics=lambda score_rows, rows, scores: {"accuracy": sum(scores) / len(scores)})
