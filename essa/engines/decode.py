"""Greedy decoding of a batch whose finished rows leave it, with a shared prompt prefix prefilled once.

transformers' `generate` keeps every row in the batch until the longest one ends: a finished row
still pays for its matmuls, attention and cache growth at every later step. Its continuous
batching (`generate_batch`, paged attention) does drop finished requests, but it packs all rows
into one flat token stream in an order of its own, so the engine's per-row low-rank terms could
not tell which candidate a token belongs to. This loop does for greedy decoding what both do,
and tells the caller which rows are active (`use_rows`) whenever that changes:

- the prompts' common token prefix (a chat template's system turn) is prefilled once per group of
  rows that share their weights (a candidate), and its KV cache is copied to the group's rows;
- the rest of each prompt is prefilled once, left-padded after the prefix (the attention mask
  hides the padding and position ids skip it, so every row sees its own prompt unpadded);
- each step feeds one token per active row through the model with transformers' KV cache, and
  rows that finish are dropped from the cache, the mask and the caller's per-row state.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving each row at least one token of its own."""
    return min(len(os.path.commonprefix(rows)), min(len(r) for r in rows) - 1)


def group_leaders(groups: list[int]) -> tuple[list[int], list[int]]:
    """The first row of each group, and for each row the position of its group's leader in that list."""
    slot: dict[int, int] = {}
    leaders = []
    for row, group in enumerate(groups):
        if group not in slot:
            slot[group] = len(leaders)
            leaders.append(row)
    return leaders, [slot[g] for g in groups]


def left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def last_logits(model: PreTrainedModel, ids: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
    # An index tensor (not logits_to_keep=1) hands the output layer a contiguous input, which it multiplies
    # as one matmul instead of a batched one (8x slower on a CPU at SmolLM2's vocabulary).
    last = torch.tensor([ids.shape[1] - 1], device=ids.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                 logits_to_keep=last).logits[:, -1]


def prefill(model: PreTrainedModel, rows: list[list[int]], groups: list[int], pad_id: int, device: torch.device,
            use_rows: Callable[[Tensor], None]) -> tuple[DynamicCache, Tensor, Tensor, Tensor]:
    """(cache, attention mask, last position ids, last logits) for every row."""
    cache = DynamicCache(config=model.config)
    shared = common_prefix(rows)
    if shared:
        leaders, slots = group_leaders(groups)
        use_rows(torch.tensor(leaders, device=device))
        ids = torch.tensor(rows[0][:shared], device=device).expand(len(leaders), -1)
        positions = torch.arange(shared, device=device).expand(len(leaders), -1)
        model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_select_indices(torch.tensor(slots, device=device))
    use_rows(torch.arange(len(rows), device=device))
    ids, mask = left_padded([r[shared:] for r in rows], pad_id, device)
    mask = torch.cat([mask.new_ones(len(rows), shared), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)[:, shared:]
    logits = last_logits(model, ids, mask, positions, cache)
    return cache, mask, positions[:, -1:], logits


@torch.no_grad()
def greedy_decode(model: PreTrainedModel, rows: list[list[int]], groups: list[int], max_new_tokens: int,
                  stop_ids: Tensor, pad_id: int, use_rows: Callable[[Tensor], None] = lambda rows: None) -> Tensor:
    """New tokens [rows, max_new_tokens]: each row's greedy continuation of its prompt token ids up to
    and including its first stop token, `pad_id` after it.

    Rows with the same `groups` id compute with the same weights (their prompt prefix is computed
    once); `use_rows(index)` is called with the indices of the rows in the next forward pass."""
    device = model.device
    new = torch.full((len(rows), max_new_tokens), pad_id, dtype=torch.long, device=device)
    cache, mask, positions, logits = prefill(model, rows, groups, pad_id, device, use_rows)
    active = torch.arange(len(rows), device=device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        new[active, step] = token
        if step == max_new_tokens - 1:
            break
        running = ~torch.isin(token, stop_ids)
        if not running.all():
            keep = running.nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active, token, mask, positions = active[keep], token[keep], mask[keep], positions[keep]
            cache.batch_select_indices(keep)
            use_rows(active)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        positions = positions + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[:, -1]
    return new
