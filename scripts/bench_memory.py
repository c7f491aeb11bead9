"""Peak memory of an essa iteration, of plain inference, and of a TRL GRPO step, side by side in one run.

Each is measured in its own fresh process (peak RSS is per process), on the same recipe: the same
model and quantization, the same prompts per step and completions per prompt (essa: population ×
prompts per iteration; GRPO: num_generations × prompts; inference: that many sequences in one
batched greedy `generate` of the base model). Loading a quantized model peaks above what the
loaded model holds (the checkpoint is read in full precision, then quantized), so the peak is
reset once the model is loaded and two peaks are reported: the work's (from the loaded model
on) and the whole process's. Per process: RSS once the libraries are imported, RSS once the model
is loaded, the work's peak RSS and what it adds to the loaded model, the process's peak RSS; on a
GPU the same for `torch.cuda.max_memory_allocated`. And where each peak comes from: the peak RSS
of each phase (loading, SVD, generation, GRPO's log-probabilities and backward), sampled every 20 ms.
Where the recipe has a [warm_start], essa's process runs it first (its sampling and fine-tune are
phases of their own), and the warm start's peak is reported beside the search's.

    python scripts/bench_memory.py [--recipe recipes/format-instructions.toml] [--set KEY=VALUE ...] [--quick]
        [--workers inference,essa,grpo] [--json out.json]
        [--plot out.png]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from machine import cpu_model, script_report, write_json

from essa.run_dir import SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ("inference", "essa", "grpo")
COLORS = {"inference": "tab:gray", "essa": "tab:blue", "grpo": "tab:orange"}
# The warm start's stages (a recipe with a [warm_start] runs them before the search): its phases start
# with "warm start", the search's are the other labelled ones.
WARM_START_PHASES = {"load_model": "warm start: load model", "heldout_reward": "warm start: held-out",
                     "best_of_k": "warm start: sampling", "fine_tune": "warm start: fine-tune"}
WARM_START_SECONDS = ("seconds_sampling", "seconds_fine_tune", "sft_steps")  # from the run's summary
QUICK = ["strategy.population=4", "data.prompts_per_iteration=2", "generation.max_new_tokens=8",
         "data.heldout_size=4"]


def status_mb(field: str) -> float:
    """A /proc/self/status memory field (VmRSS: now; VmHWM: peak since start or the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peaks() -> None:
    # Loading's freed buffers would otherwise stay in glibc's arenas and count as the loaded model.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def report_after_loading(load: Callable) -> Callable:
    """`load_model`, reporting the loaded state and resetting the peaks once it returns."""
    def loaded(*args, **kwargs):
        result = load(*args, **kwargs)
        reset_peaks()
        report("loaded")
        return result
    return loaded


class Phases:
    """Peak RSS of each named phase of a worker, sampled every 20 ms on a thread: where its peak comes from."""

    def __init__(self) -> None:
        self.current, self.stage = "other", ""
        self.peaks: dict[str, float] = {}
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while self._running:
            self._record(self.current)
            time.sleep(0.02)

    def _record(self, phase: str) -> None:
        self.peaks[phase] = max(self.peaks.get(phase, 0.0), status_mb("VmRSS"))

    def stop(self) -> dict[str, float]:
        self._running = False
        self._thread.join()
        return self.peaks

    def label(self, owner: object, name: str, phase: str, stage: bool = False) -> None:
        """While `owner.name` runs, the phase is `phase`, except within phases labelled inside it. A
        stage's phase also names the phases inside it ("warm start: sampling / generate")."""
        function = getattr(owner, name)

        @functools.wraps(function)
        def labelled(*args, **kwargs):
            outer, outer_stage = self.current, self.stage
            self.current = inner = outer_stage + phase
            if stage:
                self.stage = inner + " / "
            self._record(inner)  # a phase shorter than the sampling period still gets a row
            try:
                return function(*args, **kwargs)
            finally:
                self._record(inner)
                self.current, self.stage = outer, outer_stage

        setattr(owner, name, labelled)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_inference(recipe_path: Path, overrides: list[str], phases: Phases) -> None:
    import torch

    from essa.data import load_splits, minibatch, render
    from essa.models import load_model
    from essa.recipe import load

    recipe = load(recipe_path, overrides)
    report("imported")
    model, tokenizer = report_after_loading(load_model)(recipe.model)
    phases.label(model, "generate", "generate")
    train, _ = load_splits(recipe.data, recipe.run.seed)
    batch = train.subset(minibatch(len(train), recipe.data.prompts_per_iteration, recipe.run.seed, 0))
    rows = render(tokenizer, batch.prompts(), recipe.data) * recipe.strategy.population
    inputs = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=recipe.generation.max_new_tokens, do_sample=False,
                       temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)


