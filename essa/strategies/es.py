"""Seed-based evolution strategies (OpenAI-ES style) as an ask/tell object with explicit state.

Noise is never stored: member i of iteration t is regenerated from (run seed, stream, t, i) with a
counter-based Philox generator, so any worker, or a resumed run, reconstructs the population
from integers. The state is a handful of arrays that round-trip through a checkpoint exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from essa.recipe import StrategySection


@dataclass(frozen=True)
class ESState:
    center: np.ndarray      # float64 [dim]: offsets of the trainable singular values
    adam_m: np.ndarray      # float64 [dim]
    adam_v: np.ndarray      # float64 [dim]
    iteration: int          # number of completed updates of the center

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"center": self.center, "adam_m": self.adam_m, "adam_v": self.adam_v,
                "iteration": np.array(self.iteration, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "ESState":
        return cls(arrays["center"], arrays["adam_m"], arrays["adam_v"], int(np.asarray(arrays["iteration"]).item()))


def noise(seed: int, iteration: int, index: int, dim: int, stream: int = 0) -> np.ndarray:
    """Standard normal direction for (seed, stream, iteration, index); identical on every machine."""
    bitgen = np.random.Philox(key=np.array([seed, 0x65737361], dtype=np.uint64),
                              counter=np.array([0, stream, index, iteration], dtype=np.uint64))
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


def scheduled(value: float, kind: str, final_fraction: float, iteration: int, iterations: int) -> float:
    """`value` decayed to `value * final_fraction` at the last iteration (linear or cosine), or constant."""
    if kind == "constant":
        return value
    progress = min(iteration / max(iterations - 1, 1), 1.0)
    if kind == "linear":
        return value * (1 + (final_fraction - 1) * progress)
    return value * (final_fraction + (1 - final_fraction) * (1 + math.cos(math.pi * progress)) / 2)


class ES:
    """OpenAI-ES: antithetic Gaussian perturbations, shaped fitness, Adam or SGD on the estimate."""

    def __init__(self, config: StrategySection, dim: int, seed: int, iterations: int) -> None:
        self.config, self.dim, self.seed, self.iterations = config, dim, seed, iterations

    def init(self) -> ESState:
        zeros = np.zeros(self.dim)
        return ESState(zeros, zeros.copy(), zeros.copy(), 0)

    def restore(self, arrays: dict[str, np.ndarray]) -> ESState:
        return ESState.from_arrays(arrays)

    def sigma(self, iteration: int) -> float:
        cfg = self.config
        return scheduled(cfg.sigma, cfg.sigma_schedule, cfg.final_fraction, iteration, self.iterations)

    def directions(self, iteration: int, count: int, stream: int = 0) -> np.ndarray:
        """`count` unit-variance directions for an iteration, [count, dim]."""
        if self.config.antithetic:
            half = np.stack([noise(self.seed, iteration, i, self.dim, stream) for i in range(count // 2)])
            return np.concatenate([half, -half])
        return np.stack([noise(self.seed, iteration, i, self.dim, stream) for i in range(count)])

    def gradient(self, rewards: np.ndarray, directions: np.ndarray, sigma: float) -> np.ndarray:
        """The search-gradient estimate of the expected shaped reward."""
        utilities = shape_fitness(np.asarray(rewards, dtype=np.float64), self.config.fitness_shaping)
        return utilities @ directions / (len(utilities) * sigma)

    def update(self, state: ESState, grad: np.ndarray) -> ESState:
        """One optimizer step on the center along `grad` (ascent); advances the iteration."""
        cfg = self.config
        grad = grad - cfg.weight_decay * state.center  # decay pulls offsets back to the initial adapter
        lr = scheduled(cfg.learning_rate, cfg.learning_rate_schedule, cfg.final_fraction, state.iteration,
                       self.iterations)
        t = state.iteration + 1
        if cfg.optimizer == "sgd":
            return replace(state, center=state.center + lr * grad, iteration=t)
        m = 0.9 * state.adam_m + 0.1 * grad
        v = 0.999 * state.adam_v + 0.001 * grad**2
        step = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        return ESState(state.center + lr * step, m, v, t)

    def ask(self, state: ESState) -> np.ndarray:
        """Candidates (offsets) to evaluate, [population, dim] float32."""
        directions = self.directions(state.iteration, self.config.population)
        return (state.center + self.sigma(state.iteration) * directions).astype(np.float32)

    def tell(self, state: ESState, rewards: np.ndarray) -> ESState:
        directions = self.directions(state.iteration, self.config.population)
        return self.update(state, self.gradient(rewards, directions, self.sigma(state.iteration)))
