"""The run directory: its layout, in one place, and the check that a run can be written or resumed.

    RUN/recipe.json                 the recipe as run (--set applied); --resume reads it back
    RUN/space.safetensors           the frozen search space, saved once: resume, export and Ray workers use it
    RUN/metrics.jsonl               one row per iteration (docs/recipes.md, "The run directory")
    RUN/checkpoints/iter-NNNNNN/    atomic, hash-verified (essa/checkpoint.py)
    RUN/completions/iter-NNNNNN.jsonl   each held-out evaluation's rows
    RUN/summary.json, reward.png, report.html
    RUN/warm_start/                 adapter/, samples.jsonl (samples-round-NNN.jsonl), sampled.json,
                                    summary.json (written last: the stage is done)
    RUN/inputs/                     the datasets and reward callables given to essa.train
    RUN/adapter/                    essa.train's exported adapter
    RUN/trackers.json, tensorboard/ the trackers of run.report_to

Every module that reads or writes one of these names it from here.
"""

from __future__ import annotations

from pathlib import Path

from essa import checkpoint
from essa.errors import EssaError
from essa.files import check_writable_dir
from essa.metrics import MetricsLog
from essa.svd import SVDSpace

RECIPE_FILE, SPACE_FILE, METRICS_FILE, CHECKPOINTS = "recipe.json", "space.safetensors", "metrics.jsonl", "checkpoints"
COMPLETIONS, SUMMARY_FILE, PLOT_FILE, REPORT_FILE = "completions", "summary.json", "reward.png", "report.html"
WARM_START = "warm_start"
WARM_ADAPTER, SAMPLES, SAMPLED = "adapter", "samples.jsonl", "sampled.json"  # inside warm_start/
ROUND_SAMPLES = "samples-round-{:03d}.jsonl"  # inside warm_start/: expert iteration's round N
WARM_START_SUMMARY = f"{WARM_START}/{SUMMARY_FILE}"
INPUTS, ADAPTER = "inputs", "adapter"
TRACKERS_FILE, TENSORBOARD = "trackers.json", "tensorboard"


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A run directory essa can write, and on --resume, the files it will read back intact."""
    check_writable_dir(run_dir, "--out")
    root = run_dir / CHECKPOINTS
    has_checkpoints = root.is_dir() and any(root.glob("iter-*"))
    if not resume:
        if has_checkpoints:
            raise EssaError(f"--out: {run_dir} already holds a run; pass --resume to continue it or choose "
                            "another --out")
        return
    if (run_dir / SPACE_FILE).exists():
        SVDSpace.load(run_dir / SPACE_FILE)
    MetricsLog(run_dir / METRICS_FILE).read()
    if has_checkpoints and checkpoint.latest(root)[0] is None:
        raise EssaError(f"--resume: every checkpoint in {root} is damaged; nothing to continue from. Move "
                        f"{root} aside to start this run again from iteration 0, or start a new run with another --out")
