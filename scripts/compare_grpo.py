"""essa vs TRL GRPO (LoRA) on one task, same machine, same wall-clock budget, side by side.

essa runs the recipe (`essa align`); its training seconds (generation + scoring + update, without
held-out evaluations and model loading) set the budget. GRPO then trains with each learning rate
of a small sweep for the same training seconds (scripts/grpo_baseline.py: same model and
quantization, prompts, reward and held-out evaluation). Reported: held-out reward against training
seconds for every run (plot), final held-out reward, peak RSS, and the seconds each method needs to
reach the better method's final held-out reward. Each run is its own process; finished runs are
reused when the command is repeated with the same --out.

    python scripts/compare_grpo.py [--recipe recipes/quickstart.toml] [--learning-rates 1e-5,1e-4,1e-3,1e-2,3e-2]
        [--grpo-eval-every 2] [--set KEY=VALUE ...] [--quick] [--out runs/compare-grpo] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["strategy.population=4", "data.prompts_per_iteration=2", "generation.max_new_tokens=8",
         "data.heldout_size=4", "run.iterations=2", "run.eval_every=1"]


def essa_curve(run_dir: Path) -> dict:
    """Held-out reward against cumulative training seconds, from essa's metrics.jsonl and summary.json."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds, points = 0.0, []
    for row in rows:
        seconds += row.get("seconds_generate", 0.0) + row.get("seconds_score", 0.0) + row.get("seconds_update", 0.0)
        if row.get("heldout_reward") is not None:
            points.append({"step": row["iteration"], "seconds": seconds, "heldout_reward": row["heldout_reward"]})
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"curve": points, "peak_rss_mb": summary["peak_memory_mb"], "train_seconds": seconds}


def run_essa(recipe: Path, overrides: list[str], out: Path) -> dict:
    result = out / "result.json"
    if not result.exists():
        cmd = [sys.executable, "-m", "essa", "align", str(recipe), "--out", str(out),
               *[arg for o in overrides for arg in ("--set", o)]]
        if (out / "checkpoints").exists():
            cmd.append("--resume")  # an interrupted comparison continues its essa run
        subprocess.run(cmd, check=True, cwd=ROOT)
        result.write_text(json.dumps(essa_curve(out), indent=1))
    return json.loads(result.read_text())


def run_grpo(recipe: Path, overrides: list[str], lr: float, budget_s: float, every: int, out: Path) -> dict:
    result = out / "result.json"
    if not result.exists():
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--worker-grpo", str(out), "--recipe", str(recipe), "--lr", repr(lr),
               "--budget-s", repr(budget_s), "--grpo-eval-every", str(every),
               *[arg for o in overrides for arg in ("--set", o)]]
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(result.read_text())


def grpo_worker(recipe_path: Path, overrides: list[str], lr: float, budget_s: float, every: int, out: Path) -> None:
    from grpo_baseline import Curve, grpo_trainer

    from essa.recipe import load

    recipe = load(recipe_path, overrides)
    curve = Curve(evaluate=lambda: 0.0, every=every, budget_s=budget_s)
    # max_steps is a ceiling only: the callback stops training when the budget is spent.
    trainer, evaluate = grpo_trainer(recipe, lr, steps=10_000, output_dir=str(out / "trainer"), callbacks=[curve])
    curve.evaluate = evaluate
    trainer.train()
    result = {"curve": curve.points, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "train_seconds": curve.points[-1]["seconds"], "learning_rate": lr}
    (out / "result.json").write_text(json.dumps(result, indent=1))


def seconds_to_reach(curve: list[dict], target: float) -> float | None:
    return next((p["seconds"] for p in curve if p["heldout_reward"] >= target - 1e-12), None)


