"""PEFT LoRA adapter files: reading an adapter's factors, writing a candidate as an adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import Tensor

from essa.errors import EssaError

if TYPE_CHECKING:
    from essa.svd import SVDSpace


def read_adapter_config(adapter_dir: Path, option: str) -> dict:
    """adapter_config.json, checked for what essa uses: `r` and `lora_alpha` as positive numbers."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise EssaError(f"{option}: no PEFT adapter (adapter_config.json) in directory {str(adapter_dir)!r}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EssaError(f"{option}: {path} is damaged ({type(err).__name__}); re-export the adapter") from None
    valid = isinstance(config, dict) and all(
        isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool) and config[k] > 0
        for k in ("r", "lora_alpha"))
    if not valid:
        raise EssaError(f"{option}: {path} needs positive numbers 'r' and 'lora_alpha'")
    return config


def read_peft_adapter(adapter_dir: Path, option: str = "lora.adapter") -> tuple[dict, dict[str, tuple[Tensor, Tensor]]]:
    """(adapter_config, {module name: (lora_A, lora_B)}) from a PEFT adapter directory."""
    config = read_adapter_config(adapter_dir, option)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise EssaError(f"{option}: {adapter_dir} has no adapter_model.safetensors")
    try:
        tensors = load_file(str(weights_file))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for any damage
        raise EssaError(f"{option}: {weights_file} is damaged ({type(err).__name__}); re-export the adapter") from None
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                name = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(name, {})[part] = value.float()
    factors = {name: (p["lora_A"], p["lora_B"]) for name, p in pairs.items() if len(p) == 2}
    shapes_ok = all(a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1] for a, b in factors.values())
    if not factors or len(factors) != len(pairs) or not shapes_ok:
        raise EssaError(f"{option}: {weights_file} holds no matching lora_A/lora_B pairs of rank r")
    return config, factors


def write_peft_adapter(space: "SVDSpace", center: np.ndarray, base_model: str, out: Path) -> None:
    """A plain LoRA adapter (no DoRA, no bias) that peft and vLLM load."""
    scalings = {m.scaling for m in space.modules}
    ranks = {len(m.a.s) for m in space.modules}
    if len(scalings) != 1 or len(ranks) != 1:
        raise EssaError("export: modules with different ranks or scalings cannot share one adapter_config")
    rank = ranks.pop()
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=rank, lora_alpha=scalings.pop() * rank, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                        target_modules=sorted({m.name.rsplit(".", 1)[-1] for m in space.modules}))
    config.save_pretrained(str(out))
    tensors = {}
    for name, (a, b) in space.lora_weights(torch.as_tensor(center)).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
