"""Ask/tell search strategies over a flat vector; they know nothing of models.

Every strategy has `init() -> state`, `ask(state) -> candidates [n, dim]`, `tell(state, rewards)
-> state` and `restore(arrays) -> state`; a state has `center`, `iteration` (completed updates of
the center) and `to_arrays()`. An iteration may take more than one ask/tell (ESSAM takes two).
"""

from __future__ import annotations

from essa.recipe import StrategySection
from essa.strategies.cma import CMA, CMAState
from essa.strategies.es import ES, ESState
from essa.strategies.essam import ESSAM, ESSAMState

Strategy = ES | CMA | ESSAM
State = ESState | CMAState | ESSAMState


def candidates_per_iteration(config: StrategySection) -> int:
    """Candidates evaluated per update of the center: ESSAM evaluates a probe population too."""
    if config.name == "essam":
        return (config.sharpness_population or config.population) + config.population
    return config.population


def make_strategy(config: StrategySection, dim: int, seed: int, iterations: int) -> Strategy:
    """The recipe's strategy; `iterations` is the run's length, which the schedules decay over."""
    if config.name == "cma":
        return CMA(config, dim, seed)
    es = ES(config, dim, seed, iterations)
    return ESSAM(es) if config.name == "essam" else es


__all__ = ["CMA", "ES", "ESSAM", "State", "Strategy", "candidates_per_iteration", "make_strategy"]
