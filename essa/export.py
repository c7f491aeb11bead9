"""Export an evolved center as a standard PEFT LoRA adapter, or as a merged full model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from essa import checkpoint
from essa.adapter_files import write_peft_adapter
from essa.errors import EssaError
from essa.files import disk_error, write_errors
from essa.models import load_model, resolve_source
from essa.recipe import Recipe, from_dict, read_saved
from essa.run_dir import CHECKPOINTS, RECIPE_FILE, SPACE_FILE
from essa.svd import SVDSpace, find_targets

Which = Literal["best", "final"]


@dataclass(frozen=True)
class Run:
    recipe: Recipe
    space: SVDSpace
    center: np.ndarray  # offsets of the trainable singular values
    description: str


def load_run(run_dir: Path, which: Which) -> Run:
    """The recipe, search space and chosen center of a run directory."""
    if not (run_dir / RECIPE_FILE).is_file() or not (run_dir / SPACE_FILE).is_file():
        raise EssaError(f"run directory {run_dir} has no {RECIPE_FILE}/{SPACE_FILE}; is it an `essa align` output?")
    recipe = from_dict(read_saved(run_dir / RECIPE_FILE), str(run_dir / RECIPE_FILE))
    space = SVDSpace.load(run_dir / SPACE_FILE)
    ckpt, skipped = checkpoint.latest(run_dir / CHECKPOINTS)
    if ckpt is None:
        state = "every checkpoint is damaged" if skipped else "no checkpoint yet; run at least one iteration"
        raise EssaError(f"run directory {run_dir}: {state}")
    if ckpt.arrays.get("center") is None or ckpt.arrays["center"].shape != (space.dim,):
        raise EssaError(f"run directory {run_dir}: checkpoint {ckpt.iteration} does not match {SPACE_FILE} "
                        f"(a center of {space.dim} values expected)")
    if which == "best":
        description = (f"best center: iteration {ckpt.meta['best_iteration']}, "
                       f"held-out reward {ckpt.meta['best_reward']:.4f}")
        return Run(recipe, space, ckpt.arrays["best_center"], description)
    return Run(recipe, space, ckpt.arrays["center"], f"final center: iteration {ckpt.iteration}")


def export_adapter(run_dir: Path, out: Path, which: Which = "best") -> str:
    run = load_run(run_dir, which)
    try:
        write_peft_adapter(run.space, run.center, resolve_source(run.recipe.model.name_or_path), out)
    except write_errors() as err:
        raise disk_error(out, err) from None
    return run.description


@torch.no_grad()
def export_merged(run_dir: Path, out: Path, which: Which = "best", dtype: torch.dtype = torch.bfloat16) -> str:
    """Dequantized base (the weights the run evolved against) + merged delta, saved as safetensors."""
    run = load_run(run_dir, which)
    model, tokenizer = load_model(run.recipe.model)
    if run.recipe.model.quantization != "none":
        model = model.dequantize(dtype=torch.float32)
    targets = find_targets(model, [m.name for m in run.space.modules])
    weights = run.space.lora_weights(torch.as_tensor(run.center))
    for module_factors, (name, (a, b)) in zip(run.space.modules, weights.items()):
        weight = targets[name].weight
        delta = module_factors.scaling * (b.double() @ a.double()).to(weight.device)
        weight.copy_((weight.double() + delta).to(weight.dtype))
    model.to(dtype).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return run.description
