"""Seed-based evolution strategies (OpenAI-ES style) as an ask/tell object with explicit state.

Noise is never stored: member i of iteration t is regenerated from (run seed, t, i) with a
counter-based Philox generator, so any worker, or a resumed run, reconstructs the population
from integers. The state is a handful of arrays that round-trip through a checkpoint exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from essa.recipe import StrategySection


@dataclass(frozen=True)
class ESState:
    center: np.ndarray      # float64 [dim]: offsets of the trainable singular values
    adam_m: np.ndarray      # float64 [dim]
    adam_v: np.ndarray      # float64 [dim]
    iteration: int          # number of completed tell() calls

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"center": self.center, "adam_m": self.adam_m, "adam_v": self.adam_v,
                "iteration": np.array(self.iteration, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ESState":
        return cls(arrays["center"], arrays["adam_m"], arrays["adam_v"], int(np.asarray(arrays["iteration"]).item()))


def noise(seed: int, iteration: int, index: int, dim: int) -> np.ndarray:
    """Standard normal direction for (seed, iteration, index); identical on every machine."""
    bitgen = np.random.Philox(key=np.array([seed, 0x65737361], dtype=np.uint64),
                              counter=np.array([0, 0, index, iteration], dtype=np.uint64))
    return np.random.Generator(bitgen).standard_normal(dim)


def shape_fitness(rewards: np.ndarray, method: str) -> np.ndarray:
    """Rewards -> zero-mean utilities, invariant to the reward's scale."""
    if method == "zscore":
        std = rewards.std()
        return (rewards - rewards.mean()) / std if std > 0 else np.zeros_like(rewards)
    ranks = np.empty(len(rewards))
    ranks[np.argsort(rewards, kind="stable")] = np.arange(len(rewards))
    # Tied rewards share their mean rank, so a flat population gives no signal.
    for value in np.unique(rewards):
        tied = rewards == value
        ranks[tied] = ranks[tied].mean()
    return ranks / max(len(rewards) - 1, 1) - 0.5


class ES:
    def __init__(self, config: StrategySection, dim: int, seed: int) -> None:
        self.config, self.dim, self.seed = config, dim, seed

    def init(self) -> ESState:
        zeros = np.zeros(self.dim)
        return ESState(zeros, zeros.copy(), zeros.copy(), 0)

    def directions(self, iteration: int) -> np.ndarray:
        """The population's unit-variance directions for an iteration, [population, dim]."""
        p = self.config.population
        if self.config.antithetic:
            half = np.stack([noise(self.seed, iteration, i, self.dim) for i in range(p // 2)])
            return np.concatenate([half, -half])
        return np.stack([noise(self.seed, iteration, i, self.dim) for i in range(p)])

    def ask(self, state: ESState) -> np.ndarray:
        """Candidates (offsets) to evaluate, [population, dim] float32."""
        return (state.center + self.config.sigma * self.directions(state.iteration)).astype(np.float32)

    def tell(self, state: ESState, rewards: np.ndarray) -> ESState:
        cfg = self.config
        utilities = shape_fitness(np.asarray(rewards, dtype=np.float64), cfg.fitness_shaping)
        grad = utilities @ self.directions(state.iteration) / (len(utilities) * cfg.sigma)
        grad = grad - cfg.weight_decay * state.center  # decay pulls offsets back to the initial adapter
        t = state.iteration + 1
        if cfg.optimizer == "sgd":
            return replace(state, center=state.center + cfg.learning_rate * grad, iteration=t)
        m = 0.9 * state.adam_m + 0.1 * grad
        v = 0.999 * state.adam_v + 0.001 * grad**2
        step = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        return ESState(state.center + cfg.learning_rate * step, m, v, t)
