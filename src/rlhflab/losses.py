"""Every loss of the pipeline as a pure function: tensors in, ``(loss, metrics)`` out.

``loss`` is a differentiable scalar tensor; ``metrics`` is a flat dict of python floats
with namespaced keys (``rm/...`` for reward models, ``rewards/...`` and ``logps/...`` for
the DPO family, the names TRL users read). Hyper-parameters are keyword arguments named
as in the papers. Losses average over the batch. Every form is numerically stable:
``-log sigmoid(x)`` is written ``softplus(-x)`` or ``-logsigmoid(x)``, never
``log(sigmoid(x))``.

Contents, top to bottom:

1. reward-model losses (Bradley and Terry 1952; Ouyang et al. 2022):
   ``bradley_terry_loss``, ``plackett_luce_loss``, and the regularizer
   ``input_gradient_penalty`` (the reward's gradient norm in its input embeddings);
2. paired preference losses on sequence log-probs (Rafailov et al. 2023 and its variants):
   ``dpo_loss``, ``cdpo_loss``, ``ipo_loss``, ``hinge_loss`` (use a frozen reference) and
   ``simpo_loss``, ``orpo_loss`` (reference-free, take response lengths instead);
3. the unpaired KTO loss: ``kto_reference_point``, ``kto_loss``;
4. the supervised loss ``sft_loss``;
5. online RL, per token on (B, T) tensors: PPO's ``clipped_surrogate`` (and
   ``dual_clipped_surrogate``, Ye et al. 2020) and ``clipped_value_loss``, the aggregations ``token_mean``, ``seq_sum``, ``seq_mean`` and
   ``constant_normalizer`` (``rlhflab.registry.LOSS_AGGREGATIONS``), the whole micro-batch
   loss ``policy_gradient_loss`` (surrogate + KL + value - entropy), and the token weights
   of truncated importance sampling for a sampler that differs from the trainer,
   ``truncated_importance_weights``. Online-RL losses return ``(loss, sums)``: token sums
   for metrics that the update reduces over micro-batches and processes.

The names users write for these (``dpo.loss``, ``rl.loss_agg``), with each loss's
hyper-parameters and whether it needs a reference, are registered in ``rlhflab.registry``.

Conventions for the DPO family: every ``*_logps`` input is the per-sequence SUM of token
log-probs over response tokens, shape ``(B,)``; ``*_lengths`` is the number of response
tokens, shape ``(B,)``. A paired loss is called ``fn(policy_chosen_logps,
policy_rejected_logps, a, b, **hparams)`` with (a, b) the reference's log-probs or, for the
reference-free ones, the lengths; KTO as ``fn(policy_logps, ref_logps, is_desirable,
kl_ref_point, **hparams)``. Two conventions of TRL are keyword options: IPO on per-token
log-ratios (``ipo_loss(normalize=True, chosen_lengths=, rejected_lengths=)``) and an NLL
pooled over all chosen tokens (``orpo_loss(nll="token")``, ``simpo_loss(nll_coef=)``, with
``chosen_length_mean=`` when the batch is part of a larger one); docs/dpo.md tables every
difference from TRL 1.16.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhflab.kl import kl_estimate
from rlhflab.registry import LOSS_AGGREGATIONS

Metrics = dict[str, float]
LossOutput = tuple[torch.Tensor, Metrics]


# --------------------------------------------------------------------------- helpers


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors are 1-D with the same shape (one value per pair)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        listed = ", ".join(f"{name}={s}" for name, s in shapes.items())
        raise ValueError(f"expected 1-D tensors of equal shape (B,), got {listed}")


def _mean(x: torch.Tensor) -> float:
    """Python float of the mean of a detached tensor (metrics never carry graphs)."""
    return x.detach().float().mean().item()


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i (plain mean when weights is None).

    Normalizing by the sum of weights (not by B) keeps the loss scale independent of how
    many pairs are down-weighted; a zero weight removes a pair. All-zero weights give 0.
    """
    if weights is None:
        return values.mean()
    weights = weights.to(values.dtype)
    denom = weights.sum().clamp_min(torch.finfo(values.dtype).tiny)
    return (weights * values).sum() / denom


def _pair_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> Metrics:
    """The metrics of the DPO family, with TRL's names.

    ``rewards/accuracies`` counts strict wins (a tie counts as wrong), as TRL does.
    """
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).float()),
        "logps/chosen": _mean(policy_chosen_logps),
        "logps/rejected": _mean(policy_rejected_logps),
    }


