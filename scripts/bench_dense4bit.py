"""A model's 4-bit layers on a CPU: bitsandbytes' kernel against the engine's dense bf16 copies.

For each distinct 4-bit linear layer shape of the model (NF4, bf16 compute, as the engine loads
it), a [rows, 1, in] input is multiplied by bitsandbytes' repacked kernel, by the dequantized
weight as torch holds it (dequantized once, one bf16 `F.linear`) and by essa/engines/dense4bit.py's
copy in oneDNN's blocked layout, at each row count; the best of `--repeats` is kept and the times
are summed over the model's layers. Needs a CPU with AVX512-BF16 (where bitsandbytes repacks).

    python scripts/bench_dense4bit.py [--rows 1,8,16,32,48,64,96,128,256] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import cpu_model, script_report
from torch.nn import functional as F

from essa.engines.dense4bit import Dense4bit, dequantized, wraps
from essa.errors import EssaError
from essa.models import load_model
from essa.recipe import ModelSection


def seconds(multiply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, repeats: int) -> float:
    multiply(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        multiply(x)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def run(model_name: str, rows: list[int], repeats: int) -> list[dict]:
    model, _ = load_model(ModelSection(name_or_path=model_name, quantization="nf4", dtype="bfloat16", device="cpu"))
    shapes: dict[tuple[int, int], list[torch.nn.Module]] = {}
    for module in model.modules():
        if wraps(module):
            shapes.setdefault((module.in_features, module.out_features), []).append(module)
    if not shapes:
        raise EssaError("no 4-bit layer that bitsandbytes repacks: this CPU has no AVX512-BF16")
    plain = {shape: dequantized(modules[0]) for shape, modules in shapes.items()}
    dense = Dense4bit(model)  # each layer's forward; the class's forward is bitsandbytes' kernel
    results = []
    for n in rows:
        times = dict.fromkeys(("kernel", "plain", "dense"), 0.0)
        for shape, modules in shapes.items():
            x, layer, weight = torch.randn(n, 1, shape[0], dtype=torch.bfloat16), modules[0], plain[shape]
            times["kernel"] += seconds(lambda x: type(layer).forward(layer, x), x, repeats) * len(modules)
            times["plain"] += seconds(lambda x: F.linear(x, weight), x, repeats) * len(modules)
            times["dense"] += seconds(layer, x, repeats) * len(modules)
        ms = {f"{k}_ms": v * 1e3 for k, v in times.items()}
        results.append({"rows": n, **ms, "kernel_over_dense": times["kernel"] / times["dense"],
                        "plain_over_dense": times["plain"] / times["dense"]})
        print(f"{n:>5} rows  kernel {ms['kernel_ms']:8.2f} ms  plain bf16 {ms['plain_ms']:8.2f} ms  "
              f"dense {ms['dense_ms']:8.2f} ms  kernel/dense {times['kernel'] / times['dense']:.2f}", flush=True)
    dense.restore()
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name_or_path")
    parser.add_argument("--rows", default="1,8,16,32,48,64,96,128,256", help="comma-separated row counts")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each; the best is kept")
    parser.add_argument("--quick", action="store_true", help="rows 1 and 64, 2 repeats: a check that it runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = "1,64", 2
    try:
        results = run(args.model, [int(n) for n in args.rows.split(",")], args.repeats)
    except EssaError as err:
        sys.exit(f"error: {err}")
    device = f"CPU {cpu_model()} ({torch.get_num_threads()} threads)"
    report = script_report("bench_dense4bit.py", argv, model=args.model, device=device) | {"results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
