"""Best-of-n, exactly: its law against hand-derived cases, its KL against the analytic
bound, n = 1 as pi_ref, the bandit CLI, the plug-in KL on sampled candidates and the
best-of-n law of Gao et al."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhflab.bandit import default_bandit
from rlhflab.cli import main
from rlhflab.errors import InputError
from rlhflab.optimal import best_of_n_kl_bound, best_of_n_policy, kl_divergence


def test_two_actions_by_hand():
    """pi_ref = (1/2, 1/2), R = (1, 0), n = 2: the worse response is kept only when both
    draws are it, 1/4; so pi_bon = (3/4, 1/4) and KL = 3/4 log(3/2) + 1/4 log(1/2)
    = 0.304099 - 0.173287 = 0.130812 nats, under log 2 - 1/2 = 0.193147."""
    q = best_of_n_policy([0.5, 0.5], [1.0, 0.0], 2)
    np.testing.assert_allclose(q, [0.75, 0.25], atol=1e-12)
    assert float(kl_divergence(q, [0.5, 0.5])) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)


def test_three_actions_with_a_tie_by_hand():
    """pi_ref = (1/2, 1/4, 1/4), R = (0, 1, 1), n = 2: the top level (mass 1/2) is kept
    unless both draws are response 0, so P(top) = 1 - 1/4 = 3/4, shared by the tied
    responses in proportion to pi_ref: 3/8 each; response 0 keeps 1/4."""
    np.testing.assert_allclose(best_of_n_policy([0.5, 0.25, 0.25], [0.0, 1.0, 1.0], 2), [0.25, 0.375, 0.375])
    # n = 3 without ties, pi_ref uniform over 3, R = (0, 1, 2): F = 1/3, 2/3, 1, so
    # pi_bon = (1/27, 8/27 - 1/27, 1 - 8/27) = (1, 7, 19) / 27
    np.testing.assert_allclose(best_of_n_policy([1 / 3] * 3, [0.0, 1.0, 2.0], 3), np.array([1, 7, 19]) / 27)


def test_n_one_is_pi_ref():
    p = default_bandit()
    np.testing.assert_allclose(best_of_n_policy(p.pi_ref, p.rewards, 1), p.pi_ref, atol=1e-15)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 64, 256])
def test_exact_kl_under_the_analytic_bound(n):
    """Beirami et al. 2024: KL(pi_bon || pi_ref) <= log n - (n-1)/n, on every prompt of
    the default bandit and on one with 50 responses of distinct rewards, where the bound
    is nearly tight for small n (the formula assumes a continuum of rewards)."""
    p = default_bandit()
    q = best_of_n_policy(p.pi_ref, p.rewards, n)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-12)
    assert (np.asarray(kl_divergence(q, p.pi_ref)) <= best_of_n_kl_bound(n) + 1e-12).all()
    fine = np.full(50, 1 / 50)
    kl = float(kl_divergence(best_of_n_policy(fine, np.arange(50.0), n), fine))
    assert kl <= best_of_n_kl_bound(n) + 1e-12
    if n <= 4:  # 50 atoms approximate the continuum: within 0.02 nats of the formula
        assert kl > best_of_n_kl_bound(n) - 0.02


def test_expected_reward_rises_with_n():
    p = default_bandit()
    rewards = [float((best_of_n_policy(p.pi_ref, p.rewards, n) * p.rewards).sum(1).mean()) for n in (1, 2, 4, 8)]
    assert rewards == sorted(rewards) and rewards[-1] > rewards[0]


def test_bad_n():
    with pytest.raises(InputError, match="n"):
        best_of_n_policy([0.5, 0.5], [1.0, 0.0], 0)


def test_bandit_cli(capsys):
    assert main(["bandit", "--algo", "bon", "--n", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    p = default_bandit()
    np.testing.assert_allclose(row["policy"], best_of_n_policy(p.pi_ref, p.rewards, 4), atol=1e-6)
    assert row["kl"] <= row["kl_analytic"] == pytest.approx(math.log(4) - 0.75)
    assert row["expected_reward"] > row["ref_expected_reward"]
    assert main(["bandit", "--algo", "bon", "--n", "0"]) == 2
    assert main(["bandit", "--algo", "reinforce", "--n", "3"]) == 2


def test_plugin_kl_on_candidates_by_hand():
    """Candidates a, a, b, c with proxy scores 1, 1, 0, 2 (empirical law a 1/2, b 1/4, c 1/4),
    n = 2: F = 1/4 (b), 3/4 (a), 1 (c), so pi_bon = (1/16, 9/16 - 1/16, 1 - 9/16) for
    (b, a, c) = (0.0625, 0.5, 0.4375) and KL = 0.0625 log(0.25) + 0.5 log(1) + 0.4375 log(1.75)
    = 0.158188 nats, under log 2 - 1/2 = 0.193147 because a repeats."""
    from rlhflab.algos.best_of_n import best_indices, plugin_kl

    kl = plugin_kl(["a", "a", "b", "c"], [1.0, 1.0, 0.0, 2.0], 2)
    assert kl == pytest.approx(0.0625 * math.log(0.25) + 0.4375 * math.log(1.75), abs=1e-12)
    assert plugin_kl(["a", "a", "b", "c"], [1.0, 1.0, 0.0, 2.0], 1) == pytest.approx(0.0, abs=1e-15)
    # best of the first n only: prefixes nest
    scores = np.array([[0.0, 3.0, 1.0, 5.0], [2.0, 2.0, 1.0, 0.0]])
    assert best_indices(scores, 1).tolist() == [0, 0]
    assert best_indices(scores, 3).tolist() == [1, 0]
    assert best_indices(scores, 4).tolist() == [3, 0]


def test_fit_bon_recovers_the_law():
    """Points on R(d) = d (0.8 - 0.2 d): alpha 0.8, beta 0.2, peak at d* = 0.8 / 0.4 = 2."""
    from rlhflab.instruments.overoptimization import fit_bon

    d = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    fit = fit_bon(d, [x * (0.8 - 0.2 * x) for x in d])
    assert fit["alpha"] == pytest.approx(0.8) and fit["beta_g"] == pytest.approx(0.2)
    assert fit["d_peak"] == pytest.approx(2.0) and fit["peak_in_range"] == 1.0
