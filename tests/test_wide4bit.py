"""Wide batches through dequantized 4-bit weights, on real bitsandbytes NF4 layers."""

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from essa.engines import HFEngine
from essa.engines.hf import PopulationLoRA
from essa.engines.wide4bit import WideBatches4bit, portable, wraps
from essa.models import load_tokenizer, quantization_config
from essa.svd import build_space
from tests.conftest import PROMPTS

pytestmark = pytest.mark.skipif(not has_avx512bf16(),
                                reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")


def nf4_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                quantization_config=quantization_config("nf4", torch.bfloat16)).eval()


def layer_outputs(layer, x):
    with torch.no_grad():
        return layer(x)


def test_wide_inputs_multiply_the_dequantized_weight_and_narrow_ones_keep_bitsandbytes_kernel(tiny_model_dir):
    model = nf4_model(tiny_model_dir)
    layer = model.model.layers[0].mlp.up_proj
    assert wraps(layer)
    torch.manual_seed(0)
    wide, narrow = torch.randn(8, 9, 64, dtype=torch.bfloat16), torch.randn(3, 1, 64, dtype=torch.bfloat16)
    portable = (layer.weight.data.clone(), layer.weight.quant_state)
    expected_wide = F.linear(wide, dequantize_4bit(*portable).to(torch.bfloat16))
    kernel_wide, kernel_narrow = layer_outputs(layer, wide), layer_outputs(layer, narrow)  # bitsandbytes repacks here
    assert layer.weight.quant_state.packing_format_for_cpu

    routed = WideBatches4bit(model, min_rows=16)  # 72 token rows are wide, 3 are not
    assert layer in routed.modules and len(routed.modules) == 2 * 7
    assert torch.equal(layer_outputs(layer, wide), expected_wide)
    assert torch.equal(layer_outputs(layer, narrow), kernel_narrow)
    # the same function as bitsandbytes' kernel, to bf16 rounding (its scales are rounded to bf16)
    assert torch.allclose(expected_wide, kernel_wide, rtol=0.05, atol=0.05 * kernel_wide.abs().max().item())
    routed.restore()
    assert "forward" not in vars(layer) and torch.equal(layer_outputs(layer, wide), kernel_wide)


def test_a_later_engine_on_the_same_model_still_routes_wide_batches(tiny_model_dir):
    """The first forward repacks the weights in place; the portable copy kept at the first wrap serves later ones."""
    model = nf4_model(tiny_model_dir)
    layer = model.model.layers[1].self_attn.o_proj
    x = torch.randn(4, 32, 64, dtype=torch.bfloat16)
    first = WideBatches4bit(model, min_rows=64)
    before = layer_outputs(layer, x)
    layer_outputs(layer, x[:1, :1])  # narrow: bitsandbytes' kernel, which repacks the weight
    first.restore()
    assert layer.weight.quant_state.packing_format_for_cpu
    second = WideBatches4bit(model, min_rows=64)
    assert torch.equal(layer_outputs(layer, x), before)
    second.restore()


def test_the_engine_with_wide_batches_computes_the_nf4_model_to_bf16_precision(tiny_model_dir):
    """Against the float32 model whose weights are the 4-bit weights dequantized exactly, with the same
    per-row adapters: the wide path is that function in bf16 (bitsandbytes' kernel, which rounds its
    scales to bf16, is 20x further from it on this tiny model)."""
    model = nf4_model(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    space = build_space(model, rank=4, alpha=4, target_modules=["q_proj", "v_proj"], adapter="", trainable_fraction=1.0)
    candidates = torch.randn(4, space.dim) * 0.5
    members = torch.arange(4).repeat_interleave(len(PROMPTS) * 2)
    batch = tokenizer(PROMPTS * 8, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"].bool()
    engine = HFEngine(model, tokenizer, space, max_new_tokens=4, batch_rows=64, wide_4bit_rows=1)
    assert len(engine.wide.modules) == 2 * 7
    exact = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for module in engine.wide.modules:
        exact.get_submodule(module_name(model, module)).weight.data = dequantize_4bit(*portable(module)).float()
    reference = PopulationLoRA(exact, space, torch.float32)
    engine.lora.set_rows(candidates, members)
    reference.set_rows(candidates, members)
    with torch.no_grad():
        got, expected = model(**batch).logits.float()[mask], exact(**batch).logits[mask]
    assert (got - expected).abs().mean() < 0.03 * expected.abs().mean()
    assert len(engine.generate(candidates, PROMPTS).completions) == 4
    engine.close()
    assert engine.wide.modules == [] and all("forward" not in vars(m) for m in model.modules())


def module_name(model, module):
    return next(name for name, m in model.named_modules() if m is module)
