"""Decoding a batch whose finished rows leave it: greedy, or sampled at a temperature.

transformers' `generate` keeps every row in the batch until the longest one ends: a finished row
still pays for its matmuls, attention and cache growth at every later step. Its continuous
batching (`generate_batch`, paged attention) does drop finished requests, but it packs all rows
into one flat token stream in an order of its own, so the engine's per-row low-rank terms could
not tell which candidate a token belongs to. This loop does for greedy decoding what both do,
and tells the caller which rows are active (`use_rows`) whenever that changes: the left-padded
prompts are prefilled once, each step feeds one token per active row through the model with a KV cache
that grows by blocks (essa/engines/cache.py), and rows that finish are dropped from the cache,
the mask and the caller's per-row state (the rows that stay may change places: `use_rows` says
where each one is). Each row computes exactly what `generate` computes for it, so greedy
outputs are those of `generate` (prefilling a shared prompt prefix once per candidate was
measured 10% faster, but changes NF4 outputs on CPUs where bitsandbytes computes in bf16;
docs/benchmarks.md). Sampling (temperature > 0, for the warm start's best-of-k samples) draws each
active row's next token from softmax(logits / temperature) with the caller's generator, so a seed
gives the same samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from essa.engines.cache import block_cache, fill_holes


def last_logits(model: PreTrainedModel, ids: Tensor, mask: Tensor, positions: Tensor, cache: Cache) -> Tensor:
    # An index tensor (not logits_to_keep=1) hands the output layer a contiguous input, which it multiplies
    # as one matmul instead of a batched one (8x slower on a CPU at SmolLM2's vocabulary).
    last = torch.tensor([ids.shape[1] - 1], device=ids.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                 logits_to_keep=last).logits[:, -1]


def distinct_rows(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(first row of each distinct prompt, which of them each row is)."""
    _, inverse = torch.unique(ids, dim=0, return_inverse=True)
    rows = torch.arange(len(ids), device=ids.device)
    first = torch.full((int(inverse.max()) + 1,), len(ids), device=ids.device).scatter_reduce_(0, inverse, rows, "amin")
    return first, inverse


def prefill(model: PreTrainedModel, ids: Tensor, mask: Tensor, use_rows: Callable[[Tensor], None] = lambda rows: None,
            rows_alike: bool = False) -> tuple[Cache, Tensor, Tensor]:
    """(cache, last position ids, last logits) for left-padded prompts. With `rows_alike` (every row
    computes the same function of its prompt, as k samples of one model do), each distinct prompt is
    prefilled once and its cache copied to its rows: prefill costs about as much as all the decode
    steps of a 48-token answer, so best-of-8 sampling pays it once instead of 8 times."""
    if rows_alike:
        first, inverse = distinct_rows(ids)
        if len(first) < len(ids):
            use_rows(first)
            cache, positions, logits = prefill(model, ids[first], mask[first])
            cache.batch_select_indices(inverse)
            use_rows(torch.arange(len(ids), device=ids.device))
            return cache, positions[inverse], logits[inverse]
    cache = block_cache(model.config)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    logits = last_logits(model, ids, mask, positions, cache)
    return cache, positions[:, -1:], logits


def pick_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Greedy (temperature 0) or sampled next tokens; argmax over float32-cast logits is exact and
    torch's CPU argmax over bf16 logits is 6x slower than cast + argmax."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def decode(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
           stop_ids: Tensor, pad_id: int, use_rows: Callable[[Tensor], None] = lambda rows: None,
           on_step: Callable[[int, int], None] | None = None, temperature: float = 0.0,
           generator: torch.Generator | None = None, rows_alike: bool = False) -> Tensor:
    """New tokens [rows, max_new_tokens]: each row's greedy (or, at `temperature` > 0, sampled)
    continuation of its (left-padded) prompt up to and including its first stop token, `pad_id` after
    it. `use_rows(index)` is called with the indices of the rows in the next forward pass whenever they
    change; `on_step(finished rows, tokens generated)` after every step, for progress. `rows_alike`:
    see `prefill`."""
    mask = attention_mask
    new = torch.full((len(input_ids), max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
    cache, positions, logits = prefill(model, input_ids, mask, use_rows, rows_alike)
    active = torch.arange(len(input_ids), device=input_ids.device)
    tokens = 0
    for step in range(max_new_tokens):
        token = pick_tokens(logits, temperature, generator)
        new[active, step] = token
        tokens += len(active)
        if on_step:
            on_step(len(input_ids) - len(active), tokens)
        if step == max_new_tokens - 1:
            break
        running = ~torch.isin(token, stop_ids)
        if not running.all():
            keep = running.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            keep = fill_holes(keep, len(active))
            active, token, mask, positions = active[keep], token[keep], mask[keep], positions[keep]
            cache.batch_select_indices(keep)
            use_rows(active)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = positions + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    return new
