"""KL estimators and KL-coefficient (beta) controllers.

Estimators
----------
All estimators work per token on samples drawn from the policy, x ~ pi_theta, through the
log-ratio

    l = log pi_ref(x) - log pi_theta(x)          # (B, T)

and follow Schulman, "Approximating KL divergence" (blog post, 2020):

    k1 = -l                  unbiased for KL(pi_theta || pi_ref), high variance, can be < 0
    k2 = l^2 / 2             biased (second order in l), low variance, >= 0
    k3 = (e^l - 1) - l       unbiased (E[e^l] = 1 on-policy), >= 0, low variance

Used as a *loss* on on-policy samples (the sampling probabilities are not differentiated),
the gradient of k2 equals the gradient of the reverse KL(pi_theta || pi_ref), the gradient
of k3 equals the gradient of the forward KL(pi_ref || pi_theta), and the gradient of k1 is
zero in expectation. Hence k1 belongs in the reward (PPO, REINFORCE++), where only its
value matters, and k2/k3 belong in the loss (GRPO uses k3). The derivation is written out
in ``tests/unit/test_kl.py::test_loss_gradients_match_kl_gradients``.

    k3_ratio = rho * k3,  rho = pi_theta(x) / pi_old(x)     (in the loss only)

is TRL's GRPO default (``use_bias_correction_kl``): its value is k3's where rho = 1, its
gradient the reverse KL's, k2's on-policy, and rho times k2's off-policy (``kl_k3_ratio``).
``kl_estimate`` is how the loops call an estimator: by its registered name, with the
ratio's old log-probs where the estimator reads them, and an optional cap on each token's
estimate (``cap_kl``, ``rl.kl_clip``; verl and OpenRLHF cap at 10).

Controllers
-----------
A controller holds the current beta (``value``), is told the measured KL after each
rollout batch (``update(current_kl, n_steps)``) and round-trips its state through
``state_dict()`` / ``load_state_dict()`` so a resumed run continues the same schedule.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhflab.registry import KL_CAUTION_NATS, KL_CONTROLLERS, KL_ESTIMATORS, KL_WARNING_NATS

# KL_ESTIMATORS: name -> fn(logprobs, ref_logprobs) -> (B, T), the estimators below;
# KL_CONTROLLERS: name -> controller class. Both are registered in ``rlhflab.registry``.

__all__ = [
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "KLController",
    "AdaptiveKLController",
    "FixedKLController",
    "LagrangianKLController",
    "LinearKLController",
    "cap_kl",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_ratio",
    "make_kl_controller",
    "sequence_kl",
    "KL_CAUTION_NATS",
    "KL_WARNING_NATS",
    "KL_STATUS",
    "kl_status",
]

# ---------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = -l = log pi_theta(x) - log pi_ref(x), per token.

    Unbiased estimator of KL(pi_theta || pi_ref) for x ~ pi_theta, but noisy and negative
    on individual tokens. Its gradient as a loss is zero in expectation, so use it in the
    reward (r_t = -beta * k1_t), not in the loss. Schulman (2020), "Approximating KL
    divergence".

    Args:
        logprobs: log pi_theta(x_t) of the sampled tokens.        # (B, T)
        ref_logprobs: log pi_ref(x_t) of the same tokens.          # (B, T)

    Returns:
        k1 per token.                                              # (B, T)
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = l^2 / 2 with l = log pi_ref(x) - log pi_theta(x), per token.

    Biased (it agrees with the KL only to second order in l), low variance, non-negative.
    As a loss on on-policy samples its gradient equals the gradient of the reverse
    KL(pi_theta || pi_ref). Schulman (2020), "Approximating KL divergence".

    Args:
        logprobs: log pi_theta(x_t) of the sampled tokens.        # (B, T)
        ref_logprobs: log pi_ref(x_t) of the same tokens.          # (B, T)

    Returns:
        k2 per token.                                              # (B, T)
    """
    log_ratio = ref_logprobs - logprobs
    return 0.5 * log_ratio.square()


def kl_k3(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    log_ratio_clip: float | None = 20.0,
) -> torch.Tensor:
    """k3 = (e^l - 1) - l with l = log pi_ref(x) - log pi_theta(x), per token.

    Unbiased for KL(pi_theta || pi_ref) when x ~ pi_theta (because E[e^l] = 1), non-negative
    (e^l >= 1 + l) and low variance. As a loss on on-policy samples its gradient equals the
    gradient of the forward KL(pi_ref || pi_theta); GRPO (Shao et al. 2024) puts it in the
    loss. Schulman (2020), "Approximating KL divergence".

    Computed as ``expm1(l) - l``, which keeps precision for small |l| where e^l - 1 would
    cancel.

    Clipping: l is clamped to [-log_ratio_clip, log_ratio_clip] (default 20) before the
    exponential. Without it e^l overflows float32 at l > 88.7 (and float16 at l > 11),
    and a single token where the reference is e^20 ~ 5e8 times likelier than the policy
    (a token the policy has all but ruled out, yet sampled) would otherwise dominate the
    batch loss and its gradient. The clamp leaves every |l| <= 20 untouched (those are
    the only values an on-policy sample realistically shows); beyond it the value is
    bounded and the gradient is zero. Pass ``log_ratio_clip=None`` for the exact formula.

    Args:
        logprobs: log pi_theta(x_t) of the sampled tokens.        # (B, T)
        ref_logprobs: log pi_ref(x_t) of the same tokens.          # (B, T)
        log_ratio_clip: bound on |l|, or None for no clamp.

    Returns:
        k3 per token, >= 0.                                        # (B, T)
    """
    log_ratio = ref_logprobs - logprobs
    if log_ratio_clip is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)
    return torch.expm1(log_ratio) - log_ratio


