"""Whether a search iteration can learn: how far its members' completions and rewards stand apart
from the center's, and from noise.

A strategy ranks members by their mean reward on one minibatch. That ranking carries information
only when (a) members generate something other than the center does (otherwise every reward is the
center's), and (b) the spread of their mean rewards exceeds what the minibatch alone would give
members that were all alike. Both are measured per iteration from what the evaluation already
returned (the center is evaluated as one more candidate of the population call):

- `diverged_share`: the share of member rows whose completion differs from the center's on the same
  prompt (a σ too small for the adapter's scale leaves it near 0);
- `reward_se`: the standard error of a member's mean reward from the minibatch alone: every member
  sees the same prompts, so a prompt's difficulty is common to all and only each member's departure
  from the prompt's mean across members is noise;
- `reward_snr`: the spread of members' mean rewards over that standard error. Members that differ
  only by chance give about 1; a ranking worth following needs clearly more, which more prompts per
  candidate (a smaller standard error) or a larger σ (a larger spread) buys.

In the diagnostic mode (`run.diagnose`), every member is also scored on the held-out prompts and
`rank_correlation` is Spearman's ρ between members' minibatch and held-out rewards: the direct
measure of whether the minibatch ranks members as the held-out set would.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def population_signal(members: np.ndarray, member_digests: np.ndarray, center: np.ndarray,
                      center_digests: np.ndarray) -> dict[str, float]:
    """Diagnostics of one population evaluation: `members` are rewards [member, prompt], `center` the
    center's [prompt]; digests identify each row's completion."""
    n_members, n_prompts = members.shape
    residual = members - members.mean(0, keepdims=True)
    # n_members - 1 degrees of freedom per prompt: the per-prompt mean was estimated from the members
    dof = max(n_members - 1, 1) * n_prompts
    se = float(np.sqrt((residual ** 2).sum() / dof / n_prompts))
    spread = float(members.mean(1).std(ddof=1)) if n_members > 1 else 0.0
    return {"center_reward": float(center.mean()),
            "diverged_share": float((member_digests != center_digests[None]).mean()),
            "reward_se": se,
            "reward_snr": spread / se if se > 0 else 0.0}


def rank_correlation(minibatch: np.ndarray, heldout: np.ndarray) -> float:
    """Spearman's ρ between members' minibatch and held-out mean rewards; 0 where either is constant
    (a ranking that says nothing)."""
    if np.ptp(minibatch) == 0 or np.ptp(heldout) == 0:
        return 0.0
    return float(spearmanr(minibatch, heldout).statistic)
