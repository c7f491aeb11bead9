"""Population-batched Hugging Face engine.

All (candidate × prompt) rows go through batched greedy decodes (essa/engines/decode.py: finished
rows leave the batch) over the shared (possibly quantized) base weights, in chunks of rows of
similar prompt length of at most `generation.batch_rows` rows and `generation.batch_tokens`
tokens of cache (essa/engines/rows.py). Forward hooks on the adapted linear layers add each
row's own low-rank term, computed from the frozen SVD factors and that row's singular values:

    delta(x) = (x V_A) C[row] U_Bᵀ,   C[row] = scaling · diag(s_A[row]) U_Aᵀ V_B diag(s_B[row])

which is x (B A)ᵀ for that row's candidate, without materializing A or B. The shared matmuls
have width `rank` and the per-row part is an r × r core, so a population costs about as much as
the same number of sequences of plain batched inference.

When the search moves the LoRA factors themselves (`svd.space = "factors"`) there are no shared
directions, so a chunk's candidates are stacked into one term of rank (candidates in the chunk) × r:

    delta(x) = ((x [A_1; …; A_P]ᵀ) ⊙ mask[row]) [B_1 … B_P]ᵀ,   mask[row] = scaling on its candidate's block

Two shared matmuls of width P·r (for the quickstart's 17 candidates, 68: about a quarter of a
576-wide projection per adapted layer), and no per-row [in, r] matrices to gather at every step.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from essa.engines.attention import use_gqa_sdpa
from essa.engines.decode import decode, distinct_rows
from essa.engines.dense4bit import Dense4bit
from essa.engines.draft import can_draft, decode_drafted
from essa.engines.rows import Chunking, Generation, OnChunk, OnRows, Rows, RowsOutput, generate, prompt_lengths
from essa.svd import SVDSpace

Hook = Callable[[nn.Module, tuple, Tensor], Tensor]


class _PerRow:
    """A term's per-row state: that of every row of the batch, and that of the rows in the next forward
    pass (a decode loop's active rows)."""

    every: Tensor | None = None
    now: Tensor | None = None

    def keep(self, every: Tensor) -> None:
        self.every = self.now = every

    def use_rows(self, index: Tensor) -> None:
        self.now = self.every[index]

    def for_batch(self, x: Tensor) -> Tensor:
        if self.now is None or x.shape[0] != self.now.shape[0]:
            raise RuntimeError("population rows were not set for this batch")
        return self.now


class _RowLoRA(_PerRow):
    """The low-rank term of one module, with per-row singular values folded into one r × r core per row
    (the per-row state: diag(s_A) mix diag(s_B))."""

    def __init__(self, factors, dtype: torch.dtype, device: torch.device) -> None:
        a, b = factors.a, factors.b
        # Stored as F.linear takes them: its kernel multiplies [rows, in] by a contiguous [r, in]
        # four times faster than `@` by [in, r] (22 vs 90 us at 256 rows of SmolLM2, float32).
        self.v_a_t = a.V.T.contiguous().to(device, dtype)  # r × in
        self.mix = (a.U.T @ b.V).to(device, dtype) * factors.scaling  # r × r
        self.u_b = b.U.contiguous().to(device, dtype)      # out × r

    def set_rows(self, s_a: Tensor, s_b: Tensor) -> None:
        self.keep(s_a[:, :, None] * self.mix * s_b[:, None, :])

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        core = self.for_batch(args[0])
        x = args[0].to(self.v_a_t.dtype)  # [rows, tokens, in]
        h = F.linear(torch.bmm(F.linear(x, self.v_a_t), core), self.u_b)
        return output.add_(h)  # summed in the term's precision, rounded once to the output's


class _StackedLoRA(_PerRow):
    """The low-rank term of one module when every candidate has its own factors: the chunk's candidates
    stacked into one shared term, each row masked to its own candidate's block (the per-row state)."""

    def __init__(self, scaling: float, dtype: torch.dtype, device: torch.device) -> None:
        self.scaling, self.dtype, self.device = scaling, dtype, device
        self.a: Tensor | None = None     # [P·r, in]
        self.b: Tensor | None = None     # [out, P·r]

    def set_rows(self, a: Tensor, b: Tensor, members: Tensor) -> None:
        """`a` [P, r, in] and `b` [P, out, r] of the chunk's candidates; row i uses candidate `members[i]`."""
        n, rank = a.shape[:2]
        self.a = a.reshape(n * rank, -1).to(self.device, self.dtype)
        self.b = b.permute(1, 0, 2).reshape(b.shape[1], n * rank).to(self.device, self.dtype)
        block = torch.arange(n * rank) // rank
        self.keep(((block[None, :] == members[:, None]) * self.scaling).to(self.device, self.dtype))

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        mask = self.for_batch(args[0])
        h = F.linear(F.linear(args[0].to(self.dtype), self.a) * mask[:, None, :], self.b)
        return output.add_(h)


class PopulationLoRA:
    """Attach per-row LoRA terms for a whole population to a model's adapted layers. `timed`: add the
    seconds spent in them to `term_seconds` (for benchmarks; on a CPU every op has completed when a
    hook returns, so the sum is the terms' share of a call)."""

    def __init__(self, model: nn.Module, space: SVDSpace, dtype: torch.dtype, timed: bool = False) -> None:
        self.space = space
        device = next(model.parameters()).device
        self.terms = [_StackedLoRA(m.scaling, dtype, device) if space.space == "factors" else _RowLoRA(m, dtype, device)
                      for m in space.modules]
        self.term_seconds = 0.0
        self.handles = [model.get_submodule(m.name).register_forward_hook(self._timed(t) if timed else t)
                        for m, t in zip(space.modules, self.terms)]
        self.device, self.dtype = device, dtype

    def _timed(self, term: Hook) -> Hook:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            start = time.perf_counter()
            result = term(module, args, output)
            self.term_seconds += time.perf_counter() - start
            return result

        return hook

    def set_rows(self, candidates: Tensor, members: Tensor) -> None:
        """Row i uses candidate `members[i]` (candidates are offsets in the search space)."""
        if self.space.space == "factors":
            used, members = torch.unique(members, return_inverse=True)  # only the chunk's own candidates
            for term, (a, b) in zip(self.terms, self.space.lora_factors(candidates[used])):
                term.set_rows(a, b, members)
            return
        for term, (s_a, s_b) in zip(self.terms, self.space.singular_values(candidates)):
            term.set_rows(s_a[members].to(self.device, self.dtype), s_b[members].to(self.device, self.dtype))

    def use_rows(self, index: Tensor) -> None:
        """The next forward pass computes rows `index` of those set (a decode loop's active rows)."""
        for term in self.terms:
            term.use_rows(index)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def lora_compute_dtype(model: PreTrainedModel) -> torch.dtype:
    """At least float32, like peft's adapters: in bfloat16 an offset of 0.01 on a singular value
    of 5 would round away. The term's matmuls have width `rank`, so this costs little."""
    activations = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    return torch.promote_types(activations, torch.float32)


def same_candidate(candidates: Tensor, members: Tensor) -> Tensor:
    """A group per distinct candidate, for each row: rows in one group compute the same function."""
    if candidates.shape[1] == 0:
        return torch.zeros(len(members), dtype=torch.long)
    return distinct_rows(candidates)[1][members]


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokens that end a generation: the model's end tokens and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}


def count_generated(new_tokens: Tensor, stop_ids: set[int]) -> Tensor:
    """Tokens generated per row, up to and including the first stop token."""
    stops = torch.zeros_like(new_tokens, dtype=torch.bool)
    for token in stop_ids:
        stops |= new_tokens == token
    after_stop = (stops.cumsum(1) - stops.long()) > 0
    return (~after_stop).sum(1)


class HFEngine:
    """Evaluate populations of candidates with one batched decode per chunk of rows: greedy, or sampled
    at `temperature` > 0 from a generator seeded with `seed` (the warm start's best-of-k samples).
    `dense_4bit`: 4-bit CPU layers multiply through a bf16 copy of their dequantized weight
    (essa/engines/dense4bit.py); False keeps bitsandbytes' kernel. `time_terms`: each chunk's phases
    hold `seconds_lora_terms`, the time spent in the per-row low-rank terms (benchmarks). `drafts`:
    greedy rows given a draft of their completion can verify it in one pass (essa/engines/draft.py);
    `drafts_first`: before that is measured, it is expected to pay."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, space: SVDSpace,
                 max_new_tokens: int, batch_rows: int, batch_tokens: int = Chunking.tokens,
                 temperature: float = 0.0, seed: int = 0, dense_4bit: bool = True, time_terms: bool = False) -> None:
        self.model, self.tokenizer, self.space = model, tokenizer, space
        self.max_new_tokens = max_new_tokens
        self.plan = Chunking(batch_rows, True, batch_tokens, max_new_tokens)
        self.lora = PopulationLoRA(model, space, lora_compute_dtype(model), time_terms)
        self.time_terms = time_terms
        self.restore_attention = use_gqa_sdpa(model)
        self.dense = Dense4bit(model) if dense_4bit else None
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.stop_tensor = torch.tensor(sorted(self.stop_ids), device=self.lora.device)
        self.temperature = temperature
        self.generator = torch.Generator(self.lora.device).manual_seed(seed) if temperature else None
        self.drafts = not temperature and can_draft(model.config)
        # measured slower than undrafted on CPUs (benchmarks/drafted-members/), expected faster on GPUs
        self.drafts_first = self.drafts and self.lora.device.type != "cpu"

    def chunking(self, n_prompts: int) -> Chunking:
        return self.plan

    @torch.no_grad()
    def generate_rows(self, candidates: Tensor, prompts: list[str], rows: Rows, on_rows: OnRows | None = None,
                      drafts: list[str] | None = None) -> RowsOutput:
        """One chunk's completions; `drafts` (one text per row, where `self.drafts`): what each row is
        expected to generate, verified rather than decoded where the row agrees with it."""
        start = time.perf_counter()
        members = torch.tensor(rows.members)
        self.lora.set_rows(candidates, members)
        batch = self.tokenizer([prompts[j] for j in rows.prompts], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.lora.device)
        args = (self.model, batch["input_ids"], batch["attention_mask"])
        tail = dict(use_rows=self.lora.use_rows,
                    on_step=on_rows and (lambda finished, tokens: on_rows(finished, len(rows), tokens)),
                    groups=same_candidate(candidates, members).to(self.lora.device))
        phases = {}
        if drafts is not None and self.drafts:
            ids = self.tokenizer(drafts, add_special_tokens=False)["input_ids"]
            new, phases["draft_tokens"] = decode_drafted(*args, ids, self.max_new_tokens, self.stop_tensor,
                                                         self.tokenizer.pad_token_id, **tail)
        else:
            new = decode(*args, self.max_new_tokens, self.stop_tensor, self.tokenizer.pad_token_id,
                         temperature=self.temperature, generator=self.generator, **tail)
        new = new.cpu()
        if self.time_terms:
            phases["seconds_lora_terms"] = self.lora.term_seconds
        self.lora.term_seconds = 0.0
        return RowsOutput(self.tokenizer.batch_decode(new, skip_special_tokens=True),
                          int(count_generated(new, self.stop_ids).sum()), time.perf_counter() - start, phases)

    def generate(self, candidates: Tensor, prompts: list[str], on_chunk: OnChunk | None = None,
                 on_rows: OnRows | None = None) -> Generation:
        return generate(self, candidates, prompts, prompt_lengths(self.tokenizer, prompts), on_chunk, on_rows)

    def close(self) -> None:
        self.lora.remove()
        if self.dense:
            self.dense.restore()
        if self.restore_attention:
            self.model.set_attn_implementation(self.restore_attention)