def run_essa(recipe_path: Path, overrides: list[str], phases: Phases) -> None:
    import essa.align  # noqa: F401  (the cli imports it lazily: the baseline must include it)
    import essa.engines.load as engine_load
    import essa.warm_start as warm_start
    from essa.cli import main
    from essa.engines import HFEngine

    engine_load.load_model = report_after_loading(engine_load.load_model)
    phases.label(engine_load, "load_model", "load model")
    phases.label(engine_load, "build_space", "SVD of the adapted layers")
    phases.label(HFEngine, "generate_rows", "generate")
    for name, phase in WARM_START_PHASES.items():
        phases.label(warm_start, name, phase, stage=True)
    report("imported")
    with tempfile.TemporaryDirectory() as out:
        code = main(["align", str(recipe_path), "--out", out, "--set", "run.iterations=1",
                     *[arg for o in overrides for arg in ("--set", o)]])
        if code:
            raise SystemExit(code)
        warm = json.loads((Path(out) / SUMMARY_FILE).read_text()).get("warm_start", {})
    report("seconds", **{k: warm[k] for k in WARM_START_SECONDS if k in warm})


def run_grpo(recipe_path: Path, overrides: list[str], phases: Phases) -> None:
    import grpo_baseline
    from trl import GRPOTrainer

    from essa.recipe import load

    grpo_baseline.load_model = report_after_loading(grpo_baseline.load_model)
    phases.label(grpo_baseline, "load_model", "load model")
    phases.label(GRPOTrainer, "training_step", "rest of the step (backward)")
    phases.label(GRPOTrainer, "_generate", "generate")
    phases.label(GRPOTrainer, "_get_per_token_logps_and_entropies", "log-probabilities forward")
    recipe = load(recipe_path, overrides)
    report("imported")
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = grpo_baseline.grpo_trainer(recipe, learning_rate=1e-5, steps=1, output_dir=out)
        trainer.train()


def report(phase: str, **extra: object) -> None:
    """Worker → parent, one JSON line per phase on stdout."""
    row = {"phase": phase, **extra, "rss_mb": status_mb("VmRSS"), "hwm_mb": status_mb("VmHWM"),
           "peak_rss_mb": peak_rss_mb()}
    import torch

    if torch.cuda.is_available():
        row |= {"gpu_mb": torch.cuda.memory_allocated() / 2**20,
                "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    print("BENCH " + json.dumps(row), flush=True)


def measure(worker: str, recipe: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--recipe", str(recipe),
           *[arg for o in overrides for arg in ("--set", o)]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"error: the {worker} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rows = {r["phase"]: r for r in (json.loads(line[6:]) for line in done.stdout.splitlines()
                                    if line.startswith("BENCH "))}
    imported, loaded, done = rows["imported"], rows["loaded"], rows["done"]
    result = {"worker": worker, "imported_rss_mb": imported["rss_mb"], "loaded_rss_mb": loaded["rss_mb"],
              "work_peak_rss_mb": done["hwm_mb"], "work_added_rss_mb": done["hwm_mb"] - loaded["rss_mb"],
              "peak_rss_mb": done["peak_rss_mb"], "phase_peak_rss_mb": done["phase_peaks"]}
    stages = split_stages(done["phase_peaks"])
    if stages:
        result |= stages | {f"warm_start_{k}": v for k, v in rows["seconds"].items()
                            if k in WARM_START_SECONDS}
    if "gpu_peak_mb" in done:
        result |= {"loaded_gpu_mb": loaded["gpu_mb"], "work_peak_gpu_mb": done["gpu_peak_mb"],
                   "work_added_gpu_mb": done["gpu_peak_mb"] - loaded["gpu_mb"],
                   "peak_gpu_mb": max(loaded["gpu_peak_mb"], done["gpu_peak_mb"])}
    return result


def split_stages(phase_peaks: dict[str, float]) -> dict[str, float]:
    """The warm start's peak RSS and the search's, where a warm start ran, and their ratio: of their work
    (labelled phases but model loading, whose peak is the quantization's, the same for both)."""
    work = {p: mb for p, mb in phase_peaks.items() if p != "other" and "load model" not in p}
    warm = [mb for p, mb in work.items() if p.startswith("warm start")]
    search = [mb for p, mb in work.items() if not p.startswith("warm start")]
    if not warm or not search:
        return {}
    return {"warm_start_peak_rss_mb": max(warm), "search_peak_rss_mb": max(search),
            "warm_start_over_search_peak_rss": max(warm) / max(search)}


