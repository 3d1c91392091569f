"""The DPO family on the enumerable bandit, against exact optima (rlhflab.algos.bandit_offline).

Measured values quoted in docstrings come from the runs the tests make (seeds as given).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhflab.algos.bandit_offline import (
    BANDIT_ALGOS,
    ipo_optimum,
    ipo_population_optimum,
    preference_matrix,
    sample_pairs,
)
from rlhflab.bandit import BanditProblem, default_bandit, distance_to_optimum
from rlhflab.cli import main
from rlhflab.optimal import kl_divergence


def mean_kl(p, q) -> float:
    return float(np.mean(kl_divergence(p, q)))


def test_registry_has_the_whole_family():
    assert set(BANDIT_ALGOS) == {"dpo", "cdpo", "ipo", "hinge", "kto", "simpo", "orpo"}


def test_pairs_follow_bradley_terry_and_drop_identical_draws():
    """Two responses, pi_ref = (0.5, 0.5), R = (1, 0): half the draws are y1 == y2 (dropped);
    response 0 wins the rest with probability sigmoid(1) = 0.731. With 40000 draws the
    standard error of that frequency is sqrt(0.73*0.27/20000) = 0.003."""
    problem = BanditProblem(pi_ref=[[0.5, 0.5]], rewards=[[1.0, 0.0]])
    data = sample_pairs(problem, 40000, seed=1)
    assert data.n_identical + len(data.prompts) == 40000
    assert data.n_identical / 40000 == pytest.approx(0.5, abs=0.01)
    assert bool((data.chosen != data.rejected).all())
    assert (data.chosen == 0).float().mean().item() == pytest.approx(1 / (1 + math.exp(-1)), abs=0.012)
    det = sample_pairs(problem, 1000, seed=1, deterministic=True)
    assert bool((det.chosen == 0).all())


def test_dpo_with_enough_pairs_reaches_the_kl_optimum():
    """pi* = pi_ref exp(R/beta)/Z at beta = 0.5. With 20000 sampled comparisons (about
    14500 left after dropping y1 == y2) DPO's empirical optimum is within
    KL(pi_theta || pi*) = 0.0016, 0.0034, 0.0032 nats for seeds 0, 1, 2 (measured); the bar
    is the issue's 0.02. The same policy is far from pi* at another beta (the test can
    fail): KL to pi*(beta=1) is about 0.1."""
    problem = default_bandit()
    for seed in (0, 1, 2):
        result = BANDIT_ALGOS["dpo"](problem, 0.5, seed=seed, pairs=20000)
        assert distance_to_optimum(result.policy, problem.optimum(0.5))["kl_to_optimum"] <= 0.02
    assert mean_kl(result.policy, problem.optimum(1.0)) > 0.05


def test_ipo_closed_form_by_hand():
    """pi_ref = (0.5, 0.5), R = (1, 0), tau = 1. P(y1 > pi_ref) = 0.5*0.5 + 0.5*sigmoid(1)
    = 0.615529, P(y2 > pi_ref) = 0.5*sigmoid(-1) + 0.25 = 0.384471, so
    pi(y1) = sigmoid(0.615529 - 0.384471) = sigmoid(0.231059) = 0.557510.
    The Laplacian solve with population weights pi_ref(y) pi_ref(y') P(y > y') agrees."""
    problem = BanditProblem(pi_ref=[[0.5, 0.5]], rewards=[[1.0, 0.0]])
    closed = ipo_population_optimum(problem, 1.0)
    assert closed[0, 0] == pytest.approx(0.557510, abs=1e-6)
    wins = problem.pi_ref[:, :, None] * problem.pi_ref[:, None, :] * preference_matrix(problem)
    assert np.allclose(ipo_optimum(problem.pi_ref, wins, 1.0), closed, atol=1e-12)


def test_ipo_laplacian_solution_matches_the_population_formula_on_the_default_bandit():
    problem = default_bandit()
    for tau in (0.1, 0.5, 2.0):
        for det in (False, True):
            wins = problem.pi_ref[:, :, None] * problem.pi_ref[:, None, :] * preference_matrix(problem, det)
            assert np.allclose(ipo_optimum(problem.pi_ref, wins, tau),
                               ipo_population_optimum(problem, tau, det), atol=1e-10)


def test_ipo_converges_to_its_analytic_optimum():
    """Trained on 20000 sampled comparisons, IPO lands on the closed form computed from the
    SAME sampled win counts (measured KL ~1e-12: the loss is quadratic, the optimizer
    exact), and within KL 5e-5..1.9e-4 (seeds 0-4, measured) of the population optimum
    pi_ref exp(P(y > pi_ref)/tau)/Z; bar 1e-3. That optimum is not DPO's pi*: KL 0.27."""
    problem = default_bandit()
    result = BANDIT_ALGOS["ipo"](problem, 0.5, seed=0, pairs=20000)
    assert result.extra["kl_to_ipo_empirical_optimum"] < 1e-8
    assert result.extra["kl_to_ipo_population_optimum"] < 1e-3
    assert mean_kl(result.policy, problem.optimum(0.5)) > 0.1


