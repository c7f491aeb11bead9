"""The ESSA paper's ablations at small scale: quantization and population size.

- quantization: none / int8 / nf4 at the same budget of generated sequences (the paper: BF16 0.847,
  INT8 0.844, INT4 0.838 on PRM800K with Qwen2.5-32B: 4-bit costs little);
- population: 4 / 8 / 16 / 32 at the same generated sequences, so a larger population gets fewer
  iterations (the paper: about 8 underperforms, gains level off between 24 and 96).

Each ablation is one scripts/compare_strategies.py comparison (same seeds, resumable, its runs under
--out/NAME) and gets one table (final held-out reward, mean ± sd and min-max over seeds) and one
plot (final held-out reward per setting).

    python scripts/ablations.py [--recipe recipes/format-instructions.toml] [--only quantization,population]
        [--settings none,int8,nf4,4,8,16,32] [--seeds 0,1,2] [--budget 1024] [--set KEY=VALUE ...]
        [--out runs/ablations] [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import compare_strategies  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

ABLATIONS = {
    "quantization": {q: [f"model.quantization={q}"] for q in ("none", "int8", "nf4")},
    "population": {str(p): [f"strategy.population={p}"] for p in (4, 8, 16, 32)},
}


def table(name: str, report: dict) -> str:
    """A markdown table of the final held-out reward per setting."""
    lines = [f"| {name} | iterations | initial | final (mean ± sd) | min – max | gain |", "|---|---|---|---|---|---|"]
    for setting, s in report["summary"].items():
        finals = [r["curve"][-1]["heldout_reward"] for r in report["runs"][setting]]
        lines.append(f"| {setting} | {s['iterations']} | {s['initial_mean']:.4f} | {s['final_mean']:.4f} ± "
                     f"{s['final_sd']:.4f} | {min(finals):.4f} – {max(finals):.4f} | {s['gain_mean']:+.4f} |")
    return "\n".join(lines)


def plot(name: str, report: dict, path: Path) -> None:
    settings = list(report["summary"])
    finals = [[r["curve"][-1]["heldout_reward"] for r in report["runs"][s]] for s in settings]
    means = [report["summary"][s]["final_mean"] for s in settings]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(range(len(settings)), means, fmt="o-", capsize=4,
                yerr=[[m - min(f) for m, f in zip(means, finals)], [max(f) - m for m, f in zip(means, finals)]])
    # Each setting has its own initial adapter (e.g. float32 and NF4 base models score differently).
    ax.plot(range(len(settings)), [report["summary"][s]["initial_mean"] for s in settings], "x", color="grey",
            label="initial adapter")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_xlabel(name)
    ax.set_ylabel("final held-out reward (mean, min-max over seeds)")
    ax.set_title(f"{Path(report['recipe']).name}: {report['budget']} sequences, {len(report['seeds'])} seeds")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=compare_strategies.recipes.bundled("format-instructions"))
    parser.add_argument("--only", default=",".join(ABLATIONS), help="which ablations to run")
    parser.add_argument("--settings", default="", help="run only these settings (default: all), e.g. none,nf4,8,16")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=1024, help="generated training sequences per run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="compare_strategies' --quick (one seed, tiny runs)")
    args = parser.parse_args(argv)
    keep = set(args.settings.split(",")) if args.settings else None
    reports = {}
    for name in args.only.split(","):
        settings = {k: v for k, v in ABLATIONS[name].items() if keep is None or k in keep}
        argv = ["--recipe", str(args.recipe), "--seeds", args.seeds, "--budget", str(args.budget),
                "--out", str(args.out / name), *(["--quick"] if args.quick else []),
                *[a for o in args.overrides for a in ("--set", o)],
                *[a for setting, sets in settings.items()
                  for a in ("--variant", f"{setting}: {' '.join(sets)}")]]
        reports[name] = compare_strategies.main(argv)
        plot(name, reports[name], args.out / f"{name}.png")
        print(f"\n{table(name, reports[name])}\nplot: {args.out / f'{name}.png'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":
    main()
