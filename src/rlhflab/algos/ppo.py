"""PPO with a KL penalty, as in InstructGPT (Ouyang et al. 2022) and Ziegler et al. 2019,
with the implementation details of Huang et al. 2022 ("The N+ implementation details of
RLHF with PPO").

Per rollout step:

    r_t   = -beta * k1_t  (+ score on the last response token)      per_token_rewards
    r_t  <- r_t / std(r)  (optional; the mean is kept)               BatchStats.whiten
    A, R  = GAE(r, V; gamma, lambda)                                 advantages.gae
    A    <- (A - mean) / std                                         BatchStats.whiten
    epochs x minibatches of  clipped surrogate + vf_coef * clipped value loss
                             (- entropy bonus), gradient clipping    update.update_policy

Where this departs from the papers:

- The critic is a separate model (the SFT backbone with a zero-initialised scalar head,
  or the reward model's backbone and head), not a value head on the policy: no
  interference between the two losses, at the price of a second model in memory.
- Beta is updated once per rollout batch with the batch's mean sequence KL (fixed,
  linear or the adaptive controller of Ziegler et al.), not per minibatch.
- ``rl.kl_in=loss`` moves the KL out of the reward into the loss (k2 or k3); the
  InstructGPT setting is the default, k1 in the reward.
- No pretraining-mix term (PPO-ptx).
"""

from __future__ import annotations

import copy

import torch

from rlhflab.advantages import gae, per_token_rewards
from rlhflab.algos.online import OnlineRun
from rlhflab.algos.update import UpdateBatch
from rlhflab.distributed import BatchStats
from rlhflab.kl import kl_estimate


class ValueModel(torch.nn.Module):
    """Critic V(x, y_<t): a transformer backbone and a scalar head on every position."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int, head: torch.nn.Linear | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        if head is None:
            head = torch.nn.Linear(hidden_size, 1)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
        self.head = head

    @classmethod
    def from_causal_lm(cls, lm: torch.nn.Module) -> ValueModel:
        """A copy of the LM's backbone (``base_model``: GPT2Model, LlamaModel, ...) with a
        zero-initialised head, so V = 0 at the start and the first advantages are the
        returns themselves."""
        return cls(copy.deepcopy(lm.base_model), lm.config.hidden_size)

    @classmethod
    def from_reward_model(cls, rm, tokenizer) -> ValueModel:
        """The first member of a ``RewardModel``: its backbone, and its head with the
        reward normalization folded in (V = gain * head(h) + bias), so the critic starts
        out predicting the normalized reward at every position. The reward model must
        share the policy's tokenizer: the critic reads the policy's token ids."""
        from rlhflab.errors import InputError
        from rlhflab.reward_model import reward_head

        if rm.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise InputError("value_init rm needs a reward model with the policy's tokenizer", field="rl.value_init")
        member = rm.members[0]
        old = reward_head(member)
        head = torch.nn.Linear(old.in_features, 1)
        with torch.no_grad():
            head.weight.copy_(rm.gains[0] * old.weight)
            bias = old.bias if old.bias is not None else torch.zeros(1)
            head.bias.copy_(rm.gains[0] * bias + rm.biases[0])
        backbone = copy.deepcopy(member.base_model)
        backbone.requires_grad_(True)
        return cls(backbone, member.config.hidden_size, head)

    def forward(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
        # a copy, not a view of the head's output: FSDP2 hooks its backward on the module's output
        # and warns that an in-place op on a view would skip it
        return self.head(hidden).squeeze(-1).to(torch.float32, copy=True)  # (B, T)


def ppo_advantages(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                   values: torch.Tensor, mask: torch.Tensor, *, beta: float, kl_in_reward: bool = True,
                   kl_estimator: str = "k1", kl_clip: float | None = None, gamma: float = 1.0, lam: float = 0.95,
                   whiten_rewards: bool = False, whiten_advantages: bool = True,
                   stats: BatchStats | None = None):
    """Per-token rewards, GAE advantages and value targets of one rollout batch.

    Args:
        scores: reward per sequence.                      # (B,)
        logprobs, ref_logprobs: of the sampled tokens.    # (B, T)
        values: critic at sampling time.                  # (B, T)
        mask: response tokens.                            # (B, T)
        beta: KL coefficient (used only when ``kl_in_reward``).
        kl_clip: cap on each token's KL estimate (``kl.cap_kl``), None = off.
        stats: global batch statistics (whitening); local if None.

    Returns:
        (advantages, returns, rewards), each (B, T), 0 on padding.
    """
    stats = stats or BatchStats()
    kl = kl_estimate(kl_estimator, logprobs, ref_logprobs, cap=kl_clip)
    rewards = per_token_rewards(scores, kl, mask, beta=beta if kl_in_reward else 0.0)
    if whiten_rewards:
        rewards = stats.whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = stats.whiten(advantages, mask)
    return advantages, returns, rewards


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       stats: BatchStats) -> float:
    """1 - Var[R - V] / Var[R] over response tokens: 1 = perfect critic, 0 = no better
    than a constant, < 0 = worse."""
    var_r = stats.masked_var(returns, mask)
    return float(1.0 - stats.masked_var(returns - values, mask) / var_r) if var_r > 0 else float("nan")


def train_ppo(run: OnlineRun) -> dict:
    rl = run.rl
    for step in run.steps():
        ro = run.rollout(step)
        beta = run.kl_ctl.value
        advantages, returns, rewards = ppo_advantages(
            ro.scores, ro.logprobs, ro.ref_logprobs, ro.values, ro.mask, beta=beta,
            kl_in_reward=rl.kl_in == "reward", kl_estimator=rl.kl_estimator, kl_clip=rl.kl_clip, gamma=rl.gamma,
            lam=rl.gae_lambda,
            whiten_rewards=rl.whiten_rewards, whiten_advantages=rl.whiten_advantages, stats=run.stats)
        batch = UpdateBatch.from_rollout(ro, advantages=advantages,
                                         ref_logprobs=ro.ref_logprobs if rl.kl_in == "loss" else None,
                                         returns=returns, old_values=ro.values)
        metrics = run.update(step, batch)
        run.end_step(step, ro, metrics, {
            "val/explained_var": explained_variance(ro.values, returns, ro.mask, run.stats),
            "val/mean": float(run.stats.masked_mean(ro.values, ro.mask)),
            "val/return_mean": float(run.stats.masked_mean(returns, ro.mask)),
        })
    return run.finish()
