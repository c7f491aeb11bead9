"""Chunk planning by prompt length, the decode step's attention, and progress inside a chunk."""

import io

import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from essa.engines import HFEngine
from essa.engines.attention import decode_attention
from essa.engines.rows import Chunking, chunk_rows, prompt_lengths
from essa.models import load_tokenizer
from essa.progress import ChunkSteps
from essa.svd import build_space
from tests.conftest import greedy
from tests.test_engine import TARGETS, peft_model

LENGTHS = [381, 37, 67, 40, 120, 67]


def cells(chunks):
    return [(m, j) for rows in chunks for m, j in zip(rows.members, rows.prompts)]


def test_length_chunks_hold_every_row_once_sorted_by_length_within_the_budget():
    plan = Chunking(rows=5, by_length=True, tokens=1000, new_tokens=100)
    chunks = chunk_rows(3, LENGTHS, plan)
    assert sorted(cells(chunks)) == [(m, j) for m in range(3) for j in range(len(LENGTHS))]
    order = [LENGTHS[j] for rows in chunks for j in rows.prompts]
    assert order == sorted(order), "rows go in order of prompt length"
    for rows in chunks:
        longest = max(LENGTHS[j] for j in rows.prompts)
        assert len(rows) <= 5
        assert len(rows) == 1 or len(rows) * (longest + 100) <= 1000
    # the 381-token prompt's rows cost 481 tokens each: at most two per chunk, where 37-token ones go five at a time
    assert max(len(rows) for rows in chunks if 0 in rows.prompts) == 2 and len(chunks[0]) == 5
    assert chunk_rows(3, LENGTHS, plan) == chunks, "a pure function: every worker plans the same chunks"


def test_a_row_over_the_budget_gets_a_chunk_of_its_own():
    chunks = chunk_rows(2, [50, 900], Chunking(rows=8, by_length=True, tokens=500, new_tokens=10))
    assert [len(rows) for rows in chunks] == [2, 1, 1]


def test_without_length_order_chunks_are_candidate_major():
    chunks = chunk_rows(2, [5, 1, 3], Chunking(rows=4))
    assert cells(chunks) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [len(rows) for rows in chunks] == [4, 2]


def test_decode_attention_equals_sdpa_for_grouped_heads_and_padding():
    torch.manual_seed(0)
    q = torch.randn(5, 6, 1, 8, dtype=torch.float64)
    k, v = torch.randn(5, 2, 11, 8, dtype=torch.float64), torch.randn(5, 2, 11, 8, dtype=torch.float64)
    mask = torch.ones(5, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = decode_attention(q, k, v, mask, 8 ** -0.5)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-12)
    additive = torch.zeros(5, 1, 1, 11, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    assert torch.allclose(decode_attention(q, k, v, additive, 8 ** -0.5), out, atol=1e-12)


def test_engine_in_length_chunks_equals_peft_per_member(tiny_model_dir):
    """Prompts of very different lengths, a budget that splits them: each member still gets exactly its adapter."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = ["Hi.", "Name three colors of the rainbow and say why the sky is blue in one short line.", "2 + 2?"]
    space = build_space(model, rank=4, alpha=4, target_modules=TARGETS, adapter="", trainable_fraction=1.0)
    candidates = torch.randn(2, space.dim, generator=torch.Generator().manual_seed(4)) * 0.5
    lengths = prompt_lengths(tokenizer, prompts)
    engine = HFEngine(model, tokenizer, space, max_new_tokens=6, batch_rows=64, batch_tokens=3 * (max(lengths) + 6))
    chunks = chunk_rows(2, lengths, engine.chunking(3))
    assert len(chunks) == 2 and all(len({m for m in rows.members}) == 2 for rows in chunks)
    gen = engine.generate(candidates, prompts)
    engine.close()
    for member, candidate in enumerate(candidates):
        assert gen.completions[member] == greedy(peft_model(tiny_model_dir, space, candidate, torch.float64),
                                                 tokenizer, prompts, 6), f"member {member}"


def test_a_long_evaluation_prints_progress_before_its_first_chunk_ends(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    space = build_space(model, rank=2, alpha=2, target_modules=TARGETS, adapter="", trainable_fraction=1.0)
    long_prompts = [" ".join(["word"] * n) for n in (150, 160, 170, 180)]
    engine = HFEngine(model, tokenizer, space, max_new_tokens=8, batch_rows=2)
    out = io.StringIO()
    with ChunkSteps(Console(file=out, width=200), "eval chunks", bar=False, every=0.0) as progress:
        engine.generate(torch.zeros(1, space.dim), long_prompts, progress, progress.rows)
    lines = out.getvalue().splitlines()
    first_chunk_end = next(i for i, line in enumerate(lines) if line.startswith("eval chunks 1/2"))
    inside = [line for line in lines[:first_chunk_end] if "rows finished" in line]
    assert inside and inside[0].startswith("eval chunks: chunk 1/2 0/2 rows finished  2 tokens"), lines
    assert "tok/s" in inside[-1] and "elapsed" in inside[-1]


def test_a_one_chunk_evaluation_says_rows_not_chunks():
    out = io.StringIO()
    with ChunkSteps(Console(file=out, width=200), "held-out chunks", bar=False, every=0.0) as progress:
        progress(0, 1)
        progress.rows(19, 64, 3193)
    assert out.getvalue().startswith("held-out chunks: 19/64 rows finished  3193 tokens"), out.getvalue()
