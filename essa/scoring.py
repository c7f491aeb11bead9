"""Finding and calling reward functions safely.

A reward is a built-in name from `rewards/`, `package.module:function`, or
`path/to/file.py:function`, with TRL's signature `fn(prompts, completions, **columns)`. Several
rewards may be combined with weights. A reward that raises, hangs past its timeout or returns
NaN/None scores that completion 0, is counted, and is warned about once: it never stops a run.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from essa.errors import EssaError
from rewards import REGISTRY, RewardFn


def load_reward(spec: str) -> RewardFn:
    """A built-in reward by name, or a user's function by `module:function` / `file.py:function`."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise EssaError(f"reward.name: unknown reward {spec!r}; built-in: {', '.join(sorted(REGISTRY))}; "
                        "or 'package.module:function' or 'path/to/file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise EssaError(f"reward.name: file {module_name!r} not found")
            spec_ = importlib.util.spec_from_file_location(f"essa_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except EssaError:
        raise
    except Exception as err:  # the user's module failed to import: say so in one line
        raise EssaError(f"reward.name: cannot import {module_name!r} ({type(err).__name__}: {err})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise EssaError(f"reward.name: {module_name!r} has no function {function!r}")
    return fn


@dataclass
class Scorer:
    """Weighted sum of reward functions, each call guarded by a timeout."""

    name: str
    fns: list[tuple[RewardFn, float]]
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 60.0
    console: Console = field(default_factory=lambda: Console(stderr=True))
    warned: bool = False
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1))

    @classmethod
    def from_recipe(cls, names: str | list[str], weights: list[float], kwargs: dict[str, Any],
                    timeout_s: float) -> "Scorer":
        names = [names] if isinstance(names, str) else names
        if weights and len(weights) != len(names):
            raise EssaError(f"reward.weights: {len(weights)} weights for {len(names)} rewards")
        fns = [(load_reward(n), w) for n, w in zip(names, weights or [1.0] * len(names))]
        return cls(" + ".join(names), fns, kwargs, timeout_s)

    def _warn(self, message: str) -> None:
        if not self.warned:
            self.console.print(f"[yellow]warning:[/] reward {self.name!r}: {message} "
                               "(scored 0; counted as reward_failures in metrics.jsonl; warned once)")
            self.warned = True

    def _call(self, fn: RewardFn, prompts: list[str], completions: list[str], columns: dict) -> list:
        future = self.pool.submit(fn, prompts, completions, **columns, **self.kwargs)
        try:
            raw = list(future.result(timeout=self.timeout_s))
        except FutureTimeout:
            # The hung call keeps its thread; later calls get a fresh one.
            self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(max_workers=1)
            raise TimeoutError(f"no result within reward.timeout_s = {self.timeout_s:g} s") from None
        if len(raw) != len(completions):
            raise ValueError(f"returned {len(raw)} scores for {len(completions)} completions")
        return raw

    def __call__(self, prompts: list[str], completions: list[str],
                 columns: dict[str, list[Any]]) -> tuple[np.ndarray, int]:
        """Scores and the number of completions whose score failed."""
        total, failed = np.zeros(len(completions)), np.zeros(len(completions), dtype=bool)
        for fn, weight in self.fns:
            try:
                raw = self._call(fn, prompts, completions, columns)
            except Exception as err:  # a user's reward must never stop a run
                self._warn(f"{type(err).__name__}: {err}")
                failed[:] = True
                continue
            bad = np.array([v is None or isinstance(v, bool) or not isinstance(v, (int, float))
                            or not math.isfinite(v) for v in raw])
            if bad.any():
                self._warn("returned None or a non-finite value")
            total += weight * np.array([0.0 if b else float(v) for v, b in zip(raw, bad)])
            failed |= bad
        return np.where(failed, 0.0, total), int(failed.sum())
