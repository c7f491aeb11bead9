"""4-bit layers through bf16 copies of their dequantized weights, on real bitsandbytes NF4 layers."""

import copy

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from essa.engines import HFEngine
from essa.engines.dense4bit import Dense4bit, dequantized, wraps
from essa.engines.hf import PopulationLoRA
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


def test_every_input_multiplies_the_dequantized_weight_and_restore_gives_back_bitsandbytes_kernel(tiny_model_dir):
    model = nf4_model(tiny_model_dir)
    layer = model.model.layers[0].mlp.up_proj
    assert wraps(layer)
    torch.manual_seed(0)
    wide, narrow = torch.randn(8, 9, 64, dtype=torch.bfloat16), torch.randn(3, 1, 64, dtype=torch.bfloat16)
    weight = dequantize_4bit(layer.weight.data.clone(), layer.weight.quant_state).to(torch.bfloat16)
    kernel_wide = layer_outputs(layer, wide)  # bitsandbytes repacks the weight here
    assert layer.weight.quant_state.packing_format_for_cpu and torch.equal(dequantized(layer), weight)

    dense = Dense4bit(model)
    assert layer in dense.modules and len(dense.modules) == 2 * 7
    for x in (wide, narrow):
        assert torch.equal(layer_outputs(layer, x), F.linear(x, weight))
    # the same function as bitsandbytes' kernel, to bf16 rounding (its scales are rounded to bf16)
    assert torch.allclose(layer_outputs(layer, wide), kernel_wide, rtol=0.05,
                          atol=0.05 * kernel_wide.abs().max().item())
    dense.restore()
    assert "forward" not in vars(layer) and torch.equal(layer_outputs(layer, wide), kernel_wide)


@pytest.mark.parametrize("nested", [False, True])
def test_a_weight_repacked_before_any_engine_wrapped_it_dequantizes_to_bf16_scales(nested):
    """bitsandbytes' own inverse of its repacking leaves unnested block scales transposed; with more
    than one block per row (in 256 = 4 blocks of 64) that would scramble the weight. Its scales come
    back rounded to bf16, as its kernel uses them."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=nested)
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 256) * 0.02, requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested)._quantize("cpu")
    layer.eval()
    exact = dequantize_4bit(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)).to(torch.bfloat16)
    layer_outputs(layer, torch.randn(2, 1, 256, dtype=torch.bfloat16))
    assert layer.weight.quant_state.packing_format_for_cpu
    error = (dequantized(layer).float() - exact.float()).abs().max() / exact.float().abs().max()
    assert error < 2**-7


def test_float32_inputs_come_back_in_float32(tiny_model_dir):
    model = nf4_model(tiny_model_dir)
    layer = model.model.layers[1].self_attn.o_proj
    x = torch.randn(4, 32, 64)
    dense = Dense4bit(model)
    out = layer_outputs(layer, x)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.linear(x.bfloat16(), dequantized(layer)).float())
    dense.restore()


def test_the_engine_computes_the_nf4_model_to_bf16_precision(tiny_model_dir):
    """Against the float32 model whose weights are the 4-bit weights dequantized exactly, with the same
    per-row adapters: the dense path is that function in bf16 (bitsandbytes' kernel, which rounds its
    scales to bf16, is 20x further from it on this tiny model)."""
    model = nf4_model(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    space = build_space(model, rank=4, alpha=4, target_modules=["q_proj", "v_proj"], adapter="", trainable_fraction=1.0)
    candidates = torch.randn(4, space.dim) * 0.5
    members = torch.arange(4).repeat_interleave(len(PROMPTS) * 2)
    batch = tokenizer(PROMPTS * 8, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"].bool()
    engine = HFEngine(model, tokenizer, space, max_new_tokens=4, batch_rows=64)
    assert len(engine.dense.modules) == 2 * 7
    exact = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for module in engine.dense.modules:
        exact.get_submodule(module_name(model, module)).weight.data = dequantized(module).float()
    reference = PopulationLoRA(exact, space, torch.float32)
    engine.lora.set_rows(candidates, members)
    reference.set_rows(candidates, members)
    with torch.no_grad():
        got, expected = model(**batch).logits.float()[mask], exact(**batch).logits[mask]
    assert (got - expected).abs().mean() < 0.03 * expected.abs().mean()
    assert len(engine.generate(candidates, PROMPTS).completions) == 4
    engine.close()
    assert engine.dense.modules == [] and all("forward" not in vars(m) for m in model.modules())


def test_the_engine_can_keep_bitsandbytes_kernel(tiny_model_dir):
    model = nf4_model(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    engine = HFEngine(model, tokenizer, build_space(model, 4, 4, ["q_proj"], "", 1.0), max_new_tokens=4,
                      batch_rows=64, dense_4bit=False)
    assert engine.dense is None and all("forward" not in vars(m) for m in model.modules())
    engine.close()


def module_name(model, module):
    return next(name for name, m in model.named_modules() if m is module)
