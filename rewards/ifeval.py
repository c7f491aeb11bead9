"""IFEval: the 25 instruction checkers of lm-eval (extra `ifeval`), strict and loose as in the reference.

Two checkers need NLTK's punkt data (`length_constraints:number_sentences` counts sentences,
`change_case:capital_word_frequency` tokenizes words). Offline, where punkt cannot be
downloaded, essa evaluates those two with the same logic over a regex sentence splitter and
word tokenizer instead, and warns once; every other checker is lm-eval's own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

from essa.rewards.task import Task

PUNKT_CHECKERS = {"length_constraints:number_sentences", "change_case:capital_word_frequency"}
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


@functools.lru_cache(maxsize=1)
def _lm_eval():
    # At import lm-eval tries to download punkt and then prints "Downloaded punkt_tab" even when the
    # download failed (offline): noise. Whether punkt is there is said once, by punkt_available().
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), \
                contextlib.redirect_stderr(devnull):
            from lm_eval.tasks.ifeval import instructions_registry, utils
    except ImportError as err:
        raise ImportError("the ifeval reward needs lm-eval: pip install -e \".[ifeval]\"") from err
    from langdetect import DetectorFactory

    # langdetect reseeds the global `random` from the OS at every call unless given a seed, so the same
    # answer could pass and fail `language:response_language` from one evaluation to the next (two
    # 541-prompt evaluations of identical completions: 0.323 and 0.355 on that checker).
    DetectorFactory.seed = 0
    return instructions_registry, utils


@functools.lru_cache(maxsize=1)
def punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        warnings.warn("NLTK punkt data is not installed (offline?): IFEval's number_sentences and "
                      "capital_word_frequency use essa's regex sentence splitter and tokenizer instead", stacklevel=2)
        return False


def count_sentences(text: str) -> int:
    return len([s for s in SENTENCE_END.split(text.strip()) if s.strip()])


def _fallback_check(instruction, instruction_id: str, response: str) -> bool:
    """lm-eval's logic for the two punkt checkers, over regex tokenization."""
    args = instruction.get_instruction_args()
    if instruction_id == "length_constraints:number_sentences":
        count, limit, relation = count_sentences(response), args["num_sentences"], args["relation"]
    else:
        words = re.findall(r"\w+(?:'\w+)?|[^\w\s]", response)
        count, limit, relation = sum(w.isupper() for w in words), args["capital_frequency"], args["capital_relation"]
    return count < limit if relation == "less than" else count >= limit


@contextlib.contextmanager
def _seeded_random(seed: int) -> Iterator[None]:
    """lm-eval draws from the global `random`; seed it for one call and restore the caller's state."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _follows(instruction_id: str, kwargs: dict, prompt: str, response: str) -> bool:
    registry, _ = _lm_eval()
    instruction = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    # lm-eval (like the reference) draws a random value for a missing or invalid argument (IFEval
    # row 1122 asks for the letter '#'); a fixed seed per prompt keeps the verdict, and so a
    # resumed run, reproducible.
    with _seeded_random(zlib.crc32(f"{instruction_id}\n{prompt}".encode())):
        instruction.build_description(**{k: v for k, v in kwargs.items() if v})
    args = instruction.get_instruction_args()
    if args and "prompt" in args:
        instruction.build_description(prompt=prompt)
    if not response.strip():
        return False
    if instruction_id in PUNKT_CHECKERS and not punkt_available():
        return _fallback_check(instruction, instruction_id, response)
    with _seeded_random(0):  # restores the caller's `random`, which langdetect reseeds
        return bool(instruction.check_following(response))


def loose_variants(response: str) -> list[str]:
    """The reference's loose mode: the response with its first/last line and/or '*' removed."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [r.replace("*", "") for r in cut]


def verdicts(prompt: str, response: str, instruction_id_list: list[str], kwargs: list[dict],
             loose: bool = False) -> list[bool]:
    """Per instruction: followed or not, as IFEval's strict (or loose) evaluation decides."""
    responses = loose_variants(response) if loose else [response]
    return [any(_follows(i, kw or {}, prompt, r) for r in responses) for i, kw in zip(instruction_id_list, kwargs)]


