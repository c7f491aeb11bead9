"""Drafted decoding: rows verify a draft of their completion in one forward pass and decode on only
from where they depart from it.

A population's members are small perturbations of its center, so a member's greedy completion mostly
repeats the center's. With the center's completion of a prompt as the draft, a member's row runs one
forward pass over the whole draft after its prompt's prefill, keeps the longest prefix of the draft
that its own arg-max agrees with, takes its own token where it first disagrees, and decodes on from
there with the ordinary loop (essa/engines/decode.py). This is speculative decoding with the
population's own center as the draft model, which neither transformers' assisted generation (one
sequence, a separate draft model) nor vLLM's (n-grams or a separate model) offers for a batch whose
rows each verify a different draft.

Exactness: every token a row keeps is its own arg-max given the tokens before it, which the undrafted
loop would have produced too (in float64, equal; tested). The rejected tail of a draft stays in the
cache, masked out like left padding, so rows that depart at different points decode on in one batch
without moving their caches. That needs a cache whose columns attention may skip anywhere, so models
with sliding-window layers (whose window counts columns) decode undrafted (`can_draft`), as do models
that transform their logits after the output layer (Gemma's soft-capping could tie arg-maxes that the
raw logits do not).

A draft is the center's completion as text, tokenized again: SmolLM2-135M's completions of 32
format-instruction prompts gave back their own tokens in all 32 rows; where a text does not (a
random model's), its rows take fewer tokens from the draft, never other ones.

The draft pass costs about a prefill of the draft's length, and a row gains the decode steps of the
tokens it accepts; whether that pays depends on the hardware, so the evaluator times drafted and
undrafted populations and keeps the faster (essa/evaluation.py, `generation.speculative`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from essa.engines.cache import full_attention
from essa.engines.decode import Running, decode_running, pick_tokens

# Positions whose logits are computed at once when reading the draft pass's arg-max: all of a chunk's
# (256 rows × 64 tokens × SmolLM2's 49,152-token vocabulary) would take 3 GB in float32.
LOGIT_POSITIONS = 512


def can_draft(config: PretrainedConfig) -> bool:
    """Full attention in every layer and logits straight from the output layer."""
    text = config.get_text_config(decoder=True)
    return full_attention(config) and getattr(text, "final_logit_softcapping", None) is None


def right_padded(drafts: list[list[int]], limit: int, pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Draft token ids [rows, n] (each cut to `limit`), right-padded, and the mask of their real tokens."""
    drafts = [d[:limit] for d in drafts]
    width = max(map(len, drafts))
    ids = torch.full((len(drafts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(drafts), width), dtype=torch.long, device=device)
    for i, draft in enumerate(drafts):
        ids[i, :len(draft)] = torch.tensor(draft, dtype=torch.long)
        mask[i, :len(draft)] = 1
    return ids, mask


def draft_argmax(model: PreTrainedModel, state: Running, drafts: Tensor, draft_mask: Tensor) -> Tensor:
    """The rows' own greedy token after each draft position [rows, n], from one forward pass over the
    drafts appended to the cache (which keeps them)."""
    steps = torch.arange(1, drafts.shape[1] + 1, device=drafts.device)
    hidden = model.get_decoder()(input_ids=drafts, attention_mask=torch.cat([state.mask, draft_mask], 1),
                                 position_ids=state.positions + steps, past_key_values=state.cache,
                                 use_cache=True).last_hidden_state
    flat, head = hidden.reshape(-1, hidden.shape[-1]), model.get_output_embeddings()
    picked = [head(flat[i:i + LOGIT_POSITIONS]).float().argmax(-1) for i in range(0, len(flat), LOGIT_POSITIONS)]
    return torch.cat(picked).view(drafts.shape)


@torch.no_grad()
def decode_drafted(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, drafts: list[list[int]],
                   max_new_tokens: int, stop_ids: Tensor, pad_id: int,
                   use_rows: Callable[[Tensor], None] = lambda rows: None,
                   on_step: Callable[[int, int], None] | None = None,
                   groups: Tensor | None = None) -> tuple[Tensor, int]:
    """`decode`'s greedy tokens [rows, max_new_tokens], each row checked against its draft (token ids)
    first; and how many of the tokens were taken from the drafts."""
    device = input_ids.device
    state = Running.prefilled(model, input_ids, attention_mask, use_rows, groups)
    ids, mask = right_padded(drafts, max_new_tokens, pad_id, device)
    own = pick_tokens(state.logits, 0.0, None)[:, None]
    if ids.shape[1]:
        own = torch.cat([own, draft_argmax(model, state, ids, mask)], 1)        # [rows, n + 1]
    agreed = ((own[:, :-1] == ids) & mask.bool()).long().cumprod(1).sum(1)   # k: the draft's tokens kept
    taken = torch.where(torch.arange(own.shape[1], device=device) < agreed[:, None],
                        torch.nn.functional.pad(ids, (0, 1), value=pad_id), own)  # the draft's k, then its own
    length = (agreed + 1).clamp(max=max_new_tokens)
    stops = torch.isin(taken, stop_ids) & (torch.arange(own.shape[1], device=device) < length[:, None])
    stopped = stops.any(1)
    length = torch.where(stopped, stops.long().argmax(1) + 1, length)
    new = torch.full((len(input_ids), max_new_tokens), pad_id, dtype=torch.long, device=device)
    width = min(own.shape[1], max_new_tokens)
    new[:, :width] = torch.where(torch.arange(width, device=device) < length[:, None], taken[:, :width], pad_id)
    from_draft = int(torch.minimum(agreed, length).sum())
    if on_step:
        on_step(int((stopped | (length >= max_new_tokens)).sum()), int(length.sum()))
    # Each row has seen its prompt and the draft's tokens it kept; the rest of the draft stays masked.
    state.mask = torch.cat([state.mask, (torch.arange(ids.shape[1], device=device) < agreed[:, None]).long()], 1)
    state.positions, state.written = state.positions + agreed[:, None], length
    running = ~stopped & (length < max_new_tokens)
    last = taken.gather(1, (length - 1)[:, None]).squeeze(1)
    if state.advance(model, last, running, use_rows):
        decode_running(model, new, state, stop_ids, use_rows, on_step, tokens=int(length.sum()))
    return new, from_draft
