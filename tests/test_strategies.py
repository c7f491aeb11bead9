"""Strategies as ask/tell objects: determinism, exact resume, convergence on standard test functions."""

import numpy as np
import pytest

from essa.recipe import StrategySection
from essa.strategies import CMA, ES, ESSAM, candidates_per_iteration, make_strategy
from essa.strategies.cma import FULL_COVARIANCE_MAX_DIM
from essa.strategies.es import noise, scheduled, shape_fitness

STRATEGIES = {
    "es": dict(name="es"),
    "essam": dict(name="essam", rho=0.05),
    "essam-fast": dict(name="essam", rho=0.05, sharpness_population=4),
    "cma": dict(name="cma", covariance="full"),
    "sep-cma": dict(name="cma", covariance="diagonal"),
}
EVALUATIONS = 4000


def sphere(x: np.ndarray, optimum: np.ndarray) -> np.ndarray:
    return ((x - optimum) ** 2).sum(-1)


ROTATION = np.linalg.qr(np.random.default_rng(0).standard_normal((10, 10)))[0]
SCALES = 10 ** (3 * np.arange(10) / 9)  # condition number 1000


def rotated_ellipsoid(x: np.ndarray, optimum: np.ndarray) -> np.ndarray:
    return (SCALES * ((x - optimum) @ ROTATION.T) ** 2).sum(-1)


def rastrigin(x: np.ndarray, optimum: np.ndarray) -> np.ndarray:
    y = x - optimum
    return 10 * y.shape[-1] + (y**2 - 10 * np.cos(2 * np.pi * y)).sum(-1)


def minimize(config: StrategySection, f, optimum: np.ndarray, seed: int, evaluations: int = EVALUATIONS,
             sign: float = 1.0) -> float:
    """f at the final center after a fixed budget of evaluations; reward = -f (times `sign`)."""
    iterations = evaluations // candidates_per_iteration(config)
    strategy = make_strategy(config, len(optimum), seed, iterations)
    state = strategy.init()
    while state.iteration < iterations:
        candidates = strategy.ask(state).astype(np.float64)
        state = strategy.tell(state, -sign * f(candidates, optimum))
    return float(f(state.center[None], optimum)[0])


def config_for(name: str, **overrides) -> StrategySection:
    # ES-family step sizes decay (cosine) so the center settles; CMA-ES adapts its own step size.
    base = dict(population=16, sigma=0.1, learning_rate=0.05, sigma_schedule="cosine",
                learning_rate_schedule="cosine", final_fraction=0.1)
    return StrategySection(**(base | STRATEGIES[name] | overrides))


CASES = [  # function, optimum, overrides, threshold as a fraction of f at the start (offset 0)
    (sphere, np.linspace(-1, 1, 20), {}, 1e-3),
    (rotated_ellipsoid, np.linspace(-1, 1, 10), {}, 1e-2),
    # f(0) = 20 is a local minimum of Rastrigin: only a wide, shrinking search escapes it.
    (rastrigin, np.full(5, 2.0), {"sigma": 1.0, "learning_rate": 0.2, "final_fraction": 0.05}, 0.25),
]


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("f, optimum, overrides, threshold", CASES, ids=[c[0].__name__ for c in CASES])
def test_converges_on_standard_test_functions(name, f, optimum, overrides, threshold):
    if name.endswith("cma") and f is rastrigin:
        overrides = {"sigma": 2.0}
    start = float(f(np.zeros((1, len(optimum))), optimum)[0])
    finals = [minimize(config_for(name, **overrides), f, optimum, seed) for seed in range(3)]
    assert np.mean(finals) < threshold * start, (finals, start)


def test_the_thresholds_fail_a_broken_strategy():
    # The same harness with the reward's sign flipped (a strategy that follows the wrong direction).
    start = float(sphere(np.zeros((1, 20)), np.linspace(-1, 1, 20))[0])
    for name in ("es", "cma"):
        final = minimize(config_for(name), sphere, np.linspace(-1, 1, 20), 0, sign=-1.0)
        assert final > start


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_round_trips_and_resumes_bit_for_bit(name):
    config, optimum = config_for(name, population=8), np.linspace(-1, 1, 12)
    strategy = make_strategy(config, 12, 0, 10)

    def advance(state, steps):
        for _ in range(steps):
            state = strategy.tell(state, -sphere(strategy.ask(state).astype(np.float64), optimum))
        return state

    state = advance(strategy.init(), 3)
    restored = strategy.restore({k: np.array(v) for k, v in state.to_arrays().items()})
    assert restored.iteration == state.iteration
    a, b = advance(state, 3), advance(restored, 3)
    assert np.array_equal(a.center, b.center)
    assert all(np.array_equal(x, y) for x, y in zip(a.to_arrays().values(), b.to_arrays().values()))
    assert np.array_equal(strategy.ask(a), strategy.ask(b))


@pytest.mark.parametrize("name", STRATEGIES)
def test_workers_sharing_seed_and_rewards_stay_identical(name):
    """Two workers evaluate half the candidates each and exchange only rewards."""
    config, optimum = config_for(name, population=8), np.linspace(-1, 1, 12)
    workers = [make_strategy(config, 12, 7, 10) for _ in range(2)]
    states = [w.init() for w in workers]
    for _ in range(4):
        asked = [w.ask(s) for w, s in zip(workers, states)]
        assert np.array_equal(asked[0], asked[1])
        half = len(asked[0]) // 2
        rewards = np.concatenate([-sphere(asked[0][:half].astype(np.float64), optimum),
                                  -sphere(asked[1][half:].astype(np.float64), optimum)])
        states = [w.tell(s, rewards) for w, s in zip(workers, states)]
    assert np.array_equal(states[0].center, states[1].center)
    other_seed = make_strategy(config, 12, 8, 10)
    assert not np.array_equal(other_seed.ask(other_seed.init()), workers[0].ask(workers[0].init()))


