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

Which one a run trains is its registry entry's ``estimator`` (and, for RLOO, ``baseline``)
in ``rlhflab.registry.ONLINE_ALGORITHMS``.

Where this departs from the papers: every variant goes through the same PPO-style update
(``update.update_policy``). With one epoch and one minibatch (the REINFORCE and RLOO
defaults) the ratio is exactly 1 and the clipped surrogate's gradient is the plain
REINFORCE gradient -A * grad log pi; REINFORCE++ defaults to two minibatches, so its
clipping is active on the second. The batch-mean baseline includes the sample itself,
which scales the expected gradient of the whole KL-regularized return by (1 - 1/B) and
so leaves its optimum unchanged.
"""

from __future__ import annotations

import torch

from rlhflab.advantages import per_token_rewards, reinforce_pp_advantages
from rlhflab.algos.online import OnlineRun
from rlhflab.algos.update import UpdateBatch
from rlhflab.distributed import BatchStats
from rlhflab.kl import KL_ESTIMATORS
from rlhflab.registry import ONLINE_ALGORITHMS, SEQUENCE_BASELINES


def sequence_returns(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     mask: torch.Tensor, *, beta: float, kl_estimator: str = "k1") -> torch.Tensor:
    """R_i = score_i - beta * sum_t k_it, the KL-regularized return of each sequence.  # (B,)"""
    kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs)
    return per_token_rewards(scores, kl, mask, beta=beta).sum(-1)


def sequence_advantages(R: torch.Tensor, baseline: str, group_size: int, stats: BatchStats) -> torch.Tensor:
    """A = R - baseline (``registry.SEQUENCE_BASELINES``): a grouped baseline reads the G
    samples of each prompt, which sit on one process; the batch mean spans every process.  # (B,)"""
    fn = SEQUENCE_BASELINES[baseline]
    if SEQUENCE_BASELINES.entry(baseline).options["grouped"]:
        return fn(R, group_size)
    return fn(R, mean=stats.mean)


def reinforce_advantages(scores, logprobs, ref_logprobs, mask, *, baseline: str, group_size: int, beta: float,
                         kl_in_reward: bool = True, kl_estimator: str = "k1",
                         stats: BatchStats | None = None) -> torch.Tensor:
    """Sequence advantages broadcast over each response's tokens.   # (B, T)"""
    R = sequence_returns(scores, logprobs, ref_logprobs, mask, beta=beta if kl_in_reward else 0.0,
                         kl_estimator=kl_estimator)
    return sequence_advantages(R, baseline, group_size, stats or BatchStats())[:, None] * mask


def reinforce_pp_token_advantages(scores, logprobs, ref_logprobs, mask, *, beta: float, kl_in_reward: bool = True,
                                  kl_estimator: str = "k1", gamma: float = 1.0,
                                  stats: BatchStats | None = None) -> torch.Tensor:
    """REINFORCE++ token advantages of a batch: ``advantages.reinforce_pp_advantages`` on
    the per-token rewards, whitened with the mean and variance of every process's tokens.  # (B, T)"""
    kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs)
    rewards = per_token_rewards(scores, kl, mask, beta=beta if kl_in_reward else 0.0)
    return reinforce_pp_advantages(rewards, mask, gamma=gamma, whiten=(stats or BatchStats()).whiten)


def train_reinforce(run: OnlineRun) -> dict:
    """REINFORCE, RLOO or REINFORCE++, as ``run.algo``'s registry entry says."""
    rl = run.rl
    options = ONLINE_ALGORITHMS.entry(run.algo).options
    token_returns = options["estimator"] == "token_returns"   # REINFORCE++
    baseline = options.get("baseline") or rl.baseline         # RLOO's own, or rl.baseline
    kl = dict(kl_in_reward=rl.kl_in == "reward", kl_estimator=rl.kl_estimator, stats=run.stats)
    for step in run.steps():
        ro = run.rollout(step)
        beta = run.kl_ctl.value
        if token_returns:
            advantages = reinforce_pp_token_advantages(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, beta=beta,
                                                       gamma=rl.gamma, **kl)
        else:
            advantages = reinforce_advantages(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, baseline=baseline,
                                              group_size=ro.group_size, beta=beta, **kl)
        batch = UpdateBatch.from_rollout(ro, advantages=advantages,
                                         ref_logprobs=ro.ref_logprobs if rl.kl_in == "loss" else None)
        metrics = run.update(step, batch)
        seq_adv = advantages.sum(-1) / ro.mask.sum(-1).clamp(min=1)
        run.end_step(step, ro, metrics, {"objective/advantage_abs_mean": float(run.stats.mean(seq_adv.abs()))})
    return run.finish()
