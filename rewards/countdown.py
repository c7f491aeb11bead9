"""The Countdown numbers game: reach a target with + − × ÷ over given numbers, each used once.

The model's expression is data, never code: it is parsed with `ast.parse(mode="eval")` and
walked by a tiny evaluator that accepts only integer literals, the four operators and
parentheses, in exact rational arithmetic. Anything else (names, calls, attributes, `**`,
unary operators, very long input) is rejected without being executed.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from fractions import Fraction
from typing import Any

from essa.rewards.task import Task

MAX_CHARS = 200  # longer "expressions" are not Countdown answers and are not parsed
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class Invalid(ValueError):
    """Not a well-formed Countdown expression."""


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise Invalid("division by zero")
        return OPERATORS[type(node.op)](left, right)
    raise Invalid(f"{type(node).__name__} is not allowed")


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Value and the numbers used, or Invalid. Never executes the text."""
    expression = expression.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    if len(expression) > MAX_CHARS or not re.fullmatch(r"[\d\s()+\-*/]+", expression):
        raise Invalid("only digits, + - * / and parentheses are allowed")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise Invalid("not an arithmetic expression") from None
    used: list[int] = []
    return _evaluate(tree, used), used


def answer_text(completion: str) -> str:
    """The text inside the last <answer>...</answer>, else the last non-empty line (without `= target`).
    String searches, not a regex: a lazy `<answer>(.*?)</answer>` is quadratic on unclosed tags."""
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end >= 0 else -1
    if start >= 0:
        text = completion[start + len("<answer>"):end]
    else:
        text = (completion.strip().splitlines() or [""])[-1]
    return text[: MAX_CHARS + 1].split("=")[0]


def score(completion: str, numbers: list[int], target: int) -> float:
    """1.0: a valid expression using each number exactly once that equals the target;
    0.1: a valid expression over the numbers with another value; 0.0 otherwise."""
    try:
        value, used = evaluate(answer_text(completion))
    except Invalid:
        return 0.0
    if sorted(used) != sorted(numbers):
        return 0.0
    return 1.0 if value == target else 0.1


def reward(prompts: list[str], completions: list[str], numbers: list[list[int]], target: list[int],
           **_: Any) -> list[float]:
    return [score(c, n, t) for c, n, t in zip(completions, numbers, target)]


def generate_examples(n: int, seed: int, count: int = 4, low: int = 1, high: int = 99) -> list[dict[str, Any]]:
    """Solvable problems: the target is the value of a random expression over the numbers."""
    rng = random.Random(seed)
    examples: list[dict[str, Any]] = []
    while len(examples) < n:
        numbers = [rng.randint(low, high) for _ in range(count)]
        order = rng.sample(numbers, len(numbers))
        value = Fraction(order[0])
        for number in order[1:]:
            op = rng.choice(list(OPERATORS.values()))
            value = op(value, Fraction(number))
        if value.denominator != 1 or value <= 0:
            continue
        prompt = (f"Using the numbers {numbers}, create an equation that equals {int(value)}. You can use basic "
                  "arithmetic operations (+, -, *, /) and each number exactly once. Show your work, then give "
                  "the final equation in <answer> </answer> tags, for example <answer>(1 + 2) / 3</answer>.")
        examples.append({"prompt": prompt, "numbers": numbers, "target": int(value)})
    return examples


def splits(cfg: Any, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `countdown` source: generated puzzles, the first `heldout_size` held out."""
    rows = generate_examples(cfg.train_size + cfg.heldout_size, seed)
    return rows[cfg.heldout_size:], rows[: cfg.heldout_size]


TASK = Task("countdown", reward, generator="countdown", splits=splits)
