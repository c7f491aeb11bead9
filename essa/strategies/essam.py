"""ESSAM (arXiv 2602.01003): evolution strategies with a zeroth-order sharpness-aware step.

Each iteration asks twice. First a population around the center estimates the reward gradient;
the probe point steps *against* it by ρ (toward the worst nearby reward, as SAM's ascent step on
the loss). Then a fresh population around the probe estimates the gradient there, and that
gradient updates the center. With `sharpness_population` smaller than `population`, the first
estimate is cheaper (the paper's accelerated variant): only its direction is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from essa.strategies.es import ES, ESState

PROBE_STREAM, UPDATE_STREAM = 1, 0


@dataclass(frozen=True)
class ESSAMState:
    es: ESState
    probe: np.ndarray   # float64 [dim]: where the second population is centred (phase 1)
    phase: int          # 0: next ask is around the center; 1: around the probe

    @property
    def center(self) -> np.ndarray:
        return self.es.center

    @property
    def iteration(self) -> int:
        return self.es.iteration

    def to_arrays(self) -> dict[str, np.ndarray]:
        return self.es.to_arrays() | {"probe": self.probe, "phase": np.array(self.phase, dtype=np.int64)}


class ESSAM:
    def __init__(self, es: ES) -> None:
        self.es = es
        cfg = es.config
        self.rho = cfg.rho
        self.counts = (cfg.sharpness_population or cfg.population, cfg.population)

    def init(self) -> ESSAMState:
        es = self.es.init()
        return ESSAMState(es, es.center.copy(), 0)

    def restore(self, arrays: dict[str, np.ndarray]) -> ESSAMState:
        return ESSAMState(ESState.from_arrays(arrays), arrays["probe"], int(np.asarray(arrays["phase"]).item()))

    def _directions(self, state: ESSAMState) -> np.ndarray:
        stream = PROBE_STREAM if state.phase == 0 else UPDATE_STREAM
        return self.es.directions(state.iteration, self.counts[state.phase], stream)

    def ask(self, state: ESSAMState) -> np.ndarray:
        origin = state.center if state.phase == 0 else state.probe
        return (origin + self.es.sigma(state.iteration) * self._directions(state)).astype(np.float32)

    def tell(self, state: ESSAMState, rewards: np.ndarray) -> ESSAMState:
        grad = self.es.gradient(rewards, self._directions(state), self.es.sigma(state.iteration))
        if state.phase == 0:
            norm = np.linalg.norm(grad)
            probe = state.center - self.rho * grad / norm if norm > 0 else state.center.copy()
            return ESSAMState(state.es, probe, 1)
        es = self.es.update(state.es, grad)
        return ESSAMState(es, es.center.copy(), 0)
