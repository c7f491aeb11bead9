"""The decode loop against transformers' `generate`: same greedy tokens, with finished rows leaving
the batch."""

import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicLayer

from essa.engines import HFEngine
from essa.engines import decode as decode_module
from essa.engines.cache import BlockLayer, fill_holes
from essa.engines.decode import decode, length_passes, shared_prefix
from essa.models import load_tokenizer
from essa.svd import build_space
from tests.conftest import PROMPTS, greedy

# Prompts of different lengths (left padding) behind a shared system turn, as a chat template gives.
SYSTEM = "You are a helpful assistant. Answer briefly.\n"
CHAT = [SYSTEM + p for p in PROMPTS] + [SYSTEM + "Hi."]


def reference(model, tokenizer, prompts, max_new_tokens, stop):
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    new = out[:, batch["input_ids"].shape[1]:]
    return torch.nn.functional.pad(new, (0, max_new_tokens - new.shape[1]), value=tokenizer.pad_token_id)


def test_greedy_decode_equals_generate_with_rows_finishing_early(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    batch = tokenizer(CHAT, return_tensors="pt", padding=True, add_special_tokens=False)
    # A stop token the model emits early in some rows and not in others, so rows leave at different steps.
    free = reference(model, tokenizer, CHAT, 12, tokenizer.eos_token_id)
    stop = int(free[0, 2])
    expected = reference(model, tokenizer, CHAT, 12, stop)
    seen = []
    new = decode(model, batch["input_ids"], batch["attention_mask"], 12, torch.tensor([stop]),
                 tokenizer.pad_token_id, use_rows=lambda index: seen.append(index.tolist()))
    assert torch.equal(new, expected)
    assert seen and min(map(len, seen)) < len(CHAT), "finished rows must leave the batch"
    assert any(rows != sorted(rows) for rows in seen), "rows beyond the batch must move into the places left"


def test_engine_with_rows_leaving_equals_peft_per_member(tiny_model_dir):
    """Every member of a population sees exactly its own adapter while rows leave the batch."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    space = build_space(model, rank=4, alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        adapter="", trainable_fraction=1.0)
    candidates = torch.randn(3, space.dim, generator=torch.Generator().manual_seed(3)) * 0.5
    engine = HFEngine(model, tokenizer, space, max_new_tokens=8, batch_rows=5)
    assert model.config._attn_implementation == "essa_sdpa", "grouped-query attention without copying K and V"
    gen = engine.generate(candidates, CHAT)
    engine.close()
    assert model.config._attn_implementation == "sdpa"
    assert len({tuple(c) for c in gen.completions}) > 1, "members must differ, or the test shows nothing"
    from tests.test_engine import peft_model

    for member, candidate in enumerate(candidates):
        peft = peft_model(tiny_model_dir, space, candidate, torch.float64)
        assert gen.completions[member] == greedy(peft, tokenizer, CHAT, 8), f"member {member}"


def test_alike_rows_prefill_each_distinct_prompt_once(tiny_model_dir):
    """k copies of a prompt under one model: one prefill per distinct prompt, the same tokens as without."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [p for p in PROMPTS for _ in range(3)]  # no prefix shared by all prompts
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    args = (model, batch["input_ids"], batch["attention_mask"], 10, torch.tensor([tokenizer.eos_token_id]),
            tokenizer.pad_token_id)
    seen = []
    alike = decode(*args, use_rows=lambda index: seen.append(index.tolist()),
                   groups=torch.zeros(len(prompts), dtype=torch.long))
    assert sorted(seen[0]) == [3 * i for i in range(len(PROMPTS))], "the prefill runs the first row of each prompt"
    assert seen[1] == list(range(len(prompts)))
    assert torch.equal(alike, decode(*args))


def test_shared_prefix_is_prefilled_once_per_group(tiny_model_dir):
    """Two candidates' rows over prompts behind one system turn: the turn is prefilled by one row per
    candidate, then each row prefills its own tokens after it; the tokens equal plain `generate`."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = CHAT + CHAT
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    system = len(tokenizer(SYSTEM, add_special_tokens=False)["input_ids"])
    assert shared_prefix(batch["input_ids"], batch["attention_mask"]) >= system - 1
    seen = []
    groups = torch.tensor([0] * len(CHAT) + [1] * len(CHAT))
    new = decode(model, batch["input_ids"], batch["attention_mask"], 12, torch.tensor([tokenizer.eos_token_id]),
                 tokenizer.pad_token_id, use_rows=lambda index: seen.append(index.tolist()), groups=groups)
    assert seen[:2] == [[0, len(CHAT)], list(range(len(prompts)))], "one row per group, then every row"
    assert torch.equal(new, reference(model, tokenizer, prompts, 12, tokenizer.eos_token_id))


def test_uneven_prompts_prefilled_in_passes_by_length_equal_generate(tiny_model_dir, monkeypatch):
    """Rows of several lengths, prefilled in one pass per length and merged into one left-padded
    cache, decode what plain `generate` decodes for them: alone, and with groups sharing a prefix."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = CHAT + CHAT
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    lengths = batch["attention_mask"].sum(1)
    monkeypatch.setattr(decode_module, "PASS_COST", 0)  # a pass per length
    expected = reference(model, tokenizer, prompts, 12, tokenizer.eos_token_id)
    for groups in (None, torch.tensor([0] * len(CHAT) + [1] * len(CHAT))):
        seen = []
        new = decode(model, batch["input_ids"], batch["attention_mask"], 12, torch.tensor([tokenizer.eos_token_id]),
                     tokenizer.pad_token_id, use_rows=lambda index: seen.append(index.tolist()), groups=groups)
        assert torch.equal(new, expected)
        if groups is None:
            passes = [rows.tolist() for rows in length_passes(lengths, 0)]
            assert len(passes) > 1 and seen[:len(passes) + 1] == passes + [list(range(len(prompts)))]


def test_length_passes_trade_padding_against_passes():
    lengths = torch.tensor([5, 40, 5, 6, 41, 5])
    as_lists = lambda passes: [p.tolist() for p in passes]  # noqa: E731
    assert as_lists(length_passes(lengths, 0)) == [[0, 2, 5], [3], [1], [4]]
    # padding the 5s to 6 and the 40 to 41 costs less than two more passes
    assert as_lists(length_passes(lengths, 10)) == [[0, 2, 3, 5], [1, 4]]
    assert as_lists(length_passes(lengths, 1000)) == [[0, 1, 2, 3, 4, 5]]


def test_shared_prefix_leaves_every_row_a_token_of_its_own():
    ids = torch.tensor([[0, 5, 6, 7], [5, 6, 7, 8], [0, 0, 5, 6]])
    mask = (ids != 0).long()
    assert shared_prefix(ids, mask) == 1  # the shortest prompt, [5, 6], keeps its last token
    assert shared_prefix(ids[:2], mask[:2]) == 2
    assert shared_prefix(torch.tensor([[4, 5], [3, 5]]), torch.ones(2, 2, dtype=torch.long)) == 0


def test_fill_holes_moves_only_the_rows_beyond_the_new_size():
    keep = torch.tensor([0, 2, 3, 5, 6])  # rows 1 and 4 of 7 leave
    order = fill_holes(keep, 7)
    assert sorted(order.tolist()) == keep.tolist()
    assert order.tolist() == [0, 5, 2, 3, 6]


def test_block_layer_holds_what_a_dynamic_layer_holds():
    """Updates, rows leaving in any order, and rows copied to more rows: the same keys and values,
    in contiguous blocks whose unfilled tail is zeros and masked."""
    gen = torch.Generator().manual_seed(0)
    block, dynamic = BlockLayer(block=4), DynamicLayer()
    rows = 6
    for step, select in [(5, None), (1, torch.tensor([0, 5, 2, 3])), (1, torch.tensor([3, 1])),
                         (1, torch.tensor([0, 0, 1, 1, 1])), (2, None)]:
        if select is not None:
            block.batch_select_indices(select)
            dynamic.batch_select_indices(select)
            rows = len(select)
        k, v = torch.randn(2, rows, 2, step, 3, generator=gen)
        assert block.get_mask_sizes(step) == (-(-(block.get_seq_length() + step) // 4) * 4, 0)
        (keys, values), want = block.update(k, v), dynamic.update(k, v)
        length = block.get_seq_length()
        assert length == dynamic.get_seq_length() and keys.shape[2] == -(-length // 4) * 4
        assert keys.is_contiguous() and values.is_contiguous()
        assert torch.equal(keys[:, :, :length], want[0]) and torch.equal(values[:, :, :length], want[1])
        assert not keys[:, :, length:].any() and not values[:, :, length:].any()
