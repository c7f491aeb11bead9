"""Population evaluation vs plain batched inference, side by side in one run.

For each engine: generated tokens/s of P candidates × B prompts in one call (each candidate its
own adapter) against the base model generating the same P × B sequences with no adapter,
same prompts, same number of new tokens (fixed length: EOS ignored), same dtype. For the vLLM
engine also the seconds spent writing and loading the P adapters per iteration.

    python scripts/bench_population.py --engines hf,vllm [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from essa.data import load_splits, render
from essa.engines import HFEngine
from essa.models import load_model, resolve_device, resolve_dtype, resolve_source
from essa.recipe import DataSection, ModelSection
from essa.svd import build_space

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def candidates(dim: int, population: int) -> torch.Tensor:
    return torch.randn(population, dim, generator=torch.Generator().manual_seed(0)) * 0.5


def bench_hf(cfg: ModelSection, prompts_raw: list[str], population: int, tokens: int, rank: int) -> dict:
    model, tokenizer = load_model(cfg)
    prompts = render(tokenizer, prompts_raw, DataSection())
    space = build_space(model, rank, 0, TARGETS, "", 1.0)
    rows = [p for _ in range(population) for p in prompts]
    batch = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        base_seconds = time.perf_counter() - start
    base_tokens = (out.shape[1] - batch["input_ids"].shape[1]) * len(rows)
    engine = HFEngine(model, tokenizer, space, tokens, batch_rows=len(rows), ignore_eos=True)
    gen = engine.generate(candidates(space.dim, population), prompts)
    engine.close()
    return {"base_tokens_per_s": base_tokens / base_seconds, "population_tokens_per_s": gen.tokens / gen.seconds}


def bench_vllm(cfg: ModelSection, prompts_raw: list[str], population: int, tokens: int, rank: int) -> dict:
    from vllm import SamplingParams

    from essa.engines.vllm import VLLMEngine, check_supported, memory_args
    from essa.models import load_tokenizer

    device = resolve_device(cfg.device)
    check_supported(cfg.quantization, device)
    source = resolve_source(cfg.name_or_path)
    space = build_space(load_model(ModelSection(name_or_path=cfg.name_or_path, device="cpu"))[0], rank, 0,
                        TARGETS, "", 1.0)
    prompts = render(load_tokenizer(source), prompts_raw, DataSection())
    engine = VLLMEngine(source, space, tokens, resolve_dtype(cfg.dtype, device), cfg.quantization, population,
                        memory_args(0, 0.85, device), 2048, seed=0, ignore_eos=True)
    rows = [p for _ in range(population) for p in prompts]
    fixed = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.llm.generate(rows[:2], fixed, use_tqdm=False)  # warm-up (first-call compilation)
    start = time.perf_counter()
    out = engine.llm.generate(rows, fixed, use_tqdm=False)
    base_seconds = time.perf_counter() - start
    base_tokens = sum(len(o.outputs[0].token_ids) for o in out)
    gen = engine.generate(candidates(space.dim, population), prompts)
    engine.close()
    return {"base_tokens_per_s": base_tokens / base_seconds, "population_tokens_per_s": gen.tokens / gen.seconds,
            **{f"{k}_per_iteration": v for k, v in gen.phases.items()}}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="hf", help="comma-separated: hf, vllm")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name_or_path")
    parser.add_argument("--quantization", default="none", help="model.quantization (hf: none/int8/nf4/fp4)")
    parser.add_argument("--dtype", default="auto", help="model.dtype")
    parser.add_argument("--population", type=int, default=8, help="candidates P")
    parser.add_argument("--prompts", type=int, default=8, help="prompts B per candidate")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per sequence (EOS ignored)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--quick", action="store_true", help="P=4, B=2, 8 tokens: a check that it runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.population, args.prompts, args.tokens = 4, 2, 8
    cfg = ModelSection(name_or_path=args.model, quantization=args.quantization, dtype=args.dtype)
    _, heldout = load_splits(DataSection(heldout_size=args.prompts), 0)
    results = []
    for engine in args.engines.split(","):
        bench = {"hf": bench_hf, "vllm": bench_vllm}[engine]
        row = bench(cfg, heldout.prompts(), args.population, args.tokens, args.rank)
        row = {"engine": engine, "quantization": args.quantization, "dtype": args.dtype,
               "population": args.population, "prompts": args.prompts, "tokens": args.tokens, **row}
        row["ratio"] = row["population_tokens_per_s"] / row["base_tokens_per_s"]
        results.append(row)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{args.model}, {device}, P={args.population} candidates × B={args.prompts} prompts × {args.tokens} tokens")
    print(f"{'engine':<8}{'quant':<7}{'base tok/s':>12}{'population tok/s':>18}{'ratio':>8}"
          f"{'adapter write s':>17}{'adapter load s':>16}")
    for r in results:
        print(f"{r['engine']:<8}{r['quantization']:<7}{r['base_tokens_per_s']:>12.1f}"
              f"{r['population_tokens_per_s']:>18.1f}{r['ratio']:>8.3f}"
              f"{r.get('seconds_adapter_write_per_iteration', float('nan')):>17.3f}"
              f"{r.get('seconds_adapter_load_per_iteration', float('nan')):>16.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    cli()
