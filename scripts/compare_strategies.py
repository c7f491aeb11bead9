"""Strategies (or any recipe variants) side by side on one task: held-out reward vs generated
sequences and vs seconds.

Each variant runs `essa align` on the same recipe with several seeds and the same budget of
generated sequences (candidates × prompts per iteration: ESSAM evaluates two populations per
iteration and a larger population sees as many sequences in fewer iterations, so they get fewer
iterations). Prints mean and spread across seeds, writes a JSON file and a PNG plot.

    python scripts/compare_strategies.py [--recipe recipes/format-instructions.toml] [--seeds 0,1,2] \\
        [--budget 1024] [--strategies es,cma,essam,essam-fast] [--set KEY=VALUE ...] \\
        [--variant "NAME: KEY=VALUE KEY=VALUE" ...] [--out runs/compare-strategies] [--json FILE] [--quick]

`--variant` replaces the strategies with named sets of recipe overrides (repeatable), e.g.
`--variant "both: svd.factors=both" --variant "b: svd.factors=b"`.

Runs are kept under --out; a rerun skips finished runs and resumes killed ones. With --record DIR
each finished run is also written to DIR/VARIANT/seed-N.json (its overrides, CPU model, summary and
metrics rows): commit those, and a rerun in a later session, on a fresh checkout, reuses them and
runs only what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from machine import cpu_model  # noqa: E402

from essa import recipe as recipes  # noqa: E402
from essa.cli import main as essa  # noqa: E402
from essa.run_dir import CHECKPOINTS, METRICS_FILE, SUMMARY_FILE
from essa.strategies import candidates_per_iteration  # noqa: E402

STRATEGIES = {
    "es": ["strategy.name=es"],
    "cma": ["strategy.name=cma"],
    "essam": ["strategy.name=essam"],
    "essam-fast": ["strategy.name=essam", "strategy.sharpness_population=4"],
}
QUICK = ["data.prompts_per_iteration=2", "data.heldout_size=4", "generation.max_new_tokens=8",
         "strategy.population=4"]
SECONDS = ("seconds_generate", "seconds_score", "seconds_update", "seconds_eval")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name.strip() or not overrides.split():
        raise SystemExit(f"--variant {text!r}: expected \"NAME: KEY=VALUE [KEY=VALUE ...]\"")
    return name.strip(), overrides.split()


def run_one(recipe: Path, overrides: list[str], out: Path, record: Path | None = None) -> tuple[list[dict], dict]:
    """The metrics rows and summary of one finished run: from its committed record when there is one for
    these overrides, else from `essa align` in `out` (resumed where a killed run left it), then recorded."""
    if record is not None and record.exists():
        saved = json.loads(record.read_text())
        if saved["overrides"] == overrides:
            return saved["rows"], saved["summary"]
    metrics = out / METRICS_FILE
    if not (out / SUMMARY_FILE).exists():
        resume = ["--resume"] if (out / CHECKPOINTS).exists() else []
        argv = ["align", str(recipe), "--out", str(out), *resume]
        for item in overrides:
            argv += ["--set", item]
        if essa(argv) != 0:
            raise SystemExit(f"essa align failed for {out}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    if record is not None:
        # Committed as each run finishes, so a campaign continues in a later session (runs/ is not kept).
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"overrides": overrides, "cpu": cpu_model(), "summary": summary,
                                      "rows": rows}, indent=1))
    return rows, summary



def curve(rows: list[dict]) -> list[dict]:
    """Held-out reward points with cumulative generated sequences and seconds of the loop."""
    points, sequences, seconds = [], 0, 0.0
    for row in rows:
        sequences += row.get("sequences", 0)
        seconds += sum(row.get(k, 0.0) for k in SECONDS)
        if row.get("heldout_reward") is not None:
            points.append({"iteration": row["iteration"], "sequences": sequences, "seconds": seconds,
                           "heldout_reward": row["heldout_reward"]})
    return points


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values)


def plot(results: dict, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, runs in results.items():
        curves = [r["curve"] for r in runs]
        steps = min(len(c) for c in curves)
        for ax, key in zip(axes, ("sequences", "seconds")):
            x = [statistics.mean(c[i][key] for c in curves) for i in range(steps)]
            y = [[r["curve"][i]["heldout_reward"] - r["base"] for r in runs] for i in range(steps)]
            line, = ax.plot(x, [statistics.mean(v) for v in y], marker="o", label=name)
            ax.fill_between(x, [min(v) for v in y], [max(v) for v in y], color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("generated sequences (training)")
    axes[1].set_xlabel("seconds (generate + score + update + held-out eval)")
    axes[0].set_ylabel("held-out reward gain (mean, min-max over seeds)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=recipes.bundled("format-instructions"))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--variant", dest="variants", action="append", default=[], metavar='"NAME: KEY=VALUE ..."',
                        help="a named set of recipe overrides to compare instead of --strategies (repeatable)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=1024,
                        help="generated training sequences per run: candidates x prompts per iteration (default 1024)")
    parser.add_argument("--evals", type=int, default=4, help="held-out evaluations per run besides the initial one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-strategies"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--record", type=Path, metavar="DIR",
                        help="keep each finished run as DIR/VARIANT/seed-N.json (commit it); a rerun reuses them")
    parser.add_argument("--quick", action="store_true", help="one seed, a tiny budget and tiny prompts")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides, budget = list(args.overrides), args.budget
    if args.quick:
        seeds, budget, overrides = seeds[:1], 24, QUICK + overrides
    variants = (dict(map(parse_variant, args.variants)) if args.variants
                else {name: STRATEGIES[name] for name in args.strategies.split(",")})

    started, results = time.perf_counter(), {}
    for name, variant in variants.items():
        strategy = overrides + variant
        recipe = recipes.load(args.recipe, strategy)
        per_iteration = (candidates_per_iteration(recipe.strategy) + 1) * recipe.data.prompts_per_iteration  # + center
        iterations = max(1, budget // per_iteration)
        settings = strategy + [f"run.iterations={iterations}", f"run.eval_every={max(1, iterations // args.evals)}"]
        results[name] = []
        for seed in seeds:
            record = args.record / name / f"seed-{seed}.json" if args.record else None
            rows, run = run_one(args.recipe, settings + [f"run.seed={seed}"], args.out / name / f"seed-{seed}", record)
            points = curve(rows)
            # With a warm start, the search starts from the fine-tuned adapter: gains count from the base model.
            base = run.get("warm_start", {}).get("base_heldout_reward", points[0]["heldout_reward"])
            results[name].append({"seed": seed, "iterations": iterations, "base": base, "curve": points})

    # The held-out prompts depend on the run seed, so gains are taken per seed against its own base model.
    print(f"\n{'variant':12s} {'iterations':>10s} {'base':>8s} {'initial':>8s} {'final':>8s} "
          f"{'gain (mean ± sd)':>18s} {'search (mean ± sd)':>20s} {'best gain':>9s} {'seconds':>8s}")
    summary = {}
    for name, runs in results.items():
        base = spread([r["base"] for r in runs])
        initial = spread([r["curve"][0]["heldout_reward"] for r in runs])
        final = spread([r["curve"][-1]["heldout_reward"] for r in runs])
        gain = spread([r["curve"][-1]["heldout_reward"] - r["base"] for r in runs])
        # the search's own part: from its starting adapter (after a warm start) to its final center
        search = spread([r["curve"][-1]["heldout_reward"] - r["curve"][0]["heldout_reward"] for r in runs])
        best_gain = statistics.mean(max(p["heldout_reward"] for p in r["curve"]) - r["base"] for r in runs)
        seconds = spread([r["curve"][-1]["seconds"] for r in runs])
        summary[name] = {"base_mean": base[0], "initial_mean": initial[0], "final_mean": final[0],
                         "final_sd": final[1],
                         "gain_mean": gain[0], "gain_sd": gain[1], "best_gain_mean": best_gain,
                         "search_gain_mean": search[0], "search_gain_sd": search[1],
                         "search_gains": [r["curve"][-1]["heldout_reward"] - r["curve"][0]["heldout_reward"]
                                          for r in runs],
                         "seconds_mean": seconds[0], "iterations": runs[0]["iterations"]}
        print(f"{name:12s} {runs[0]['iterations']:>10d} {base[0]:8.4f} {initial[0]:8.4f} {final[0]:8.4f} "
              f"{gain[0]:+10.4f} ± {gain[1]:.4f} {search[0]:+12.4f} ± {search[1]:.4f} {best_gain:+9.4f} "
              f"{seconds[0]:8.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "strategies.png", f"{args.recipe.name}: {len(seeds)} seeds, {budget} sequences")
    report = {"recipe": str(args.recipe), "overrides": overrides, "variants": variants, "budget": budget,
              "seeds": seeds,
              "summary": summary, "runs": results, "seconds_total": time.perf_counter() - started}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(f"plot: {args.out / 'strategies.png'}")
    return report


if __name__ == "__main__":
    main()
