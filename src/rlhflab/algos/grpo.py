"""GRPO (Shao et al. 2024, DeepSeekMath) and Dr. GRPO (Liu et al. 2025).

    G samples per prompt; R_i = score_i
    A_i  = (R_i - mean_group(R)) / (std_group(R) + eps)     GRPO
    A_i  =  R_i - mean_group(R)                              Dr. GRPO (rl.scale_std=false)
    loss = agg_t[ clipped surrogate(A_i) + beta * k3_t ]
      agg = per-sequence mean, then mean over sequences     GRPO (loss_agg seq_mean)
      agg = sum / (N_seqs * max_new_tokens)                 Dr. GRPO (loss_agg constant)

Options: asymmetric clipping (``rl.clip_eps_high``, DAPO's clip-higher), any KL
estimator in the loss, or the KL in the reward instead (``rl.kl_in=reward``:
R_i = score_i - beta * sum_t k1_t, then the group advantages).

What the exact-optimum bandit shows (docs/online-rl.md): the default GRPO does not
optimize the KL-regularized objective (whose optimum is pi*, rlhflab.optimal). The k3 loss's gradient
is that of the forward KL(pi_ref || pi), and the std scaling multiplies each prompt's
reward by 1/std_group, i.e. changes beta per prompt; the group mean includes the sample
itself, which shrinks the reward gradient by (1 - 1/G) against an unshrunk KL term. The
configuration with k2 in the loss, no std scaling and beta scaled by (G-1)/G, or the KL
in the reward, targets pi*.
"""

from __future__ import annotations

import torch

from rlhflab.advantages import grpo_advantages
from rlhflab.algos.online import OnlineRun
from rlhflab.algos.reinforce import sequence_returns
from rlhflab.algos.update import UpdateBatch


def grpo_token_advantages(scores, logprobs, ref_logprobs, mask, *, group_size: int, scale_std: bool = True,
                          beta: float = 0.0, kl_in_reward: bool = False, kl_estimator: str = "k1",
                          kl_clip: float | None = None) -> torch.Tensor:
    """Group-relative sequence advantages broadcast over each response's tokens.   # (B, T)

    Groups are local to a prompt, so no statistics cross processes."""
    R = sequence_returns(scores, logprobs, ref_logprobs, mask, beta=beta, kl_estimator=kl_estimator,
                         kl_clip=kl_clip) if kl_in_reward else scores
    return grpo_advantages(R, group_size, scale_std=scale_std)[:, None] * mask


def train_grpo(run: OnlineRun) -> dict:
    rl = run.rl
    for step in run.steps():
        ro = run.rollout(step)
        beta = run.kl_ctl.value
        advantages = grpo_token_advantages(
            ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, group_size=ro.group_size, scale_std=rl.scale_std,
            beta=beta, kl_in_reward=rl.kl_in == "reward", kl_estimator=rl.kl_estimator, kl_clip=rl.kl_clip)
        batch = UpdateBatch.from_rollout(ro, advantages=advantages,
                                         ref_logprobs=ro.ref_logprobs if rl.kl_in == "loss" else None)
        metrics = run.update(step, batch)
        groups = ro.scores.view(-1, ro.group_size)
        solved = (groups.std(dim=1) == 0).float()  # groups with no learning signal
        run.end_step(step, ro, metrics, {"grpo/zero_std_frac": float(run.stats.mean(solved))})
    return run.finish()
