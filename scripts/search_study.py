"""The search-regime study (issue 44): does evolving the singular values add to a warm start, and
against the fine-tune continued (expert iteration) at equal generated sequences?

Search variants run with scripts/compare_strategies.py (its --record folder); this script runs the
expert-iteration baseline from the same warm start (`warm_start.rounds`, one round per
`warm_start.prompts` × `samples_per_prompt` sequences, up to the same --budget) into the same
folder, then reads every record and prints, per variant, each seed's held-out reward after the
warm start and at the end, the search's (or the further rounds') own part, and a plot of the
held-out reward against the sequences generated after the warm start and against seconds.

    python scripts/search_study.py --records benchmarks/search-regime/records --budget 21760 \\
        [--expert-iteration "short-ei: warm_start.epochs=1 warm_start.repair=\\"\\"" --seeds 5] \\
        [--set data.heldout_size=256 ...] [--plot benchmarks/search-regime/curves.png] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from compare_strategies import curve, parse_variant, run_one  # noqa: E402
from machine import cpu_model, write_json  # noqa: E402

from essa import recipe as recipes  # noqa: E402

# The search after the rounds is a formality (one iteration of 2 × 1): the run's held-out evaluation
# at iteration 0 is the last round's adapter.
NO_SEARCH = ["strategy.name=es", "strategy.population=2", "data.prompts_per_iteration=1", "run.iterations=1",
             "run.eval_every=1"]


def rounds_curve(rows: list[dict], summary: dict, per_round: int) -> list[dict]:
    """Held-out points of an expert-iteration run: after round 1 (the shared warm start), each further
    round's adapter, the last measured at the search's iteration 0."""
    rounds = summary["warm_start"]["rounds"]
    rewards = [r["heldout_reward_before"] for r in rounds] + [rows[0]["heldout_reward"]]
    seconds = [0.0] + [sum(r["seconds"] for r in rounds[:n + 1]) for n in range(len(rounds))]
    return [{"sequences": n * per_round, "seconds": seconds[n], "heldout_reward": reward}
            for n, reward in enumerate(rewards)]


def run_expert_iteration(recipe: Path, name: str, variant: list[str], common: list[str], seeds: list[int],
                         budget: int, records: Path, out: Path) -> None:
    loaded = recipes.load(recipe, common + variant)
    per_round = loaded.warm_start.prompts * loaded.warm_start.samples_per_prompt
    settings = common + variant + [f"warm_start.rounds={1 + budget // per_round}"] + NO_SEARCH
    for seed in seeds:
        run_one(recipe, settings + [f"run.seed={seed}"], out / name / f"seed-{seed}",
                records / name / f"seed-{seed}.json")


def curves(records: Path, recipe: Path) -> dict[str, list[dict]]:
    """Every recorded run's curve, by variant."""
    found: dict[str, list[dict]] = {}
    for path in sorted(records.glob("*/seed-*.json")):
        record = json.loads(path.read_text())
        if "rows" not in record:  # scripts/compare_grpo.py's records (grpo/) hold curves of their own
            continue
        summary, rows = record["summary"], record["rows"]
        warm = summary.get("warm_start", {})
        if warm.get("rounds"):
            loaded = recipes.load(recipe, record["overrides"])
            points = rounds_curve(rows, summary, loaded.warm_start.prompts * loaded.warm_start.samples_per_prompt)
        else:
            points = curve(rows)  # sequences and seconds after the warm start
        seed = int(path.stem.removeprefix("seed-"))
        found.setdefault(path.parent.name, []).append({"seed": seed, "base": warm.get("base_heldout_reward"),
                                                       "cpu": record.get("cpu"), "curve": points})
    return found


def plot(found: dict[str, list[dict]], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, runs in sorted(found.items()):
        for ax, key in zip(axes, ("sequences", "seconds")):
            color = None
            for run in runs:
                line, = ax.plot([p[key] for p in run["curve"]], [p["heldout_reward"] for p in run["curve"]],
                                marker="o", markersize=3, color=color, label=None if color else name)
                color = line.get_color()
    axes[0].set_xlabel("sequences generated after the warm start")
    axes[1].set_xlabel("seconds after the warm start (generate + score + update + held-out)")
    axes[0].set_ylabel("held-out reward (one line per seed)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(found: dict[str, list[dict]]) -> dict[str, dict]:
    print(f"{'variant':22s} {'seeds':>8s} {'base':>7s} {'start':>7s} {'final':>7s} {'own part per seed':>30s} "
          f"{'mean ± sd':>16s} {'sequences':>9s}")
    summary = {}
    for name, runs in sorted(found.items()):
        own = [r["curve"][-1]["heldout_reward"] - r["curve"][0]["heldout_reward"] for r in runs]
        mean, sd = statistics.mean(own), statistics.pstdev(own)
        bases = [r["base"] for r in runs if r["base"] is not None]
        summary[name] = {"seeds": [r["seed"] for r in runs], "own_part": own, "own_part_mean": mean,
                         "own_part_sd": sd, "start": [r["curve"][0]["heldout_reward"] for r in runs],
                         "final": [r["curve"][-1]["heldout_reward"] for r in runs], "base": bases,
                         "sequences": [r["curve"][-1]["sequences"] for r in runs],
                         "cpu": sorted({r["cpu"] for r in runs if r["cpu"]})}
        print(f"{name:22s} {','.join(str(r['seed']) for r in runs):>8s} "
              f"{statistics.mean(bases) if bases else float('nan'):7.3f} "
              f"{statistics.mean(summary[name]['start']):7.3f} {statistics.mean(summary[name]['final']):7.3f} "
              f"{' '.join(f'{x:+.3f}' for x in own):>30s} {mean:+8.3f} ± {sd:.3f} "
              f"{max(summary[name]['sequences']):9d}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=recipes.bundled("quickstart"))
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--budget", type=int, default=21760, help="sequences generated after the warm start")
    parser.add_argument("--expert-iteration", dest="baselines", action="append", default=[],
                        metavar='"NAME: KEY=VALUE ..."', help="run this warm start's expert iteration first")
    parser.add_argument("--seeds", default="5")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/search-regime"))
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    for name, variant in map(parse_variant, args.baselines):
        run_expert_iteration(args.recipe, name, variant, args.overrides, seeds, args.budget, args.records, args.out)
    found = curves(args.records, args.recipe)
    summary = table(found)
    if args.plot:
        plot(found, args.plot, f"{args.recipe.name}: held-out reward after the warm start")
    report = {"recipe": str(args.recipe), "budget": args.budget, "cpu": cpu_model(), "summary": summary,
              "curves": found}
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
