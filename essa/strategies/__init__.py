"""Ask/tell search strategies over a flat vector; they know nothing of models."""

from essa.recipe import StrategySection
from essa.strategies.es import ES, ESState


def make_strategy(config: StrategySection, dim: int, seed: int) -> ES:
    return {"es": ES}[config.name](config, dim, seed)


__all__ = ["ES", "ESState", "make_strategy"]
