"""The REINFORCE family: REINFORCE with a baseline, RLOO, REINFORCE++ and
REINFORCE++-baseline. No critic.

    REINFORCE  (Williams 1992; Ahmadian et al. 2024)
        R_i = score_i - beta * sum_t k1_it           (KL in the sequence reward)
        A_i = R_i - mean_batch(R)   or   R_i - mean_group(R)           (rl.baseline)
        loss = -(1/N) sum_i A_i * sum_t log pi(y_it)                   (loss_agg seq_sum)

    RLOO  (Ahmadian et al. 2024, "Back to Basics")
        k samples per prompt, A_i = R_i - mean of the other k - 1 samples' R

    For both, ``rl.whiten_advantages=true`` normalizes the sequence advantages over the
    global batch of sequences, A <- (A - mean) / std (off by default, as in the papers; TRL's
    RLOO ``normalize_advantages``).

    REINFORCE++  (Hu 2025)
        r_t = -beta * k1_t (+ score on the last token), G_t = sum_{s >= t} r_s
        A_t = (G_t - mean(G)) / std(G) over all tokens of the global batch
        clipped surrogate over minibatches (loss_agg token_mean)

    REINFORCE++-baseline  (Hu et al. 2025; OpenRLHF's reinforce_baseline)
        REINFORCE++ with score_i - mean of its prompt's scores on the last token

Which one a run trains is its registry entry's ``estimator`` (and, for RLOO and
REINFORCE++-baseline, ``baseline``) in ``rlhflab.registry.ONLINE_ALGORITHMS``. The two
REINFORCE++ variants whiten by definition: ``rl.whiten_advantages=false`` is an error there
(``algos.rl_config``).

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

from rlhflab.advantages import (
    per_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
)
from rlhflab.algos.online import OnlineRun
from rlhflab.algos.update import UpdateBatch
from rlhflab.distributed import BatchStats
from rlhflab.kl import kl_estimate
from rlhflab.registry import ONLINE_ALGORITHMS, SEQUENCE_BASELINES


def sequence_returns(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     mask: torch.Tensor, *, beta: float, kl_estimator: str = "k1",
                     kl_clip: float | None = None) -> torch.Tensor:
    """R_i = score_i - beta * sum_t k_it, the KL-regularized return of each sequence.  # (B,)"""
    kl = kl_estimate(kl_estimator, logprobs, ref_logprobs, cap=kl_clip)
    return per_token_rewards(scores, kl, mask, beta=beta).sum(-1)


def sequence_advantages(R: torch.Tensor, baseline: str, group_size: int, stats: BatchStats) -> torch.Tensor:
    """A = R - baseline (``registry.SEQUENCE_BASELINES``): a grouped baseline reads the G
    samples of each prompt, which sit on one process; the batch mean spans every process.  # (B,)"""
    fn = SEQUENCE_BASELINES[baseline]
    if SEQUENCE_BASELINES.entry(baseline).options["grouped"]:
        return fn(R, group_size)
    return fn(R, mean=stats.mean)


def reinforce_advantages(scores, logprobs, ref_logprobs, mask, *, baseline: str, group_size: int, beta: float,
                         kl_in_reward: bool = True, kl_estimator: str = "k1", kl_clip: float | None = None,
                         whiten: bool = False, stats: BatchStats | None = None) -> torch.Tensor:
    """Sequence advantages broadcast over each response's tokens; ``whiten``: normalized
    first over the sequences of the global batch, A <- (A - mean) / sqrt(var + 1e-8).   # (B, T)"""
    stats = stats or BatchStats()
    R = sequence_returns(scores, logprobs, ref_logprobs, mask, beta=beta if kl_in_reward else 0.0,
                         kl_estimator=kl_estimator, kl_clip=kl_clip)
    A = sequence_advantages(R, baseline, group_size, stats)
    if whiten:
        A = stats.whiten(A, torch.ones_like(A))
    return A[:, None] * mask


def reinforce_pp_token_advantages(scores, logprobs, ref_logprobs, mask, *, beta: float, kl_in_reward: bool = True,
                                  kl_estimator: str = "k1", kl_clip: float | None = None, gamma: float = 1.0,
                                  group_size: int | None = None, stats: BatchStats | None = None) -> torch.Tensor:
    """REINFORCE++ token advantages of a batch: ``advantages.reinforce_pp_advantages`` on
    the per-token rewards, whitened with the mean and variance of every process's tokens;
    with ``group_size``, REINFORCE++-baseline's (``advantages.reinforce_pp_baseline_advantages``:
    each score less its group's mean first).  # (B, T)"""
    kl = kl_estimate(kl_estimator, logprobs, ref_logprobs, cap=kl_clip)
    whiten = (stats or BatchStats()).whiten
    beta = beta if kl_in_reward else 0.0
    if group_size is not None:
        return reinforce_pp_baseline_advantages(scores, kl, mask, group_size, beta=beta, gamma=gamma, whiten=whiten)
    return reinforce_pp_advantages(per_token_rewards(scores, kl, mask, beta=beta), mask, gamma=gamma, whiten=whiten)


def train_reinforce(run: OnlineRun) -> dict:
    """REINFORCE, RLOO, REINFORCE++ or REINFORCE++-baseline, as ``run.algo``'s registry entry says."""
    rl = run.rl
    options = ONLINE_ALGORITHMS.entry(run.algo).options
    token_returns = options["estimator"] == "token_returns"   # REINFORCE++ (-baseline: with a baseline)
    baseline = options.get("baseline") or rl.baseline         # RLOO's or REINFORCE++-baseline's own, or rl.baseline
    kl = dict(kl_in_reward=rl.kl_in == "reward", kl_estimator=rl.kl_estimator, kl_clip=rl.kl_clip, stats=run.stats)
    for step in run.steps():
        ro = run.rollout(step)
        beta = run.kl_ctl.value
        if token_returns:
            advantages = reinforce_pp_token_advantages(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, beta=beta,
                                                       gamma=rl.gamma, group_size=ro.group_size if baseline else None,
                                                       **kl)
        else:
            advantages = reinforce_advantages(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, baseline=baseline,
                                              group_size=ro.group_size, beta=beta, whiten=rl.whiten_advantages, **kl)
        batch = UpdateBatch.from_rollout(ro, advantages=advantages,
                                         ref_logprobs=ro.ref_logprobs if rl.kl_in == "loss" else None)
        metrics = run.update(step, batch)
        seq_adv = advantages.sum(-1) / ro.mask.sum(-1).clamp(min=1)
        run.end_step(step, ro, metrics, {"objective/advantage_abs_mean": float(run.stats.mean(seq_adv.abs()))})
    return run.finish()
