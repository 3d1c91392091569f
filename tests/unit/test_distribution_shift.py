"""The distribution-shift reading's math and the rejection-sampling selection, by hand."""

import math

import numpy as np
import pytest
import torch

from rlhflab.algos.rejection_sampling import select_best
from rlhflab.commands.iterate import split_budget
from rlhflab.errors import InputError
from rlhflab.instruments.distribution_shift import fit_gaussian, mahalanobis


def test_mahalanobis_by_hand():
    """mu = (1, 0), P = diag(1/4, 1): x = (3, 1) -> z = (2, 1), D^2 = 4/4 + 1 = 2;
    x = mu -> 0."""
    mu = torch.tensor([1.0, 0.0])
    P = torch.diag(torch.tensor([0.25, 1.0]))
    d = mahalanobis(torch.tensor([[3.0, 1.0], [1.0, 0.0]]), mu, P)
    assert d.tolist() == pytest.approx([math.sqrt(2.0), 0.0])


def test_fit_gaussian_by_hand():
    """Points (0,0), (2,0), (0,2), (2,2): mu = (1, 1), Sigma = I (ML covariance), tr = 2, d = 2,
    so lambda = shrink * 1 and P = I / (1 + shrink)."""
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    mu, P = fit_gaussian(x, shrink=0.5)
    assert mu.tolist() == pytest.approx([1.0, 1.0])
    assert P.numpy() == pytest.approx(np.eye(2) / 1.5)


def test_fit_gaussian_constant_features_stay_finite():
    mu, P = fit_gaussian(torch.ones(5, 3))
    assert torch.isfinite(P).all() and mahalanobis(torch.ones(1, 3), mu, P).item() == 0.0


def test_far_points_read_far():
    """Drawn from N(0, I) in 4 dimensions, the squared distance has mean ~ d = 4; a point 10
    std out along one axis reads ~10."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=g)
    mu, P = fit_gaussian(x, shrink=1e-3)
    assert (mahalanobis(x, mu, P) ** 2).mean().item() == pytest.approx(4.0, rel=0.05)
    assert mahalanobis(torch.tensor([[10.0, 0, 0, 0]]), mu, P).item() == pytest.approx(10.0, rel=0.05)


def test_select_best_skips_unended_and_threshold():
    scores = np.array([[0.1, 0.9, 0.5], [2.0, 1.0, 0.0], [0.3, 0.2, 0.1]])
    ended = np.array([[True, False, True], [False, False, False], [True, True, True]])
    # row 0: 0.9 has no EOS, best ended is index 2; row 1: none ended; row 2: best 0.3
    assert select_best(scores, ended) == [2, None, 0]
    assert select_best(scores, ended, threshold=0.4) == [2, None, None]


def test_split_budget():
    assert split_budget(10, 3, "x") == [4, 3, 3]
    assert split_budget(9, 1, "x") == [9]
    with pytest.raises(InputError):
        split_budget(2, 3, "x")


def test_diagnosis_flags_shift_beyond_binomial_noise():
    """In distribution 5% of samples lie beyond the held-out 95th percentile; the rule fires
    above 5% + 3 binomial standard errors: n = 200 -> 0.05 + 3 sqrt(0.05 * 0.95 / 200) = 0.096."""
    from rlhflab.diagnose import diagnose

    def names(rate, n):
        return [f["name"] for f in diagnose({"shift/ood_rate": rate, "shift/n": n})["findings"]]

    assert "distribution_shift" in names(0.10, 200)
    assert "distribution_shift" not in names(0.09, 200)
    assert "distribution_shift" not in names(0.10, 40)  # 40 samples: the limit is 0.153
    finding = next(f for f in diagnose({"shift/ood_rate": 0.5, "shift/n": 200})["findings"]
                   if f["name"] == "distribution_shift")
    assert "rlhflab iterate" in finding["fix"] and "raise beta" in finding["fix"]
