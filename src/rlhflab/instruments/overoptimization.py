"""Over-optimization (Gao, Schulman & Hilton 2022): gold reward against d = sqrt(KL).

Under RL the gold reward gained over the initial policy follows

    R_RL(d)  = d * (alpha - beta_g * log d),    peak at d* = exp(alpha / beta_g - 1), R* = beta_g * d*

and under best-of-n R_bon(d) = d * (alpha - beta_g * d), peak at d* = alpha / (2 beta_g).
Both are linear in (alpha, beta_g), so they are fitted by least squares. The proxy (the
reward model's score) keeps rising while the gold peaks and falls.
"""

from __future__ import annotations

import math

import numpy as np


def fit_gao(d: list[float], gold_gain: list[float], form: str = "rl") -> dict[str, float]:
    """Least-squares fit of R(d) to ``gold_gain`` (gold minus its value at d = 0).

    Returns alpha, beta_g, the fitted peak d*, KL* = d*^2 and R*, the fit's R^2, and
    ``peak_in_range``: 1 when d* lies within the measured d (a peak the data show), 0 when
    it is an extrapolation (or there is no turning point): then the curve has no peak
    within the measured KL, whatever number the formula gives. ``d_max`` is the largest
    measured d. Points with d <= 0 carry no information about the shape and are dropped.
    """
    x = np.asarray(d, dtype=np.float64)
    y = np.asarray(gold_gain, dtype=np.float64)
    keep = x > 1e-9
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return {"alpha": float("nan"), "beta_g": float("nan"), "d_peak": float("nan"),
                "kl_peak": float("nan"), "gold_gain_peak": float("nan"), "r2": float("nan"), "n": float(len(x)),
                "peak_in_range": 0.0, "d_max": float(x.max()) if len(x) else float("nan")}
    second = -x * np.log(x) if form == "rl" else -x * x
    A = np.stack([x, second], 1)
    (alpha, beta_g), *_ = np.linalg.lstsq(A, y, rcond=None)
    pred = A @ np.array([alpha, beta_g])
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    if beta_g <= 0:  # no turning point: the gold is still rising within the fitted range
        d_peak = peak = float("inf")
    elif form == "rl":
        d_peak = math.exp(min(50.0, alpha / beta_g - 1))
        peak = beta_g * d_peak
    else:
        d_peak = alpha / (2 * beta_g)
        peak = alpha * d_peak - beta_g * d_peak**2
    return {"alpha": float(alpha), "beta_g": float(beta_g), "d_peak": float(d_peak),
            "kl_peak": float(d_peak) ** 2, "gold_gain_peak": float(peak),
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "n": float(len(x)),
            "peak_in_range": float(bool(x.min() <= d_peak <= x.max())), "d_max": float(x.max())}


def curve_readings(kl: list[float], gold: list[float], proxy: list[float]) -> dict[str, float]:
    """Readings of a training curve (one point per evaluation, in step order): the gold
    peak, how far gold fell after it, how much the proxy rose after it, and the Gao fit."""
    if not gold:
        return {}
    i = int(np.argmax(gold))
    out = {
        "overopt/gold_peak": float(gold[i]),
        "overopt/gold_peak_kl": float(kl[i]),
        "overopt/gold_final": float(gold[-1]),
        "overopt/gold_drop_from_peak": float(gold[i] - gold[-1]),
        "overopt/proxy_gain_after_peak": float(proxy[-1] - proxy[i]) if proxy else float("nan"),
    }
    d = [math.sqrt(max(0.0, k)) for k in kl]
    fit = fit_gao(d, [g - gold[0] for g in gold], "rl")
    out.update({f"overopt/fit_{k}": v for k, v in fit.items()})
    return out


def fit_bon(d: list[float], gold_gain: list[float]) -> dict[str, float]:
    """Gao et al.'s best-of-n law R_bon(d) = d (alpha - beta_g d), d = sqrt(KL of best-of-n
    from the policy), fitted to the gold gained over the policy's own samples: ``fit_gao``
    with ``form="bon"``, the same keys as the RL law's fit beside it."""
    return fit_gao(d, gold_gain, "bon")
