"""Experiment trackers (`run.report_to`): TensorBoard, Weights & Biases and MLflow, each one more sink
of the metrics rows the loop already writes to metrics.jsonl.

Each tracker is its own client library, an optional extra. It gets the recipe as its config, every
numeric value of every row as a scalar at step = iteration, and at each held-out evaluation a table
of sample completions. The tracker's run id is kept in the run directory (trackers.json), so a
`--resume` continues the same tracker run: wandb and MLflow resume it by id, TensorBoard writes to
the same directory and drops any steps after the checkpoint the run resumed from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from essa.files import write_text
from essa.run_dir import TENSORBOARD, TRACKERS_FILE

SAMPLE_ROWS = 8  # completions per table: enough to read, small enough for every tracker's UI


def names(report_to: str | list[str]) -> list[str]:
    """`run.report_to` as TRL users write it: one tracker's name or a list of them."""
    return [report_to] if isinstance(report_to, str) else list(report_to)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(raw: dict[str, Any]) -> dict[str, str]:
    """The recipe as `section.key` parameters (MLflow and TensorBoard take flat string values)."""
    return {f"{s}.{k}": json.dumps(v) if not isinstance(v, str) else v
            for s, keys in raw.items() if isinstance(keys, dict) for k, v in keys.items()}


class Tracker(Protocol):
    def log(self, row: dict[str, Any], completions: list[dict[str, Any]] | None) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, run_dir: Path, raw: dict, state: dict, resume_after: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the steps a killed run logged after its last checkpoint.
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD),
                                    purge_step=None if resume_after is None else resume_after + 1)
        if resume_after is None:
            self.writer.add_text("recipe", "```\n" + json.dumps(raw, indent=1) + "\n```", 0)
        state["tensorboard"] = str(run_dir / TENSORBOARD)

    def log(self, row: dict[str, Any], completions: list[dict[str, Any]] | None) -> None:
        step = row["iteration"]
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        if completions:
            lines = ["| prompt | completion | reward |", "|---|---|---|"]
            lines += [f"| {cell(r['prompt'])} | {cell(r['completion'])} | {r['reward']:.3f} |"
                      for r in completions[:SAMPLE_ROWS]]
            self.writer.add_text("heldout_completions", "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def cell(text: str) -> str:
    """Text as one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")[:500]


class WandB:
    def __init__(self, run_dir: Path, raw: dict, state: dict, resume_after: int | None) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "essa"), id=state.get("wandb"),
                              resume="allow", dir=str(run_dir), name=run_dir.name, config=raw)
        state["wandb"] = self.run.id

    def log(self, row: dict[str, Any], completions: list[dict[str, Any]] | None) -> None:
        data: dict[str, Any] = scalars(row)
        if completions:
            data["heldout_completions"] = self.wandb.Table(
                columns=["prompt", "completion", "reward"],
                data=[[r["prompt"], r["completion"], r["reward"]] for r in completions[:SAMPLE_ROWS]])
        self.run.log(data, step=row["iteration"])

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, raw: dict, state: dict, resume_after: int | None) -> None:
        import mlflow

        self.mlflow = mlflow
        if state.get("mlflow"):
            self.run = mlflow.start_run(run_id=state["mlflow"])
        else:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "essa"))
            self.run = mlflow.start_run(run_name=run_dir.name)
            mlflow.log_params(flatten(raw))
        state["mlflow"] = self.run.info.run_id

    def log(self, row: dict[str, Any], completions: list[dict[str, Any]] | None) -> None:
        self.mlflow.log_metrics(scalars(row), step=row["iteration"])
        if completions:
            sample = completions[:SAMPLE_ROWS]
            self.mlflow.log_table({k: [r[k] for r in sample] for k in ("prompt", "completion", "reward")},
                                  artifact_file=f"heldout_completions/iter-{row['iteration']:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """Every tracker the recipe names, fed the same rows."""

    def __init__(self, report_to: str | list[str], run_dir: Path, raw: dict, resume_after: int | None) -> None:
        path = run_dir / TRACKERS_FILE
        state = json.loads(path.read_text()) if resume_after is not None and path.is_file() else {}
        self.trackers: list[Tracker] = []
        try:
            for name in names(report_to):
                self.trackers.append(KINDS[name](run_dir, raw, state, resume_after))
        except BaseException:
            self.close()
            raise
        if self.trackers:
            write_text(path, json.dumps(state, indent=1))

    def log(self, row: dict[str, Any], completions: list[dict[str, Any]] | None = None) -> None:
        for tracker in self.trackers:
            tracker.log(row, completions)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
