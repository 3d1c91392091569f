"""Advantages: masked statistics, GAE, per-token rewards and REINFORCE-family baselines.

Conventions shared by every function here:

- Token tensors are (B, T); ``mask`` is float or bool (B, T), 1/True on response tokens.
  Masked reductions select valid entries with ``torch.where``, so padded positions are
  ignored exactly, whatever they hold (nan and inf included). Token-level outputs are 0
  at padded positions.
- Sequence-level returns ``R`` are (B,). Grouped estimators (group mean, RLOO, GRPO)
  expect the samples of one prompt to be contiguous rows: rows [0:G] are the G samples
  of prompt 0, rows [G:2G] those of prompt 1, and so on (what
  ``prompts.repeat_interleave(G, dim=0)`` produces). B must be a multiple of G.
- These are targets for the loss: pass detached values and rewards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "batch_mean_baseline",
    "gae",
    "group_mean_baseline",
    "grpo_advantages",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
]


# ---------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------


def _select(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x where valid, exact 0 elsewhere (nan/inf at padded positions do not leak)."""
    return torch.where(valid, x, torch.zeros_like(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over valid entries: sum(mask * x) / sum(mask).

    Args:
        x: values.                                        # (B, T) (any shape)
        mask: 1/True where x counts.                      # same shape as x
        dim: reduce over this dim, or over everything if None.

    Returns:
        A scalar (dim=None) or x reduced over ``dim``. A slice without valid entries
        gives 0, not nan.
    """
    valid = mask.bool()
    count = valid.sum() if dim is None else valid.sum(dim)
    total = _select(x, valid).sum() if dim is None else _select(x, valid).sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all valid entries (a scalar).

        var = sum(mask * (x - mean)^2) / (n - 1)     if unbiased (Bessel, as torch.var)
        var = sum(mask * (x - mean)^2) / n           otherwise

    with n = sum(mask). The denominator is floored at 1, so one (or no) valid entry
    gives variance 0 instead of nan.

    Args:
        x: values.                                        # (B, T) (any shape)
        mask: 1/True where x counts.                      # same shape as x
        unbiased: Bessel's correction.

    Returns:
        The variance.                                     # ()
    """
    valid = mask.bool()
    mean = masked_mean(x, valid)
    sq_dev = _select((x - mean).square(), valid).sum()
    n = valid.sum()
    denom = (n - 1) if unbiased else n
    return sq_dev / denom.clamp(min=1).to(sq_dev.dtype)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalize x over its valid entries to unit variance (and zero mean).

        out = (x - mean) / sqrt(var + eps)            shift_mean=True (advantage whitening)
        out = (x - mean) / sqrt(var + eps) + mean     shift_mean=False (reward whitening)

    mean and the unbiased var are taken over all valid entries of the batch (masked_mean,
    masked_var) unless given: ``distributed.BatchStats.whiten`` passes those of the global
    batch of all processes. shift_mean=False rescales without moving the mean, the "reward
    whitening without shifting the mean" of Huang et al. 2022, "The N+ implementation
    details of RLHF with PPO": subtracting the mean from rewards would change the
    incentive for response length. Padded positions are 0 in the output.

    Args:
        x: values.                                        # (B, T)
        mask: 1/True on valid entries.                    # (B, T)
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance.
        mean, var: the statistics to whiten with (default: x's own over ``mask``).  # ()

    Returns:
        Whitened values, 0 at padded positions.           # (B, T)
    """
    valid = mask.bool()
    if mean is None:
        mean = masked_mean(x, valid)
    if var is None:
        var = masked_var(x, valid, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _select(out, valid)


# ---------------------------------------------------------------------------------------
# PPO: per-token rewards and GAE
# ---------------------------------------------------------------------------------------


def _last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """Index of the last True in each row.                # (B, T) bool -> (B,) long"""
    positions = torch.arange(valid.shape[-1], device=valid.device)
    return torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=-1)


def per_token_rewards(
    scores: torch.Tensor,
    kl_per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """Per-token PPO reward: a KL penalty on every token, the score on the last one.

        r_t = -beta * kl_t + [t == last valid token] * score

    as in Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022). Pass k1 as
    ``kl_per_token`` (see ``rlhflab.kl``: k1 belongs in the reward). The last valid token
    of a row is the last position where mask is 1, which for a right-padded response mask
    starting at position 0 is ``mask.sum(1) - 1``.

    Args:
        scores: reward-model score per sequence.          # (B,)
        kl_per_token: per-token KL estimate (k1).         # (B, T)
        mask: 1/True on response tokens; every row needs at least one.  # (B, T)
        beta: KL coefficient.

    Returns:
        Rewards, 0 at padded positions.                   # (B, T)

    Raises:
        ValueError: if a row has no valid token (its score would be lost).
    """
    valid = mask.bool()
    last = _last_valid_index(valid)
    if bool((last < 0).any()):
        raise ValueError("per_token_rewards: every row of mask needs at least one valid token")
    rewards = _select(-beta * kl_per_token, valid)
    positions = torch.arange(valid.shape[-1], device=valid.device)
    is_last = positions == last[:, None]  # (B, T), one True per row
    score_t = torch.where(is_last, scores.to(rewards.dtype)[:, None], torch.zeros_like(rewards))
    return rewards + score_t


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation").

        delta_t = r_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V_t                            (value-function target)

    where t' is the next *valid* position after t; after the last valid token of a row
    V_{t'} = A_{t'} = 0 (the episode ends: no bootstrap). Recursing over valid tokens only
    means masked positions, wherever they sit (right padding, a left prompt part, holes),
    contribute nothing: their rewards and values are never read. For a right-padded mask
    this equals the usual loop over t with zeros past the end.

    Special cases: lam = 1 gives A_t = (discounted return-to-go) - V_t; lam = 0 gives the
    one-step TD error.

    Args:
        rewards: per-token rewards (KL penalty and final score included, see
            ``per_token_rewards``).                       # (B, T)
        values: value estimates V(s_t), detached.         # (B, T)
        mask: 1/True on response tokens.                  # (B, T)
        gamma: discount.
        lam: GAE lambda.

    Returns:
        (advantages, returns), both 0 at masked positions.  # (B, T), (B, T)
    """
    valid = mask.bool()
    rewards = _select(rewards, valid)
    values = _select(values, valid)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V at the next valid token
    next_adv = torch.zeros_like(values[:, 0])  # (B,) A at the next valid token
    zero = torch.zeros_like(next_adv)
    advs_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        valid_t = valid[:, t]
        advs_reversed.append(torch.where(valid_t, adv, zero))
        # Carry the bootstrap across masked positions unchanged.
        next_value = torch.where(valid_t, values[:, t], next_value)
        next_adv = torch.where(valid_t, adv, next_adv)
    advantages = torch.stack(advs_reversed[::-1], dim=1)
    returns = _select(advantages + values, valid)
    return advantages, returns


# ---------------------------------------------------------------------------------------
# REINFORCE family: sequence-level baselines
# ---------------------------------------------------------------------------------------


def _grouped(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B // G, G), checking the layout."""
    if returns.dim() != 1:
        raise ValueError(f"returns must be 1-D (B,), got shape {tuple(returns.shape)}")
    if group_size < 1 or returns.numel() % group_size != 0:
        raise ValueError(
            f"batch size {returns.numel()} is not a multiple of group_size {group_size}"
        )
    return returns.view(-1, group_size)


def batch_mean_baseline(
    returns: torch.Tensor, *, mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean
) -> torch.Tensor:
    """REINFORCE with the batch mean as baseline: A_i = R_i - mean_j R_j.

    Williams 1992; the simplest variance reduction, as in the REINFORCE baselines of
    Ahmadian et al. 2024.

    Args:
        returns: sequence-level returns R.                # (B,)
        mean: the batch mean; ``distributed.BatchStats.mean`` spans every process's rows.

    Returns:
        Advantages.                                       # (B,)
    """
    return returns - mean(returns)


def group_mean_baseline(returns: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE with a per-prompt baseline: A_i = R_i - mean of R over i's group.

    Rows are grouped contiguously: rows [kG:(k+1)G] are the G samples of prompt k.

    Args:
        returns: sequence-level returns R.                # (B,), B = n_prompts * G
        group_size: G, samples per prompt.

    Returns:
        Advantages.                                       # (B,)
    """
    grouped = _grouped(returns, group_size)  # (B // G, G)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs").

        A_i = R_i - 1/(k-1) * sum_{j != i} R_j  =  k/(k-1) * (R_i - mean_group(R))

    The baseline of sample i does not depend on R_i, so the estimator stays unbiased.
    Rows are grouped contiguously by prompt (rows [0:k] are prompt 0's samples).

    Args:
        returns: sequence-level returns R.                # (B,), B = n_prompts * k
        k: samples per prompt, >= 2.

    Returns:
        Advantages.                                       # (B,)
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got k={k}")
    return group_mean_baseline(returns, k) * (k / (k - 1))


def grpo_advantages(
    returns: torch.Tensor,
    group_size: int,
    *,
    scale_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages.

        GRPO     (Shao et al. 2024, DeepSeekMath):  A_i = (R_i - mean_g) / (std_g + eps)
        Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"):
                                                    A_i =  R_i - mean_g   (scale_std=False)

    std_g is the unbiased (Bessel-corrected) standard deviation of the group, like
    ``torch.std`` in the GRPO reference implementations. A group whose rewards are all
    equal gets advantages 0 (no nan). Rows are grouped contiguously by prompt.

    Args:
        returns: sequence-level returns R.                # (B,), B = n_prompts * G
        group_size: G, samples per prompt, >= 2.
        scale_std: divide by the group std (GRPO) or not (Dr. GRPO).
        eps: added to the std.

    Returns:
        Advantages.                                       # (B,)
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs group_size >= 2, got {group_size}")
    grouped = _grouped(returns, group_size)  # (B // G, G)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_std:
        adv = adv / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    return adv.reshape(-1)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    whiten: Callable[..., torch.Tensor] = masked_whiten,
) -> torch.Tensor:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for
    Aligning Large Language Models").

        G_t = sum_{s >= t, valid} gamma^(s-t) * r_s       (returns-to-go, gamma = 1)
        A_t = (G_t - mean(G)) / sqrt(var(G) + eps)        (whitened over the batch)

    The KL penalty lives in the per-token rewards (``per_token_rewards`` with k1); the
    mean and unbiased variance are global over all valid tokens of the batch, with no
    per-prompt baseline and no critic.

    Args:
        token_rewards: per-token rewards.                 # (B, T)
        mask: 1/True on response tokens.                  # (B, T)
        gamma: discount (1 in the paper).
        eps: added to the variance in the whitening.
        whiten: ``masked_whiten``, or ``distributed.BatchStats.whiten`` for the statistics
            of every process's tokens.

    Returns:
        Advantages, 0 at padded positions.                # (B, T)
    """
    # GAE with V = 0 and lam = 1 is exactly the discounted return-to-go over valid tokens.
    returns_to_go, _ = gae(
        token_rewards, torch.zeros_like(token_rewards), mask, gamma=gamma, lam=1.0
    )
    return whiten(returns_to_go, mask, shift_mean=True, eps=eps)


def reinforce_pp_baseline_advantages(
    scores: torch.Tensor,
    kl_per_token: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    *,
    beta: float,
    gamma: float = 1.0,
    eps: float = 1e-8,
    whiten: Callable[..., torch.Tensor] = masked_whiten,
) -> torch.Tensor:
    """REINFORCE++-baseline advantages (Hu et al. 2025, "REINFORCE++"; OpenRLHF's
    ``reinforce_baseline`` estimator): the prompt's mean score as the baseline, then
    REINFORCE++'s token returns normalized over the global batch.

        s'_i = score_i - mean of the scores of i's group            (group_mean_baseline)
        r_t  = -beta * kl_t + [t == last valid token] * s'_i        (per_token_rewards)
        G_t  = sum_{s >= t, valid} gamma^(s-t) * r_s
        A_t  = (G_t - mean(G)) / sqrt(var(G) + eps)                 over every valid token

    The baseline is taken on the scores alone: the KL penalty stays per token, outside it
    (as in OpenRLHF). The group mean removes each prompt's difficulty (a prompt whose samples
    all score high teaches nothing), which a global whitening alone cannot; the whitening
    then sets one scale for the batch, robust to the reward's scale. Rows are grouped
    contiguously by prompt (rows [0:G] are prompt 0's samples).

    Args:
        scores: reward per sequence.                      # (B,), B = n_prompts * G
        kl_per_token: per-token KL estimate (k1).         # (B, T)
        mask: 1/True on response tokens.                  # (B, T)
        group_size: G, samples per prompt, >= 2.
        beta: KL coefficient (0: the KL is in the loss).
        gamma: discount (1 in the paper).
        eps: added to the variance in the whitening.
        whiten: ``masked_whiten``, or ``distributed.BatchStats.whiten`` for the statistics
            of every process's tokens.

    Returns:
        Advantages, 0 at padded positions.                # (B, T)
    """
    if group_size < 2:
        raise ValueError(f"REINFORCE++-baseline needs group_size >= 2, got {group_size}")
    centered = group_mean_baseline(scores, group_size)
    rewards = per_token_rewards(centered, kl_per_token, mask, beta=beta)
    return reinforce_pp_advantages(rewards, mask, gamma=gamma, eps=eps, whiten=whiten)
