"""Checkable format instructions (IFEval-like) with graded scores, for the offline quickstart.

Each instruction has an id, a phrasing for the prompt, and a checker that scores a response in
[0, 1]. Scores are graded rather than pass/fail because a small model rarely satisfies an
instruction fully at first: a binary reward gives every candidate 0 and evolution no signal.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from essa.rewards.ifeval_repair import end_phrase, finished, quoted, word_limit
from essa.rewards.task import Task

END_PHRASES = ["is there anything else i can help with?", "that is all.", "hope this helps!", "thank you for reading."]
QUOTE = '"'
MIN_WORDS = 5  # fewer words than the smallest word limit (10) allows, enough to be an answer


@dataclass(frozen=True)
class Instruction:
    describe: Callable[[dict[str, Any]], str]
    check: Callable[[str, dict[str, Any]], float]
    sample: Callable[[random.Random], dict[str, Any]]


def _lowercase(text: str, _: dict) -> float:
    capitals = sum(ch.isupper() for ch in text)
    return max(0.0, 1.0 - capitals / 5)


def _no_commas(text: str, _: dict) -> float:
    return max(0.0, 1.0 - text.count(",") / 3)


def _max_words(text: str, kw: dict) -> float:
    words, limit = len(re.findall(r"\S+", text)), kw["max_words"]
    return 1.0 if words <= limit else max(0.0, 1.0 - (words - limit) / limit)


def _end_phrase(text: str, kw: dict) -> float:
    text, phrase = text.strip().lower(), kw["end_phrase"]
    if text.endswith(phrase):
        return 1.0
    return 0.5 if phrase in text else 0.0


def _quoted(text: str, _: dict) -> float:
    text = text.strip()
    return (0.5 if text.startswith(QUOTE) else 0.0) + (0.5 if len(text) > 1 and text.endswith(QUOTE) else 0.0)


INSTRUCTIONS: dict[str, Instruction] = {
    "lowercase": Instruction(
        lambda kw: "Your entire response must be in lowercase letters, with no capital letters at all.",
        _lowercase, lambda rng: {}),
    "no_commas": Instruction(
        lambda kw: "Do not use any commas in your response.", _no_commas, lambda rng: {}),
    "max_words": Instruction(
        lambda kw: f"Answer in at most {kw['max_words']} words.", _max_words,
        lambda rng: {"max_words": rng.choice([10, 15, 20, 25, 30])}),
    "end_phrase": Instruction(
        lambda kw: f"End your response with the exact phrase \"{kw['end_phrase']}\".", _end_phrase,
        lambda rng: {"end_phrase": rng.choice(END_PHRASES)}),
    "quoted": Instruction(
        lambda kw: "Wrap your entire response in double quotation marks.", _quoted, lambda rng: {}),
}


def score_response(text: str, instructions: list[dict[str, Any]]) -> float:
    """Mean graded score over a prompt's instructions, scaled down for answers under MIN_WORDS words:
    an empty answer has no commas, no capitals and few words, and scored up to 0.75 on most prompts,
    so evolution learned to say nothing (seen in the quickstart's held-out completions)."""
    scores = [INSTRUCTIONS[i["id"]].check(text, i.get("kwargs", {})) for i in instructions]
    return sum(scores) / len(scores) * min(1.0, len(re.findall(r"\S+", text)) / MIN_WORDS)


def reward(prompts: list[str], completions: list[str], instructions: list[list[dict]], **_: Any) -> list[float]:
    """TRL-style reward: one score per completion, from the `instructions` dataset column."""
    return [score_response(text, inst) for text, inst in zip(completions, instructions)]


def repair_one(text: str, instructions: list[dict[str, Any]]) -> str:
    """`text` edited to follow `instructions` (the warm start's `repair`, as essa.rewards.ifeval_repair does for
    IFEval): the word limit first, leaving room for an ending phrase, then the phrase, the case and the
    commas, and the quotes last. With both quotes and an ending phrase the phrase sits inside the quotes:
    the two checkers cannot both be met, and this way each gives at least half."""
    given = {i["id"]: i.get("kwargs", {}) for i in instructions}
    text = finished(text)
    phrase = given.get("end_phrase", {}).get("end_phrase", "")
    if "max_words" in given:
        room = given["max_words"]["max_words"] - len(phrase.split())
        text = word_limit(text, {"relation": "less than", "num_words": room + 1})
    if phrase:
        text = end_phrase(text, {"end_phrase": phrase})
    if "lowercase" in given:
        text = text.lower()
    if "no_commas" in given:
        text = text.replace(",", "")
    return quoted(text, {}) if "quoted" in given else text


def repair(prompts: list[str], completions: list[str], instructions: list[list[dict]], **_: Any) -> list[str]:
    """Each completion edited to follow its prompt's instructions (`warm_start.repair`, docs/recipes.md)."""
    return [repair_one(text, inst) for text, inst in zip(completions, instructions)]


QUESTIONS = [
    "Write a short paragraph about {topic}.",
    "Describe {topic} to a ten-year-old.",
    "Give one piece of advice about {topic}.",
    "Explain why {topic} matters.",
    "Tell a tiny story involving {topic}.",
    "List a few facts about {topic}.",
]

TOPICS = [
    "the ocean", "winter mornings", "honey bees", "the moon", "public libraries", "bicycles", "volcanoes",
    "tea", "friendship", "the rain forest", "chess", "city parks", "owls", "bread baking", "trains",
    "the desert", "music lessons", "lighthouses", "gardening", "snow", "the solar system", "museums",
    "penguins", "recycling", "mountains", "coffee", "sleep", "rivers", "kites", "old maps", "robots",
    "the night sky", "apples", "bridges", "whales", "camping", "clocks", "deserts at night", "pottery",
    "the wind", "thunderstorms", "post offices", "dolphins", "markets", "origami", "forests in autumn",
    "umbrellas", "hot air balloons", "islands", "candles", "cats", "dogs", "castles", "rainbows",
    "farms", "birthdays", "trees", "the alphabet", "photography", "soup",
]


def generate_examples(n: int, seed: int, topics: list[str]) -> list[dict[str, Any]]:
    """`n` prompts, each a task on a topic plus one or two instructions, with an `instructions` column."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        ids = rng.sample(sorted(INSTRUCTIONS), k=rng.choice([1, 2]))
        chosen = [{"id": i, "kwargs": INSTRUCTIONS[i].sample(rng)} for i in ids]
        task = rng.choice(QUESTIONS).format(topic=rng.choice(topics))
        text = " ".join([task] + [INSTRUCTIONS[c["id"]].describe(c["kwargs"]) for c in chosen])
        examples.append({"prompt": text, "instructions": chosen})
    return examples


def splits(cfg: Any, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `format-instructions` source. Held-out prompts use topics never seen in training, so a gain
    is not memorization."""
    heldout_topics, train_topics = TOPICS[::4], [t for i, t in enumerate(TOPICS) if i % 4]
    return (generate_examples(cfg.train_size, seed, train_topics),
            generate_examples(cfg.heldout_size, seed + 1, heldout_topics))


TASK = Task("format-instructions", reward, generator="format-instructions", splits=splits)
