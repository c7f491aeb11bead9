"""`essa recipe check`: what a recipe will do, from the model's config alone (no weights loaded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from essa.models import meta_model, read_config, resolve_dtype
from essa.recipe import Recipe
from essa.svd import find_targets, searched_entries

BYTES_PER_WEIGHT = {"none": None, "int8": 1.0, "nf4": 0.55, "fp4": 0.55}  # 4-bit: + absmax/blocks
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Plan:
    modules: int
    search_dim: int
    population: int
    prompts_per_iteration: int
    rows_per_iteration: int
    rows_per_call: int
    weights_gb: float
    kv_cache_gb: float

    @property
    def memory_gb(self) -> float:
        return self.weights_gb + self.kv_cache_gb


def plan(recipe: Recipe, device_type: str = "cuda", prompt_tokens: int = 256) -> Plan:
    """Search dimension and a memory estimate (weights + KV cache of one generate call)."""
    config = read_config(recipe.model)
    model = meta_model(config, recipe.model.name_or_path)
    targets = find_targets(model, recipe.lora.target_modules)
    svd = recipe.svd
    search_dim = 0
    for module in targets.values():
        rank = min(recipe.lora.rank, module.in_features, module.out_features)
        a = searched_entries(rank, rank, module.in_features, svd.trainable_fraction, svd.space)
        b = searched_entries(rank, module.out_features, rank, svd.trainable_fraction, svd.space)
        search_dim += (a if svd.factors == "both" else 0) + b
    dtype = str(resolve_dtype(recipe.model.dtype, torch.device(device_type), recipe.model.quantization)).removeprefix(
        "torch.")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    per_weight = BYTES_PER_WEIGHT[recipe.model.quantization] or DTYPE_BYTES[dtype]
    weights = linear * per_weight + (total - linear) * DTYPE_BYTES[dtype]
    rows_per_iteration = (recipe.strategy.population + 1) * recipe.data.prompts_per_iteration  # members + center
    rows = min(rows_per_iteration, recipe.generation.batch_rows)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    tokens = prompt_tokens + recipe.generation.max_new_tokens
    cached = min(rows * tokens, max(recipe.generation.batch_tokens, tokens))  # a chunk's budget, one row at least
    kv = cached * config.num_hidden_layers * 2 * kv_heads * head_dim * DTYPE_BYTES[dtype]
    return Plan(len(targets), search_dim, recipe.strategy.population,
                recipe.data.prompts_per_iteration, rows_per_iteration, rows, weights / 2**30, kv / 2**30)
