"""Decoding a batch whose finished rows leave it: greedy, or sampled at a temperature.

transformers' `generate` keeps every row in the batch until the longest one ends: a finished row
still pays for its matmuls, attention and cache growth at every later step. Its continuous
batching (`generate_batch`, paged attention) does drop finished requests, but it packs all rows
into one flat token stream in an order of its own, so the engine's per-row low-rank terms could
not tell which candidate a token belongs to. This loop does for greedy decoding what both do,
and tells the caller which rows are active (`use_rows`) whenever that changes: the left-padded
prompts are prefilled once, in passes of rows of similar length where that saves padding
(`prefill_by_length`), each step feeds one token per active row through the model with a KV cache
that grows by blocks (essa/engines/cache.py), and rows that finish are dropped from the cache,
the mask and the caller's per-row state (the rows that stay may change places: `use_rows` says
where each one is). Each row computes what `generate` computes for it, so greedy outputs are
those of `generate` up to rounding. Rows that compute the same function (a population's rows of
one candidate, k samples of one model: `groups`) share their prefill where their prompts do: the
token prefix every prompt of a batch starts with (a chat template's system turn, a third to half
of a short prompt) is prefilled once per group and each row prefills only the rest (in full-attention
models: the padding it leaves mid-row would shift a sliding window), and rows of one group with the
same prompt are prefilled once. In float64 that is equal to `generate` (tested);
in reduced precision it rounds differently (attention sums over other lengths), which the
numerics policy of benchmarks/history/speed.md judges by results. Sampling (temperature > 0, for the warm
start's best-of-k samples) draws each active row's next token from softmax(logits / temperature)
with the caller's generator, so a seed gives the same samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from essa.engines.cache import block_cache, fill_holes, full_attention, right_aligned

# Padded positions one more prefill pass must save to be worth its fixed cost (a forward pass's
# Python and kernel-launch overhead, and smaller matmuls): a few tokens for each of a few hundred rows.
PASS_COST = 1024


def last_logits(model: PreTrainedModel, ids: Tensor, mask: Tensor, positions: Tensor, cache: Cache) -> Tensor:
    # An index tensor (not logits_to_keep=1) hands the output layer a contiguous input, which it multiplies
    # as one matmul instead of a batched one (8x slower on a CPU at SmolLM2's vocabulary).
    last = torch.tensor([ids.shape[1] - 1], device=ids.device)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                 logits_to_keep=last).logits[:, -1]


def distinct_rows(values: Tensor) -> tuple[Tensor, Tensor]:
    """(first row of each distinct row of `values`, which of them each row is)."""
    _, inverse = torch.unique(values, dim=0, return_inverse=True)
    rows = torch.arange(len(values), device=values.device)
    first = torch.full((int(inverse.max()) + 1,), len(values), device=values.device)
    return first.scatter_reduce_(0, inverse, rows, "amin"), inverse


def shared_prefix(ids: Tensor, mask: Tensor) -> int:
    """How many tokens every left-padded prompt starts with alike, leaving each row at least one of its own."""
    starts = mask.argmax(1)
    most = int((ids.shape[1] - starts).min()) - 1
    if most <= 0:
        return 0
    tokens = ids.gather(1, starts[:, None] + torch.arange(most, device=ids.device))
    return int((tokens == tokens[:1]).all(0).long().cumprod(0).sum())


Prefilled = tuple[Cache, Tensor, Tensor, Tensor]  # cache, attention mask, last position ids, last logits


def prefill(model: PreTrainedModel, ids: Tensor, mask: Tensor, use_rows: Callable[[Tensor], None] = lambda rows: None,
            groups: Tensor | None = None) -> Prefilled:
    """The cache, mask, last position ids and last logits of left-padded prompts. `groups[i]`: rows in
    one group compute the same function of their prompt (None: every row its own). Prefill costs
    about as much as all the decode steps of a 48-token answer, so it is shared where it can be."""
    if groups is None:
        return prefill_rows(model, ids, mask)
    first, inverse = distinct_rows(torch.cat([groups[:, None], ids], 1))
    if len(first) < len(ids):  # k samples of a prompt: prefill it once, copy its cache to its rows
        use_rows(first)
        cache, mask, positions, logits = prefill(model, ids[first], mask[first], lambda rows: use_rows(first[rows]),
                                                 groups[first])
        cache.batch_select_indices(inverse)
        use_rows(torch.arange(len(ids), device=ids.device))
        return cache, mask[inverse], positions[inverse], logits[inverse]
    length, (leaders, group_of) = shared_prefix(ids, mask), distinct_rows(groups)
    # The prefix costs one more forward pass, about one decode step of every row: worth it when it
    # saves more than a token per row. It leaves padding between the prefix and each row's own tokens,
    # which a sliding window would count as positions.
    if (len(ids) - len(leaders)) * length < len(ids) or not full_attention(model.config):
        return prefill_rows(model, ids, mask)
    return prefill_after_prefix(model, ids, mask, length, leaders, group_of, use_rows)


def length_passes(lengths: Tensor, pass_cost: int) -> list[Tensor]:
    """The rows in prefill passes of similar prompt length (each pass pads its rows to its longest):
    the split with the fewest padded positions plus `pass_cost` per pass, rows of one length in one
    pass. Exact over the distinct lengths (dynamic programming; a chunk has a few hundred at most)."""
    unique, counts = torch.unique(lengths, return_counts=True)  # ascending
    values, rows_before = unique.tolist(), [0, *counts.cumsum(0).tolist()]
    best, cut = [0] + [None] * len(values), [0] * (len(values) + 1)
    for end in range(1, len(values) + 1):  # passes over values[:end], the last one values[start:end]
        best[end], cut[end] = min((best[start] + (rows_before[end] - rows_before[start]) * values[end - 1]
                                   + pass_cost, start) for start in range(end))
    passes, end = [], len(values)
    while end:
        start = cut[end]
        passes.append(((lengths >= values[start]) & (lengths <= values[end - 1])).nonzero().squeeze(1))
        end = start
    return passes[::-1]


def prefill_by_length(model: PreTrainedModel, ids: Tensor, mask: Tensor,
                      use_rows: Callable[[Tensor], None] = lambda rows: None,
                      groups: Tensor | None = None) -> Prefilled:
    """`prefill` in passes of rows of similar length (`length_passes`), merged into one left-padded
    cache: a batch of uneven prompts (IFEval's are 37 to 381 tokens) pays for its padding in every
    layer's matmuls and attention at prefill, where half the positions of a 256-row chunk of 32 IFEval
    prompts were padding. Decoding then runs all rows together; each row computes what it would alone."""
    lengths = mask.sum(1)
    passes = length_passes(lengths, PASS_COST) if full_attention(model.config) else []
    if len(passes) <= 1:  # a cache with sliding-window layers is not a block cache, and is not merged
        return prefill(model, ids, mask, use_rows, groups)
    parts = []
    for rows in passes:
        width = int(lengths[rows].max())
        use_rows(rows)
        parts.append(prefill(model, ids[rows, -width:], mask[rows, -width:],
                             lambda index, rows=rows: use_rows(rows[index]), None if groups is None else groups[rows]))
    width = max(part_mask.shape[1] for _, part_mask, _, _ in parts)
    merged_mask = mask.new_zeros(len(ids), width)
    positions = parts[0][2].new_empty(len(ids), 1)
    logits = parts[0][3].new_empty(len(ids), parts[0][3].shape[1])
    for rows, (_, part_mask, part_positions, part_logits) in zip(passes, parts):
        merged_mask[rows, width - part_mask.shape[1]:] = part_mask
        positions[rows], logits[rows] = part_positions, part_logits
    use_rows(torch.arange(len(ids), device=ids.device))
    return right_aligned([part[0] for part in parts], passes, len(ids)), merged_mask, positions, logits


def prefill_rows(model: PreTrainedModel, ids: Tensor, mask: Tensor) -> Prefilled:
    cache = block_cache(model.config)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    logits = last_logits(model, ids, mask, positions, cache)
    return cache, mask, positions[:, -1:], logits


def prefill_after_prefix(model: PreTrainedModel, ids: Tensor, mask: Tensor, length: int, leaders: Tensor,
                         group_of: Tensor, use_rows: Callable[[Tensor], None]) -> Prefilled:
    """The first `length` tokens, common to every prompt, prefilled by one row of each group (`leaders`)
    and copied to the group's rows; then each row's own tokens, left-padded after the prefix (the
    mask and the position ids skip the padding, so each row computes what it would unpadded)."""
    start = int(mask[0].argmax())
    prefix = ids[:1, start:start + length].expand(len(leaders), length)
    use_rows(leaders)
    cache = block_cache(model.config)
    ones = mask.new_ones(len(leaders), length)
    last_logits(model, prefix, ones, (ones.cumsum(-1) - 1), cache)
    cache.batch_select_indices(group_of)
    use_rows(torch.arange(len(ids), device=ids.device))
    own = ids.shape[1] - mask.argmax(1) - length      # each row's tokens after the prefix
    width = int(own.max())
    rest = torch.arange(width, device=ids.device)[None] >= (width - own)[:, None]
    mask = torch.cat([mask.new_ones(len(ids), length), rest.to(mask.dtype)], 1)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    logits = last_logits(model, ids[:, -width:], mask, positions[:, length:], cache)
    return cache, mask, positions[:, -1:], logits


def pick_tokens(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Greedy (temperature 0) or sampled next tokens; argmax over float32-cast logits is exact and
    torch's CPU argmax over bf16 logits is 6x slower than cast + argmax."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)


@dataclass
class Running:
    """The rows still decoding: where each one's tokens go in the output (`active`, and `written`
    tokens so far), the cache, mask and position ids of what each has seen, and the logits of its
    next token."""

    cache: Cache
    mask: Tensor
    positions: Tensor
    logits: Tensor
    active: Tensor
    written: Tensor

    @classmethod
    def prefilled(cls, model: PreTrainedModel, ids: Tensor, mask: Tensor, use_rows: Callable[[Tensor], None],
                  groups: Tensor | None) -> "Running":
        """Every row of left-padded prompts, prefilled (`prefill_by_length`), nothing written yet."""
        rows = torch.arange(len(ids), device=ids.device)
        return cls(*prefill_by_length(model, ids, mask, use_rows, groups), rows, torch.zeros_like(rows))

    def keep(self, index: Tensor) -> None:
        self.mask, self.positions, self.active, self.written = (self.mask[index], self.positions[index],
                                                                self.active[index], self.written[index])
        self.cache.batch_select_indices(index)

    def advance(self, model: PreTrainedModel, token: Tensor, running: Tensor,
                use_rows: Callable[[Tensor], None]) -> bool:
        """Drop the rows that are not `running`, feed each other row its `token`; False when none is left."""
        if not running.all():
            keep = running.nonzero().squeeze(1)
            if keep.numel() == 0:
                return False
            keep = fill_holes(keep, len(self.active))
            self.keep(keep)
            token = token[keep]
            use_rows(self.active)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.active), 1)], dim=1)
        self.positions = self.positions + 1
        self.logits = model(input_ids=token[:, None], attention_mask=self.mask, position_ids=self.positions,
                            past_key_values=self.cache, use_cache=True).logits[:, -1]
        return True


@torch.no_grad()
def decode(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
           stop_ids: Tensor, pad_id: int, use_rows: Callable[[Tensor], None] = lambda rows: None,
           on_step: Callable[[int, int], None] | None = None, temperature: float = 0.0,
           generator: torch.Generator | None = None, groups: Tensor | None = None) -> Tensor:
    """New tokens [rows, max_new_tokens]: each row's greedy (or, at `temperature` > 0, sampled)
    continuation of its (left-padded) prompt up to and including its first stop token, `pad_id` after
    it. `use_rows(index)` is called with the indices of the rows in the next forward pass whenever they
    change; `on_step(finished rows, tokens generated)` after every step, for progress. `groups`: see
    `prefill`."""
    new = torch.full((len(input_ids), max_new_tokens), pad_id, dtype=torch.long, device=input_ids.device)
    state = Running.prefilled(model, input_ids, attention_mask, use_rows, groups)
    return decode_running(model, new, state, stop_ids, use_rows, on_step, temperature, generator)


def decode_running(model: PreTrainedModel, new: Tensor, state: Running, stop_ids: Tensor,
                   use_rows: Callable[[Tensor], None], on_step: Callable[[int, int], None] | None = None,
                   temperature: float = 0.0, generator: torch.Generator | None = None, tokens: int = 0) -> Tensor:
    """Decode the `state`'s rows on into `new` until each has a stop token or fills its row; `tokens`:
    generated before (for `on_step`)."""
    while True:
        token = pick_tokens(state.logits, temperature, generator)
        new[state.active, state.written] = token
        state.written = state.written + 1
        tokens += len(state.active)
        if on_step:
            on_step(len(new) - len(state.active), tokens)
        running = ~torch.isin(token, stop_ids) & (state.written < new.shape[1])
        if not state.advance(model, token, running, use_rows):
            return new
