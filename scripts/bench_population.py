"""Population evaluation vs plain batched inference, side by side in one run.

For each engine and precision: generated tokens/s of P candidates × B prompts in one call (each
candidate its own adapter) against the base model generating the same P × B sequences with no
adapter, same prompts, same number of new tokens (fixed length: EOS ignored), same dtype and
quantization. Both are warmed up, then measured alternately `--repeats` times; the best of each
is reported. For the HF engine on a CPU also the share of a population call spent in the
per-row low-rank terms (timed in one more call); for the vLLM engine the seconds spent writing
and loading the P adapters.

    python scripts/bench_population.py [--engines hf,vllm] [--precisions fp32,bf16,int8,nf4]
        [--model smollm2-135m-instruct | --random qwen2.5-1.5b] [--quick] [--json out.json] [--plot out.png]

`--random SHAPE` builds a random-weight model shaped like a published one (scripts/random_models.py;
no download): the matmuls cost what the real model's cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
from random_models import SHAPES, build_random_model

from essa.data import load_splits, render
from essa.engines import HFEngine
from essa.engines.hf import _RowLoRA
from essa.errors import EssaError
from essa.models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from essa.recipe import DataSection, ModelSection
from essa.svd import SVDSpace, build_space

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# precision -> (model.quantization, model.dtype); quantized layers compute in the device's default dtype.
PRECISIONS = {"fp32": ("none", "float32"), "bf16": ("none", "bfloat16"), "int8": ("int8", "auto"),
              "nf4": ("nf4", "auto")}


def candidates(dim: int, population: int) -> torch.Tensor:
    return torch.randn(population, dim, generator=torch.Generator().manual_seed(0)) * 0.5


def best_of(repeats: int, measures: dict[str, Callable[[], tuple[int, float]]]) -> dict[str, float]:
    """Alternate the measurements `repeats` times (so drift hits both alike); best tokens/s of each."""
    best = dict.fromkeys(measures, 0.0)
    for _ in range(repeats):
        for name, measure in measures.items():
            tokens, seconds = measure()
            best[name] = max(best[name], tokens / seconds)
    return best


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_hf(cfg: ModelSection, prompts_raw: list[str], population: int, tokens: int, rank: int,
             repeats: int) -> dict:
    model, tokenizer = load_model(cfg)
    prompts = render(tokenizer, prompts_raw, DataSection())
    space = build_space(model, rank, 0, TARGETS, "", 1.0)
    rows = [p for _ in range(population) for p in prompts]
    batch = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)

    @torch.no_grad()
    def base(new_tokens: int = tokens) -> tuple[int, float]:
        sync()
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        sync()
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(rows), time.perf_counter() - start

    def population_call(new_tokens: int = tokens) -> tuple[int, float]:
        # The engine's hooks are attached only for this call: the base measurement runs without them.
        engine = HFEngine(model, tokenizer, space, new_tokens, batch_rows=len(rows), ignore_eos=True)
        gen = engine.generate(candidates(space.dim, population), prompts)
        engine.close()
        return gen.tokens, gen.seconds

    base(2), population_call(2)  # warm-up: first-call allocations and kernel selection
    best = best_of(repeats, {"base": base, "population": population_call})
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"base_tokens_per_s": best["base"], "population_tokens_per_s": best["population"],
            "search_dim": space.dim, "peak_gpu_mb": peak, "term_share": term_share(population_call)}


def term_share(population_call: Callable[[], tuple[int, float]]) -> float | None:
    """Share of one extra population call spent in the per-row low-rank terms, the population's
    only extra work: the terms alone allow a ratio of about 1 - share, so a lower ratio is noise
    or a cost outside them. CPU only, where every op has completed when the hook returns."""
    if torch.cuda.is_available():
        return None
    spent = 0.0
    term = _RowLoRA.__call__

    def timed(self: _RowLoRA, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        nonlocal spent
        start = time.perf_counter()
        result = term(self, module, args, output)
        spent += time.perf_counter() - start
        return result

    _RowLoRA.__call__ = timed
    try:
        _, seconds = population_call()
    finally:
        _RowLoRA.__call__ = term
    return spent / seconds


def vllm_space(source: str, rank: int) -> SVDSpace:
    # The adapters' frozen directions come from the base weights, read once on the CPU.
    return build_space(load_model(ModelSection(name_or_path=source, device="cpu"))[0], rank, 0, TARGETS, "", 1.0)


def bench_vllm(cfg: ModelSection, prompts_raw: list[str], population: int, tokens: int, rank: int,
               repeats: int) -> dict:
    from vllm import SamplingParams

    from essa.engines.vllm import VLLMEngine, check_supported, memory_args

    device = resolve_device(cfg.device)
    check_supported(cfg.quantization, device)
    source = resolve_source(cfg.name_or_path)
    space = vllm_space(source, rank)
    prompts = render(load_tokenizer(source), prompts_raw, DataSection())
    engine = VLLMEngine(source, space, tokens, resolve_dtype(cfg.dtype, device), cfg.quantization, population,
                        memory_args(0, 0.85, device), 2048, seed=0, ignore_eos=True)
    rows = [p for _ in range(population) for p in prompts]
    fixed = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.llm.generate(rows[:2], fixed, use_tqdm=False)  # warm-up (first-call compilation)
    phases: dict[str, float] = {}

    def base() -> tuple[int, float]:
        start = time.perf_counter()
        out = engine.llm.generate(rows, fixed, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in out), time.perf_counter() - start

    def population_call() -> tuple[int, float]:
        gen = engine.generate(candidates(space.dim, population), prompts)
        phases.update(gen.phases)
        return gen.tokens, gen.seconds

    population_call()  # warm-up of the LoRA path
    best = best_of(repeats, {"base": base, "population": population_call})
    engine.close()
    return {"base_tokens_per_s": best["base"], "population_tokens_per_s": best["population"],
            "search_dim": space.dim, **{f"{k}_per_iteration": v for k, v in phases.items()}}


def run(args: argparse.Namespace, model: str) -> list[dict]:
    _, heldout = load_splits(DataSection(heldout_size=args.prompts), 0)
    results = []
    for engine in args.engines.split(","):
        for precision in args.precisions.split(","):
            quantization, dtype = PRECISIONS[precision]
            cfg = ModelSection(name_or_path=model, quantization=quantization, dtype=dtype, device=args.device)
            bench = {"hf": bench_hf, "vllm": bench_vllm}[engine]
            print(f"measuring {engine} {precision} ...", flush=True)
            try:
                row = bench(cfg, heldout.prompts(), args.population, args.tokens, args.rank, args.repeats)
            except EssaError as err:  # e.g. vLLM with bitsandbytes on a CPU: say so and measure the rest
                print(f"skipped {engine} {precision}: {err}")
                continue
            row = {"engine": engine, "precision": precision, "population": args.population,
                   "prompts": args.prompts, "tokens": args.tokens, **row}
            row["ratio"] = row["population_tokens_per_s"] / row["base_tokens_per_s"]
            results.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return results


def cell(row: dict, key: str, width: int) -> str:
    return f"{row[key]:>{width}.3f}" if row.get(key) is not None else f"{'-':>{width}}"


def print_table(results: list[dict], header: str) -> None:
    print(header)
    print(f"{'engine':<8}{'precision':<11}{'base tok/s':>12}{'population tok/s':>18}{'ratio':>8}{'term share':>12}"
          f"{'adapter write s':>17}{'adapter load s':>16}")
    for r in results:
        print(f"{r['engine']:<8}{r['precision']:<11}{r['base_tokens_per_s']:>12.1f}"
              f"{r['population_tokens_per_s']:>18.1f}{r['ratio']:>8.3f}{cell(r, 'term_share', 12)}"
              f"{cell(r, 'seconds_adapter_write_per_iteration', 17)}"
              f"{cell(r, 'seconds_adapter_load_per_iteration', 16)}")


def plot(results: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['engine']} {r['precision']}" for r in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(1.6 * len(results) + 2, 4))
    ax.bar([i - 0.2 for i in x], [r["base_tokens_per_s"] for r in results], 0.4, label="plain batched inference")
    bars = ax.bar([i + 0.2 for i in x], [r["population_tokens_per_s"] for r in results], 0.4,
                  label="population (P adapters)")
    ax.bar_label(bars, [f"{r['ratio']:.2f}×" for r in results])
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("generated tokens/s")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="hf", help="comma-separated: hf, vllm")
    parser.add_argument("--precisions", default="fp32,bf16,int8,nf4", help=f"comma-separated: {', '.join(PRECISIONS)}")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name_or_path")
    parser.add_argument("--random", choices=sorted(SHAPES), help="a random-weight model of this shape instead")
    parser.add_argument("--device", default="auto", help="model.device")
    parser.add_argument("--population", type=int, default=8, help="candidates P")
    parser.add_argument("--prompts", type=int, default=8, help="prompts B per candidate")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per sequence (EOS ignored)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements of each; best is kept")
    parser.add_argument("--quick", action="store_true", help="P=4, B=2, 8 tokens, 1 repeat: a check that it runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also draw the results here (PNG)")
    args = parser.parse_args(argv)
    if args.quick:
        args.population, args.prompts, args.tokens, args.repeats = 4, 2, 8, 1
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_random_model(args.random, Path(tmp) / "model")) if args.random else args.model
        results = run(args, model)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    name = f"random {args.random}" if args.random else args.model
    title = (f"{name}, {device}, P={args.population} candidates × B={args.prompts} prompts × "
             f"{args.tokens} tokens, LoRA rank {args.rank} on {'/'.join(TARGETS)}")
    print_table(results, title)
    if args.plot:
        plot(results, title, args.plot)
    report = {"model": name, "device": device, "machine": platform.machine(), "torch": torch.__version__,
              "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
