"""Held-out results of two sets of `essa align` runs, seed by seed: the numerics-policy check.

A reduced-precision speed-up of the engine is kept when the quickstart's held-out reward over at
least 5 seeds is not worse with it than without it, paired by seed (benchmarks/history/speed.md, "Numerics
policy"). Each side is a directory of run directories named PREFIX-sSEED (each with its
summary.json, as `essa align --out` writes); this prints and writes per seed the base model's,
final and best held-out rewards (and the warm start's, where the run had one), the gain, wall
time and tokens/s of both sides, and the paired difference of the gains with its mean and
standard deviation.

    python scripts/paired_runs.py --runs runs/policy --a old --b new --seeds 0,1,2,3,4 \\
        --json benchmarks/history/engine_policy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from machine import cpu_model

from essa.run_dir import METRICS_FILE, SUMMARY_FILE


def side(run_dir: Path) -> dict:
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    tokens = sum(r.get("generated_tokens", 0) for r in rows)
    generate = sum(r.get("seconds_generate", 0.0) for r in rows)
    # With a warm start, the run's baseline is the fine-tuned adapter; the gain counts from the base model.
    warm = summary.get("warm_start")
    base = warm["base_heldout_reward"] if warm else summary["baseline_heldout_reward"]
    return {"base": base, "after_warm_start": summary["baseline_heldout_reward"] if warm else None,
            "final": summary["final_heldout_reward"], "best": summary["best_heldout_reward"],
            "gain": summary["final_heldout_reward"] - base, "seconds": summary["seconds_this_session"],
            "peak_memory_mb": summary.get("peak_memory_mb"), "tokens_per_s": tokens / generate if generate else None}



def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="directory holding PREFIX-sSEED run directories")
    parser.add_argument("--a", required=True, help="prefix of the runs without the change")
    parser.add_argument("--b", required=True, help="prefix of the runs with it")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        a, b = side(args.runs / f"{args.a}-s{seed}"), side(args.runs / f"{args.b}-s{seed}")
        rows.append({"seed": seed, args.a: a, args.b: b, "gain_difference": b["gain"] - a["gain"],
                     "speedup_wall": a["seconds"] / b["seconds"],
                     "speedup_tokens_per_s": (b["tokens_per_s"] / a["tokens_per_s"]
                                              if a["tokens_per_s"] and b["tokens_per_s"] else None)})
    summary = {name: spread([r[name]["gain"] for r in rows]) for name in (args.a, args.b)}
    summary |= {key: spread([r[key] for r in rows]) for key in ("gain_difference", "speedup_wall")}
    report = {"cpu": cpu_model(), "seeds": rows, "summary": summary}
    print(f"{'seed':>4}  {args.a + ' base→final (gain)':>28}  {args.b + ' base→final (gain)':>28}  "
          f"{'b−a':>7}  {'s a':>6}  {'s b':>6}")
    for r in rows:
        a, b = r[args.a], r[args.b]
        print(f"{r['seed']:>4}  {a['base']:.3f}→{a['final']:.3f} ({a['gain']:+.3f}){'':>8}  "
              f"{b['base']:.3f}→{b['final']:.3f} ({b['gain']:+.3f}){'':>8}  {r['gain_difference']:+.3f}  "
              f"{a['seconds']:6.0f}  {b['seconds']:6.0f}")
    s = report["summary"]
    print(f"gain {args.a} {s[args.a]['mean']:+.3f} ± {s[args.a]['sd']:.3f}, {args.b} {s[args.b]['mean']:+.3f} ± "
          f"{s[args.b]['sd']:.3f}; paired difference {s['gain_difference']['mean']:+.3f} ± "
          f"{s['gain_difference']['sd']:.3f}; wall-time speed-up {s['speedup_wall']['mean']:.2f}×")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
