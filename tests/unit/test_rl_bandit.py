"""The online algorithms on the enumerable bandit, against the closed-form optimum.

Every run below is the update code of the language-model loops on one-token responses
(rlhflab.algos.bandit_online). The bar, KL(pi_theta || pi*) <= 0.02 nats (mean over the
three prompts of ``default_bandit()``) at beta = 0.5, is the issue's; the measured values
at the default steps are given per test. Distances are computed in float64 by
``rlhflab.optimal``.
"""

from __future__ import annotations

import numpy as np
import pytest

from rlhflab.algos.bandit_online import BANDIT_ALGOS
from rlhflab.bandit import default_bandit, distance_to_optimum
from rlhflab.optimal import kl_divergence

BETA = 0.5
BAR = 0.02


def _distance(algo: str, beta: float = BETA, **options) -> float:
    """KL(pi_theta || pi*(BETA)) after training at ``beta``."""
    problem = default_bandit()
    result = BANDIT_ALGOS[algo](problem, beta, seed=0, **options)
    return distance_to_optimum(result.policy, problem.optimum(BETA))["kl_to_optimum"]


def forward_kl_optimum(pi_ref: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """argmax_pi E_pi[R] - beta * KL(pi_ref || pi), per prompt.

    Stationarity with a multiplier lam: R(y) + beta * pi_ref(y) / pi(y) = lam, so
    pi(y) = beta * pi_ref(y) / (lam - R(y)) with lam > max R chosen by bisection so that
    pi sums to 1 (the sum decreases monotonically in lam)."""
    out = []
    for p, r in zip(pi_ref, rewards):
        lo, hi = r.max() + 1e-12, r.max() + beta + 10.0
        for _ in range(200):
            lam = 0.5 * (lo + hi)
            lo, hi = (lam, hi) if (beta * p / (lam - r)).sum() > 1 else (lo, lam)
        out.append(beta * p / (lam - r))
    return np.array(out)


@pytest.mark.parametrize("algo", ["ppo", "reinforce", "rloo", "reinforce++"])
def test_kl_in_reward_algorithms_reach_pi_star(algo):
    """k1 in the reward optimizes the reverse-KL objective exactly. Measured at the default
    steps (60 for PPO, 300 otherwise): PPO 1e-5, REINFORCE 7e-5, RLOO 4e-6, REINFORCE++ 1e-4
    nats (REINFORCE, RLOO, REINFORCE++ <= 1.3e-4 over seeds 0-2); the bar is 0.02."""
    assert _distance(algo) <= BAR


def test_grpo_with_the_kl_in_the_reward_reaches_pi_star():
    """With k1 in the reward the group std only rescales each prompt's whole return, so the
    fixed point is pi* with or without it (measured at 150 steps: 2e-7 and 8e-6 nats)."""
    assert _distance("grpo", steps=150, kl_in="reward", kl_estimator="k1") <= BAR
    assert _distance("grpo", steps=150, kl_in="reward", kl_estimator="k1", scale_std=False) <= BAR


def test_dr_grpo_with_k2_in_the_loss_reaches_pi_star_at_beta_times_g_minus_1_over_g():
    """Dr. GRPO (no std) with k2 in the loss: the group mean includes the sample itself,
    which scales the reward gradient by (G-1)/G against the KL's, so it converges to
    pi*(beta * G/(G-1)) (measured at 150 steps: 0.0052 nats from pi*(0.5), 1.8e-4 from
    pi*(0.571) at G=8), and to pi*(beta) when run at beta * (G-1)/G (measured 1.9e-4)."""
    G = 8
    assert _distance("grpo", beta=BETA * (G - 1) / G, steps=150, scale_std=False, kl_estimator="k2") <= BAR
    problem = default_bandit()
    policy = BANDIT_ALGOS["grpo"](problem, BETA, seed=0, steps=150, scale_std=False, kl_estimator="k2").policy
    to_shifted = distance_to_optimum(policy, problem.optimum(BETA * G / (G - 1)))["kl_to_optimum"]
    to_nominal = distance_to_optimum(policy, problem.optimum(BETA))["kl_to_optimum"]
    assert to_shifted < 0.2 * to_nominal


def test_reinforce_pp_baseline_reaches_pi_star_at_beta_times_g_minus_1_over_g():
    """REINFORCE++-baseline subtracts the group's mean score, the sample's own included, and
    keeps the KL per token outside that baseline: the score's gradient is scaled by (G-1)/G
    against the KL's, as Dr. GRPO's, so it converges to pi*(beta * G/(G-1)). Measured at 150
    steps, G = 4, seeds 0-2: 0.017-0.021 nats from pi*(0.5) and 1.0e-4 to 3.3e-4 from
    pi*(0.667); run at beta * 3/4 = 0.375, 1.1e-4 to 3.6e-4 from pi*(0.5)."""
    G = 4
    assert _distance("reinforce++-baseline", beta=BETA * (G - 1) / G, steps=150) <= BAR
    problem = default_bandit()
    policy = BANDIT_ALGOS["reinforce++-baseline"](problem, BETA, seed=0, steps=150).policy
    to_shifted = distance_to_optimum(policy, problem.optimum(BETA * G / (G - 1)))["kl_to_optimum"]
    to_nominal = distance_to_optimum(policy, problem.optimum(BETA))["kl_to_optimum"]
    assert to_shifted < 0.2 * to_nominal and to_nominal > 0.01


def test_k3_in_the_loss_targets_the_forward_kl_solution():
    """RLOO with k3 in the loss: the gradient of k3 on on-policy samples is that of the
    forward KL(pi_ref || pi), so the fixed point is the forward-KL-regularized optimum,
    not pi*. Measured: 4e-5 nats from the forward solution, 0.044 from pi*."""
    problem = default_bandit()
    result = BANDIT_ALGOS["rloo"](problem, BETA, seed=0, kl_in="loss", kl_estimator="k3")
    forward = forward_kl_optimum(problem.pi_ref, problem.rewards, BETA)
    assert float(np.mean(kl_divergence(result.policy, forward))) <= 0.005
    assert distance_to_optimum(result.policy, problem.optimum(BETA))["kl_to_optimum"] > BAR


def test_default_grpo_does_not_reach_pi_star():
    """GRPO as published (std scaling, k3 in the loss): a finding, not a bug. Measured
    0.22 nats from pi* (150 steps as at 300 or 600); the test guards the documented
    number's order of magnitude."""
    assert _distance("grpo", steps=150) > 0.1


def test_truncated_importance_sampling_corrects_a_sampler_mismatch():
    """Samples drawn at temperature 0.7 but trained as if drawn from pi_theta: REINFORCE's
    batch baseline leaves each prompt's constant in the advantages at pi*, whose off-policy
    gradient does not vanish, so the fixed point moves; TIS (weights min(pi_theta /
    pi_sampler, C)) brings it back. Measured at beta 0.5: KL(pi || pi*) 0.0001 on-policy,
    0.0338 with the mismatch, 0.0005 with C = 2 (the table in docs/online-rl.md)."""
    on_policy = _distance("reinforce")
    mismatch = _distance("reinforce", sampler_temperature=0.7)
    corrected = _distance("reinforce", sampler_temperature=0.7, tis_cap=2.0)
    assert mismatch > 20 * max(on_policy, corrected)
    assert corrected <= 0.002