def summarize(essa: dict, grpo: dict[str, dict]) -> dict:
    best_lr = max(grpo, key=lambda lr: grpo[lr]["curve"][-1]["heldout_reward"])
    finals = {"essa": essa["curve"][-1]["heldout_reward"], "grpo": grpo[best_lr]["curve"][-1]["heldout_reward"]}
    target = max(finals.values())
    reach = {"essa": seconds_to_reach(essa["curve"], target), "grpo": seconds_to_reach(grpo[best_lr]["curve"], target)}
    # The time target: how long essa takes to reach GRPO's final, against GRPO's own time to it.
    to_grpo_final = {"essa": seconds_to_reach(essa["curve"], finals["grpo"]),
                     "grpo": seconds_to_reach(grpo[best_lr]["curve"], finals["grpo"])}
    time_ratio = (to_grpo_final["essa"] / to_grpo_final["grpo"]
                  if to_grpo_final["essa"] is not None and to_grpo_final["grpo"] else None)
    peaks = {"essa": essa["peak_rss_mb"], "grpo": grpo[best_lr]["peak_rss_mb"]}
    return {"grpo_best_learning_rate": float(best_lr), "initial_heldout_reward": essa["curve"][0]["heldout_reward"],
            "final_heldout_reward": finals, "target": target, "seconds_to_target": reach,
            "seconds_to_grpo_final": to_grpo_final, "essa_over_grpo_seconds_to_grpo_final": time_ratio,
            "peak_rss_mb": peaks, "grpo_over_essa_peak_rss": peaks["grpo"] / peaks["essa"],
            "budget_s": essa["train_seconds"]}


def plot(essa: dict, grpo: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*[(p["seconds"], p["heldout_reward"]) for p in essa["curve"]]), "o-", lw=2, label="essa")
    for lr, run in grpo.items():
        ax.plot(*zip(*[(p["seconds"], p["heldout_reward"]) for p in run["curve"]]), "s--", label=f"TRL GRPO lr {lr}")
    ax.set_xlabel("training seconds (held-out evaluation excluded)")
    ax.set_ylabel("held-out reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, for both methods")
    parser.add_argument("--learning-rates", default="1e-5,1e-4,1e-3,1e-2,3e-2", help="GRPO learning-rate sweep")
    parser.add_argument("--grpo-eval-every", type=int, default=2, help="GRPO steps between held-out evaluations")
    parser.add_argument("--quick", action="store_true", help=f"one learning rate (the first) and {' '.join(QUICK)}")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare-grpo")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker-grpo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    recipe = args.recipe.resolve()
    if args.worker_grpo:
        grpo_worker(recipe, args.overrides, args.lr, args.budget_s, args.grpo_eval_every, args.worker_grpo)
        return {}
    overrides = (QUICK if args.quick else []) + args.overrides
    rates = args.learning_rates.split(",")[:1] if args.quick else args.learning_rates.split(",")
    out = args.out.resolve()
    essa = run_essa(recipe, overrides, out / "essa")
    grpo = {lr: run_grpo(recipe, overrides, float(lr), essa["train_seconds"], args.grpo_eval_every,
                         out / f"grpo-lr{lr}") for lr in rates}
    summary = summarize(essa, grpo)
    plot(essa, grpo, out / "essa_vs_grpo.png")
    print(f"recipe {args.recipe.name} {' '.join(overrides)}; budget {summary['budget_s']:.0f} training seconds")
    print(f"{'run':<18}{'steps':>6}{'held-out first':>16}{'final':>8}{'best':>8}{'peak RSS MiB':>14}")
    for name, run in [("essa", essa)] + [(f"grpo lr {lr}", r) for lr, r in grpo.items()]:
        rewards = [p["heldout_reward"] for p in run["curve"]]
        print(f"{name:<18}{run['curve'][-1]['step']:>6}{rewards[0]:>16.4f}{rewards[-1]:>8.4f}{max(rewards):>8.4f}"
              f"{run['peak_rss_mb']:>14.0f}")
    reach = summary["seconds_to_target"]
    print(f"target (the better final) {summary['target']:.4f}: essa reaches it at "
          f"{_seconds(reach['essa'])}, GRPO (lr {summary['grpo_best_learning_rate']:g})"
          f" at {_seconds(reach['grpo'])}; GRPO/essa peak RSS {summary['grpo_over_essa_peak_rss']:.2f}")
    to_grpo = summary["seconds_to_grpo_final"]
    ratio = summary["essa_over_grpo_seconds_to_grpo_final"]
    ratio_text = f" (essa/GRPO {ratio:.2f})" if ratio is not None else ""
    print(f"GRPO's final {summary['final_heldout_reward']['grpo']:.4f}: essa reaches it at "
          f"{_seconds(to_grpo['essa'])}, GRPO at {_seconds(to_grpo['grpo'])}{ratio_text}")
    report = {"recipe": str(args.recipe), "overrides": overrides, "essa": essa, "grpo": grpo, "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def _seconds(value: float | None) -> str:
    return "never (within the budget)" if value is None else f"{value:.0f} s"


if __name__ == "__main__":
    main()
