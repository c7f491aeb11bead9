"""Random-weight models built from a config, for GPU checks and benchmarks without a download.

Shapes follow the published configs (hidden size, layers, heads, vocabulary) so that matmul
sizes, KV-cache and memory are those of the real model; the weights are noise, so outputs are
meaningless but cost the same to compute. The tokenizer is any local one with a chat template
(SmolLM2's, which essa converts into ~/.cache/essa/gguf/); its ids fit in every vocabulary here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from essa.models import load_tokenizer, resolve_source

SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


def default_tokenizer_dir() -> Path:
    return Path(resolve_source("smollm2-135m-instruct"))


def config_for(shape: str, vocab_size: int, hidden: int = 1024, layers: int = 8) -> PretrainedConfig:
    """A Qwen2.5-shaped config by name, or ("llama") a small Llama of the given hidden size and depth."""
    if shape == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                           num_hidden_layers=layers, num_attention_heads=hidden // 64,
                           num_key_value_heads=hidden // 256, tie_word_embeddings=True)
    return Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6)


def build_random_model(shape: str, out: Path, tokenizer_dir: Path | None = None, dtype: torch.dtype = torch.bfloat16,
                       **llama: int) -> Path:
    """Write a random model of `shape` (see SHAPES, or "llama" with hidden=, layers=) and the tokenizer to `out`."""
    tokenizer = load_tokenizer(str(tokenizer_dir or default_tokenizer_dir()))
    vocab = len(tokenizer) if shape == "llama" else SHAPES[shape]["vocab_size"]
    config = config_for(shape, vocab, **llama)
    config.update(dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
