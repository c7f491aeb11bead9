"""The `essa` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from essa import recipe as recipes
from essa.errors import EssaError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="essa", description="Align LLMs with evolution strategies over the singular values of LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    align = sub.add_parser("align", help="evolve an adapter as a recipe says",
                           description="Load the model, build the SVD-LoRA search space, evolve the singular values, "
                                       "checkpoint every iteration. Recipe fields: docs/recipes.md.")
    align.add_argument("recipe", nargs="?", type=Path,
                       help="TOML recipe (default: the bundled quickstart, recipes/quickstart.toml)")
    align.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set run.iterations=2 (repeatable; values are TOML)")
    align.add_argument("--out", type=Path, metavar="DIR",
                       help="run directory for checkpoints, metrics.jsonl and reward.png (default: runs/RECIPE_NAME)")
    align.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last valid checkpoint, with the recipe saved there "
                            "(--set still applies, e.g. to raise run.iterations)")

    recipe = sub.add_parser("recipe", help="work with recipes without running them",
                            description="Recipe tools. `essa recipe check RECIPE` validates a recipe.")
    recipe_sub = recipe.add_subparsers(dest="recipe_command", required=True, metavar="SUBCOMMAND")
    check = recipe_sub.add_parser("check", help="validate a recipe and print what it will do",
                                  description="Validate a recipe without loading model weights; print the search "
                                              "dimension, population, prompts per iteration and a memory estimate "
                                              "(from the model's config, when it can be read).")
    check.add_argument("recipe", type=Path, metavar="RECIPE", help="TOML recipe")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, as for `essa align`")

    score = sub.add_parser("score", help="score existing completions with a reward",
                           description="Score rows of a JSONL file (fields `prompt`, `response` and any dataset "
                                       "columns the reward needs); write each row with its `reward` and print "
                                       "aggregate metrics. With --reward ifeval, rows without instruction columns "
                                       "take them from the IFEval prompt of the same text.")
    score.add_argument("--reward", required=True, metavar="NAME",
                       help="a built-in reward, package.module:function or path/to/file.py:function")
    score.add_argument("--reward-kwargs", default="{}", metavar="JSON", help="keyword arguments for the reward")
    score.add_argument("--input", required=True, type=Path, metavar="FILE", help="rows to score (.jsonl)")
    score.add_argument("--output", required=True, type=Path, metavar="FILE", help="scored rows (.jsonl)")
    score.add_argument("--timeout-s", type=float, default=60.0, metavar="S",
                       help="time limit of one reward call in seconds; a call over it is stopped and its rows "
                            "score 0 (default: 60)")
    score.add_argument("--memory-gb", type=float, default=4.0, metavar="GB",
                       help="address-space limit of the reward process in GiB (default: 4)")

    evaluate = sub.add_parser("eval", help="compare the base model and adapters on held-out prompts",
                              description="Generate on the recipe's held-out prompts with the base model and, "
                                          "with --adapter (repeatable), each adapter; print a "
                                          "side-by-side table (for IFEval: prompt/instruction level, strict/loose) "
                                          "and write a JSON report with the metrics and completions.")
    evaluate.add_argument("recipe", type=Path, metavar="RECIPE", help="TOML recipe (model, data, reward)")
    evaluate.add_argument("--adapter", dest="adapters", type=Path, metavar="DIR", action="append", default=[],
                          help="a PEFT LoRA adapter, e.g. from essa export; repeat it to compare several "
                               "(the base model is generated once)")
    evaluate.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N held-out prompts")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a recipe key, as for `essa align`")
    evaluate.add_argument("--report", type=Path, default=Path("eval-report.json"), metavar="FILE",
                          help="where to write the JSON report (default: eval-report.json)")

    export = sub.add_parser("export", help="write an evolved adapter as a PEFT adapter or a merged model",
                            description="Export the best (by held-out reward) or final center of a run.")
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an `essa align` run directory")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--adapter", type=Path, metavar="DIR",
                        help="write a standard PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)")
    target.add_argument("--merged", type=Path, metavar="DIR",
                        help="write a full model: dequantized base + merged delta, bf16 safetensors + tokenizer")
    export.add_argument("--center", choices=["best", "final"], default="best",
                        help="which center to export: best held-out reward (default) or the last iteration's")

    report = sub.add_parser("report", help="write a run's self-contained HTML report",
                            description="One HTML file that opens without a network: the recipe, reward curves, "
                                        "time per phase and memory per iteration, the held-out completions of the "
                                        "initial adapter and the best center side by side, and the export command. "
                                        "`essa align` writes it at the end of every run.")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an `essa align` run directory")
    report.add_argument("--out", type=Path, metavar="FILE", help="where to write it (default: RUN_DIR/report.html)")
    return parser


def _report(args: argparse.Namespace) -> None:
    from essa.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")


def _align(args: argparse.Namespace) -> None:
    from rich.console import Console

    from essa import interrupts
    from essa.align import align
    from essa.run_dir import RECIPE_FILE

    path = args.recipe or recipes.bundled("quickstart")
    run_dir = args.out or Path("runs") / path.stem
    saved = run_dir / RECIPE_FILE
    if args.resume and saved.exists():
        raw, source = recipes.read_saved(saved), str(saved)
    else:
        raw, source = recipes.read_raw(path), str(path)
    raw = recipes.apply_overrides(raw, args.overrides, source)
    recipe = recipes.from_dict(raw, source)
    console = Console(soft_wrap=True)  # in a log file a line stays one line
    try:
        with interrupts.recorded():
            align(recipe, run_dir, args.resume, console)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted; checkpoints in {run_dir} are intact. Continue with:\n"
                      f"  essa align {path} --out {run_dir} --resume")
        raise SystemExit(130) from None


def _export(args: argparse.Namespace) -> None:
    from essa.export import export_adapter, export_merged
    from essa.files import check_writable_dir

    check_writable_dir(args.adapter or args.merged, "--adapter" if args.adapter else "--merged")
    if args.adapter:
        print(f"wrote PEFT adapter to {args.adapter} ({export_adapter(args.run_dir, args.adapter, args.center)})")
    else:
        print(f"wrote merged model to {args.merged} ({export_merged(args.run_dir, args.merged, args.center)})")


def _recipe_check(args: argparse.Namespace) -> None:
    from essa.commands.recipe_check import recipe_check

    recipe_check(args.recipe, args.overrides)


def _score(args: argparse.Namespace) -> None:
    from essa import extras
    from essa.commands.score import score_file

    try:
        kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as err:
        raise EssaError(f"--reward-kwargs: not valid JSON ({err.msg})") from None
    if not isinstance(kwargs, dict):
        raise EssaError("--reward-kwargs: expected a JSON object")
    if not 0 < args.timeout_s <= 86400 or not 0.5 <= args.memory_gb <= 4096:
        raise EssaError("--timeout-s: expected a number in (0, 86400]; --memory-gb: in [0.5, 4096]")
    extras.check(extras.reward_needs(args.reward))
    metrics = score_file(args.reward, kwargs, args.input, args.output, args.timeout_s, args.memory_gb)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {args.output}")


def _eval(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from essa.commands.evaluate import evaluate, write_report
    from essa.files import check_output_file

    check_output_file(args.report, "--report")
    console = Console(soft_wrap=True)
    report = evaluate(recipes.load(args.recipe, args.overrides), args.adapters, args.limit, console)
    write_report(report, args.report)
    results = report["results"]
    table = Table(title=f"essa eval: {report['prompts']} held-out prompts of {args.recipe}")
    table.add_column("metric")
    for name in results:
        table.add_column(name)
    for metric in next(iter(results.values())):
        table.add_row(metric, *(f"{r[metric]:.4f}" if isinstance(r[metric], float) else str(r[metric])
                                for r in results.values()))
    console.print(table)
    print(f"wrote {args.report}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from essa.progress import quiet_third_party

    quiet_third_party()
    try:
        {"align": _align, "export": _export, "recipe": _recipe_check, "score": _score,
         "eval": _eval, "report": _report}[args.command](args)
    except EssaError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the environment, not the input: a full disk, a vanished directory
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
