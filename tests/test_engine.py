"""The population-batched engine against plain peft models with each member's adapter materialized."""

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from essa.engines import HFEngine
from essa.engines.hf import count_generated
from essa.models import load_tokenizer, quantization_config
from essa.svd import build_space
from tests.conftest import PROMPTS, greedy

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def peft_model(model_dir, space, candidate, dtype, quantization="none"):
    """A real peft LoRA model whose adapter is `candidate` materialized from the SVD space."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                quantization_config=quantization_config(quantization, dtype))
    config = LoraConfig(r=space.rank, lora_alpha=space.modules[0].scaling * space.rank, target_modules=TARGETS,
                        lora_dropout=0.0)
    model = get_peft_model(base, config)
    state = {}
    for name, (a, b) in space.lora_weights(candidate).items():
        state[f"base_model.model.{name}.lora_A.weight"] = a.to(dtype)
        state[f"base_model.model.{name}.lora_B.weight"] = b.to(dtype)
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    return model.eval()


# Offsets of each space's scale: singular values near 1, factor entries near 1/sqrt(width).
SIGMA = {"singular_values": 0.5, "factors": 0.05}


def setup(model_dir, dtype, quantization="none", population=4, space="singular_values"):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 quantization_config=quantization_config(quantization, dtype)).eval()
    tokenizer = load_tokenizer(str(model_dir))
    searched = build_space(model, rank=4, alpha=4, target_modules=TARGETS, adapter="", trainable_fraction=1.0,
                           space=space)
    torch.manual_seed(1)
    candidates = torch.randn(population, searched.dim) * SIGMA[space]
    return model, tokenizer, searched, candidates


@pytest.mark.parametrize("space", ["singular_values", "factors"])
def test_greedy_output_of_every_member_equals_peft_with_its_adapter(tiny_model_dir, space):
    model, tokenizer, space, candidates = setup(tiny_model_dir, torch.float64, space=space)
    engine = HFEngine(model, tokenizer, space, max_new_tokens=8, batch_rows=5)  # 12 rows in chunks of 5
    gen = engine.generate(candidates, PROMPTS)
    assert len(gen.completions) == len(candidates) and gen.tokens > 0
    assert len({tuple(c) for c in gen.completions}) > 1, "members must differ, or the test shows nothing"
    for member, candidate in enumerate(candidates):
        reference = peft_model(tiny_model_dir, space, candidate, torch.float64)
        assert gen.completions[member] == greedy(reference, tokenizer, PROMPTS, 8), f"member {member}"


def test_zero_offsets_give_the_base_model(tiny_model_dir):
    model, tokenizer, space, _ = setup(tiny_model_dir, torch.float64)
    base = greedy(model, tokenizer, PROMPTS, 8)
    engine = HFEngine(model, tokenizer, space, max_new_tokens=8, batch_rows=64)
    assert engine.generate(torch.zeros(1, space.dim), PROMPTS).completions[0] == base


@pytest.mark.parametrize("quantization, layer, space", [("int8", "Linear8bitLt", "singular_values"),
                                                        ("nf4", "Linear4bit", "singular_values"),
                                                        ("nf4", "Linear4bit", "factors")])
def test_quantized_engine_matches_peft_on_real_bitsandbytes_layers(tiny_model_dir, quantization, layer, space):
    model, tokenizer, space, candidates = setup(tiny_model_dir, torch.float32, quantization, population=2,
                                                space=space)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
    engine = HFEngine(model, tokenizer, space, max_new_tokens=4, batch_rows=64)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"].bool()
    # LLM.int8 picks outlier columns over the whole batch, so its base matmul depends on the batch's
    # rows; comparing one member at a time on the same rows isolates the engine's low-rank term.
    # On CPUs with AVX512-BF16, bitsandbytes computes 4-bit matmuls in bf16: the last-bit differences
    # of the two (equal) fp32 low-rank terms become bf16 rounding flips in the next layer (measured:
    # logits differ by up to 0.02, while the candidate moves them by about 3).
    from bitsandbytes.functional import has_avx512bf16

    tolerance = 5e-2 if quantization == "nf4" and has_avx512bf16() else 1e-4
    for member, candidate in enumerate(candidates):
        engine.lora.set_rows(candidate[None], torch.zeros(len(PROMPTS), dtype=torch.long))
        reference = peft_model(tiny_model_dir, space, candidate, torch.float32, quantization)
        with torch.no_grad():
            logits = model(**batch).logits
            expected = reference(**batch).logits
            with reference.disable_adapter():
                base_logits = reference(**batch).logits
        assert torch.allclose(logits[mask], expected[mask], atol=tolerance, rtol=tolerance)
        assert not torch.allclose(expected[mask], base_logits[mask], atol=1e-2), "the candidate must change outputs"


def test_count_generated_stops_at_the_first_stop_token():
    new = torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert count_generated(new, {2}).tolist() == [3, 4, 1]


def test_space_from_a_peft_adapter_reproduces_it(tiny_model_dir, tmp_path):
    torch.manual_seed(2)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64),
                             LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    trained.save_pretrained(tmp_path / "sft")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    space = build_space(model, rank=2, alpha=0, target_modules=["q_proj"], adapter=str(tmp_path / "sft"),
                        trainable_fraction=1.0)
    assert len(space.modules) == 4 * model.config.num_hidden_layers and space.modules[0].scaling == 2.0
    weights = space.lora_weights(torch.zeros(space.dim))
    layer = trained.base_model.model.model.layers[0].self_attn.q_proj
    a, b = weights["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(a.double(), layer.lora_A["default"].weight, atol=1e-5)
    assert torch.allclose(b.double(), layer.lora_B["default"].weight, atol=1e-5)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    engine = HFEngine(model, tokenizer, space, max_new_tokens=8, batch_rows=64)
    expected = greedy(trained.eval(), tokenizer, PROMPTS, 8)
    assert engine.generate(torch.zeros(1, space.dim), PROMPTS).completions[0] == expected