def test_dpo_drives_a_deterministic_loser_to_zero_whatever_beta_but_ipo_does_not():
    """Deterministic preferences (the better reward always wins): the DPO loss has no
    minimizer, the worst response's probability only falls. Measured after the default 500
    steps: below 1e-9 at beta = 0.5 and about 1e-4 at beta = 2 (pi_ref gives it 0.1-0.4).
    IPO at tau = 2 converges to its closed form, which keeps it at 0.16-0.34."""
    problem = default_bandit()
    worst = problem.rewards.argmin(1)
    for beta in (0.5, 2.0):
        result = BANDIT_ALGOS["dpo"](problem, beta, seed=0, pairs=5000, deterministic=True)
        assert result.policy[np.arange(3), worst].max() < 1e-3
    ipo = BANDIT_ALGOS["ipo"](problem, 2.0, seed=0, pairs=5000, deterministic=True)
    assert ipo.policy[np.arange(3), worst].min() > 0.1
    assert ipo.extra["kl_to_ipo_empirical_optimum"] < 1e-8


def test_simpo_is_anchored_to_uniform_not_to_the_reference():
    """SimPO with gamma = 0 and unit lengths is Bradley-Terry on beta*log pi, so its optimum
    is softmax(R/beta): the KL-regularized optimum for a UNIFORM reference, whatever pi_ref.
    Measured at beta = 2 (seeds 0-4): KL to softmax(R/2) 0.8e-4..2.7e-4; bar 2e-3. Its KL
    from pi_ref stays 0.15 while DPO's optimum at the same beta is 0.034 from pi_ref."""
    problem = default_bandit()
    result = BANDIT_ALGOS["simpo"](problem, 2.0, seed=0, pairs=20000, gamma=0.0)
    e = np.exp(problem.rewards / 2.0)
    assert mean_kl(result.policy, e / e.sum(1, keepdims=True)) < 2e-3
    assert result.extra["kl_to_ref"] > 3 * mean_kl(problem.optimum(2.0), problem.pi_ref)


def test_orpo_with_small_lambda_is_sft_on_the_winners():
    """ORPO's NLL term alone fits the distribution of chosen responses,
    q_w(y) ∝ pi_ref(y) sum_{y' != y} pi_ref(y') P(y > y'), not pi_ref: at lambda = 0.01
    (seeds 0-4, measured) KL(pi || q_w) = 1.8e-4..6.5e-4 (bar 3e-3) and KL(pi || pi_ref)
    about 0.07, which no setting of lambda brings to 0."""
    problem = default_bandit()
    result = BANDIT_ALGOS["orpo"](problem, 0.01, seed=0, pairs=20000)
    prefs = preference_matrix(problem) * (1 - np.eye(4))
    q_w = problem.pi_ref * np.einsum("xyz,xz->xy", prefs, problem.pi_ref)
    q_w /= q_w.sum(1, keepdims=True)
    assert mean_kl(result.policy, q_w) < 3e-3
    assert result.extra["kl_to_ref"] > 0.04


def test_every_algorithm_runs_and_reports():
    problem = default_bandit()
    for fn in BANDIT_ALGOS.values():
        result = fn(problem, 0.5, seed=0, pairs=500, steps=20)
        assert result.policy.shape == (3, 4) and np.allclose(result.policy.sum(1), 1.0)
        assert result.extra["pairs"] + result.extra["pairs_identical_dropped"] == 500
    with pytest.raises(TypeError, match="unknown option"):
        BANDIT_ALGOS["dpo"](problem, 0.5, seed=0, pairs=100, steps=2, nonsense=1)
    with pytest.raises(TypeError, match="kl-estimator"):
        BANDIT_ALGOS["dpo"](problem, 0.5, seed=0, pairs=100, steps=2, kl_estimator="k1")


def test_bandit_cli_json(capsys):
    assert main(["bandit", "--algo", "ipo", "--pairs", "2000", "--steps", "200", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["algo"] == "ipo" and row["pairs"] + row["pairs_identical_dropped"] == 2000
    assert row["kl_to_ipo_empirical_optimum"] < 1e-6
    assert main(["bandit", "--algo", "dpo", "--option", "bogus=1", "--json"]) == 2
