"""Markdown tables from `essa eval` reports: the base model, each adapter, and the adapters' mean ±
sd (population) and min-max, per metric; metrics named `strict <type>` (IFEval's per-instruction
accuracy) go to a second table with the base, the adapters' mean and the change.

Several reports (e.g. evaluations split across processes) are read as one: their base rows must
agree, which also checks that the base generation is reproducible.

    python scripts/eval_table.py REPORT.json [REPORT.json ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read(reports: list[Path]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(base metrics, {adapter: metrics}) over all reports."""
    base, adapters = None, {}
    for path in reports:
        report = json.loads(path.read_text())
        results = dict(report["results"])
        if base is not None and results["base"] != base:
            raise SystemExit(f"{path}: its base model's metrics differ from the first report's")
        base = results.pop("base")
        for name, metrics in results.items():
            adapters[report["adapter"] if name == "adapter" else name] = metrics
    return base, adapters


def tables(base: dict[str, float], adapters: dict[str, dict[str, float]]) -> tuple[str, str]:
    names = list(adapters)
    main = [m for m in base if not m.startswith("strict ") and m != "reward_failures"]
    head = "| metric | base | " + " | ".join(names) + " | adapters: mean ± sd | min – max | change of the mean |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in main:
        values = [adapters[n][m] for n in names]
        mean, sd = statistics.mean(values), statistics.pstdev(values)
        lines.append(f"| {m} | {base[m]:.4f} | " + " | ".join(f"{v:.4f}" for v in values)
                     + f" | {mean:.4f} ± {sd:.4f} | {min(values):.4f} – {max(values):.4f} | {mean - base[m]:+.4f} |")
    kinds = [m for m in base if m.startswith("strict ")]
    per_type = ["| instruction type (strict) | base | adapters' mean | change |", "|---|---|---|---|"]
    for m in sorted(kinds, key=lambda k: statistics.mean(adapters[n][k] for n in names) - base[k]):
        mean = statistics.mean(adapters[n][m] for n in names)
        per_type.append(f"| {m.removeprefix('strict ')} | {base[m]:.3f} | {mean:.3f} | {mean - base[m]:+.3f} |")
    return "\n".join(lines), "\n".join(per_type)


def main(argv: list[str] | None = None) -> tuple[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="also write the merged metrics here")
    args = parser.parse_args(argv)
    base, adapters = read(args.reports)
    out = tables(base, adapters)
    print(out[0] + "\n\n" + out[1])
    if args.json:
        args.json.write_text(json.dumps({"base": base, "adapters": adapters}, indent=1))
    return out


if __name__ == "__main__":
    main()
