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

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = [re.compile(r","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$")]


def normalize(answer: str) -> str:
    """lm-eval's exact_match normalization (regexes_to_ignore, then strip)."""
    for pattern in IGNORE:
        answer = pattern.sub("", answer)
    return answer.strip()


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


def reward(prompts: list[str], completions: list[str], answer: list[str], mode: str = "flexible",
           **_: Any) -> list[float]:
    """1.0 when the extracted answer equals the reference's `#### n`, else 0.0."""
    scores = []
    for text, reference in zip(completions, answer):
        got = extract(text, mode)
        scores.append(float(got is not None and same_number(got, reference)))
    return scores
