"""`essa eval`: the base model and adapters on a recipe's held-out prompts, side by side.

The base model and the first adapter are evaluated in one batched generation: with the adapter's
factors as the search space (trainable fraction 1), the adapter is the zero offset and the base
model is the offset that sets every singular value to 0 (a zero delta, exactly). Each further
adapter (e.g. other seeds) is one more generation on the same loaded model, so the base model is
generated once however many adapters are compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from essa import extras
from essa.data import render
from essa.engines.load import engine_for
from essa.files import write_text
from essa.models import load_model
from essa.preflight import check_model, load_data
from essa.progress import ChunkSteps, phase
from essa.recipe import Recipe
from essa.rewards import task_named
from essa.scoring import Scorer
from essa.svd import SVDSpace, build_space


def metrics_for(recipe: Recipe, rows: list[dict], completions: list[str], scorer: Scorer) -> dict[str, float]:
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != recipe.data.prompt_field}
    prompts = [r[recipe.data.prompt_field] for r in rows]
    scores, failures = scorer(prompts, completions, columns)
    metrics = {"reward_mean": float(scores.mean()), "reward_failures": failures}
    task = task_named(recipe.reward.name)
    if task and task.metrics:  # the task's own metrics beside the reward (GSM8K's filters, IFEval's accuracies)
        responses = [{**r, "prompt": p, "response": c} for p, c, r in zip(prompts, completions, rows)]
        metrics |= task.metrics(scorer.rows, responses, [float(x) for x in scores])
    return metrics


def evaluate(recipe: Recipe, adapters: list[Path], limit: int | None, console: Console) -> dict:
    with phase(console, "checking the model config, data and reward"):
        extras.check(extras.input_needs(recipe))
        for adapter in adapters or [None]:
            check_model(recipe, adapter, "--adapter")
        _, heldout = load_data(recipe)
        reward = recipe.reward
        scorer = Scorer.from_recipe(reward.name, reward.weights, reward.kwargs, reward.timeout_s, reward.memory_gb,
                                    sorted(heldout.columns()))
    try:
        return _evaluate(recipe, adapters, heldout.rows[:limit] if limit else heldout.rows, scorer, console)
    finally:
        scorer.close()


def adapter_names(adapters: list[Path]) -> list[str]:
    """Report keys: "adapter" for a single one (as before), else each adapter's path as given."""
    return ["adapter"] if len(adapters) == 1 else [str(a) for a in adapters]


def _evaluate(recipe: Recipe, adapters: list[Path], rows: list[dict], scorer: Scorer, console: Console) -> dict:
    with phase(console, "loading the model"):
        model, tokenizer = load_model(recipe.model)
    prompts = render(tokenizer, [r[recipe.data.prompt_field] for r in rows], recipe.data)
    completions: list[list[str]] = []
    for n, adapter in enumerate(adapters or [None]):
        with phase(console, f"reading the adapter {adapter}" if adapter else "building the base model's space"):
            lora = recipe.lora
            space = SVDSpace(build_space(model, lora.rank, lora.alpha, lora.target_modules, str(adapter or ""),
                                         1.0).modules, 1.0)
        initial = torch.cat([torch.cat([m.a.s, m.b.s]) for m in space.modules])
        candidates = torch.stack(([-initial] if n == 0 else []) + ([torch.zeros_like(initial)] if adapter else []))
        engine = engine_for(model, tokenizer, space, recipe.generation)
        what = (f"generating for {len(rows)} prompts with " + ("the base model" if n == 0 else "")
                + (" and " if n == 0 and adapter else "") + (f"the adapter {adapter}" if adapter else ""))
        with phase(console, what), ChunkSteps(console, "eval chunks", bar=False) as progress:
            completions += engine.generate(candidates, prompts, progress, progress.rows).completions
        engine.close()
    names = ["base"] + adapter_names(adapters)
    with phase(console, f"scoring {len(names) * len(rows)} completions"):
        results = {n: metrics_for(recipe, rows, c, scorer) for n, c in zip(names, completions)}
    return {"recipe": recipe.source, "adapter": str(adapters[0]) if len(adapters) == 1 else None,
            "adapters": [str(a) for a in adapters], "prompts": len(rows), "results": results,
            "completions": [{"prompt": r[recipe.data.prompt_field], **dict(zip(names, outs))}
                            for r, outs in zip(rows, zip(*completions))]}


def write_report(report: dict, path: Path) -> None:
    write_text(path, json.dumps(report, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
