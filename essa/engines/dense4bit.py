"""4-bit layers on a CPU, multiplied through a bf16 copy of their dequantized weight.

On CPUs with AVX512-BF16, bitsandbytes multiplies a 4-bit weight with a fused kernel
(`gemv_4bit`) that unpacks the weight again for every tile of rows. One oneDNN bf16 matmul over
the layer's dequantized weight, reordered once into oneDNN's blocked layout, is 1.3-1.6x faster
on SmolLM2-135M's layers at every row count, from one decode row to a 256-row prefill (2 cores,
AMD EPYC, `scripts/bench_dense4bit.py`, benchmarks/history/speed.md). It is what torch's Inductor does
with frozen CPU linear weights (`mkldnn._reorder_linear_weight`, then `_linear_pointwise`), and
it computes the NF4 function more exactly than the kernel, which rounds its block scales to bf16.

The price is memory: 2 bytes per weight beside the 4-bit weight (212 MB for SmolLM2-135M) for
the engine's lifetime. `generation.dense_4bit = false` keeps bitsandbytes' kernel, for a model
that fits in memory only in 4 bits. No module or weight is replaced: each layer's `forward` is
set for the engine's lifetime, and `restore` removes it.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import Tensor, nn

# Each layer's 4-bit weight in bitsandbytes' portable layout, kept from the first wrap on (half a
# byte per weight): bitsandbytes repacks `module.weight` in place at its first inference forward
# through its own kernel, and its inverse returns the block scales rounded to bf16.
_PORTABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def wraps(module: nn.Module) -> bool:
    """A 4-bit layer on a CPU that bitsandbytes multiplies with its repacking kernel, computing in bf16."""
    return (getattr(module, "support_avx512bf16_for_cpu", False)
            and getattr(getattr(module, "weight", None), "quant_state", None) is not None
            and module.weight.device.type == "cpu" and getattr(module, "compute_dtype", None) == torch.bfloat16)


def portable(module: nn.Module) -> tuple[Tensor, object]:
    """The layer's 4-bit weight and quantization state in bitsandbytes' portable layout."""
    if module not in _PORTABLE:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = module.weight.data.clone(), copy.deepcopy(module.weight.quant_state)
        if getattr(state, "packing_format_for_cpu", False):  # repacked before any engine wrapped it
            nested = state.original_nested
            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
            if not nested:  # bitsandbytes 0.50 leaves these scales transposed, as its kernel reads them
                state.absmax = state.absmax.T.reshape(-1).float()
        _PORTABLE[module] = (data, state)
    return _PORTABLE[module]


def dequantized(module: nn.Module) -> Tensor:
    """The layer's weight dequantized to bf16."""
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(*portable(module)).to(torch.bfloat16)


class _DenseForward:
    """One layer's forward: its dequantized weight in oneDNN's layout, one bf16 matmul."""

    def __init__(self, module: nn.Module) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(dequantized(module), None)
        self.bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, self.bias, "none", [], "")
        return y.to(x.dtype)


class Dense4bit:
    """Multiply a model's bf16-compute 4-bit CPU layers through bf16 copies of their weights."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules() if wraps(m)]
        for module in self.modules:
            module.forward = _DenseForward(module)

    def restore(self) -> None:
        for module in self.modules:
            del module.forward  # the class's forward again, and the copy is freed
        self.modules = []