def kl_k3_ratio(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    old_logprobs: torch.Tensor,
    log_ratio_clip: float | None = 20.0,
) -> torch.Tensor:
    """k3 times the importance ratio of the current policy to the one that sampled, per token:

        rho_t = exp(log pi_theta(x_t) - log pi_old(x_t))          (with its gradient)
        k_t   = rho_t * k3_t = rho_t * ((e^l - 1) - l),   l = log pi_ref(x_t) - log pi_theta(x_t)

    TRL's GRPO default (``use_bias_correction_kl=True``, after DeepSeek-AI 2025, "DeepSeek-V3.2":
    the KL term estimated on samples of pi_old, corrected to pi_theta). Its value is k3's where
    rho = 1 (the first minibatch of a rollout). Its gradient, with grad l = -grad log pi_theta and
    grad rho = rho grad log pi_theta,

        grad k_t = rho (1 - e^l) grad log pi + rho (e^l - 1 - l) grad log pi = -rho l grad log pi
                 = rho * grad k2_t,

    so on-policy it is k2's (the reverse KL's), and on samples of pi_old it is the importance-
    weighted reverse-KL gradient, E_old[rho (log pi - log pi_ref) grad log pi] = grad
    KL(pi_theta || pi_ref), where k2's own gradient would be biased. In the reward rho = 1 and
    only the value counts, which is k3's: it belongs in the loss (``algos.rl_config`` refuses
    it in the reward). The log-ratios are clamped to +-``log_ratio_clip`` before exp, as in
    ``kl_k3`` and the policy ratio.

    Args:
        logprobs: log pi_theta(x_t), with gradients.              # (B, T)
        ref_logprobs: log pi_ref(x_t).                             # (B, T)
        old_logprobs: log pi_old(x_t), of the policy that sampled (detached).  # (B, T)
        log_ratio_clip: bound on |l| and |log rho|, or None for the exact formula.

    Returns:
        rho * k3 per token, >= 0.                                  # (B, T)
    """
    log_rho = logprobs - old_logprobs.detach()
    if log_ratio_clip is not None:
        log_rho = log_rho.clamp(-log_ratio_clip, log_ratio_clip)
    return torch.exp(log_rho) * kl_k3(logprobs, ref_logprobs, log_ratio_clip=log_ratio_clip)


