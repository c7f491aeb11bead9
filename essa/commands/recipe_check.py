"""`essa recipe check`: a recipe validated as `essa align` would, from the model's config alone (no weights
loaded), and what it will do: the search dimension, the population and a memory estimate. A hub model
or dataset that cannot be reached offline is noted instead of checked."""

from __future__ import annotations

from pathlib import Path

import torch

from essa import extras
from essa import recipe as recipes
from essa.data import is_hub
from essa.errors import EssaError
from essa.models import is_hub_id
from essa.plan import plan
from essa.preflight import check_model, check_repair, load_data
from essa.scoring import Scorer


def recipe_check(path: Path, overrides: list[str]) -> None:
    recipe = recipes.load(path, overrides)
    notes = validate(recipe)
    print(f"{path}: valid")
    for note in notes:
        print(note)
    describe(recipe)


def validate(recipe: recipes.Recipe) -> list[str]:
    """The checks `essa align` makes before loading weights; notes on what could not be checked offline."""
    extras.check(extras.input_needs(recipe) + extras.run_needs(recipe))
    notes = []
    try:
        check_model(recipe)
    except EssaError as err:
        if not is_hub_id(recipe.model.name_or_path):
            raise
        notes.append(f"  model not checked: {err}")
    columns = None
    try:
        train, heldout = load_data(recipe)
        columns = sorted(set(train.columns()) & set(heldout.columns()))
        notes.append(f"  data: {len(train)} training and {len(heldout)} held-out prompts")
    except EssaError as err:
        if not any(is_hub(s) for s in (recipe.data.source, recipe.data.heldout_source) if s):
            raise
        notes.append(f"  data not checked: {err}")
    reward = recipe.reward
    scorer = Scorer.from_recipe(reward.name, reward.weights, reward.kwargs, reward.timeout_s, reward.memory_gb,
                                columns)
    try:
        check_repair(recipe, scorer, columns)
    finally:
        scorer.close()
    return notes


def describe(recipe: recipes.Recipe) -> None:
    """What the recipe will do, from the model's config: the model, the search dimension, memory."""
    model = recipe.model
    print(f"  model: {model.name_or_path} (quantization {model.quantization}, dtype {model.dtype}), "
          f"engine {recipe.run.engine}, strategy {recipe.strategy.name}, reward {recipe.reward.name}")
    device = "cuda" if recipe.model.device.startswith("cuda") or torch.cuda.is_available() else "cpu"
    try:
        p = plan(recipe, device)
    except EssaError as err:
        print(f"  search dimension and memory: not computed ({err})")
        return
    factors = "2 factors" if recipe.svd.factors == "both" else "factor B"
    searched = "every entry" if recipe.svd.space == "factors" else "trainable singular values"
    print(f"  search dimension: {p.search_dim} ({p.modules} modules, {factors}, {searched})")
    print(f"  population {p.population} × {p.prompts_per_iteration} prompts per iteration "
          f"({p.rows_per_iteration} rows, the center's included, in generate calls of up to {p.rows_per_call})")
    strategy = recipe.strategy
    if strategy.name == "essam":
        from essa.strategies import candidates_per_iteration

        print(f"  ESSAM: {candidates_per_iteration(strategy)} candidates per iteration "
              f"({strategy.sharpness_population or strategy.population} at the center, "
              f"{strategy.population} at the sharpness probe)")
    if strategy.name == "cma":
        from essa.strategies.cma import full_covariance

        print(f"  CMA-ES covariance: {'full' if full_covariance(strategy, p.search_dim) else 'diagonal (sep-CMA)'}")
    print(f"  memory estimate on {device}: weights {p.weights_gb:.2f} GiB + KV cache {p.kv_cache_gb:.2f} GiB "
          f"≈ {p.memory_gb:.2f} GiB (prompts of 256 tokens)")