def reward(prompts: list[str], completions: list[str], instruction_id_list: list[list[str]],
           kwargs: list[list[dict]], mode: str = "strict", per_prompt: str = "fraction", **_: Any) -> list[float]:
    """Per prompt: the fraction of its instructions followed (`per_prompt="fraction"`) or 1 only
    when all are (`"all"`), judged strictly or loosely (`mode`)."""
    if mode not in ("strict", "loose") or per_prompt not in ("fraction", "all"):
        raise ValueError(f"mode must be 'strict' or 'loose' and per_prompt 'fraction' or 'all', "
                         f"got {mode!r} and {per_prompt!r}")
    scores = []
    for prompt, response, ids, kws in zip(prompts, completions, instruction_id_list, kwargs):
        followed = verdicts(prompt, response, ids, kws, loose=mode == "loose")
        scores.append(float(all(followed)) if per_prompt == "all" else sum(followed) / len(followed))
    return scores


def instruction_verdicts(prompts: list[str], completions: list[str], instruction_id_list: list[list[str]],
                         kwargs: list[list[dict]], **_: Any) -> list[dict[str, list[bool]]]:
    """Per prompt, IFEval's strict and loose verdict for each of its instructions (what `essa score`
    and `essa eval` report), in the shape of lm-eval's output rows."""
    return [{"follow_instruction_list_strict": verdicts(p, r, ids, kws, loose=False),
             "follow_instruction_list_loose": verdicts(p, r, ids, kws, loose=True)}
            for p, r, ids, kws in zip(prompts, completions, instruction_id_list, kwargs)]


def _seeded_description(instruction, seed: int) -> tuple[str, dict]:
    """lm-eval's own description with its own random choices, made reproducible by `seed`."""
    with _seeded_random(seed):
        return instruction.build_description(), instruction.get_instruction_args() or {}


def generate_examples(n: int, seed: int) -> list[dict[str, Any]]:
    """IFEval-style training prompts: a task on one of essa's topics plus one to three
    non-conflicting instructions, phrased and parameterized by lm-eval's checkers themselves,
    with `instruction_id_list` and `kwargs` columns the `ifeval` reward accepts."""
    from essa.rewards.format_instructions import QUESTIONS, TOPICS

    registry, _ = _lm_eval()
    pool = sorted(set(registry.INSTRUCTION_DICT) - {"combination:repeat_prompt"})  # needs the prompt itself
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        ids: list[str] = []
        wanted = rng.choice([1, 2, 3])
        for candidate in rng.sample(pool, len(pool)):
            if len(ids) == wanted:
                break
            if not any(candidate in registry.INSTRUCTION_CONFLICTS.get(i, ()) or
                       i in registry.INSTRUCTION_CONFLICTS.get(candidate, ()) for i in ids):
                ids.append(candidate)
        described = [_seeded_description(registry.INSTRUCTION_DICT[i](i), rng.randrange(2**32)) for i in ids]
        task = rng.choice(QUESTIONS).format(topic=rng.choice(TOPICS))
        examples.append({"prompt": " ".join([task] + [text for text, _ in described]),
                         "instruction_id_list": ids, "kwargs": [kwargs for _, kwargs in described]})
    return examples


VERDICTS = "essa.rewards.ifeval:instruction_verdicts"
STRICT, LOOSE = "follow_instruction_list_strict", "follow_instruction_list_loose"


def splits(cfg: Any, seed: int) -> tuple[list[dict], list[dict]]:
    """The `ifeval-generated` source: generated prompts, the first `heldout_size` held out."""
    rows = generate_examples(cfg.train_size + cfg.heldout_size, seed)
    return rows[cfg.heldout_size:], rows[: cfg.heldout_size]


