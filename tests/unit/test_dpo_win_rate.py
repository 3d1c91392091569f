"""gold_win_rate: ties count half, 95% Wilson interval (rlhflab.instruments.win_rate)."""

from __future__ import annotations

import math

import pytest

from rlhflab.instruments.win_rate import gold_win_rate, wilson_interval


def test_counts_and_ties_half():
    """a vs b over 4 prompts: win, tie, loss, win -> (2 + 0.5) / 4 = 0.625."""
    r = gold_win_rate([1.0, 0.5, -1.0, 2.0], [0.0, 0.5, 0.0, 1.9])
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 1, 1, 4)
    assert r["win_rate"] == 0.625
    assert r["ci_low"] < 0.625 < r["ci_high"]


def test_wilson_interval_by_hand():
    """p = 0.5, n = 100, z = 1.96: denom = 1 + 3.8416/100 = 1.038416, center = 0.5,
    half = 1.96/1.038416 * sqrt(0.0025 + 3.8416/40000) = 1.887487 * 0.050951 = 0.096169
    -> (0.403831, 0.596169)."""
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.403831, abs=2e-5)
    assert high == pytest.approx(0.596169, abs=2e-5)


def test_all_wins_has_a_nonzero_interval_inside_0_1():
    """n = 10, p = 1: the Wilson lower bound is n / (n + z^2) = 10 / 13.841459 = 0.722467;
    the upper bound is 1."""
    r = gold_win_rate([1.0] * 10, [0.0] * 10)
    assert r["win_rate"] == 1.0 and r["ci_high"] == pytest.approx(1.0)
    assert r["ci_low"] == pytest.approx(10 / (10 + 1.959964**2), abs=1e-6)


def test_identical_policies_give_one_half():
    r = gold_win_rate([0.3, -1.0, 2.0], [0.3, -1.0, 2.0])
    assert r["win_rate"] == 0.5 and r["ties"] == 3


def test_exact_coverage_without_and_with_ties():
    """Exact coverage of the 95% interval at a true win-rate of 1/2, summing over every
    outcome. Without ties (binomial) Wilson is close to nominal but not exact: measured
    0.9586 (n=20), 0.9351 (n=50), 0.9431 (n=100). With ties (s = 0, 1/2, 1 with
    probabilities 1/4, 1/2, 1/4: same mean, half the variance) the interval is conservative:
    0.9934 at n = 50."""
    from math import comb, factorial

    def covers(p: float, n: int) -> bool:
        low, high = wilson_interval(p, n)
        return low <= 0.5 <= high

    for n, measured in ((20, 0.9586), (50, 0.9351), (100, 0.9431)):
        coverage = sum(comb(n, k) * 0.5**n for k in range(n + 1) if covers(k / n, n))
        assert coverage == pytest.approx(measured, abs=1e-4)
    n = 50
    with_ties = sum(
        factorial(n) / (factorial(w) * factorial(t) * factorial(n - w - t)) * 0.25**w * 0.5**t * 0.25**(n - w - t)
        for w in range(n + 1) for t in range(n + 1 - w) if covers((w + 0.5 * t) / n, n)
    )
    assert with_ties > 0.99


def test_bad_input():
    with pytest.raises(ValueError, match="has 2 scores"):
        gold_win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no prompts"):
        gold_win_rate([], [])
    with pytest.raises(ValueError, match="finite"):
        gold_win_rate([math.nan], [0.0])
