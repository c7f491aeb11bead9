"""4-bit layers on a CPU: wide batches through a dequantized weight and oneDNN's bf16 matmul.

On CPUs with AVX512-BF16, bitsandbytes repacks each 4-bit weight at its first inference forward
for a fused kernel (`gemv_4bit`) that reads the packed weight for every row tile. That is the
fastest at a few rows, and it was 48% of an IFEval-shape population call (docs/benchmarks.md).
At many rows the matmul is compute-bound, and dequantizing the layer's weight to bf16 once per
forward pass, then one bf16 GEMM, is faster: it is what bitsandbytes itself does on CUDA for
batches (`dequantize_4bit` + matmul), and the dequantization's cost is shared by all rows.
Measured on 2 cores of an AMD EPYC, bf16, SmolLM2-135M's shapes (docs/benchmarks.md).

So each 4-bit layer keeps bitsandbytes' kernel for narrow inputs (a decode's last few rows) and
sends inputs of at least `min_rows` token rows (prefill, a population's decode steps) through
the dequantized weight. That needs the weight in bitsandbytes' portable layout beside the
repacked one: half a byte per weight more, a quarter of a bf16 copy. bitsandbytes has no switch
between its two CPU paths per call, hence this wrapper. It replaces no module and no weight: it sets
each layer's `forward` to choose between bitsandbytes' own functions for the engine's lifetime,
and `restore` removes it.
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import Tensor, nn
from torch.nn import functional as F

MIN_ROWS = 64  # measured break-even of the two paths (docs/benchmarks.md)

# Each layer's weight in the portable layout, kept from the first wrap on: bitsandbytes repacks
# `module.weight` in place at its first inference forward, and a later engine on the same model
# (a held-out evaluation after the search, a benchmark's repeats) should not have to unpack it.
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
        if getattr(state, "packing_format_for_cpu", False):  # already repacked before any engine wrapped it
            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        _PORTABLE[module] = (data, state)
    return _PORTABLE[module]


class _WideForward:
    """One layer's forward: the dequantized weight for wide inputs, bitsandbytes' own forward otherwise."""

    def __init__(self, module: nn.Module, min_rows: int) -> None:
        from bitsandbytes.functional import dequantize_4bit

        self.dequantize = dequantize_4bit
        self.narrow = module.forward
        self.weight, self.state = portable(module)
        self.bias, self.min_rows = module.bias, min_rows

    def __call__(self, x: Tensor) -> Tensor:
        if x.numel() < self.min_rows * x.shape[-1]:
            return self.narrow(x)
        weight = self.dequantize(self.weight, self.state).to(torch.bfloat16)
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)


class WideBatches4bit:
    """Route wide inputs of a model's bf16-compute 4-bit CPU layers through dequantized weights."""

    def __init__(self, model: nn.Module, min_rows: int) -> None:
        self.modules = [m for m in model.modules() if wraps(m)]
        for module in self.modules:
            module.forward = _WideForward(module, min_rows)

    def restore(self) -> None:
        for module in self.modules:
            del module.forward  # the class's forward again
        self.modules = []
