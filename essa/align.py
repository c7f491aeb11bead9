"""The alignment loop: recipe → model + SVD space → strategy asks → engine evaluates → rewards score
→ strategy tells → checkpoint. Read it top to bottom; every piece it calls is a small module."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from essa import checkpoint, completions, interrupts, trackers, warm_start
from essa.data import Dataset, minibatch
from essa.distributed import RayEvaluator, distributed
from essa.engines.load import load_engine
from essa.engines.rows import add_up
from essa.errors import EssaError
from essa.evaluation import Evaluation, Evaluator, LocalEvaluator, Task
from essa.files import write_text
from essa.metrics import MetricsLog, peak_memory_mb, plot
from essa.models import load_tokenizer, resolve_source
from essa.preflight import Inputs, check_inputs
from essa.progress import ChunkSteps, Steps, phase
from essa.recipe import Recipe
from essa.report import write_report
from essa.run_dir import CHECKPOINTS, METRICS_FILE, PLOT_FILE, RECIPE_FILE, SPACE_FILE, SUMMARY_FILE, check_run_dir
from essa.scoring import Scorer
from essa.search_signal import population_signal, rank_correlation
from essa.strategies import State, Strategy, make_strategy


@dataclass
class Best:
    center: np.ndarray
    reward: float
    iteration: int


@dataclass
class Parts:
    """What one run evaluates with: built once from the recipe."""

    recipe: Recipe
    evaluator: Evaluator
    tokenizer: PreTrainedTokenizerBase
    train: Dataset
    heldout: Task
    scorer: Scorer

    def heldout_reward(self, center: np.ndarray, progress: ChunkSteps | None = None) -> tuple[float, Evaluation]:
        """Mean reward of the center on the held-out prompts, with its evaluation."""
        evaluation = self.evaluator.evaluate(center[None], self.heldout, keep_texts=True, on_chunk=progress,
                                             on_rows=progress and progress.rows)
        return float(evaluation.scores.mean()), evaluation


def build_parts(recipe: Recipe, run_dir: Path, inputs: Inputs, console: Console) -> Parts:
    if distributed(recipe):
        evaluator = RayEvaluator(recipe, run_dir, console)
        tokenizer = load_tokenizer(resolve_source(recipe.model.name_or_path))
    else:
        engine, tokenizer = load_engine(recipe, run_dir)
        evaluator = LocalEvaluator(engine, inputs.scorer, recipe.generation.speculative)
    return Parts(recipe, evaluator, tokenizer, inputs.train, Task.of(tokenizer, inputs.heldout, recipe.data),
                 inputs.scorer)


def step(parts: Parts, strategy: Strategy, state: State) -> tuple[State, dict]:
    """One iteration: the same minibatch for every candidate, batched generation, score, tell, until the
    strategy has updated its center (one ask/tell for ES and CMA-ES, two for ESSAM). The first ask is
    around the center for every strategy: the center joins its evaluation as one more candidate, so the
    row can say how far the members stand from it (essa.search_signal)."""
    recipe, t0 = parts.recipe, time.perf_counter()
    batch = parts.train.subset(minibatch(len(parts.train), recipe.data.prompts_per_iteration, recipe.run.seed,
                                         state.iteration))
    task = Task.of(parts.tokenizer, batch, recipe.data)
    evaluations, asked, start = [], [], state.iteration
    while state.iteration == start:
        members = strategy.ask(state)
        candidates = members if evaluations else np.concatenate([members, state.center[None]])
        # the center's completions draft the members' (essa/engines/draft.py), where the engine drafts
        evaluation = parts.evaluator.evaluate(candidates, task, draft=None if evaluations else len(members))
        state = strategy.tell(state, evaluation.scores[:len(members)].mean(1))
        evaluations.append(evaluation)
        asked.append(members)
    first, seconds = evaluations[0], time.perf_counter() - t0
    rewards = first.scores[:-1].mean(1)
    timings = add_up(e.metrics() | {"seconds_evaluate": e.seconds} for e in evaluations)
    row = {"iteration": state.iteration, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
           "reward_max": float(rewards.max()),
           **population_signal(first.scores[:-1], first.digests[:-1], first.scores[-1], first.digests[-1]),
           "reward_failures": sum(e.failures for e in evaluations),
           "candidates": sum(len(e.scores) for e in evaluations),
           "sequences": sum(e.scores.size for e in evaluations), **timings,
           "tokens_per_s": timings["generated_tokens"] / timings["seconds_evaluate"],
           "draft_acceptance": timings.get("draft_tokens", 0) / timings["member_tokens"] if "member_tokens" in timings
           else 0.0,
           "seconds_update": seconds - timings["seconds_evaluate"]}
    if recipe.run.diagnose:
        row |= diagnose(parts, asked[0], rewards)
    return state, row


def diagnose(parts: Parts, members: np.ndarray, rewards: np.ndarray) -> dict:
    """`run.diagnose`: the members' held-out rewards, and how their minibatch rewards rank against them."""
    evaluation = parts.evaluator.evaluate(members, parts.heldout)
    heldout = evaluation.scores.mean(1)
    return {"rank_correlation": rank_correlation(rewards, heldout), "heldout_members_mean": float(heldout.mean()),
            "heldout_members_std": float(heldout.std()), "seconds_diagnose": evaluation.seconds}


