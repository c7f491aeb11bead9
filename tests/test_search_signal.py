"""essa.search_signal: the diagnostics that say whether a search iteration can learn."""

import numpy as np

from essa.search_signal import population_signal, rank_correlation


def signal(members: np.ndarray, center: np.ndarray, member_digests=None, center_digests=None) -> dict:
    member_digests = np.zeros(members.shape, np.int64) if member_digests is None else member_digests
    center_digests = np.zeros(center.shape, np.int64) if center_digests is None else center_digests
    return population_signal(members, member_digests, center, center_digests)


def test_members_that_write_what_the_center_writes_have_no_signal():
    rewards = np.tile(np.array([0.0, 1.0, 0.5]), (4, 1))
    out = signal(rewards, rewards[0])
    assert out == {"center_reward": 0.5, "diverged_share": 0.0, "reward_se": 0.0, "reward_snr": 0.0}


def test_diverged_share_counts_rows_whose_completion_differs_from_the_centers():
    member_digests = np.array([[1, 2, 3, 4], [1, 9, 3, 9]])
    out = signal(np.zeros((2, 4)), np.zeros(4), member_digests, np.array([1, 2, 3, 4]))
    assert out["diverged_share"] == 2 / 8


def test_members_alike_but_for_chance_give_a_ratio_near_one():
    rng = np.random.default_rng(0)
    # prompt difficulty is shared by every member; each row adds noise of its own, no member is better
    difficulty = rng.uniform(0, 1, 4000)
    rewards = (rng.uniform(0, 1, (64, 4000)) < difficulty).astype(float)
    out = signal(rewards, difficulty)
    assert abs(out["reward_se"] - np.sqrt((difficulty * (1 - difficulty)).mean() / 4000)) < 2e-4
    assert 0.75 < out["reward_snr"] < 1.25


def test_members_that_differ_stand_out_of_the_noise():
    rng = np.random.default_rng(1)
    skill = np.linspace(0.2, 0.8, 16)[:, None]
    rewards = (rng.uniform(0, 1, (16, 256)) < skill).astype(float)
    assert signal(rewards, rewards.mean(0))["reward_snr"] > 5


def test_rank_correlation():
    assert rank_correlation(np.array([0.1, 0.2, 0.3]), np.array([1.0, 5.0, 9.0])) == 1.0
    assert rank_correlation(np.array([0.1, 0.2, 0.3]), np.array([9.0, 5.0, 1.0])) == -1.0
    assert rank_correlation(np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 1.0])) == 0.0
