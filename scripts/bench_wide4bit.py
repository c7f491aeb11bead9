"""Where a 4-bit layer's dequantized weight beats bitsandbytes' CPU kernel: the break-even row count.

For each distinct 4-bit linear layer shape of the model (NF4, bf16 compute, as the engine loads
it), a [rows, 1, in] input is multiplied alternately by bitsandbytes' repacked kernel and by
essa/engines/wide4bit.py's path (dequantize the weight, one bf16 matmul), at each row count; the
best of `--repeats` is kept. Their ratio per row count, summed over the model's layers, is what
sets `MIN_ROWS` there. Needs a CPU with AVX512-BF16 (where bitsandbytes repacks).

    python scripts/bench_wide4bit.py [--rows 1,8,16,32,48,64,96,128,256] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from machine import cpu_model, script_report

from essa.engines.wide4bit import WideBatches4bit, wraps
from essa.errors import EssaError
from essa.models import load_model
from essa.recipe import ModelSection


def seconds(layer: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    layer(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
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
    WideBatches4bit(model, min_rows=1).restore()  # as an engine does, before bitsandbytes repacks any weight
    results = []
    for n in rows:
        kernel = dequantized = 0.0
        for (n_in, _), modules in shapes.items():
            x = torch.randn(n, 1, n_in, dtype=torch.bfloat16)
            layer = modules[0]
            kernel += seconds(layer, x, repeats) * len(modules)
            wide = WideBatches4bit(model, min_rows=1)
            dequantized += seconds(layer, x, repeats) * len(modules)
            wide.restore()
        results.append({"rows": n, "kernel_ms": kernel * 1e3, "dequantized_ms": dequantized * 1e3,
                        "kernel_over_dequantized": kernel / dequantized})
        print(f"{n:>5} rows  kernel {kernel * 1e3:8.2f} ms  dequantized {dequantized * 1e3:8.2f} ms  "
              f"ratio {kernel / dequantized:.2f}", flush=True)
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
    report = script_report("bench_wide4bit.py", argv, model=args.model, device=device) | {"results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
