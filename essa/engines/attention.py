"""transformers' SDPA attention, with a decode step that costs what its K/V cost on a CPU.

Two things in transformers' SDPA path are slow on a CPU for grouped-query models:
- With an attention mask (left-padded batches always have one), transformers repeats each
  key/value head for every query head it serves before calling SDPA, because on CUDA a masked
  grouped-query SDPA falls back to the slow math kernel. On a CPU, torch's SDPA takes `enable_gqa`
  with a mask; the repeat, a copy of the whole KV cache per layer and token, was the largest cost
  of a decode step after the matmuls (SmolLM2: 3.6 ms vs 0.5 ms per layer at 64 rows).
- torch's CPU SDPA kernel (a flash-attention loop over blocks) is built for long queries: for
  one query token it runs at 1.2 ms per layer at 64 rows × 200 positions in float32 and 5.6 ms in
  bfloat16, where two batched matmuls over the same K/V take 0.8 and 0.56 ms (2 cores, AMD EPYC,
  2026-12-02). A decode step therefore computes its attention as those two matmuls, each group of
  query heads against its own key/value head without repeating K or V, the softmax in float32.
Registered under its own name through transformers' attention and mask interfaces, so models keep
their own attention code and only the kernel call changes. Prefill (query length > 1) stays on SDPA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "essa_sdpa"


def decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor, scaling: float) -> Tensor:
    """One query token per row: [B, H, 1, D] against [B, H_kv, T, D] keys and values, `mask` boolean
    (True attends) or additive, broadcastable to [B, 1, 1, T]. Returns [B, 1, H, D]."""
    b, heads, _, d = query.shape
    kv_heads, t = key.shape[1], key.shape[2]
    grouped = query.view(b, kv_heads, heads // kv_heads, d)             # the query heads of each K/V head
    scores = (grouped @ key.transpose(-1, -2)).float() * scaling         # [B, H_kv, group, T]
    mask = mask.reshape(b, 1, 1, t) if mask.shape[0] == b else mask.reshape(1, 1, 1, t)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = scores.softmax(-1).to(value.dtype) @ value                     # [B, H_kv, group, D]
    return out.reshape(b, 1, heads, d)


def gqa_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                       **kwargs) -> tuple[Tensor, None]:
    special = kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None or dropout > 0
    if attention_mask is None or query.device.type != "cpu" or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.shape[2] == 1:
        return decode_attention(query, key, value, attention_mask, scale), None
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale,
                                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, gqa_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_gqa_sdpa(model: PreTrainedModel) -> str | None:
    """Switch a CPU model that uses SDPA to these kernels; the implementation to restore, if switched."""
    previous = model.config._attn_implementation
    if previous != "sdpa" or model.device.type != "cpu":
        return None
    model.set_attn_implementation(NAME)
    return previous
