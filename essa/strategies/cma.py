"""CMA-ES over the singular-value offsets, as the ESSA paper uses, on the `cmaes` library.

`cmaes` keeps its state (mean, step size, covariance, evolution paths, RNG) in an object. Here
that object is rebuilt from the strategy's explicit state on every call, so ask/tell stay pure
functions of (state, rewards): every worker holding the same state asks the same candidates,
and a state written to a checkpoint resumes bit for bit.

A full covariance costs dim² memory and an eigendecomposition per generation (1.6 s at 2,048
dimensions on 2 CPU cores, 11 s at 4,096); above FULL_COVARIANCE_MAX_DIM `covariance = "auto"`
uses the separable (diagonal) variant, which is linear in the dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cmaes import CMA as FullCMA
from cmaes import SepCMA

from essa.recipe import StrategySection

FULL_COVARIANCE_MAX_DIM = 2048
RNG_PREFIX = "_rng."


@dataclass(frozen=True)
class CMAState:
    arrays: dict[str, np.ndarray]   # the cmaes object's attributes, RNG included
    iteration: int                  # number of completed generations

    @property
    def center(self) -> np.ndarray:
        return self.arrays["_mean"]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return self.arrays | {"iteration": np.array(self.iteration, dtype=np.int64)}


def _capture(optimizer: FullCMA | SepCMA) -> dict[str, np.ndarray]:
    arrays = {}
    for name, value in vars(optimizer).items():
        if isinstance(value, np.random.RandomState):
            kind, keys, pos, has_gauss, cached = value.get_state()
            arrays |= {RNG_PREFIX + "keys": keys, RNG_PREFIX + "pos": np.array([pos, has_gauss], dtype=np.int64),
                       RNG_PREFIX + "cached": np.array(cached, dtype=np.float64)}
        elif value is not None:
            arrays[name] = np.array(value)  # a copy: the optimizer mutates its arrays in place
    return arrays


def _apply(optimizer: FullCMA | SepCMA, arrays: dict[str, np.ndarray]) -> None:
    for name, fresh in vars(optimizer).copy().items():
        if isinstance(fresh, np.random.RandomState):
            pos, has_gauss = arrays[RNG_PREFIX + "pos"]
            fresh.set_state(("MT19937", arrays[RNG_PREFIX + "keys"], int(pos), int(has_gauss),
                             float(arrays[RNG_PREFIX + "cached"])))
        elif name not in arrays:
            setattr(optimizer, name, None)  # lazily computed (eigenbasis) and not computed yet
        elif arrays[name].ndim or fresh is None:
            setattr(optimizer, name, arrays[name].copy())
        else:
            setattr(optimizer, name, type(fresh)(arrays[name].item()))  # scalars keep the type cmaes gave them


def full_covariance(config: StrategySection, dim: int) -> bool:
    return config.covariance == "full" or (config.covariance == "auto" and dim <= FULL_COVARIANCE_MAX_DIM)


class CMA:
    """CMA-ES maximizing the reward: population λ, initial step σ, mean at offset zero."""

    def __init__(self, config: StrategySection, dim: int, seed: int) -> None:
        self.config, self.dim, self.seed = config, dim, seed
        self.library = FullCMA if full_covariance(config, dim) else SepCMA
        self._last: tuple[CMAState, FullCMA | SepCMA, np.ndarray] | None = None

    def _fresh(self) -> FullCMA | SepCMA:
        optimizer = self.library(mean=np.zeros(self.dim), sigma=self.config.sigma,
                                 population_size=self.config.population, seed=self.seed)
        # cmaes allocates its stopping-rule history with np.empty; defined values keep states comparable.
        optimizer._funhist_values.fill(np.inf)
        return optimizer

    def _optimizer(self, state: CMAState) -> FullCMA | SepCMA:
        optimizer = self._fresh()
        _apply(optimizer, state.arrays)
        return optimizer

    def init(self) -> CMAState:
        return CMAState(_capture(self._fresh()), 0)

    def restore(self, arrays: dict[str, np.ndarray]) -> CMAState:
        arrays = dict(arrays)
        return CMAState(arrays, int(np.asarray(arrays.pop("iteration")).item()))

    def _candidates(self, optimizer: FullCMA | SepCMA) -> np.ndarray:
        return np.stack([optimizer.ask() for _ in range(self.config.population)])

    def _asked(self, state: CMAState) -> tuple[FullCMA | SepCMA, np.ndarray]:
        """The optimizer after drawing this state's candidates, and the candidates. Rebuilding costs
        an eigendecomposition, so the last one is kept for the tell() that follows its ask()."""
        if self._last is None or self._last[0] is not state:
            optimizer = self._optimizer(state)
            self._last = (state, optimizer, self._candidates(optimizer))
        return self._last[1], self._last[2]

    def ask(self, state: CMAState) -> np.ndarray:
        return self._asked(state)[1].astype(np.float32)

    def tell(self, state: CMAState, rewards: np.ndarray) -> CMAState:
        optimizer, candidates = self._asked(state)  # the same draws for the same state: same RNG
        self._last = None  # the optimizer is about to move on
        optimizer.tell([(x, -float(r)) for x, r in zip(candidates, rewards)])  # cmaes minimizes
        return CMAState(_capture(optimizer), state.iteration + 1)