def row_verdicts(score_rows: Any, rows: list[dict[str, Any]]) -> list[dict[str, list[bool]]]:
    """Strict and loose verdicts per row (`prompt`, `response`, `instruction_id_list`, `kwargs`), computed
    in the reward process; a row whose check fails counts as following none of its instructions."""
    columns = {k: [r[k] for r in rows] for k in ("instruction_id_list", "kwargs")}
    values = score_rows(VERDICTS, [r["prompt"] for r in rows], [r["response"] for r in rows], columns, {})
    out = []
    for row, value in zip(rows, values):
        valid = isinstance(value, dict) and all(isinstance(value.get(k), list) for k in (STRICT, LOOSE))
        none = [False] * len(row["instruction_id_list"])
        out.append(value if valid else {STRICT: none, LOOSE: none})
    return out


def accuracies(rows: list[dict[str, Any]]) -> dict[str, float]:
    """IFEval's four accuracies (prompt level: all followed; instruction level; strict and loose),
    then the strict accuracy of each instruction type (`strict <type>`), so a user sees what moved.
    Rows hold `instruction_id_list` and the verdict lists."""
    metrics = {}
    for mode, key in (("strict", STRICT), ("loose", LOOSE)):
        lists = [r[key] for r in rows]
        metrics[f"prompt_level_{mode}"] = sum(all(v) for v in lists) / len(lists)
        metrics[f"instruction_level_{mode}"] = sum(map(sum, lists)) / max(1, sum(map(len, lists)))
    by_type: dict[str, list[bool]] = {}
    for r in rows:
        for kind, followed in zip(r["instruction_id_list"], r[STRICT]):
            by_type.setdefault(kind, []).append(followed)
    return metrics | {f"strict {kind}": sum(v) / len(v) for kind, v in sorted(by_type.items())}


def eval_metrics(score_rows: Any, rows: list[dict[str, Any]], scores: list[float]) -> dict[str, float]:
    return accuracies([r | v for r, v in zip(rows, row_verdicts(score_rows, rows))])


def with_instructions(rows: list[dict[str, Any]], source: str, read_hub: Any) -> list[dict[str, Any]]:
    """`essa score`'s rows: those without `instruction_id_list`/`kwargs` take them from the IFEval prompt
    with the same text (`read_hub(id, config, split)`; rows whose prompt is not one keep none: reported,
    not scored); then checked."""
    if not all("instruction_id_list" in r and "kwargs" in r for r in rows):
        by_prompt = {r["prompt"]: r for r in read_hub("google/IFEval", "", "train")}
        rows = [dict(row, instruction_id_list=by_prompt[row["prompt"]]["instruction_id_list"],
                     kwargs=by_prompt[row["prompt"]]["kwargs"])
                if "instruction_id_list" not in row and row["prompt"] in by_prompt else row for row in rows]
    for n, row in enumerate(rows, 1):
        ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
        if "instruction_id_list" in row and not (
                isinstance(ids, list) and isinstance(kwargs, list) and len(ids) == len(kwargs) and ids
                and all(isinstance(i, str) for i in ids) and all(k is None or isinstance(k, dict) for k in kwargs)):
            raise ValueError(f"row {n} of {source}: 'instruction_id_list' must be a non-empty list of "
                             "strings and 'kwargs' a list of objects (or null) of the same length")
    return rows


def heldout_details(score_rows: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each held-out row of a run carries beside its reward: its instructions and verdicts."""
    return [{"instructions": r["instruction_id_list"], "strict": v[STRICT], "loose": v[LOOSE]}
            for r, v in zip(rows, row_verdicts(score_rows, rows))]


TASK = Task("ifeval", reward, generator="ifeval-generated", splits=splits, extra="ifeval", metrics=eval_metrics,
            verdicts=row_verdicts, verdict_columns=("instruction_id_list", "kwargs"), prepare=with_instructions,
            scorable=lambda row: "instruction_id_list" in row,
            skipped="not an IFEval prompt: no instructions to check", details=heldout_details,
            local_copies={("google/IFEval", "train"): "ifeval/input_data.jsonl"})
