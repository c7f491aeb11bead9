"""essa from Python: `essa.train(recipe, train_dataset=ds, reward_funcs=[f])`, where a TRL user writes
`GRPOTrainer(model=..., reward_funcs=[f], train_dataset=ds, args=GRPOConfig(...)).train()`.

(Not `essa.align`: that name is the loop's module, and Python rebinds a package's attribute to its
submodule whenever the submodule is imported.)

It is the command's own run, not a second pipeline: the recipe (a bundled name, a TOML path or a dict
of sections) gets `overrides`, the datasets become JSONL files in the run directory (`inputs/`) that
the recipe names as its data, and reward callables are saved there with cloudpickle and named by
path. So a reward still runs in the killable reward child (which unpickles it), and `essa align
--resume`, `essa export` or a Ray worker find everything in the run directory, as for any run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from rich.console import Console

from essa import interrupts
from essa import recipe as recipes
from essa.errors import EssaError
from essa.export import export_adapter
from essa.files import atomic_path, write_text
from essa.reward_process import PICKLED
from essa.run_dir import ADAPTER, INPUTS, RECIPE_FILE, check_run_dir


@dataclass(frozen=True)
class Result:
    run_dir: Path          # metrics.jsonl, checkpoints/, completions/, report.html, inputs/
    adapter: Path          # the exported PEFT adapter (PeftModel.from_pretrained(base, result.adapter))
    summary: dict[str, Any]  # what summary.json holds: held-out rewards before and after, seconds, memory


def train(recipe: str | Path | Mapping[str, Any] = "quickstart", *, train_dataset: Any = None,
          eval_dataset: Any = None, reward_funcs: Sequence[Callable[..., Any] | str] = (),
          overrides: Mapping[str, Any] | None = None, out: str | Path | None = None, resume: bool = False,
          export: Literal["best", "final"] = "best", console: Console | None = None) -> Result:
    """Run `essa align` on Python objects and export its adapter.

    recipe: a bundled recipe's name ("quickstart"), a TOML file, or a dict of sections
        ({"model": {...}, "strategy": {...}}), as docs/recipes.md describes them.
    train_dataset / eval_dataset: a `datasets.Dataset` or a list of dicts with a "prompt" column
        (`data.prompt_field`); every other column is passed to the rewards by name. Without an
        eval_dataset, `data.heldout_size` rows of the training data are held out.
    reward_funcs: callables with TRL's signature, `f(completions, **kwargs)` or
        `f(prompts, completions, **kwargs)`, returning one float per completion, or reward names.
    overrides: {"section.key": value}, like `--set`.
    out: the run directory (default runs/NAME). resume: continue the run there.
    """
    raw, source, name = _read(recipe)
    run_dir = Path(out) if out is not None else Path("runs") / name
    check_run_dir(run_dir, resume)  # before anything is written into it
    saved = run_dir / RECIPE_FILE
    if resume and saved.exists():  # the run's own recipe, inputs included, as `essa align --resume` reads it
        raw, source = recipes.read_saved(saved), str(saved)
    else:
        raw = with_inputs(raw, run_dir / INPUTS, train_dataset, eval_dataset, reward_funcs)
    raw = recipes.with_values(raw, dict(overrides or {}), source)
    parsed = recipes.from_dict(raw, source)

    from essa.align import align as run_align

    with interrupts.recorded():
        summary = run_align(parsed, run_dir, resume, console or Console(soft_wrap=True))
    adapter = run_dir / ADAPTER
    export_adapter(run_dir, adapter, export)
    return Result(run_dir, adapter, summary)


def _read(recipe: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str, str]:
    """(raw sections, source for messages, default run name) of a recipe given in any of its forms."""
    if isinstance(recipe, Mapping):
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in recipe.items()}, "recipe", "python"
    path = Path(recipe)
    if path.suffix != ".toml" and not path.exists():
        path = recipes.bundled(str(recipe))
    return recipes.read_raw(path), str(path), path.stem


def with_inputs(raw: dict[str, Any], inputs: Path, train: Any, heldout: Any,
                rewards: Sequence[Callable[..., Any] | str]) -> dict[str, Any]:
    """The recipe with the given datasets and reward callables written to `inputs` and named there."""
    values: dict[str, Any] = {}
    if train is not None:
        values["data.source"] = str(write_rows(inputs / "train.jsonl", train, "train_dataset"))
    if heldout is not None:
        rows = list(_rows(heldout, "eval_dataset"))
        values["data.heldout_source"] = str(write_rows(inputs / "eval.jsonl", rows, "eval_dataset"))
        values["data.heldout_size"] = len(rows)  # all of it; overrides may say fewer
    if rewards:
        values["reward.name"] = [reward if isinstance(reward, str) else str(pickle_reward(inputs, i, reward))
                                 for i, reward in enumerate(rewards)]
    return recipes.with_values(raw, values, "essa.train")


def _rows(data: Any, argument: str) -> Iterable[dict[str, Any]]:
    rows = data.to_list() if hasattr(data, "to_list") else data
    if not isinstance(rows, (list, tuple)) or not all(isinstance(row, Mapping) for row in rows):
        raise EssaError(f"{argument}: expected a datasets.Dataset or a list of dicts, got {type(data).__name__}")
    return rows


def write_rows(path: Path, data: Any, argument: str) -> Path:
    lines = []
    for i, row in enumerate(_rows(data, argument)):
        try:
            lines.append(json.dumps(dict(row), ensure_ascii=False))
        except (TypeError, ValueError) as err:
            raise EssaError(f"{argument}: row {i + 1} cannot be written as JSON ({err})") from None
    write_text(path, "\n".join(lines) + "\n")
    return path


def pickle_reward(inputs: Path, index: int, fn: Callable[..., Any]) -> Path:
    import cloudpickle

    if not callable(fn):
        raise EssaError(f"reward_funcs[{index}]: expected a callable or a reward name, got {type(fn).__name__}")
    path = inputs / f"reward-{index}-{getattr(fn, '__name__', 'reward').strip('<>')}{PICKLED}"
    with atomic_path(path) as tmp:
        tmp.write_bytes(cloudpickle.dumps(fn))
    return path
