"""Drafted members: rows that verify the center's completion generate exactly what they generate
undrafted and what peft generates with their adapter, on every model family's tiny random model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from essa import evaluation as evaluation_module
from essa.engines import HFEngine
from essa.engines.rows import Rows, prompt_lengths
from essa.evaluation import LocalEvaluator, Task
from essa.models import load_tokenizer
from essa.scoring import Scorer
from essa.svd import build_space
from tests.conftest import greedy
from tests.test_decode import CHAT
from tests.test_engine import TARGETS, peft_model

NEW_TOKENS = 12
FAMILY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "qwen2": (Qwen2ForCausalLM, lambda **ids: Qwen2Config(**FAMILY, **ids)),       # q/k/v biases
    "qwen3": (Qwen3ForCausalLM, lambda **ids: Qwen3Config(**FAMILY, head_dim=16, **ids)),  # q/k norms
    "mistral": (MistralForCausalLM, lambda **ids: MistralConfig(**FAMILY, sliding_window=None, **ids)),
    "gemma3": (Gemma3ForCausalLM,
               lambda **ids: Gemma3TextConfig(**FAMILY, head_dim=16, layer_types=["full_attention"] * 2, **ids)),
    # sliding-window layers: the engine decodes undrafted
    "gemma3-sliding": (Gemma3ForCausalLM, lambda **ids: Gemma3TextConfig(**FAMILY, head_dim=16, sliding_window=4,
                                                                          layer_types=["sliding_attention",
                                                                                       "full_attention"], **ids)),
}


@pytest.fixture(scope="session", params=["llama", *FAMILIES])
def family_dir(request, tmp_path_factory, tiny_model_dir, smollm2_dir):
    if request.param == "llama":
        return request.param, tiny_model_dir
    tokenizer = load_tokenizer(str(smollm2_dir))
    cls, config = FAMILIES[request.param]
    torch.manual_seed(0)
    model = cls(config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():  # weights large enough that members' small offsets change their greedy tokens
        for name, p in model.named_parameters():
            # Gemma multiplies its embeddings by √hidden: at 0.2 they drown what the layers add, and
            # members never differ
            if p.dim() == 2:
                p.normal_(0, 0.02 if "gemma" in request.param and "embed" in name else 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return request.param, path


def population(model_dir, dtype=torch.float64):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = load_tokenizer(str(model_dir))
    space = build_space(model, rank=4, alpha=4, target_modules=TARGETS, adapter="", trainable_fraction=1.0)
    torch.manual_seed(1)
    center = torch.randn(space.dim) * 0.3
    # members from identical to the center to far from it: they agree with its completion never,
    # from some token on, or wholly
    scales = torch.tensor([0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])[:, None]
    members = center + torch.randn(len(scales), space.dim) * scales
    return model, tokenizer, space, torch.cat([members, center[None]])


def drafted_rows(engine, candidates) -> tuple[Rows, list[str]]:
    """Every member (all candidates but the last, the center) on every prompt, with the center's
    completions as their drafts."""
    center, prompts = len(candidates) - 1, tuple(range(len(CHAT)))
    lead = engine.generate_rows(candidates, CHAT, Rows((center,) * len(CHAT), prompts))
    rows = Rows(tuple(m for m in range(center) for _ in CHAT), prompts * center)
    return rows, [lead.texts[j] for j in rows.prompts]


def first_difference(row: list[int], draft: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(row, draft)):
        if a != b:
            return i
    return None if len(row) == len(draft) else min(len(row), len(draft))


def test_drafted_members_equal_undrafted_and_peft_on_every_family(family_dir):
    name, model_dir = family_dir
    model, tokenizer, space, candidates = population(model_dir)
    engine = HFEngine(model, tokenizer, space, max_new_tokens=NEW_TOKENS, batch_rows=256)
    assert engine.drafts == (name != "gemma3-sliding")
    rows, drafts = drafted_rows(engine, candidates)
    drafted = engine.generate_rows(candidates, CHAT, rows, drafts=drafts)
    plain = engine.generate_rows(candidates, CHAT, rows)
    engine.close()
    assert drafted.texts == plain.texts and drafted.tokens == plain.tokens
    for member in (0, 4, 7):  # identical to the center, near it, far from it
        reference = peft_model(model_dir, space, candidates[member], torch.float64)
        texts = [t for m, t in zip(rows.members, plain.texts) if m == member]
        assert texts == greedy(reference, tokenizer, CHAT, NEW_TOKENS), f"{name}: member {member}"
    own = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in plain.texts]
    guide = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in drafts]
    departs = [first_difference(o, g) for o, g in zip(own, guide)]
    assert 0 in departs, "a member departs from the draft at its first token"
    assert any(d not in (0, None) for d in departs), "a member departs mid-draft"
    assert None in departs, "a member keeps the whole draft"
    if name == "gemma3-sliding":
        assert "draft_tokens" not in drafted.phases
    else:
        assert 0 < drafted.phases["draft_tokens"] < drafted.tokens


def test_drafted_members_equal_undrafted_in_float32(tiny_model_dir):
    model, tokenizer, space, candidates = population(tiny_model_dir, torch.float32)
    engine = HFEngine(model, tokenizer, space, max_new_tokens=NEW_TOKENS, batch_rows=256)
    rows, drafts = drafted_rows(engine, candidates)
    drafted = engine.generate_rows(candidates, CHAT, rows, drafts=drafts)
    assert drafted.texts == engine.generate_rows(candidates, CHAT, rows).texts
    assert drafted.phases["draft_tokens"] > 0


def length_evaluator(engine, tokenizer, tmp_path, speculative="auto") -> tuple[LocalEvaluator, Task]:
    """The engine's evaluator with a reward that scores a completion by its length, and the CHAT prompts."""
    (tmp_path / "length.py").write_text(
        "def reward(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    scorer = Scorer.from_recipe(f"{tmp_path / 'length.py'}:reward", [], {})
    return LocalEvaluator(engine, scorer, speculative), Task(CHAT, CHAT, {}, prompt_lengths(tokenizer, CHAT))


def test_evaluator_drafts_members_from_the_center_and_scores_them_alike(tiny_model_dir, tmp_path, monkeypatch):
    model, tokenizer, space, candidates = population(tiny_model_dir)
    engine = HFEngine(model, tokenizer, space, max_new_tokens=NEW_TOKENS, batch_rows=10)
    calls = []
    generate_rows = engine.generate_rows
    monkeypatch.setattr(engine, "generate_rows", lambda *args, **kw: calls.append(args[-1] is not None)
                        or generate_rows(*args, **kw))
    evaluator, work = length_evaluator(engine, tokenizer, tmp_path, speculative=True)
    drafted = evaluator.evaluate(candidates.numpy(), work, keep_texts=True, draft=len(candidates) - 1)
    plain = evaluator.evaluate(candidates.numpy(), work, keep_texts=True)
    assert drafted.completions == plain.completions
    assert (drafted.scores == plain.scores).all() and (drafted.digests == plain.digests).all()
    assert drafted.tokens == plain.tokens
    assert 0 < drafted.phases["draft_tokens"] <= drafted.extra["member_tokens"] < drafted.tokens
    assert "member_tokens" not in plain.extra and "draft_tokens" not in plain.phases
    assert calls[:len(calls) // 2].count(True) > 1, "members' chunks were drafted"
    assert set(evaluator.pace) == {True}, "an undrafted population was not asked for a draft: not timed"
    evaluator.close()


def test_evaluator_tries_both_ways_then_keeps_the_faster(tiny_model_dir, tmp_path):
    model, tokenizer, space, candidates = population(tiny_model_dir)
    engine = HFEngine(model, tokenizer, space, max_new_tokens=NEW_TOKENS, batch_rows=256)
    assert engine.drafts and not engine.drafts_first, "measured slower on CPUs: drafted only when tried"
    evaluator, work = length_evaluator(engine, tokenizer, tmp_path)
    retry = evaluation_module.RETRY
    assert evaluator.drafts() is False, "on a CPU the first population is undrafted"
    evaluator.pace[False] = 100.0  # as its evaluation would time it
    assert [evaluator.drafts() for _ in range(2 * retry)].count(True) == 2, "then a drafted one every RETRY-th"
    evaluator.pace = {}  # as on a GPU (`drafts_first`): each way timed once, drafted first
    drafted = [bool(evaluator.evaluate(candidates.numpy(), work, draft=len(candidates) - 1).extra)
               for _ in range(2)]
    assert drafted == [True, False] and set(evaluator.pace) == {True, False}
    evaluator.pace = {True: 2.0, False: 1.0}  # drafting measured faster: kept, undrafted tried every RETRY-th time
    evaluator.choices = 0
    choices = [evaluator.drafts() for _ in range(2 * retry)]
    assert choices.count(False) == 2 and choices[retry - 1] is False
    evaluator.close()
