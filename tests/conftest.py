"""Shared fixtures: a tiny random Llama built from a config (with SmolLM2's real tokenizer) and recipes for it."""

from __future__ import annotations

import os
import subprocess

# Tests never download: fail fast instead of retrying the hub (set before transformers is imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from essa.models import load_tokenizer, resolve_source  # noqa: E402
from tests.clean_tree import pytest_sessionfinish, pytest_sessionstart  # noqa: E402, F401

PROMPTS = ["Write a haiku about rain.", "Name three colors.", "What is 2 + 2?"]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, converted once from its GGUF file into a transformers directory."""
    return Path(resolve_source("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    tokenizer = load_tokenizer(str(smollm2_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so greedy outputs depend on small deltas
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Plain batched greedy generation (left padding), the reference the engine is compared with."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def write_recipe(path: Path, model_dir: Path, **sections: dict) -> Path:
    """A small recipe for the tiny model; keyword arguments override whole keys per section."""
    base = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"rank": 2},
        "strategy": {"population": 4, "sigma": 0.5, "learning_rate": 0.2},
        "data": {"train_size": 32, "heldout_size": 4, "prompts_per_iteration": 2},
        "generation": {"max_new_tokens": 6},
        "run": {"iterations": 4, "eval_every": 2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_model_dir: Path):
    def make(**sections: dict) -> Path:
        return write_recipe(tmp_path / "recipe.toml", tiny_model_dir, **sections)

    return make


def netns_available() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def in_netns(args: list[str]) -> list[str]:
    """The command inside a network namespace of its own, with only loopback up."""
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    return ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {quoted}"]