# ------------------------------------------------------------ 1. reward-model losses


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
    targets: torch.Tensor | None = None,
) -> LossOutput:
    """Bradley-Terry reward-model loss with margin, weights, label smoothing, soft targets and centering.

    With d_i = r_w,i - r_l,i - m_i (Ouyang et al. 2022; Stiennon et al. 2020; margin as in
    Touvron et al. 2023 "Llama 2"):

        l_i = (1 - eps) * softplus(-d_i) + eps * softplus(d_i)
        L   = sum_i w_i l_i / sum_i w_i  +  center_coef * sum_i w_i (r_w,i + r_l,i)^2 / sum_i w_i

    softplus(-d) = -log sigmoid(d) is the negative log-likelihood of the BT model
    P(y_w > y_l) = sigmoid(r_w - r_l); eps is the probability that the label is flipped,
    so eps = 0.5 makes the loss symmetric in d. With soft targets p_i = P(y_w,i better) (an
    AI labeller's normalized option probability, Bai et al. 2022 "Constitutional AI" section
    4.1) the per-pair term is the cross-entropy against p_i,

        l_i = -[q_i log sigmoid(d_i) + (1 - q_i) log sigmoid(-d_i)]
            = q_i softplus(-d_i) + (1 - q_i) softplus(d_i),   q_i = (1 - eps) p_i + eps (1 - p_i),

    minimized at d_i = log(q_i / (1 - q_i)); p_i = 1 gives the hard loss above. The centering term (Eisenstein et al. 2023,
    "Helping or Herding?") pins the free per-prompt constant of the rewards near 0.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards r(x, y_w), r(x, y_l).
        margin: (B,) per-pair margin m_i, a float for all pairs, or None (m = 0).
        weights: (B,) non-negative per-pair confidence weights, or None (all 1). The loss
            is normalized by the SUM OF WEIGHTS, so scaling all weights changes nothing and
            a zero weight removes the pair (from both terms; metrics stay unweighted).
        label_smoothing: eps in [0, 0.5].
        targets: (B,) soft labels p_i in [0, 1], or None (all 1: hard labels).
        center_coef: coefficient of the centering penalty (0 disables it).

    Metrics (unweighted over the batch; margin_mean is r_w - r_l without m):
        rm/accuracy (fraction with r_w > r_l strictly), rm/margin_mean, rm/chosen_mean,
        rm/rejected_mean, and rm/center_penalty (the term added to the loss, i.e.
        center_coef * weighted mean of (r_w + r_l)^2) when center_coef != 0.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    d = diff if margin is None else diff - margin
    if targets is None:
        per_pair = (1.0 - label_smoothing) * F.softplus(-d) + label_smoothing * F.softplus(d)
    else:
        _check_same_shape(chosen_rewards=chosen_rewards, targets=targets)
        q = (1.0 - label_smoothing) * targets + label_smoothing * (1.0 - targets)
        per_pair = q * F.softplus(-d) + (1.0 - q) * F.softplus(d)
    loss = _weighted_mean(per_pair, weights)

    metrics: Metrics = {
        "rm/accuracy": _mean((diff > 0).float()),
        "rm/margin_mean": _mean(diff),
        "rm/chosen_mean": _mean(chosen_rewards),
        "rm/rejected_mean": _mean(rejected_rewards),
    }
    if center_coef != 0.0:
        penalty = center_coef * _weighted_mean((chosen_rewards + rejected_rewards) ** 2, weights)
        loss = loss + penalty
        metrics["rm/center_penalty"] = penalty.item()
    return loss, metrics


def plackett_luce_loss(rewards: torch.Tensor, *, mask: torch.Tensor | None = None) -> LossOutput:
    """Plackett-Luce negative log-likelihood of K-way rankings (Plackett 1975; Luce 1959).

    Column 0 holds the best response, column K-1 the worst. The probability of the ranking
    is the product of choosing each item among those not yet chosen:

        L = -mean_b sum_{k=0}^{K-2} [ r_b,k - logsumexp(r_b,k, ..., r_b,K-1) ]

    (the k = K-1 term is identically 0). For K = 2 this is exactly the Bradley-Terry loss
    softplus(r_1 - r_0). InstructGPT (Ouyang et al. 2022) instead turns one ranking into
    all C(K, 2) pairs and averages the BT loss over them; the two coincide only for K = 2.

    Args:
        rewards: (B, K) rewards, ordered best first.
        mask: optional (B, K) bool, True for real items. Rankings shorter than K put their
            padding at the end; masked items are simply left out of the ranking wherever
            they sit. A row with fewer than 2 real items contributes 0 but still counts in
            the mean over B.

    Metrics (over the real items):
        rm/accuracy: fraction of ordered pairs (j better than k) with r_j > r_k strictly;
        rm/margin_mean: mean of r_j - r_k over those pairs;
        rm/top1_accuracy: fraction of rows (with >= 2 items) whose highest reward is item 0;
        rm/best_mean, rm/worst_mean: mean reward of the first and of the last real item.
    """
    if rewards.dim() != 2:
        raise ValueError(f"expected rewards of shape (B, K), got {tuple(rewards.shape)}")
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    elif mask.shape != rewards.shape or mask.dtype != torch.bool:
        raise ValueError(f"expected a bool mask of shape {tuple(rewards.shape)}")

    # Masked items get a large finite negative reward: exp() of it is 0 in the logsumexp,
    # and unlike -inf it never produces inf - inf = nan in the backward pass.
    very_negative = torch.finfo(rewards.dtype).min
    filled = rewards.masked_fill(~mask, very_negative)
    # suffix_lse[b, k] = logsumexp(filled[b, k:]), via a cumulative logsumexp reversed.
    suffix_lse = torch.logcumsumexp(filled.flip(-1), dim=-1).flip(-1)
    log_choice = torch.where(mask, filled - suffix_lse, torch.zeros_like(filled))  # (B, K)
    loss = -log_choice.sum(dim=-1).mean()

    with torch.no_grad():
        k = rewards.shape[1]
        better_first = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(1)
        pairs = better_first & mask[:, :, None] & mask[:, None, :]  # (B, K, K): j before k
        diffs = (rewards[:, :, None] - rewards[:, None, :])[pairs]
        n_items = mask.sum(dim=-1)
        ranked = n_items >= 2
        first_idx = mask.float().argmax(dim=-1, keepdim=True)  # first real item
        last_idx = k - 1 - mask.flip(-1).float().argmax(dim=-1, keepdim=True)  # last one
        top1 = filled.argmax(dim=-1, keepdim=True) == first_idx
        first = rewards.gather(1, first_idx).squeeze(1)
        worst = rewards.gather(1, last_idx).squeeze(1)
        metrics: Metrics = {
            "rm/accuracy": _mean((diffs > 0).float()) if diffs.numel() else 0.0,
            "rm/margin_mean": _mean(diffs) if diffs.numel() else 0.0,
            "rm/top1_accuracy": _mean(top1.squeeze(1)[ranked].float()) if ranked.any() else 0.0,
            "rm/best_mean": _mean(first[ranked]) if ranked.any() else 0.0,
            "rm/worst_mean": _mean(worst[ranked]) if ranked.any() else 0.0,
        }
    return loss, metrics


def input_gradient_penalty(
    rewards: torch.Tensor,
    embeddings: torch.Tensor | Sequence[torch.Tensor],
    masks: torch.Tensor | Sequence[torch.Tensor],
    *,
    coef: float = 1.0,
) -> LossOutput:
    """Penalty on the norm of the reward's gradient with respect to its input embeddings.

    For N sequences with rewards r_n and input (token) embeddings e_t:

        P = coef * (1 / N) sum_n sum_{t in S_n} || d r_n / d e_t ||^2

    with S_n the positions of sequence n that ``masks`` selects (the reward-model loop
    selects the response tokens, the end token included: the tokens a policy chooses).
    A reward model whose score moves a lot when one token's embedding moves a little pays
    for single tokens out of context, the phrase-level gaming a policy finds (the
    gradient-norm regularizer of input-gradient training, Drucker and LeCun 1992 "double
    backpropagation"; Ross and Doshi-Velez 2018; as a gradient penalty, Gulrajani et al.
    2017). Each reward must depend on its own sequence's embeddings only (separate rows,
    or packed rows with block-diagonal attention), so one gradient of sum_n r_n gives every
    d r_n / d e_t at once. The gradient is taken with ``create_graph=True``: P is
    differentiable in the model's parameters (double backprop), and its own gradient is
    computed by the backward of the total loss.

    Args:
        rewards: (N,) rewards computed from ``embeddings``.
        embeddings: a (..., T, d) tensor of input embeddings on the graph of ``rewards``
            (requires grad), or a list of them (one per forward pass).
        masks: (..., T) masks, one per embeddings tensor: 1 where a position counts.
        coef: the coefficient (lambda).

    Metrics: rm/grad_penalty (P, the term added to the loss) and rm/input_grad_sq (the mean
    over sequences of sum_t ||d r_n / d e_t||^2, without coef).
    """
    if rewards.dim() != 1:
        raise ValueError(f"expected rewards of shape (N,), got {tuple(rewards.shape)}")
    embeddings = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
    masks = [masks] if isinstance(masks, torch.Tensor) else list(masks)
    if len(embeddings) != len(masks) or any(e.shape[:-1] != m.shape for e, m in zip(embeddings, masks)):
        raise ValueError("expected one mask of shape (..., T) per embeddings tensor of shape (..., T, d)")
    grads = torch.autograd.grad(rewards.sum(), embeddings, create_graph=True)
    # At least float32 (a bf16 gradient's square loses most of its digits), float64 kept.
    total = sum((g.to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum(-1) * m.to(g.dtype)).sum()
                for g, m in zip(grads, masks))
    sq = total / max(1, rewards.numel())
    loss = coef * sq
    return loss, {"rm/grad_penalty": loss.item(), "rm/input_grad_sq": sq.item()}


# ------------------------------------------------ 2. paired preference losses (DPO family)


def _logratios(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor,
               ref_rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_w)/pi_ref(y_w) and log pi(y_l)/pi_ref(y_l), each (B,); h is their difference."""
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def _reference_pair_loss(per_pair: Callable[[torch.Tensor], torch.Tensor], reward_scale: float,
                         policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                         ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                         lengths: tuple[torch.Tensor, torch.Tensor] | None = None) -> LossOutput:
    """What DPO, cDPO, IPO and the hinge loss share: L = mean_i per_pair(h_i) with
    h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), and the metrics of
    ``_pair_metrics`` with the implicit rewards reward_scale * log pi/pi_ref.

    With ``lengths`` (|y_w|, |y_l|) each log-ratio is first divided by its response's
    token count (at least 1): h = log pi/pi_ref(y_w) / |y_w| - log pi/pi_ref(y_l) / |y_l|;
    the metrics stay on the summed log-ratios, as TRL reports them."""
    chosen_lr, rejected_lr = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if lengths is None:
        h = chosen_lr - rejected_lr
    else:
        chosen_len, rejected_len = _lengths(chosen_lr, rejected_lr, *lengths)
        h = chosen_lr / chosen_len.clamp(min=1) - rejected_lr / rejected_len.clamp(min=1)
    loss = per_pair(h).mean()
    metrics = _pair_metrics(reward_scale * chosen_lr, reward_scale * rejected_lr,
                            policy_chosen_logps, policy_rejected_logps)
    return loss, metrics


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, targets: torch.Tensor | None = None) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al. 2023).

        h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
        L = mean_i -log sigmoid(beta * h_i)

    With soft targets p_i = P(y_w,i better) (an AI labeller's, Bai et al. 2022) the per-pair
    term is the cross-entropy of the implicit Bradley-Terry model against p_i,

        L = mean_i -[p_i log sigmoid(beta h_i) + (1 - p_i) log sigmoid(-beta h_i)],

    cDPO with a per-pair eps_i = 1 - p_i, minimized at beta h_i = log(p_i / (1 - p_i));
    targets None (all p_i = 1) is the loss above.

    The implicit reward is beta * log pi/pi_ref; metrics report it as rewards/chosen and
    rewards/rejected (batch means), their difference rewards/margins, the fraction of
    pairs whose chosen reward is strictly higher (rewards/accuracies), and the mean summed
    policy log-probs logps/chosen and logps/rejected.
    """
    if targets is not None:
        return cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         beta=beta, targets=targets)
    return _reference_pair_loss(
        lambda h: -F.logsigmoid(beta * h), beta,
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    )


def cdpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
              beta: float = 0.1, label_smoothing: float = 0.0,
              targets: torch.Tensor | None = None) -> LossOutput:
    """Conservative DPO: DPO with labels flipped with probability eps (Mitchell 2023,
    "A note on DPO with noisy preferences and relationship to IPO").

        L = mean_i [ -(1 - eps) log sigmoid(beta h_i) - eps log sigmoid(-beta h_i) ]

    eps = 0 is DPO; eps = 0.5 is symmetric in h (no preference). With soft targets p_i
    (P(y_w,i better)) the label of pair i is first p_i, then flipped with probability eps:

        L = mean_i -[q_i log sigmoid(beta h_i) + (1 - q_i) log sigmoid(-beta h_i)],
        q_i = (1 - eps) p_i + eps (1 - p_i),

    which is the loss above when every p_i = 1. Metrics as ``dpo_loss``.
    TRL 1.16 has no such loss: its ``sigmoid`` ignores ``label_smoothing``, and its
    ``robust`` divides the same expression, with the flipped term's sign reversed, by
    1 - 2 eps (the unbiased estimator of Chowdhury et al. 2024, "Provably Robust DPO").
    """
    if targets is not None:
        _check_same_shape(policy_chosen_logps=policy_chosen_logps, targets=targets)
        q = (1.0 - label_smoothing) * targets + label_smoothing * (1.0 - targets)

    def per_pair(h: torch.Tensor) -> torch.Tensor:
        logits = beta * h
        if targets is None:
            return (-(1.0 - label_smoothing) * F.logsigmoid(logits)
                    - label_smoothing * F.logsigmoid(-logits))
        return -q * F.logsigmoid(logits) - (1.0 - q) * F.logsigmoid(-logits)

    return _reference_pair_loss(
        per_pair, beta,
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    )


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             tau: float = 0.1, normalize: bool = False, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> LossOutput:
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm
    to Understand Learning from Human Preferences"), the IPO loss of eq. (17):

        L = mean_i (h_i - 1 / (2 tau))^2

    h is built from per-sequence SUMMED log-probs, as in the paper. ``normalize=True``
    (``dpo.ipo_normalize``) divides each log-ratio by its response's token count first,

        h_i = log pi/pi_ref(y_w,i) / |y_w,i| - log pi/pi_ref(y_l,i) / |y_l,i|,

    which is TRL's ``loss_type="ipo"`` (it needs ``chosen_lengths`` and ``rejected_lengths``,
    (B,) each); a tau tuned for one form is not comparable with the other. The regularizer
    is tau * KL, so metrics report rewards as tau * log pi/pi_ref on summed log-probs
    either way (keys as ``dpo_loss``, meaning what TRL's mean).
    """
    lengths = None
    if normalize:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo_loss(normalize=True) needs chosen_lengths and rejected_lengths")
        lengths = (chosen_lengths, rejected_lengths)
    return _reference_pair_loss(
        lambda h: (h - 1.0 / (2.0 * tau)).pow(2), tau,
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, lengths,
    )


def hinge_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
               beta: float = 0.1) -> LossOutput:
    """Hinge (SLiC) loss on the DPO log-ratio (Zhao et al. 2023, "SLiC-HF"; with the
    reference log-ratio as in Liu et al. 2023, "Statistical Rejection Sampling"):

        L = mean_i max(0, 1 - beta * h_i)

    i.e. SLiC's calibration margin delta = 1/beta. Pairs already beyond the margin give no
    gradient. Metrics as ``dpo_loss``.
    """
    return _reference_pair_loss(
        lambda h: torch.relu(1.0 - beta * h), beta,
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    )


