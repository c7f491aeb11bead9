"""Building a recipe's engine, and the search space it evaluates, in whichever process runs it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from essa.engines.hf import HFEngine
from essa.engines.vllm import VLLMEngine, check_supported, memory_args
from essa.models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from essa.recipe import GenerationSection, Recipe
from essa.run_dir import SPACE_FILE
from essa.svd import SVDSpace, build_space


def load_space(run_dir: Path, recipe: Recipe, model: Callable[[], PreTrainedModel]) -> SVDSpace:
    """The frozen factors are saved once per run, so a resume, an export or another worker uses
    exactly the same space."""
    path = run_dir / SPACE_FILE
    if path.exists():
        return SVDSpace.load(path)
    lora = recipe.lora
    space = build_space(model(), lora.rank, lora.alpha, lora.target_modules, lora.adapter,
                        recipe.svd.trainable_fraction, recipe.svd.factors, recipe.svd.directions, recipe.run.seed,
                        recipe.svd.space)
    space.save(path)
    return space


def engine_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, space: SVDSpace, gen: GenerationSection,
               temperature: float = 0.0, seed: int = 0) -> HFEngine:
    """The HF engine as a recipe's `[generation]` section sets it up."""
    return HFEngine(model, tokenizer, space, gen.max_new_tokens, gen.batch_rows, gen.batch_tokens, temperature, seed,
                    gen.dense_4bit)


def hf_engine(recipe: Recipe, run_dir: Path) -> tuple[HFEngine, PreTrainedTokenizerBase]:
    model, tokenizer = load_model(recipe.model)
    space = load_space(run_dir, recipe, lambda: model)
    return engine_for(model, tokenizer, space, recipe.generation), tokenizer


def tensor_parallel_args(gpus: int) -> dict:
    """vLLM's arguments for a model split over `gpus` GPUs: its Ray executor, which places the
    shards in the placement group of the essa worker that builds the engine."""
    return {"tensor_parallel_size": gpus, "distributed_executor_backend": "ray"} if gpus > 1 else {}


def vllm_engine(recipe: Recipe, run_dir: Path, tensor_parallel: int = 1) -> tuple[VLLMEngine, PreTrainedTokenizerBase]:
    device = resolve_device(recipe.model.device)
    check_supported(recipe.model.quantization, device)
    # The transformers model only serves to derive the SVD space (vLLM loads its own copy).
    cpu_model = replace(recipe.model, quantization="none", device="cpu")
    space = load_space(run_dir, recipe, lambda: load_model(cpu_model)[0])
    source = resolve_source(recipe.model.name_or_path)
    cfg = recipe.vllm
    engine = VLLMEngine(source, space, recipe.generation.max_new_tokens,
                        resolve_dtype(recipe.model.dtype, device, recipe.model.quantization),
                        recipe.model.quantization,
                        cfg.max_loras or recipe.strategy.population + 1,  # the members and their center
                        memory_args(cfg.kv_cache_gb, cfg.gpu_memory_utilization, device), cfg.max_model_len,
                        recipe.run.seed, tensor_parallel_args(tensor_parallel))
    return engine, load_tokenizer(source)


def load_engine(recipe: Recipe, run_dir: Path, tensor_parallel: int = 1) -> tuple[HFEngine | VLLMEngine,
                                                                                   PreTrainedTokenizerBase]:
    """The recipe's engine; the space is read from `run_dir` or built there."""
    if recipe.run.engine == "vllm":
        return vllm_engine(recipe, run_dir, tensor_parallel)
    return hf_engine(recipe, run_dir)
