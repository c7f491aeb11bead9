"""Everything a command reads, checked before any model weights load.

Bad input should cost seconds and one line, not minutes and a traceback: the recipe's values
against the model's config (its layers, its context length), the data source and its rows, the
reward and the options and columns it needs, adapters, and the run directory with the files a
resume or an export reads. `essa recipe check` runs the same checks as `essa align`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from essa import extras
from essa.adapter_files import read_peft_adapter
from essa.data import Dataset, load_splits
from essa.engines.vllm import check_supported
from essa.errors import EssaError, RecipeError
from essa.models import meta_model, read_config, resolve_device
from essa.recipe import Recipe
from essa.scoring import Scorer
from essa.svd import find_targets


@dataclass
class Inputs:
    """What a recipe reads, loaded and checked: the prompts and a ready scorer (close it when done)."""

    train: Dataset
    heldout: Dataset
    scorer: Scorer


def check_adapter(adapter: Path, option: str, model: nn.Module) -> None:
    """An adapter's files parse and its factors fit the layers they name."""
    _, factors = read_peft_adapter(adapter, option)
    layers = dict(model.named_modules())
    for name, (a, b) in factors.items():
        layer = layers.get(name)
        if not isinstance(layer, nn.Linear):
            raise EssaError(f"{option}: {adapter} adapts {name!r}, which is not a linear layer of the model")
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            raise EssaError(f"{option}: {adapter} was made for another model: {name} is "
                            f"{layer.out_features}×{layer.in_features}, its factors give {b.shape[0]}×{a.shape[1]}")


def check_model(recipe: Recipe, adapter: Path | None = None, adapter_option: str = "lora.adapter") -> None:
    """The recipe against the model's config: target layers exist, the rank fits them, generation
    fits the context, and an adapter fits the layers it names."""
    config = read_config(recipe.model)
    model = meta_model(config, recipe.model.name_or_path)
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and recipe.generation.max_new_tokens >= context:
        raise RecipeError(recipe.source, "generation.max_new_tokens",
                          f"{recipe.generation.max_new_tokens} does not fit the model's context of {context} tokens")
    adapter = adapter or (Path(recipe.lora.adapter) if recipe.lora.adapter else None)
    if adapter is not None:
        check_adapter(adapter, adapter_option, model)
        return
    targets = find_targets(model, recipe.lora.target_modules)
    smallest = min(min(m.in_features, m.out_features) for m in targets.values())
    if recipe.lora.rank > smallest:
        raise RecipeError(recipe.source, "lora.rank", f"{recipe.lora.rank} exceeds the smallest adapted layer's "
                          f"dimension ({smallest}); use a rank in [1, {smallest}]")


def check_rows(dataset: Dataset, source: str, what: str) -> None:
    if not len(dataset):
        raise EssaError(f"data.source: {source} gives no {what} prompts")
    bad = next((i for i, p in enumerate(dataset.prompts()) if not isinstance(p, str) or not p.strip()), None)
    if bad is not None:
        got = repr(dataset.prompts()[bad])[:60]
        raise EssaError(f"data.prompt_field: {what} row {bad + 1} of {source}: the prompt "
                        f"({dataset.prompt_field!r}) must be a non-empty string, got {got}")


def load_data(recipe: Recipe) -> tuple[Dataset, Dataset]:
    """The train and held-out prompts, with every prompt a non-empty string."""
    data = recipe.data
    train, heldout = load_splits(data, recipe.run.seed)
    check_rows(train, data.source, "training")
    check_rows(heldout, data.heldout_source or data.source, "held-out")
    return train, heldout


def check_inputs(recipe: Recipe) -> Inputs:
    """Extras, model config, data and reward, in that order, before any weights load."""
    extras.check(extras.input_needs(recipe) + extras.run_needs(recipe))
    check_model(recipe)
    if recipe.run.engine == "vllm":  # before the warm start, which would run for minutes on the HF engine first
        check_supported(recipe.model.quantization, resolve_device(recipe.model.device))
    train, heldout = load_data(recipe)
    reward = recipe.reward
    check_warm_start(recipe, train)
    columns = sorted(set(train.columns()) & set(heldout.columns()))
    scorer = Scorer.from_recipe(reward.name, reward.weights, reward.kwargs, reward.timeout_s, reward.memory_gb,
                                columns)
    try:
        check_repair(recipe, scorer, list(train.columns()))
    except BaseException:
        scorer.close()
        raise
    return Inputs(train, heldout, scorer)


def check_warm_start(recipe: Recipe, train: Dataset) -> None:
    cfg = recipe.warm_start
    if cfg.method == "reference" and cfg.response_field not in train.columns():
        raise RecipeError(recipe.source, "warm_start.response_field",
                          f"the training data has no column {cfg.response_field!r} to fine-tune on; its columns: "
                          + (", ".join(sorted(train.columns())) or "none besides the prompt"))


def check_repair(recipe: Recipe, scorer: Scorer, columns: list[str] | None) -> None:
    """`warm_start.repair` imported in the reward's child, which runs it, with the columns it needs."""
    if recipe.warm_start.repair:
        scorer.process.check(recipe.warm_start.repair, {}, columns, field="warm_start.repair")
