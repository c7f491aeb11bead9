"""Scaling out on Ray: measured here, then modelled for GPU clusters.

Measured, side by side in one invocation (each run an `essa align` subprocess, Ray runs inside a
private network namespace with only loopback when this is root):
  - one process with all the machine's torch threads (`distributed.workers = 1`),
  - Ray with 1 worker and with 2 workers, one torch thread each,
reporting seconds per iteration (evaluation and update, held-out evaluation aside), population
throughput (generated tokens/s), the driver's overhead per iteration (the strategy update, and the
part of the evaluation not covered by the workers' own generate and score time: dispatch, transfer,
waiting on the slowest chunk) and bytes per iteration.

Modelled: iteration time of the paper's Qwen2.5-7B GSM8K and Llama-3.1-8B IFEval recipes on N GPUs
(one worker per GPU) from the recipe's rows and chunks, a roofline decode step per chunk (weights
read once per step, or the matmul FLOPs, whichever is slower; the GPU figures are arguments), the
driver's measured update time and per-chunk overhead, and the measured bytes per row over the
driver's link. See docs/distributed.md.

    python scripts/bench_scaling.py --out benchmarks/history/bench_scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_model

from essa import recipe as recipes
from essa.run_dir import METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]

# (label, --set overrides, torch threads of the driver process)
CONFIGS = [("one process, 2 threads", ["distributed.workers=1"]),
           ("Ray, 1 worker x 1 thread", ["distributed.workers=1", "distributed.address=local"]),
           ("Ray, 2 workers x 1 thread", ["distributed.workers=2"])]
# The ESSA paper's PRM800K Qwen2.5-32B time to 0.835 (minutes), from its scaling figure.
PAPER = {"essa": {16: 200, 128: 20}, "grpo": {16: 400, 128: 150}}



def isolated(args: list[str]) -> list[str]:
    """Inside a network namespace with only loopback, where we may make one (root)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return args
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in args)
    return ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {quoted}"]


def run(recipe: str, sets: list[str], out: Path, tmp: Path) -> list[dict]:
    args = [sys.executable, "-m", "essa", "align", recipe, "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(tmp)}
    subprocess.run(isolated(args), env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()][1:]


def summarize(label: str, rows: list[dict], workers: int) -> dict:
    mean = lambda key: sum(r.get(key, 0.0) for r in rows) / len(rows)  # noqa: E731
    busy = (mean("seconds_generate") + mean("seconds_score")) / workers
    return {"config": label, "workers": workers, "iterations": len(rows),
            "seconds_per_iteration": mean("seconds_evaluate") + mean("seconds_update"),
            "tokens_per_s": mean("generated_tokens") / mean("seconds_evaluate"),
            "seconds_update": mean("seconds_update"),
            "evaluation_overhead_s": mean("seconds_evaluate") - busy,
            "bytes_per_iteration": mean("bytes_sent") + mean("bytes_received"),
            "rewards": [r["reward_mean"] for r in rows]}


def decode_seconds(rows: int, tokens: int, params_b: float, gpu: dict) -> float:
    """One chunk on one GPU: `tokens` decode steps, each bound by reading the bf16 weights once
    or by the batch's matmul FLOPs (KV-cache reads and early-finishing rows ignored)."""
    memory = 2 * params_b * 1e9 / (gpu["bandwidth_tb_s"] * 1e12)
    compute = 2 * params_b * 1e9 * rows / (gpu["tflops"] * 1e12 * gpu["mfu"])
    return tokens * max(memory, compute)


def model(name: str, params_b: float, gpus: list[int], gpu: dict, update_s: float, per_chunk_s: float,
          bytes_per_row: float, bandwidth_gb_s: float) -> list[dict]:
    r = recipes.load(recipes.bundled(name))
    rows = r.strategy.population * r.data.prompts_per_iteration
    table = []
    for n in gpus:
        for policy, size in (("recipe batch_rows", r.generation.batch_rows), ("rows / N", math.ceil(rows / n))):
            chunks = math.ceil(rows / size)
            rounds = math.ceil(chunks / n)
            seconds = rounds * decode_seconds(size, r.generation.max_new_tokens, params_b, gpu) \
                + update_s + chunks * per_chunk_s + rows * bytes_per_row / (bandwidth_gb_s * 1e9)
            table.append({"recipe": name, "gpus": n, "chunking": policy, "batch_rows": size, "chunks": chunks,
                          "busy_gpus": min(n, chunks), "seconds_per_iteration": seconds})
    for row in table:
        first = next(t for t in table if t["chunking"] == row["chunking"] and t["recipe"] == name)
        row["speedup_vs_first"] = first["seconds_per_iteration"] / row["seconds_per_iteration"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(recipes.bundled("format-instructions")))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=16, help="the quickstart's 8 x 8 rows / 16: 4 chunks")
    parser.add_argument("--gpu", default='{"name": "H100 SXM", "bandwidth_tb_s": 3.35, "tflops": 989, "mfu": 0.4}',
                        help="the modelled GPU, as JSON")
    parser.add_argument("--network-gb-s", type=float, default=1.25, help="driver link (10 Gbit/s)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "history" / "bench_scaling.json")
    args = parser.parse_args()

    sets = [f"run.iterations={args.iterations}", f"run.eval_every={args.iterations}",
            f"generation.batch_rows={args.batch_rows}"]
    measured = []
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:
        for label, extra in CONFIGS:
            workers = int(extra[0].split("=")[1])
            rows = run(args.recipe, sets + extra, Path(tmp) / f"run-{len(measured)}", Path(tmp))
            measured.append(summarize(label, rows, workers))
            print(json.dumps(measured[-1]), flush=True)
    two, measured_recipe = measured[-1], recipes.load(Path(args.recipe))
    rows = measured_recipe.strategy.population * measured_recipe.data.prompts_per_iteration
    per_chunk = two["evaluation_overhead_s"] / math.ceil(rows / args.batch_rows)
    bytes_per_row = two["bytes_per_iteration"] / rows
    gpu = json.loads(args.gpu)
    modelled = [row for name, params in (("gsm8k-qwen2.5-7b", 7.6), ("ifeval-llama3.1-8b", 8.0))
                for row in model(name, params, [1, 8, 16, 128], gpu, two["seconds_update"], per_chunk, bytes_per_row,
                                 args.network_gb_s)]
    result = {"command": "python scripts/bench_scaling.py " + " ".join(sys.argv[1:]), "cpu": cpu_model(),
              "cores": os.cpu_count(), "measured": measured,
              "same_rewards_ray_1_and_2_workers": measured[1]["rewards"] == measured[2]["rewards"],
              "same_rewards_as_one_process": measured[0]["rewards"] == measured[2]["rewards"],
              "model": {"gpu": gpu, "seconds_update": two["seconds_update"], "overhead_per_chunk_s": per_chunk,
                        "bytes_per_row": bytes_per_row,
                        "network_gb_s": args.network_gb_s, "rows": modelled},
              "paper_prm800k_32b_minutes_to_0.835": PAPER}
    args.out.write_text(json.dumps(result, indent=1))
    for row in modelled:
        print(f"{row['recipe']:<20}{row['gpus']:>5} GPUs  {row['chunking']:<18}{row['chunks']:>4} chunks  "
              f"{row['seconds_per_iteration']:8.1f} s/iter  x{row['speedup_vs_first']:.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
