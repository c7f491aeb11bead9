"""Conciseness (as in ES-at-Scale's conciseness task): a correct answer, as short as the reference.

score = correctness × length penalty, where correctness is 1 when the reference answer appears
in the completion (case, punctuation and spacing ignored) and the length penalty is
min(1, reference words / completion words): 1 for an answer no longer than the reference,
falling as the completion grows.
"""

from __future__ import annotations

import re
from typing import Any

from essa.rewards.task import Task


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def score(completion: str, reference: str) -> float:
    if not _normalize(reference) or _normalize(reference) not in _normalize(completion):
        return 0.0
    return min(1.0, len(reference.split()) / max(1, len(completion.split())))


def reward(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    return [score(c, str(a)) for c, a in zip(completions, answer)]


TASK = Task("conciseness", reward)