def save_checkpoint(root: Path, state: State, best: Best, baseline: float, keep: int) -> None:
    # The center is stored under its own key too, so an export needs no strategy to read it.
    arrays = {f"strategy.{k}": v for k, v in state.to_arrays().items()} | {"center": state.center,
                                                                            "best_center": best.center}
    meta = {"best_reward": best.reward, "best_iteration": best.iteration, "baseline_reward": baseline}
    checkpoint.save(root, checkpoint.Checkpoint(state.iteration, arrays, meta), keep=keep)


def restore(root: Path, strategy: Strategy, console: Console) -> tuple[State, Best, float] | None:
    ckpt, skipped = checkpoint.latest(root)
    for path in skipped:
        console.print(f"[yellow]warning:[/] checkpoint {path} is incomplete or corrupt; using the one before it")
    if ckpt is None:
        return None
    state = strategy.restore({k.removeprefix("strategy."): v for k, v in ckpt.arrays.items()
                              if k.startswith("strategy.")})
    best = Best(ckpt.arrays["best_center"], ckpt.meta["best_reward"], ckpt.meta["best_iteration"])
    console.print(f"resuming after iteration {ckpt.iteration} from {root}")
    return state, best, ckpt.meta["baseline_reward"]


def summarize(run_dir: Path, recipe: Recipe, rows: list[dict], best: Best, baseline: float, iterations: int,
              seconds: float, warm: dict | None, console: Console) -> dict:
    plot(rows, run_dir / PLOT_FILE, f"essa align: {recipe.source}")
    final = next((r["heldout_reward"] for r in reversed(rows) if r.get("heldout_reward") is not None), baseline)
    summary = {"baseline_heldout_reward": baseline, "final_heldout_reward": final,
               "best_heldout_reward": best.reward, "best_iteration": best.iteration, "iterations": iterations,
               "seconds_this_session": seconds, "peak_memory_mb": peak_memory_mb(), "run_dir": str(run_dir)}
    if warm:
        summary["warm_start"] = warm
    write_text(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
    page = write_report(run_dir)
    table = Table(title="essa align: held-out reward of the center")
    columns = (["base model"] if warm else []) + ["initial", "final", "best", "best at iteration"]
    for column in columns:
        table.add_column(column)
    table.add_row(*([f"{warm['base_heldout_reward']:.4f}"] if warm else []), f"{baseline:.4f}", f"{final:.4f}",
                  f"{best.reward:.4f}", str(best.iteration))
    console.print(table)
    console.print(f"run directory: {run_dir} (metrics.jsonl, completions/, reward.png, checkpoints/); report: {page}; "
                  f"export with: essa export {run_dir} --adapter DIR")
    return summary


def align(recipe: Recipe, run_dir: Path, resume: bool, console: Console) -> dict:
    started = time.perf_counter()
    check_run_dir(run_dir, resume)
    with phase(console, "checking the model config, data and reward"):
        inputs = check_inputs(recipe)
    try:
        if not resume:
            (run_dir / SPACE_FILE).unlink(missing_ok=True)
        write_text(run_dir / RECIPE_FILE, json.dumps(recipe.written, indent=1))
        searched, warm = recipe, None
        if warm_start.enabled(recipe):  # the paper's SFT stage: it makes the adapter the search starts from
            adapter, warm = warm_start.run(recipe, inputs.train, inputs.heldout, inputs.scorer, run_dir, resume,
                                           console)
            searched = warm_start.searched(recipe, adapter)
        with phase(console, "loading the model and building the SVD space"):
            parts = build_parts(searched, run_dir, inputs, console)
        try:
            return evolve(parts, recipe, run_dir, resume, started, warm, console)
        finally:
            parts.evaluator.close()  # also on Ctrl-C: vLLM's scratch adapters and Ray's workers go
    finally:
        inputs.scorer.close()


def heldout(parts: Parts, center: np.ndarray, iteration: int, run_dir: Path,
            console: Console) -> tuple[float, Evaluation, list[dict]]:
    """The center's held-out reward; its prompts, completions and rewards go to completions/."""
    with ChunkSteps(console, "held-out chunks", bar=False) as progress:  # inside align's own bar or spinner
        reward, evaluation = parts.heldout_reward(center, progress)
    rows = completions.heldout_rows(parts.heldout, evaluation, parts.scorer)
    completions.write(run_dir, iteration, rows)
    return reward, evaluation, rows


def evolve(parts: Parts, written: Recipe, run_dir: Path, resume: bool, started: float, warm: dict | None,
           console: Console) -> dict:
    """Restore or start, then iterate to run.iterations, checkpointing after every iteration. `written`:
    the recipe as the user wrote it (the trackers' config), before a warm start set its adapter."""
    recipe, run = parts.recipe, parts.recipe.run
    ckpt_root, metrics = run_dir / CHECKPOINTS, MetricsLog(run_dir / METRICS_FILE)
    space = parts.evaluator.space
    strategy = make_strategy(recipe.strategy, space.dim, run.seed, run.iterations)
    searched = "LoRA factor entries" if space.space == "factors" else "trainable singular values"
    console.print(f"search space: {len(space.modules)} modules, rank {space.rank}, {space.dim} {searched}; "
                  f"population {recipe.strategy.population} × "
                  f"{min(recipe.data.prompts_per_iteration, len(parts.train))} prompts")

    restored = restore(ckpt_root, strategy, console) if resume else None
    sinks = trackers.Trackers(run.report_to, run_dir, written.written, restored[0].iteration if restored else None)
    try:
        if restored:
            state, best, baseline = restored
            metrics.truncate(state.iteration)
        else:
            state = strategy.init()
            metrics.truncate(-1)
            with phase(console, f"evaluating the initial adapter on {len(parts.heldout.prompts)} held-out prompts"):
                baseline, evaluation, samples = heldout(parts, state.center, 0, run_dir, console)
            if evaluation.failures == len(parts.heldout.prompts):  # all-zero rewards would look like a run
                raise EssaError(f"reward {parts.scorer.name!r} failed on every held-out row "
                                f"({evaluation.first_error}); nothing was trained: fix the reward, its "
                                "reward.kwargs or the data's columns")
            best = Best(state.center.copy(), baseline, 0)
            row = {"iteration": 0, "heldout_reward": baseline, "reward_failures": evaluation.failures,
                   "peak_memory_mb": peak_memory_mb()}
            metrics.append(row)
            sinks.log(row, samples)
            console.print(f"held-out reward of the initial adapter: {baseline:.4f}")

        with Steps(console, "align", run.iterations, state.iteration) as steps:
            while state.iteration < run.iterations:
                interrupts.check()  # a Ctrl-C that a library swallowed stops the run here
                t = time.perf_counter()
                state, row = step(parts, strategy, state)
                stats = (f"reward {row['reward_mean']:.3f} (max {row['reward_max']:.3f}, center "
                         f"{row['center_reward']:.3f})  {row['diverged_share']:.0%} differ  "
                         f"snr {row['reward_snr']:.1f}")
                samples = None
                if state.iteration % run.eval_every == 0 or state.iteration == run.iterations:
                    t_eval = time.perf_counter()
                    row["heldout_reward"], evaluation, samples = heldout(parts, state.center, state.iteration,
                                                                         run_dir, console)
                    row["reward_failures"] += evaluation.failures
                    row["seconds_eval"] = time.perf_counter() - t_eval
                    if row["heldout_reward"] > best.reward:
                        best = Best(state.center.copy(), row["heldout_reward"], state.iteration)
                    stats += f"  held-out {row['heldout_reward']:.3f}"
                row["peak_memory_mb"] = peak_memory_mb()
                metrics.append(row)
                save_checkpoint(ckpt_root, state, best, baseline, run.keep_checkpoints)
                sinks.log(row, samples)
                steps.update(state.iteration, f"{stats}  {row['tokens_per_s']:.0f} tok/s  "
                                              f"{time.perf_counter() - t:.1f} s")
    finally:
        sinks.close()

    return summarize(run_dir, recipe, metrics.read(), best, baseline, state.iteration,
                     time.perf_counter() - started, warm, console)