def cap_kl(per_token_kl: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Each token's KL estimate clamped to [-cap, cap] (``rl.kl_clip``); None: unchanged.

        k_t <- min(max(k_t, -cap), cap)

    verl clamps k3 (and the other estimators it computes in one function) to [-10, 10];
    OpenRLHF clamps k1, k2 and k3 to [-10, 10]. Where the cap acts the token's KL gradient is
    0: a token the reference all but rules out stops dominating the batch's KL term, at the
    price of no longer pulling that token back.

    Args:
        per_token_kl: a per-token estimate.                        # (B, T)
        cap: the bound c > 0, or None.

    Returns:
        The clamped estimate.                                      # (B, T)
    """
    if cap is None:
        return per_token_kl
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    return per_token_kl.clamp(-cap, cap)


def kl_estimate(name: str, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *,
                old_logprobs: torch.Tensor | None = None, cap: float | None = None) -> torch.Tensor:
    """The registered estimator ``name`` (``registry.KL_ESTIMATORS``) per token, capped by
    ``cap_kl``. An estimator that reads the ratio to the sampling policy (k3_ratio) gets
    ``old_logprobs``; without them (the reward, at sampling time) its ratio is 1.   # (B, T)"""
    fn = KL_ESTIMATORS[name]
    if KL_ESTIMATORS.entry(name).options.get("old_logprobs"):
        kl = fn(logprobs, ref_logprobs, old_logprobs=logprobs.detach() if old_logprobs is None else old_logprobs)
    else:
        kl = fn(logprobs, ref_logprobs)
    return cap_kl(kl, cap)


def sequence_kl(per_token_kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level KL: sum_t mask_t * kl_t over the response tokens of each row.

    Padded positions are ignored exactly (selected out with ``torch.where``), so whatever
    they hold, nan or inf included, never reaches the sum.

    Args:
        per_token_kl: a per-token estimate, e.g. ``kl_k1(...)``.   # (B, T)
        mask: 1/True on response tokens, 0/False elsewhere.        # (B, T)

    Returns:
        KL per sequence, in nats.                                  # (B,)
    """
    valid = mask.bool()
    return torch.where(valid, per_token_kl, torch.zeros_like(per_token_kl)).sum(dim=-1)


# ---------------------------------------------------------------------------------------
# Controllers
# ---------------------------------------------------------------------------------------


class FixedKLController:
    """A constant beta; ``update`` does nothing."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Ignore the measurement; return the (unchanged) beta."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class LinearKLController:
    """A linear beta schedule in the number of steps taken so far (a curriculum).

        beta(s) = beta_start + (beta_end - beta_start) * min(s, total_steps) / total_steps

    Typically beta_start > beta_end: hold the policy close to the reference early, then
    let it move. ``update`` advances s by ``n_steps`` (the measured KL is ignored); after
    ``total_steps`` beta stays at ``beta_end``.
    """

    def __init__(self, beta_start: float, beta_end: float, total_steps: int) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if beta_start < 0 or beta_end < 0:
            raise ValueError(f"betas must be >= 0, got {beta_start}, {beta_end}")
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.total_steps = int(total_steps)
        self.steps = 0

    @property
    def value(self) -> float:
        frac = min(self.steps, self.total_steps) / self.total_steps
        return self.beta_start + (self.beta_end - self.beta_start) * frac

    def update(self, current_kl: float, n_steps: int) -> float:
        """Advance the schedule by ``n_steps``; return the new beta."""
        self.steps += int(n_steps)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # value is derived from steps; it is stored only so checkpoints are readable.
        self.steps = int(state["steps"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards ``target``.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences":

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    ``current_kl`` is the mean sequence-level KL of the rollout batch (nats) and
    ``n_steps`` the number of samples (episodes) in it; ``horizon`` sets how many samples
    it takes for beta to change by a factor of about e^0.2 when the error saturates.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if init_beta < 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one controller step; return the new beta."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class LagrangianKLController:
    """beta as the Lagrange multiplier of a KL budget: maximize reward subject to KL <= epsilon.

    The constrained problem  max_pi E_pi[R]  s.t.  KL(pi || pi_ref) <= epsilon  has the
    Lagrangian  L(pi, beta) = E_pi[R] - beta (KL(pi || pi_ref) - epsilon),  beta >= 0. For a
    fixed beta the policy step maximizes L over pi (the usual KL-penalized objective); the
    dual function g(beta) = max_pi L has slope dg/dbeta = epsilon - KL(pi_beta), so projected
    gradient descent on g, one step per rollout batch, is

        beta <- max(0, beta + lr_beta * (KL - epsilon))

    (dual ascent): beta grows while the policy overspends its budget and shrinks, down to
    0, while it underspends. At a fixed point KL = epsilon (or beta = 0 and the budget is
    not binding), the optimum of the constrained problem: pi*_beta at the beta with
    KL(pi*_beta || pi_ref) = epsilon (``rlhflab.optimal.beta_for_kl``). Unlike the adaptive
    controller's multiplicative step, the step is additive, so beta can reach 0 and leave it.

    ``current_kl`` is the batch's mean sequence-level KL in nats; ``n_steps`` is ignored
    (one dual step per batch, whatever its size).
    """

    def __init__(self, init_beta: float, epsilon: float, lr: float) -> None:
        if init_beta < 0:
            raise ValueError(f"init_beta must be >= 0, got {init_beta}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.value = float(init_beta)
        self.epsilon = float(epsilon)
        self.lr = float(lr)

    def update(self, current_kl: float, n_steps: int) -> float:
        """One dual step on the measured KL; return the new beta."""
        self.value = max(0.0, self.value + self.lr * (float(current_kl) - self.epsilon))
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | LinearKLController | AdaptiveKLController | LagrangianKLController

def make_kl_controller(kind: str, **kwargs: Any) -> KLController:
    """Build a controller by name: ``make_kl_controller("adaptive", init_beta=0.1,
    target=6.0, horizon=10000)``. Keyword arguments go to the constructor."""
    try:
        ctor = KL_CONTROLLERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown KL controller {kind!r}; expected one of {sorted(KL_CONTROLLERS)}"
        ) from None
    return ctor(**kwargs)


# ---------------------------------------------------------------------------------------
# How far is too far
# ---------------------------------------------------------------------------------------

KL_STATUS = ("ok", "caution", "warning")


def kl_status(kl: float, caution: float = KL_CAUTION_NATS, warning: float = KL_WARNING_NATS) -> str:
    """'ok', 'caution' (KL > caution) or 'warning' (KL > warning), for a sequence-level KL
    from the reference, in nats."""
    return "warning" if kl > warning else "caution" if kl > caution else "ok"
