"""Gold win-rate of one policy against another on the same prompts.

For prompts i = 1..n, each policy answers once; the gold judge scores both answers and the
per-prompt score is s_i = 1 if a's answer scores higher, 0 if lower, 1/2 on a tie:

    win_rate = (wins + ties / 2) / n

Confidence interval: the Wilson score interval (Wilson 1927) at 95% with the tie-adjusted
proportion p = win_rate in place of a binomial proportion,

    center = (p + z^2/(2n)) / (1 + z^2/n)
    half   = z / (1 + z^2/n) * sqrt(p (1 - p) / n + z^2 / (4 n^2)),      z = 1.959964

Each s_i lies in [0, 1], so Var(s_i) <= p (1 - p): with ties the true variance is smaller
than the binomial one the interval assumes, which makes the interval conservative (never
too narrow). Unlike the normal interval it stays inside [0, 1] and has non-zero width when
every prompt is a win. Prompts must be independent (one sample per prompt); sampling both
policies with the same seed pairs their randomness, which is allowed and reduces variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import fmean

Z_95 = 1.959963984540054  # standard normal quantile at 0.975


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion p observed on n trials."""
    if n <= 0:
        raise ValueError("n must be positive")
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def gold_win_rate(golds_a: Sequence[float], golds_b: Sequence[float], *,
                  tie_tol: float = 1e-9) -> dict[str, float]:
    """Win-rate of a over b from per-prompt gold scores (same prompts, same order).

    |a_i - b_i| <= tie_tol counts as a tie (half a win). Returns ``win_rate``, ``ci_low``,
    ``ci_high`` (95% Wilson, see the module docstring), ``n``, and the counts ``wins``,
    ``ties``, ``losses``.
    """
    if len(golds_a) != len(golds_b):
        raise ValueError(f"golds_a has {len(golds_a)} scores but golds_b has {len(golds_b)}")
    n = len(golds_a)
    if n == 0:
        raise ValueError("no prompts to compare")
    wins = ties = 0
    for a, b in zip(golds_a, golds_b):
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"gold scores must be finite, got {a} and {b}")
        if abs(a - b) <= tie_tol:
            ties += 1
        elif a > b:
            wins += 1
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(rate, n)
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "n": n,
            "wins": wins, "ties": ties, "losses": n - wins - ties}


def length_controlled_win_rate(wins: list[float], length_diff: list[float], iters: int = 50) -> float:
    """Win-rate at zero length difference: fit P(win) = sigmoid(a + b * dlen) by Newton's
    method (ties count as half a win, i.e. a fractional label) and return sigmoid(a), as in
    length-controlled AlpacaEval (Dubois et al. 2024). dlen is in tokens, standardized."""
    n = len(wins)
    if n == 0:
        return float("nan")
    sd = math.sqrt(fmean(d * d for d in length_diff)) or 1.0
    xs = [d / sd for d in length_diff]
    a = b = 0.0
    for _ in range(iters):
        ps = [1 / (1 + math.exp(-(a + b * x))) for x in xs]
        ga = sum(w - p for w, p in zip(wins, ps))
        gb = sum((w - p) * x for w, p, x in zip(wins, ps, xs))
        haa = sum(p * (1 - p) for p in ps) + 1e-6
        hab = sum(p * (1 - p) * x for p, x in zip(ps, xs))
        hbb = sum(p * (1 - p) * x * x for p, x in zip(ps, xs)) + 1e-6
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        a += (hbb * ga - hab * gb) / det
        b += (haa * gb - hab * ga) / det
        a, b = max(-20.0, min(20.0, a)), max(-20.0, min(20.0, b))
    return 1 / (1 + math.exp(-a))
