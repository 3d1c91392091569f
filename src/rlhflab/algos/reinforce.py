"""The REINFORCE family: REINFORCE with a baseline, RLOO and REINFORCE++. No critic.

    REINFORCE  (Williams 1992; Ahmadian et al. 2024)
        R_i = score_i - beta * sum_t k1_it           (KL in the sequence reward)
        A_i = R_i - mean_batch(R)   or   R_i - mean_group(R)           (rl.baseline)
        loss = -(1/N) sum_i A_i * sum_t log pi(y_it)                   (loss_agg seq_sum)

    RLOO  (Ahmadian et al. 2024, "Back to Basics")
        k samples per prompt, A_i = R_i - mean of the other k - 1 samples' R

    REINFORCE++  (Hu 2025)
        r_t = -beta * k1_t (+ score on the last token), G_t = sum_{s >= t} r_s
        A_t = (G_t - mean(G)) / std(G) over all tokens of the global batch
        clipped surrogate over minibatches (loss_agg token_mean)

Where this departs from the papers: every variant goes through the same PPO-style update
(``online.update_policy``). With one epoch and one minibatch (the REINFORCE and RLOO
defaults) the ratio is exactly 1 and the clipped surrogate's gradient is the plain
REINFORCE gradient -A * grad log pi; REINFORCE++ defaults to two minibatches, so its
clipping is active on the second. The batch-mean baseline includes the sample itself,
which scales the expected gradient of the whole KL-regularized return by (1 - 1/B) and
so leaves its optimum unchanged.
"""

from __future__ import annotations

import torch

from rlhflab.advantages import gae, group_mean_baseline, per_token_rewards, rloo_advantages
from rlhflab.algos.online import BatchStats, OnlineRun, UpdateBatch
from rlhflab.kl import KL_ESTIMATORS


def sequence_returns(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     mask: torch.Tensor, *, beta: float, kl_estimator: str = "k1") -> torch.Tensor:
    """R_i = score_i - beta * sum_t k_it, the KL-regularized return of each sequence.  # (B,)"""
    kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs)
    return per_token_rewards(scores, kl, mask, beta=beta).sum(-1)


SEQUENCE_BASELINES = {
    "batch": lambda R, G, stats: R - stats.mean(R),
    "group": lambda R, G, stats: group_mean_baseline(R, G),
    "rloo": lambda R, G, stats: rloo_advantages(R, G),
}
"""Sequence advantage A = R - baseline, by name: fn(R (B,), group_size, stats) -> (B,)."""


def reinforce_advantages(scores, logprobs, ref_logprobs, mask, *, baseline: str, group_size: int, beta: float,
                         kl_in_reward: bool = True, kl_estimator: str = "k1",
                         stats: BatchStats | None = None) -> torch.Tensor:
    """Sequence advantages broadcast over each response's tokens.   # (B, T)"""
    stats = stats or BatchStats()
    R = sequence_returns(scores, logprobs, ref_logprobs, mask, beta=beta if kl_in_reward else 0.0,
                         kl_estimator=kl_estimator)
    A = SEQUENCE_BASELINES[baseline](R, group_size, stats)
    return A[:, None] * mask


def reinforce_pp_advantages(scores, logprobs, ref_logprobs, mask, *, beta: float, kl_in_reward: bool = True,
                            kl_estimator: str = "k1", gamma: float = 1.0,
                            stats: BatchStats | None = None) -> torch.Tensor:
    """REINFORCE++ token advantages, whitened over the global batch.   # (B, T)

    With one process this is ``advantages.reinforce_pp_advantages`` on the per-token
    rewards; with several, mean and variance span every process's tokens.
    """
    stats = stats or BatchStats()
    kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs)
    rewards = per_token_rewards(scores, kl, mask, beta=beta if kl_in_reward else 0.0)
    returns_to_go, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return stats.whiten(returns_to_go, mask)


def _kl_kwargs(rl, beta: float, stats: BatchStats) -> dict:
    return dict(beta=beta, kl_in_reward=rl.kl_in == "reward", kl_estimator=rl.kl_estimator, stats=stats)


VARIANTS = {
    "reinforce": lambda ro, rl, beta, stats: reinforce_advantages(
        ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, baseline=rl.baseline, group_size=ro.group_size,
        **_kl_kwargs(rl, beta, stats)),
    "rloo": lambda ro, rl, beta, stats: reinforce_advantages(
        ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, baseline="rloo", group_size=ro.group_size,
        **_kl_kwargs(rl, beta, stats)),
    "reinforce++": lambda ro, rl, beta, stats: reinforce_pp_advantages(
        ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, gamma=rl.gamma, **_kl_kwargs(rl, beta, stats)),
}
"""Token advantages (B, T) of a Rollout by algorithm name."""


def train_reinforce(run: OnlineRun) -> dict:
    """REINFORCE (``run.algo == "reinforce"``), RLOO (``"rloo"``) or REINFORCE++."""
    rl = run.rl
    for step in run.steps():
        ro = run.rollout(step)
        beta = run.kl_ctl.value
        advantages = VARIANTS[run.algo](ro, rl, beta, run.stats)
        batch = UpdateBatch(old_logprobs=ro.logprobs, advantages=advantages, mask=ro.mask,
                            ref_logprobs=ro.ref_logprobs if rl.kl_in == "loss" else None)
        metrics = run.update(step, batch, ro)
        seq_adv = advantages.sum(-1) / ro.mask.sum(-1).clamp(min=1)
        run.end_step(step, ro, metrics, {"objective/advantage_abs_mean": float(run.stats.mean(seq_adv.abs()))})
    return run.finish()
