"""Peak memory of an essa iteration, of plain inference, and of a TRL GRPO step, side by side in one run.

Each is measured in its own fresh process (peak RSS is per process), on the same recipe: the same
model and quantization, the same prompts per step and completions per prompt (essa: population ×
prompts per iteration; GRPO: num_generations × prompts; inference: that many sequences in one
batched greedy `generate` of the base model). Reported: the process's peak RSS, its RSS once the
libraries are imported (before the model loads), their difference (what the work itself costs),
and on a GPU `torch.cuda.max_memory_allocated`.

    python scripts/bench_memory.py [--recipe recipes/quickstart.toml] [--set KEY=VALUE ...] [--quick] [--json out.json]
        [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ("inference", "essa", "grpo")
QUICK = ["strategy.population=4", "data.prompts_per_iteration=2", "generation.max_new_tokens=8",
         "data.heldout_size=4"]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_inference(recipe_path: Path, overrides: list[str]) -> None:
    import torch

    from essa.data import load_splits, minibatch, render
    from essa.models import load_model
    from essa.recipe import load

    recipe = load(recipe_path, overrides)
    report("imported")
    model, tokenizer = load_model(recipe.model)
    train, _ = load_splits(recipe.data, recipe.run.seed)
    batch = train.subset(minibatch(len(train), recipe.data.prompts_per_iteration, recipe.run.seed, 0))
    rows = render(tokenizer, batch.prompts(), recipe.data) * recipe.strategy.population
    inputs = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=recipe.generation.max_new_tokens, do_sample=False,
                       temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)


def run_essa(recipe_path: Path, overrides: list[str]) -> None:
    import essa.align  # noqa: F401  (the cli imports it lazily: the baseline must include it)
    from essa.cli import main

    report("imported")
    with tempfile.TemporaryDirectory() as out:
        code = main(["align", str(recipe_path), "--out", out, "--set", "run.iterations=1",
                     *[arg for o in overrides for arg in ("--set", o)]])
    if code:
        raise SystemExit(code)


def run_grpo(recipe_path: Path, overrides: list[str]) -> None:
    from grpo_baseline import grpo_trainer

    from essa.recipe import load

    recipe = load(recipe_path, overrides)
    report("imported")
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = grpo_trainer(recipe, learning_rate=1e-5, steps=1, output_dir=out)
        trainer.train()


def report(phase: str) -> None:
    """Worker → parent, one JSON line per phase on stdout."""
    row = {"phase": phase, "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()}
    try:
        import torch

        if torch.cuda.is_available():
            row["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    print("BENCH " + json.dumps(row), flush=True)


def measure(worker: str, recipe: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--recipe", str(recipe),
           *[arg for o in overrides for arg in ("--set", o)]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"error: the {worker} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rows = {r["phase"]: r for r in (json.loads(line[6:]) for line in done.stdout.splitlines()
                                    if line.startswith("BENCH "))}
    peak = rows["done"]["peak_rss_mb"]
    return {"worker": worker, "peak_rss_mb": peak, "imported_rss_mb": rows["imported"]["rss_mb"],
            "work_rss_mb": peak - rows["imported"]["rss_mb"], "gpu_peak_mb": rows["done"].get("gpu_peak_mb")}


def plot(results: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = all(r["gpu_peak_mb"] for r in results.values())
    key, label = ("gpu_peak_mb", "peak GPU memory (MiB)") if gpu else ("peak_rss_mb", "peak RSS (MiB)")
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(results)
    bars = ax.bar(names, [results[n][key] for n in names], color=["tab:gray", "tab:blue", "tab:orange"])
    if not gpu:
        ax.bar(names, [results[n]["imported_rss_mb"] for n in names], color="white", alpha=0.5, hatch="//",
               label="of which: libraries imported")
        ax.legend()
    ax.bar_label(bars, [f"{results[n][key]:.0f}" for n in names])
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as for essa align")
    parser.add_argument("--quick", action="store_true", help=f"also set {' '.join(QUICK)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also draw the results here (PNG)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = (QUICK if args.quick else []) + args.overrides
    if args.worker:
        {"inference": run_inference, "essa": run_essa, "grpo": run_grpo}[args.worker](args.recipe.resolve(),
                                                                                      overrides)
        report("done")
        return {}
    results = {w: measure(w, args.recipe.resolve(), overrides) for w in WORKERS}
    base = results["inference"]
    ratios = {f"{w}_over_inference_{k}": results[w][k] / base[k] for w in ("essa", "grpo")
              for k in ("peak_rss_mb", "work_rss_mb")}
    ratios |= {f"grpo_over_essa_{k}": results["grpo"][k] / results["essa"][k] for k in ("peak_rss_mb", "work_rss_mb")}
    if base["gpu_peak_mb"]:
        ratios |= {"essa_over_inference_gpu": results["essa"]["gpu_peak_mb"] / base["gpu_peak_mb"],
                   "grpo_over_essa_gpu": results["grpo"]["gpu_peak_mb"] / results["essa"]["gpu_peak_mb"]}
    title = f"recipe {args.recipe.name} {' '.join(overrides)}".strip()
    print(title)
    print(f"{'':<11}{'peak RSS MiB':>14}{'after imports':>15}{'work MiB':>10}{'GPU peak MiB':>14}")
    for w, r in results.items():
        gpu = f"{r['gpu_peak_mb']:>14.0f}" if r["gpu_peak_mb"] else f"{'-':>14}"
        print(f"{w:<11}{r['peak_rss_mb']:>14.0f}{r['imported_rss_mb']:>15.0f}{r['work_rss_mb']:>10.0f}{gpu}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    if args.plot:
        plot(results, title, args.plot)
    report_ = {"recipe": str(args.recipe), "overrides": overrides, "results": results, "ratios": ratios}
    if args.json:
        args.json.write_text(json.dumps(report_, indent=1))
    return report_


if __name__ == "__main__":
    main()
