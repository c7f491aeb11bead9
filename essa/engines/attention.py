"""transformers' SDPA attention, without copying K and V for grouped-query attention on a CPU.

With an attention mask (left-padded batches always have one), transformers repeats each key/value
head for every query head it serves before calling SDPA, because on CUDA a masked grouped-query
SDPA falls back to the slow math kernel. On a CPU, torch's SDPA takes `enable_gqa` with a mask and
gives bit-identical results; the repeat, a copy of the whole KV cache per layer and token, was
the largest cost of a decode step after the matmuls (SmolLM2: 3.6 ms vs 0.5 ms per layer at 64 rows).
Registered under its own name through transformers' attention and mask interfaces, so models keep
their own attention code and only the kernel call changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "essa_sdpa"


def gqa_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                       **kwargs) -> tuple[Tensor, None]:
    grouped = query.shape[1] != key.shape[1]
    if attention_mask is None or not grouped or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, gqa_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_gqa_sdpa(model: PreTrainedModel) -> str | None:
    """Switch a CPU model that uses SDPA to the grouped-query kernel; the implementation to restore, if switched."""
    previous = model.config._attn_implementation
    if previous != "sdpa" or model.device.type != "cpu":
        return None
    model.set_attn_implementation(NAME)
    return previous
