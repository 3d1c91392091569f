"""Reward-model instrument math against hand-derived values."""

import math

import pytest
import torch

from rlhflab.instruments.rm_eval import (
    calibration,
    expected_calibration_error,
    pearson,
    roc_auc,
    shifted,
)
from rlhflab.reward_model import REDUCTIONS, normalization


def test_ece_by_hand():
    # Bin [0.2, 0.3): p = 0.2, 0.2, outcomes 0, 1 -> |0.2 - 0.5| = 0.3, weight 2/4.
    # Bin [0.8, 0.9): p = 0.8, 0.8, outcomes 1, 1 -> |0.8 - 1.0| = 0.2, weight 2/4.
    ece, points = expected_calibration_error([0.2, 0.2, 0.8, 0.8], [0, 1, 1, 1], n_bins=10)
    assert ece == pytest.approx(0.5 * 0.3 + 0.5 * 0.2)
    assert [p["n"] for p in points] == [2, 2]
    assert points[0]["bin"] == [0.2, 0.3] and points[1]["frequency"] == 1.0
    # p = 1.0 falls in the last bin, not past it.
    assert expected_calibration_error([1.0], [1], n_bins=10)[1][0]["bin"] == [0.9, 1.0]


def test_roc_auc_by_hand():
    # Positives 0.9, 0.4; negatives 0.5, 0.1: of 4 (pos, neg) pairs, 3 are ordered right.
    assert roc_auc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts 1/2.
    assert roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_calibration_uses_votes_in_both_orientations():
    # One pair, p(chosen) = 0.75, votes [1, 1, 0]: outcomes (0.75: 1, 1, 0) and (0.25: 0, 0, 1).
    # Each bin: |0.75 - 2/3| = 1/12, so ECE = 1/12.
    out = calibration([0.75], [{"votes": [1, 1, 0]}])
    assert out["calibration/ece"] == pytest.approx(1 / 12)
    # AUC: positives {0.75, 0.75, 0.25}, negatives {0.25, 0.25, 0.75}: of 9 pairs, 4 are
    # won outright (0.75 over 0.25) and 4 are ties (counting 1/2): (4 + 0.5 * 4) / 9 = 2/3.
    assert out["calibration/auc"] == pytest.approx((4 + 0.5 * 4) / 9)


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1], [1, 2]))


def test_normalization_maps_reference_to_mean_0_std_1():
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])
    gain, bias = normalization(raw)
    z = gain * raw + bias
    assert z.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert normalization(torch.tensor([2.0, 2.0])) == (1.0, -2.0)  # constant: shift only


def test_ensemble_reductions_by_hand():
    s = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # two members, two responses
    assert REDUCTIONS["mean"](s, 1.0).tolist() == [2.0, 0.0]
    assert REDUCTIONS["min"](s, 1.0).tolist() == [1.0, 0.0]
    # Population std of (1, 3) is 1: mean - 2 * std = 0.
    assert REDUCTIONS["mean_minus_std"](s, 2.0).tolist() == [0.0, 0.0]
    one = torch.tensor([[1.5, -0.5]])
    assert all(REDUCTIONS[r](one, 1.0).tolist() == [1.5, -0.5] for r in REDUCTIONS)


def test_shifted_inputs_shuffle_or_repeat():
    import random

    out = shifted(["a b c d", "x y ."], random.Random(0))
    assert sorted(out[0].split()) == ["a", "b", "c", "d"]
    assert out[1] == "x y . x y . x y ."