def test_noise_is_a_pure_function_of_seed_stream_iteration_member():
    assert np.array_equal(noise(3, 7, 2, 50), noise(3, 7, 2, 50))
    for other in (noise(3, 7, 3, 50), noise(3, 8, 2, 50), noise(4, 7, 2, 50), noise(3, 7, 2, 50, stream=1)):
        assert not np.array_equal(noise(3, 7, 2, 50), other)


def test_antithetic_pairs():
    es = ES(StrategySection(population=6, sigma=0.1), 20, 0, 10)
    d = es.directions(0, 6)
    assert np.array_equal(d[:3], -d[3:])
    assert es.ask(es.init()).shape == (6, 20)


def test_fitness_shaping():
    r = np.array([3.0, 1.0, 2.0, 2.0])
    ranks = shape_fitness(r, "centered_rank")
    assert ranks[0] == 0.5 and ranks[1] == -0.5 and ranks[2] == ranks[3]
    assert abs(ranks.sum()) < 1e-12
    z = shape_fitness(r, "zscore")
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12
    assert not shape_fitness(np.ones(4), "centered_rank").any()
    assert not shape_fitness(np.ones(4), "zscore").any()


def test_schedules_decay_from_the_initial_to_the_final_fraction():
    assert scheduled(0.5, "constant", 0.1, 9, 10) == 0.5
    for kind in ("linear", "cosine"):
        values = [scheduled(0.5, kind, 0.1, t, 10) for t in range(12)]
        assert values[0] == pytest.approx(0.5) and values[9] == pytest.approx(0.05) and values[11] == values[9]
        assert all(a >= b for a, b in zip(values, values[1:]))
    assert scheduled(1.0, "cosine", 0.0, 5, 11) == pytest.approx(0.5)
    es = ES(StrategySection(population=4, sigma=1.0, sigma_schedule="linear", final_fraction=0.5), 3, 0, 3)
    state = es.init()
    spreads = []
    for _ in range(3):
        spreads.append(np.abs(es.ask(state) - state.center).max() / np.abs(es.directions(state.iteration, 4)).max())
        state = es.tell(state, np.arange(4.0))
    assert spreads == pytest.approx([1.0, 0.75, 0.5], rel=1e-5)


@pytest.mark.parametrize("optimizer, lr", [("adam", 0.05), ("sgd", 0.02)])
def test_es_converges_with_each_optimizer_and_fitness_shaping(optimizer, lr):
    optimum = np.linspace(-1, 1, 20)
    for shaping in ("zscore", "centered_rank"):
        config = StrategySection(name="es", population=16, sigma=0.1, learning_rate=lr, optimizer=optimizer,
                                 fitness_shaping=shaping)
        assert minimize(config, sphere, optimum, 0, 2400) < 0.05 * float((optimum**2).sum())


def test_weight_decay_pulls_toward_the_initial_adapter():
    optimum = np.full(10, 5.0)
    configs = {decay: StrategySection(name="es", population=8, sigma=0.1, learning_rate=0.5, optimizer="sgd",
                                      weight_decay=decay) for decay in (0.0, 0.5)}
    final = {decay: minimize(config, sphere, optimum, 0, 320) for decay, config in configs.items()}
    assert final[0.5] > final[0.0]  # held back from the optimum


def test_essam_probes_against_the_reward_direction_then_updates_the_center():
    essam = make_strategy(StrategySection(name="essam", population=8, sharpness_population=4, sigma=0.1, rho=0.5,
                                          optimizer="sgd", learning_rate=0.1), 6, 0, 10)
    state = essam.init()
    first = essam.ask(state)
    assert first.shape == (4, 6)
    gain = np.arange(6.0)  # reward = gain · x: the reward direction is +gain
    state = essam.tell(state, first.astype(np.float64) @ gain)
    assert state.iteration == 0 and state.phase == 1 and not state.center.any()
    assert np.linalg.norm(state.probe) == pytest.approx(0.5)
    assert state.probe @ gain < 0  # against the reward
    second = essam.ask(state)
    assert second.shape == (8, 6) and np.allclose(second.mean(0), state.probe, atol=1e-6)
    state = essam.tell(state, second.astype(np.float64) @ gain)
    assert state.iteration == 1 and state.phase == 0 and state.center @ gain > 0


def test_cma_uses_a_full_covariance_up_to_the_documented_size_then_the_diagonal():
    auto = StrategySection(name="cma")
    assert isinstance(make_strategy(auto, 16, 0, 1), CMA)
    assert make_strategy(auto, FULL_COVARIANCE_MAX_DIM, 0, 1).library.__name__ == "CMA"
    assert make_strategy(auto, FULL_COVARIANCE_MAX_DIM + 1, 0, 1).library.__name__ == "SepCMA"
    full = StrategySection(name="cma", covariance="full")
    assert make_strategy(full, FULL_COVARIANCE_MAX_DIM + 1, 0, 1).library.__name__ == "CMA"


def test_cma_starts_at_zero_offset_with_the_recipe_population():
    cma = make_strategy(StrategySection(name="cma", population=12, sigma=0.3), 5, 0, 1)
    state = cma.init()
    assert not state.center.any()
    candidates = cma.ask(state)
    assert candidates.shape == (12, 5) and 0.1 < candidates.std() < 0.6


def test_make_strategy_by_name():
    assert isinstance(make_strategy(StrategySection(), 4, 0, 1), CMA)  # the default, chosen in docs/strategies.md
    assert isinstance(make_strategy(StrategySection(name="es"), 4, 0, 1), ES)
    assert isinstance(make_strategy(StrategySection(name="essam"), 4, 0, 1), ESSAM)
