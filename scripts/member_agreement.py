"""How often members' greedy completions differ from their center's, and how much of that the engine's
precision makes on its own: the floor under `diverged_share` (essa/search_signal.py).

For each `--sigma`, the center (offset 0 of a recipe's adapter) and `--members` members at that σ are
evaluated in one population call on `--prompts` training prompts, and the center once more on its
own. Printed and written per σ: the share of rows where a member's completion differs from the
center's (what `diverged_share` measures), where two members differ from each other, where the
center differs from itself evaluated alone, and the members' mean reward. At a σ of 1e-6 the
members are the center up to rounding: whatever differs there is the engine's numerics (batch
composition and reduced-precision rounding flipping greedy near-ties), not the search.

    python scripts/member_agreement.py --recipe recipes/quickstart.toml --set lora.adapter="DIR" \\
        --set 'warm_start.method="none"' --set 'warm_start.repair=""' --sigmas 1e-6,0.01,0.3,1 \\
        --json benchmarks/search-regime/member_agreement.json
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
from machine import cpu_model, script_report, write_json
from rich.console import Console

from essa import recipe as recipes
from essa.align import build_parts
from essa.data import minibatch
from essa.evaluation import Task
from essa.preflight import check_inputs


def disagreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a != b).mean())


def measure(parts, task: Task, sigma: float, members: int, seed: int) -> dict:
    dim = parts.evaluator.space.dim
    rng = np.random.default_rng(seed)
    center = np.zeros(dim, np.float32)
    candidates = np.stack([center] + [center + sigma * rng.standard_normal(dim).astype(np.float32)
                                      for _ in range(members)])
    together = parts.evaluator.evaluate(candidates, task)
    alone = parts.evaluator.evaluate(center[None], task)
    digests = together.digests
    pairs = list(itertools.combinations(range(1, members + 1), 2))
    return {"sigma": sigma,
            "member_vs_center": float(np.mean([disagreement(digests[m], digests[0]) for m in range(1, members + 1)])),
            "member_vs_member": float(np.mean([disagreement(digests[i], digests[j]) for i, j in pairs])),
            "center_vs_center_alone": disagreement(digests[0], alone.digests[0]),
            "center_reward": float(together.scores[0].mean()),
            "members_reward": float(together.scores[1:].mean()),
            "members_reward_std": float(together.scores[1:].mean(1).std())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=recipes.bundled("quickstart"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sigmas", default="1e-6,0.01,0.1,0.3,1.0")
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    recipe = recipes.load(args.recipe, args.overrides)
    inputs = check_inputs(recipe)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            parts = build_parts(recipe, Path(run_dir), inputs, Console(stderr=True))
            batch = parts.train.subset(minibatch(len(parts.train), args.prompts, args.seed, 0))
            task = Task.of(parts.tokenizer, batch, recipe.data)
            print(f"{'sigma':>8s} {'member/center':>14s} {'member/member':>14s} {'center/alone':>13s} "
                  f"{'center reward':>14s} {'members reward':>15s}")
            for sigma in (float(s) for s in args.sigmas.split(",")):
                row = measure(parts, task, sigma, args.members, args.seed)
                rows.append(row)
                print(f"{sigma:8g} {row['member_vs_center']:14.2f} {row['member_vs_member']:14.2f} "
                      f"{row['center_vs_center_alone']:13.2f} {row['center_reward']:14.4f} "
                      f"{row['members_reward']:15.4f}")
            parts.evaluator.close()
    finally:
        inputs.scorer.close()
    report = script_report("member_agreement.py", argv, recipe=str(args.recipe), overrides=args.overrides,
                           cpu=cpu_model(), members=args.members, prompts=args.prompts, rows=rows)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