RSS_KEYS = ("work_peak_rss_mb", "work_added_rss_mb", "peak_rss_mb")
GPU_KEYS = ("work_peak_gpu_mb", "work_added_gpu_mb", "peak_gpu_mb")


def ratios_of(results: dict[str, dict]) -> dict[str, float]:
    keys = RSS_KEYS + (GPU_KEYS if any("peak_gpu_mb" in r for r in results.values()) else ())
    pairs = {"essa_over_inference": ("essa", "inference"), "grpo_over_inference": ("grpo", "inference"),
             "grpo_over_essa": ("grpo", "essa")}
    return {f"{name}_{k}": results[a][k] / results[b][k] for name, (a, b) in pairs.items() for k in keys
            if a in results and b in results}


def print_table(results: dict[str, dict], ratios: dict[str, float], title: str) -> None:
    print(title)
    columns = {"after imports": "imported_rss_mb", "loaded": "loaded_rss_mb", "work peak": "work_peak_rss_mb",
               "work adds": "work_added_rss_mb", "process peak": "peak_rss_mb"}
    if any("peak_gpu_mb" in r for r in results.values()):
        columns |= {"GPU loaded": "loaded_gpu_mb", "GPU work peak": "work_peak_gpu_mb",
                    "GPU work adds": "work_added_gpu_mb"}
    print("MiB        " + "".join(f"{c:>15}" for c in columns))
    for w, r in results.items():
        print(f"{w:<11}" + "".join(f"{r[k]:>15.0f}" for k in columns.values()))
    for w, r in results.items():
        print(f"{w} peak RSS by phase: " + ", ".join(f"{p} {mb:.0f}" for p, mb in r["phase_peak_rss_mb"].items()))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    if "warm_start_peak_rss_mb" in results.get("essa", {}):
        r = results["essa"]
        print(f"essa: warm start peak {r['warm_start_peak_rss_mb']:.0f} MiB, search peak {r['search_peak_rss_mb']:.0f} "
              f"MiB: {r['warm_start_over_search_peak_rss']:.2f}x; warm start sampling "
              f"{r.get('warm_start_seconds_sampling', 0):.0f} s, fine-tune "
              f"{r.get('warm_start_seconds_fine_tune', 0):.0f} s ({r.get('warm_start_sft_steps', 0)} steps)")


def plot(results: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "gpu" if any("peak_gpu_mb" in r for r in results.values()) else "rss"
    names = list(results)
    loaded = [results[n][f"loaded_{unit}_mb"] for n in names]
    added = [results[n][f"work_added_{unit}_mb"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(names, loaded, color="lightgray", label="loaded model (and libraries)")
    bars = ax.bar(names, added, bottom=loaded, color=[COLORS[n] for n in names],
                  label="added by the work")
    ax.scatter(names, [results[n][f"peak_{unit}_mb"] for n in names], marker="_", s=600, color="black",
               label="process peak (loading included)", zorder=3)
    ax.bar_label(bars, [f"{results[n][f'work_peak_{unit}_mb']:.0f}" for n in names])
    ax.set_ylabel("peak GPU memory allocated (MiB)" if unit == "gpu" else "peak RSS (MiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "format-instructions.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as for essa align")
    parser.add_argument("--quick", action="store_true", help=f"also set {' '.join(QUICK)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also draw the results here (PNG)")
    parser.add_argument("--workers", default=",".join(WORKERS),
                        help=f"which of {', '.join(WORKERS)} to measure (comma-separated; default all)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = (QUICK if args.quick else []) + args.overrides
    if args.worker:
        phases = Phases()
        {"inference": run_inference, "essa": run_essa, "grpo": run_grpo}[args.worker](args.recipe.resolve(),
                                                                                      overrides, phases)
        report("done", phase_peaks=phases.stop())
        return {}
    workers = args.workers.split(",")
    if unknown := set(workers) - set(WORKERS):
        parser.error(f"--workers: unknown {', '.join(sorted(unknown))} (one of {', '.join(WORKERS)})")
    results = {w: measure(w, args.recipe.resolve(), overrides) for w in workers}
    ratios = ratios_of(results)
    title = f"recipe {args.recipe.name} {' '.join(overrides)}".strip()
    print_table(results, ratios, title)
    if args.plot:
        plot(results, title, args.plot)
    report_ = script_report("bench_memory.py", argv, recipe=str(args.recipe), overrides=overrides, cpu=cpu_model(),
                            results=results, ratios=ratios)
    write_json(args.json, report_)
    return report_


if __name__ == "__main__":
    main()
