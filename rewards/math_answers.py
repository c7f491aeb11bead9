"""MATH / PRM800K-style LaTeX answers, verified symbolically with math-verify."""

from __future__ import annotations

from typing import Any

from math_verify import parse, verify


def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion's final answer (\\boxed{} first) equals the reference `answer`.

    math-verify's own timeouts use SIGALRM, which only works on the main thread; they are
    turned off here because essa already runs every reward call under `reward.timeout_s`."""
    scores = []
    for completion, reference in zip(completions, answer):
        gold = parse(reference if "$" in reference or "\\boxed" in reference else f"${reference}$",
                     parsing_timeout=None)
        predicted = parse(completion, parsing_timeout=None)
        scores.append(float(bool(gold) and bool(predicted) and verify(gold, predicted, timeout_seconds=None)))
    return scores