def _lengths(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             chosen_lengths: torch.Tensor,
             rejected_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The response lengths of a reference-free loss in the log-probs' dtype, each (B,),
    after checking that all four are (B,)."""
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    dtype = policy_chosen_logps.dtype
    return chosen_lengths.to(dtype), rejected_lengths.to(dtype)


def _mean_token_metrics(metrics: Metrics, policy_chosen_logps: torch.Tensor,
                        policy_rejected_logps: torch.Tensor, chosen_len: torch.Tensor,
                        rejected_len: torch.Tensor) -> Metrics:
    """A reference-free loss's logps metrics as TRL's SimPO and ORPO report them: logps/chosen
    and logps/rejected are the mean PER-TOKEN log-probs log pi(y)/|y|, and the mean summed
    log-probs (what the other losses' logps/* are) go under logps/chosen_sum and
    logps/rejected_sum."""
    metrics["logps/chosen_sum"] = metrics["logps/chosen"]
    metrics["logps/rejected_sum"] = metrics["logps/rejected"]
    metrics["logps/chosen"] = _mean(policy_chosen_logps / chosen_len)
    metrics["logps/rejected"] = _mean(policy_rejected_logps / rejected_len)
    return metrics


def _pooled_nll(policy_chosen_logps: torch.Tensor, chosen_len: torch.Tensor,
                chosen_length_mean: torch.Tensor | float | None) -> torch.Tensor:
    """The NLL of the chosen responses pooled over all their tokens, as per-pair terms (B,):

        n_i = -log pi(y_w,i) / mean_j |y_w,j|,   so   mean_i n_i = -sum_i log pi(y_w,i) / sum_i |y_w,i|,

    one mean over every chosen token of the batch, as TRL's cross-entropy pools it (long
    responses weigh more than short ones). ``chosen_length_mean`` replaces mean_j |y_w,j|
    when this batch is a part of a larger one (a micro-batch of a global batch), so that the
    mean over the large batch is still pooled over all of its tokens.
    """
    mean_len = chosen_len.mean() if chosen_length_mean is None else chosen_length_mean
    return -policy_chosen_logps / torch.as_tensor(mean_len, dtype=chosen_len.dtype, device=chosen_len.device)


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *, beta: float = 2.0,
               gamma: float = 0.5, nll_coef: float = 0.0,
               chosen_length_mean: torch.Tensor | float | None = None) -> LossOutput:
    """Simple Preference Optimization, reference-free (Meng et al. 2024, "SimPO"):

        L = mean_i -log sigmoid( beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma )
            + nll_coef * ( -sum_i log pi(y_w,i) / sum_i |y_w,i| )

    gamma is the absolute target reward margin of the paper; TRL 1.16's ``simpo_gamma`` is
    the same absolute margin (its CPOTrainer subtracts simpo_gamma / beta from the
    log-prob difference before multiplying by beta). Lengths are response-token counts and
    must be positive. The second term is CPO's behaviour-cloning NLL on the chosen responses
    (Xu et al. 2024), pooled over all chosen tokens of the batch as TRL's ``cpo_alpha``
    term is (``dpo.simpo_nll_coef``; TRL's default cpo_alpha is 1, SimPO's paper and the
    default here have none); ``chosen_length_mean`` as in ``_pooled_nll``.

    Metrics: rewards/* are the length-normalized beta * log pi(y) / |y| (no reference);
    logps/* the mean per-token log-probs and logps/*_sum the mean summed ones
    (``_mean_token_metrics``); simpo/nll_loss when nll_coef != 0.
    """
    chosen_len, rejected_len = _lengths(
        policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths
    )
    chosen_rewards = beta * policy_chosen_logps / chosen_len
    rejected_rewards = beta * policy_rejected_logps / rejected_len
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma).mean()
    metrics = _pair_metrics(
        chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps
    )
    _mean_token_metrics(metrics, policy_chosen_logps, policy_rejected_logps, chosen_len, rejected_len)
    if nll_coef != 0.0:
        nll = _pooled_nll(policy_chosen_logps, chosen_len, chosen_length_mean).mean()
        loss = loss + nll_coef * nll
        metrics["simpo/nll_loss"] = nll.item()
    return loss, metrics


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate everywhere (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): log1p(-exp(a)) for a < -log 2, else log(-expm1(a)).

    Each branch only ever sees inputs from its own side of -log 2, so neither produces an
    inf or nan that ``torch.where`` would turn into a nan gradient.
    """
    cut = -math.log(2.0)
    far = torch.log1p(-torch.exp(a.clamp(max=cut)))
    near = torch.log(-torch.expm1(a.clamp(min=cut)))
    return torch.where(a < cut, far, near)


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, *,
              lam: float = 0.1, nll: str = "sequence",
              chosen_length_mean: torch.Tensor | float | None = None) -> LossOutput:
    """Odds-Ratio Preference Optimization, reference-free (Hong et al. 2024, "ORPO").

    With the mean-token log-prob a(y) = log pi(y) / |y| (the paper's length-normalized
    P_theta(y|x)) and odds(y) = P / (1 - P):

        log odds(y) = a(y) - log(1 - exp(a(y)))
        L = mean_i [ n_i - lam * log sigmoid(log odds(y_w,i) - log odds(y_l,i)) ]

    The NLL term n_i (``dpo.orpo_nll``) is LENGTH-NORMALIZED, not the
    summed SFT loss: per response, n_i = -a(y_w,i), by default (``nll="sequence"``: each
    response weighs the same), or pooled over all chosen tokens of the batch
    (``nll="token"``, ``_pooled_nll``: mean_i n_i = -sum_i log pi(y_w,i) / sum_i |y_w,i|,
    as TRL's cross-entropy pools it, so long responses weigh more). a is clamped to at most -eps(dtype) in
    the odds and the per-response NLL: a response of probability 1 would have infinite log
    odds; the clamp keeps loss and gradients finite.

    Metrics: rewards/* are lam * a(y) (as TRL reports them), logps/* the mean per-token
    log-probs and logps/*_sum the mean summed ones (``_mean_token_metrics``), plus
    orpo/nll_loss, orpo/log_odds_ratio (mean log sigmoid of the log-odds difference) and
    orpo/log_odds_chosen (mean log-odds difference).
    """
    chosen_len, rejected_len = _lengths(
        policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths
    )
    top = -torch.finfo(policy_chosen_logps.dtype).eps
    chosen_mean = (policy_chosen_logps / chosen_len).clamp(max=top)
    rejected_mean = (policy_rejected_logps / rejected_len).clamp(max=top)
    log_odds = (chosen_mean - log1mexp(chosen_mean)) - (rejected_mean - log1mexp(rejected_mean))
    ratio_term = F.logsigmoid(log_odds)
    if nll not in ("sequence", "token"):
        raise ValueError(f"nll must be 'sequence' or 'token', got {nll!r}")
    nll_i = -chosen_mean if nll == "sequence" else _pooled_nll(policy_chosen_logps, chosen_len, chosen_length_mean)
    loss = (nll_i - lam * ratio_term).mean()

    metrics = _pair_metrics(
        lam * chosen_mean, lam * rejected_mean, policy_chosen_logps, policy_rejected_logps
    )
    _mean_token_metrics(metrics, policy_chosen_logps, policy_rejected_logps, chosen_len, rejected_len)
    metrics["orpo/nll_loss"] = _mean(nll_i)
    metrics["orpo/log_odds_ratio"] = _mean(ratio_term)
    metrics["orpo/log_odds_chosen"] = _mean(log_odds)
    return loss, metrics


# ------------------------------------------------------------- 3. unpaired: KTO


def kto_reference_point(
    policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor
) -> torch.Tensor:
    """KTO reference point z0 (Ethayarajh et al. 2024, "KTO"), a detached scalar:

        z0 = max(0, mean_j [log pi(y_j | x_i) - log pi_ref(y_j | x_i)])

    computed on MISMATCHED pairs (each prompt with another example's response), a biased
    but cheap estimate of KL(pi || pi_ref). No gradient flows through it.
    """
    _check_same_shape(
        policy_mismatched_logps=policy_mismatched_logps,
        ref_mismatched_logps=ref_mismatched_logps,
    )
    return (policy_mismatched_logps - ref_mismatched_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    is_desirable: torch.Tensor,
    kl_ref_point: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """Kahneman-Tversky Optimization on UNPAIRED examples (Ethayarajh et al. 2024, "KTO").

    With r_i = log pi(y_i) - log pi_ref(y_i) and z0 = max(0, kl_ref_point), DETACHED here
    whatever the caller passes (see ``kto_reference_point``):

        desirable:    l_i = w_d * (1 - sigmoid(beta * (r_i - z0)))
        undesirable:  l_i = w_u * (1 - sigmoid(beta * (z0 - r_i)))
        L = mean_i l_i   (over all B examples, both kinds)

    1 - sigmoid(x) is computed as sigmoid(-x). The paper suggests w_d n_d / (w_u n_u) in
    [1, 4/3] when the two kinds are imbalanced.

    Args:
        policy_logps, ref_logps: (B,) summed log-probs of each example's response.
        is_desirable: (B,) bool, True for a desirable (thumbs-up) example.
        kl_ref_point: scalar tensor or float, the KL estimate (clamped at 0, detached).

    Metrics: rewards/chosen and logps/chosen (means of beta * r and of the policy log-probs
    over desirable examples; the keys are OMITTED when the batch has none), likewise
    rewards/rejected and logps/rejected over undesirable ones, rewards/margins when both
    kinds are present, count/chosen and count/rejected (always present), and kl (z0).
    """
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, is_desirable=is_desirable)
    if is_desirable.dtype != torch.bool:
        raise ValueError(f"is_desirable must be a bool tensor, got {is_desirable.dtype}")
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype, device=policy_logps.device)
    z0 = z0.detach().clamp(min=0)

    logratios = policy_logps - ref_logps
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - z0))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z0 - logratios))
    loss = torch.where(is_desirable, desirable_losses, undesirable_losses).mean()

    rewards = (beta * logratios).detach()
    undesirable = ~is_desirable
    metrics: Metrics = {
        "count/chosen": float(is_desirable.sum().item()),
        "count/rejected": float(undesirable.sum().item()),
        "kl": z0.item(),
    }
    if is_desirable.any():
        metrics["rewards/chosen"] = _mean(rewards[is_desirable])
        metrics["logps/chosen"] = _mean(policy_logps[is_desirable])
    if undesirable.any():
        metrics["rewards/rejected"] = _mean(rewards[undesirable])
        metrics["logps/rejected"] = _mean(policy_logps[undesirable])
    if is_desirable.any() and undesirable.any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


# ------------------------------------------------------------ 4. supervised fine-tuning


def sft_loss(
    token_logps: torch.Tensor, response_mask: torch.Tensor, *, n_tokens: float | None = None
) -> LossOutput:
    """Negative log-likelihood of response tokens only (InstructGPT stage 1).

        L_SFT = -(1/N) * sum_{b,t} m_{b,t} * log pi(y_{b,t} | x_b, y_{b,<t})

    token_logps (B, T) aligned to the input ids, response_mask (B, T) 1 on response tokens
    (EOS included), so prompt and pad tokens never contribute. N defaults to the number of
    response tokens in this batch; pass the count over the whole global batch (all
    micro-batches and processes) so that accumulated or data-parallel gradients equal those
    of one large batch exactly.
    """
    mask = response_mask.to(token_logps.dtype)
    nll_sum = -(token_logps * mask).sum()
    count = mask.sum()
    denom = count if n_tokens is None else torch.as_tensor(n_tokens, dtype=token_logps.dtype)
    loss = nll_sum / denom.clamp(min=1)
    return loss, {"sft/nll_sum": nll_sum.item(), "sft/tokens": count.item()}



# ------------------------------------------------- 5. online RL: the policy-gradient loss

LOG_RATIO_CLAMP = 20.0
"""|log pi_theta - log pi_old| is clamped to this before exp (as OpenRLHF's policy loss and
``kl.kl_k3`` do): e^20 ~ 5e8 is far beyond any ratio the clip lets through, and float32's
exp overflows at 88.7. Every |log ratio| < 20 is untouched."""


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                      clip_eps: float = 0.2, clip_eps_high: float | None = None):
    """PPO's clipped surrogate per token (Schulman et al. 2017), as a loss to minimise:

        rho_t = exp(clamp(log pi_theta(y_t) - log pi_old(y_t), -20, 20))
        l_t   = max(-A_t * rho_t,  -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))

    eps_high = eps_low = clip_eps unless ``clip_eps_high`` is given (asymmetric clipping,
    "clip-higher" of DAPO, Yu et al. 2025). With one update per rollout rho = 1 and the
    gradient is the plain policy gradient -A_t * grad log pi(y_t). The clamp
    (``LOG_RATIO_CLAMP``) keeps rho finite; where it acts the gradient is 0, as it is on the
    clipped branch.

    Args:
        logprobs: log pi_theta of the sampled tokens.     # (B, T)
        old_logprobs: log pi_old at sampling time.        # (B, T)
        advantages: A_t, detached.                        # (B, T)

    Returns:
        (l_t, rho_t, clipped_t): per-token loss, ratio and a 0/1 float telling where the
        clipped branch is the larger one (and so the gradient is 0).  # (B, T) each
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped).float()


def dual_clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                           clip_eps: float = 0.2, clip_eps_high: float | None = None, dual_clip: float = 3.0):
    """Dual-clip PPO per token (Ye et al. 2020, "Mastering Complex Control in MOBA Games with
    Deep Reinforcement Learning"), as a loss to minimise; c = ``dual_clip`` > 1:

        l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))          A_t >= 0
        l_t = min(max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high)), -c A_t)   A_t < 0

    (verl's ``compute_policy_loss_vanilla`` with ``clip_ratio_c`` = c, OpenRLHF's
    ``PolicyLoss(dual_clip=c)``.) For A < 0, -A > 0 factors out:
    max(rho, clip(rho, 1 - eps_low, 1 + eps_high)) = max(rho, 1 - eps_low), so

        l_t = -A_t * min(max(rho_t, 1 - eps_low), c)                                  A_t < 0

    PPO's clip bounds a negative-advantage token's loss from below only: a token whose ratio has
    grown far past 1 + eps_high (several epochs, or a stale sampler) keeps the unclipped
    -A rho, a loss and a gradient that grow with rho without bound. The dual clip caps it at
    -c A, where the gradient is 0. For A >= 0 it is PPO's clipped surrogate unchanged; for
    A < 0 and 1 - eps_low < rho < c the gradient is PPO's, -A grad rho.

    Returns:
        (l_t, rho_t, clipped_t, dual_clipped_t): per-token loss, ratio, 0/1 where PPO's clip
        binds (as ``clipped_surrogate``), and 0/1 where the dual clip binds (A < 0, rho > c).
                                                                              # (B, T) each
    """
    if not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    l_t, ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps=clip_eps,
                                            clip_eps_high=clip_eps_high)
    cap = -dual_clip * advantages
    negative = advantages < 0
    dual = negative & (l_t > cap)
    return torch.where(negative, torch.minimum(l_t, cap), l_t), ratio, clipped, dual.float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
                       clip_eps: float = 0.2):
    """PPO's clipped value loss per token (Huang et al. 2022, "The 37 implementation details
    of PPO"):

        V_clip = V_old + clip(V - V_old, -eps, eps)
        l_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Returns:
        (l_t, clipped_t) per token.                       # (B, T) each
    """
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped = (values - returns).square()
    clipped = (v_clipped - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@dataclass
class Counts:
    """Normalisers of one minibatch: its global counts (all processes) divided by the number
    of processes W, because DDP averages gradients over W."""

    n_seqs: float
    n_tokens: float
    max_len: int


# How per-token losses x (B, T) become one number (``rl.loss_agg``, registry.LOSS_AGGREGATIONS).
# Each sums over this process's rows and divides by a count of the global minibatch, so
# micro-batches and processes add up to the gradient of the whole minibatch.


def token_mean(x: torch.Tensor, mask: torch.Tensor, c: Counts) -> torch.Tensor:
    """sum_{i,t} m_it x_it / N_tokens  (PPO, REINFORCE++, DAPO's token-level loss)"""
    return (x * mask).sum() / c.n_tokens


def seq_sum(x: torch.Tensor, mask: torch.Tensor, c: Counts) -> torch.Tensor:
    """(1/N_seqs) sum_i sum_t m_it x_it  (REINFORCE: the score function of a whole sequence)"""
    return (x * mask).sum() / c.n_seqs


def seq_mean(x: torch.Tensor, mask: torch.Tensor, c: Counts) -> torch.Tensor:
    """(1/N_seqs) sum_i (1/|y_i|) sum_t m_it x_it  (GRPO, Shao et al. 2024)"""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / c.n_seqs


def constant_normalizer(x: torch.Tensor, mask: torch.Tensor, c: Counts) -> torch.Tensor:
    """(1/(N_seqs * L_max)) sum_{i,t} m_it x_it  (Dr. GRPO, Liu et al. 2025: no length bias)"""
    return (x * mask).sum() / (c.n_seqs * c.max_len)


@dataclass
class PolicyLossSettings:
    """Hyper-parameters of ``policy_gradient_loss`` (RLConfig's names)."""

    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    loss_agg: str = "token_mean"
    kl_coef: float = 0.0  # beta when the KL is in the loss, else 0
    kl_estimator: str = "k3"
    kl_clip: float | None = None  # cap on each token's KL estimate (kl.cap_kl), None = off
    dual_clip: float | None = None  # c of dual-clip PPO (dual_clipped_surrogate), None = off
    entropy_coef: float = 0.0
    vf_coef: float = 0.1
    value_clip_eps: float = 0.2


def policy_gradient_loss(logprobs, old_logprobs, advantages, mask, counts: Counts, hp: PolicyLossSettings, *,
                         ref_logprobs=None, entropy=None, values=None, old_values=None, returns=None,
                         is_weights=None):
    """The loss of one micro-batch: clipped surrogate + KL + value - entropy bonus.

        L = agg(w * l^clip) + kl_coef * agg(w * k(log pi_theta, log pi_ref))
            + vf_coef * token_mean(l^V) - entropy_coef * agg(H)

    ``w`` is 1, or the detached truncated importance weights of a sampler that differs from
    the trainer (``is_weights``, ``truncated_importance_weights``). Both the surrogate and
    the KL term are expectations under pi_theta estimated on the sampler's tokens, so both
    are weighted: weighting the surrogate alone leaves the KL term's gradient off-policy and,
    with the KL in the loss, moves the fixed point away from pi* (docs/online-rl.md measures
    it on the bandit). TRL 1.16 (``GRPOTrainer._compute_loss``), verl (``dp_actor``: the
    weights inside the policy loss, the KL loss added after) and OpenRLHF (``PolicyLoss``)
    weight the policy-gradient term only.

    ``l^clip`` is ``clipped_surrogate``, or ``dual_clipped_surrogate`` when ``hp.dual_clip``
    is set. ``agg`` is ``registry.LOSS_AGGREGATIONS[hp.loss_agg]``; the KL term is the
    estimator ``hp.kl_estimator`` on the current log-probs (k3: GRPO; k2: the reverse-KL
    gradient; k3_ratio reads the ratio to ``old_logprobs``), each token's estimate capped at
    ``hp.kl_clip`` (``kl.kl_estimate``); the value term is there only when ``values`` is
    given (PPO).

    Args:
        logprobs, old_logprobs, advantages, mask: (b, T) each; ref_logprobs, entropy,
        values, old_values, returns, is_weights: (b, T) or None.

    Returns:
        (loss, sums): the scalar loss and, for metrics, name -> (sum over tokens,
        token count) of this micro-batch, to be reduced over micro-batches and processes.
    """
    agg = LOSS_AGGREGATIONS[hp.loss_agg]
    dual = None
    if hp.dual_clip is None:
        pg_t, ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages,
                                                 clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high)
    else:
        pg_t, ratio, clipped, dual = dual_clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps=hp.clip_eps,
                                                            clip_eps_high=hp.clip_eps_high, dual_clip=hp.dual_clip)
    if is_weights is not None:
        pg_t = is_weights * pg_t
    loss = agg(pg_t, mask, counts)
    n = mask.sum()
    log_ratio = (logprobs - old_logprobs).detach()

    def s(x):
        return ((x.detach() * mask).sum(), n)

    sums = {"loss/policy": s(pg_t), "policy/clipfrac": s(clipped), "policy/approxkl": s(0.5 * log_ratio.square()),
            "policy/ratio_mean": s(ratio)}
    if dual is not None:
        sums["policy/dual_clipfrac"] = s(dual)
    if hp.kl_coef and ref_logprobs is not None:
        kl_t = kl_estimate(hp.kl_estimator, logprobs, ref_logprobs, old_logprobs=old_logprobs, cap=hp.kl_clip)
        loss = loss + hp.kl_coef * agg(kl_t if is_weights is None else is_weights * kl_t, mask, counts)
        sums["loss/kl"] = s(kl_t)
    if entropy is not None:
        if hp.entropy_coef:
            loss = loss - hp.entropy_coef * agg(entropy, mask, counts)
        sums["policy/entropy"] = s(entropy)
    if values is not None:
        v_t, v_clipped = clipped_value_loss(values, old_values, returns, clip_eps=hp.value_clip_eps)
        loss = loss + hp.vf_coef * token_mean(v_t, mask, counts)
        sums.update({"loss/value": s(v_t), "val/clipfrac": s(v_clipped), "val/vpred": s(values)})
    return loss, sums


def truncated_importance_weights(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, *,
                                 cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework
    secretly brings you off-policy RL training"), per token:

        w_t = min(pi_train(y_t) / pi_sampler(y_t), C) = min(exp(log pi_train - log pi_sampler), C)

    detached. Samples drawn from pi_sampler but trained as if drawn from pi_train bias the
    policy gradient E_sampler[A grad log pi] away from E_train[A grad log pi]; weighting each
    token's policy-gradient term by w_t removes the bias up to the truncation at C, which
    bounds the variance; ``policy_gradient_loss`` weights a KL term in the loss too, for the
    same reason. The log-ratio is clamped to [-20, 20] before exp.

    Args:
        train_logprobs: log pi_train of the sampled tokens (the trainer's old log-probs).  # (B, T)
        sampler_logprobs: log pi_sampler of the same tokens.                           # (B, T)
        cap: C > 0.

    Returns:
        w_t, (B, T), no gradient.
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_ratio = (train_logprobs - sampler_logprobs).detach().clamp(-20.0, 20.0)
    return torch.exp(log_ratio).clamp(max=cap)
