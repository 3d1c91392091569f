"""Early warning during online RL, without gold: readings a run computes on a user's own
setup at every held-out evaluation (``rl.eval_every``), and the rule that turns them into a
warning. All are logged under ``warn/...`` in ``metrics.jsonl``.

The reference is the SFT policy itself (the run's frozen reference model), sampled twice on
the held-out prompts with seeds of their own: draw A fits the reference, draw B, fresh
samples of the same policy, says what "nothing moved" looks like. The features are what the
reward model's head reads (``instruments.distribution_shift.member_features``: the last
hidden state at the pooled token), per member of an ensemble; readings average the members.

- ``warn/outlier_rate``: the share of the policy's samples whose Mahalanobis distance to
  draw A's features lies beyond the 99th percentile of draw B's distances (InfoRM, Miao et
  al. 2024, who read the reward model's latent space against the SFT model's outputs). The
  percentile is taken out of sample: with 200 samples of 128 features, the in-sample 99th
  percentile had 9.5-15% of a fresh SFT draw beyond it on the demo world (the fit is tight
  around its own points), so the cut must come from samples the fit never saw. 1% by
  construction for samples like the SFT policy's.
- ``warn/feature_shift``: the Mahalanobis distance of the mean of the policy's sample
  features from draw A's mean, and ``warn/feature_shift_ratio``, that over the same distance
  of draw B's mean (the sampling noise of a mean of as many SFT samples): 1 when the samples
  are, as a set, the SFT policy's. A distribution-level reading where the outlier rate is a
  tail count: see docs/instruments.md for why the tail count does not move under
  over-optimization (the policy's samples grow more typical, not less) and the set's mean
  does.
- ``warn/ensemble_std`` (ensembles): the mean over samples of the std over members of their
  normalized scores (Coste et al. 2024; Eisenstein et al. 2023), and ``warn/ensemble_ratio``,
  that over the same on draw A (the SFT policy's samples).
- ``warn/proxy_gain``, ``warn/judge_drop``, ``warn/proxy_up_judge_down`` (with
  ``--eval-prompts --judge``): the run's reward now minus at the judge's best evaluation, the
  judge's best win-rate minus its win-rate now, and 1 when the proxy rose while the
  win-rate's 95% interval now lies wholly below the best (Gao et al. 2022's shape, seen
  through a judge instead of gold).
- ``warn/exploit_gain``: the low end of the 95% interval of the reward-model attack's
  first-ranked pattern (``rl.attack_every``, ``instruments.rm_attack``), its last attack.
- ``warn/kl_acceleration``, ``warn/entropy_drop``, ``warn/length_drift`` (``curve_readings``):
  the run's own training curve in windows of ``rl.eval_every`` steps: the second difference
  of the mean KL over the last three windows, the fall of the mean entropy from the first
  window's, and the log-ratio of the mean response length to the first window's. The
  readings users of reward-hacking monitors watch (KL acceleration, entropy collapse, length
  drift); logged, and in the rule only where the instrument card found them to warn.

The rule (``triggers``): any one reading past its bar (``BARS``) fires; ``warn/fired`` is the
step of the first evaluation at which one did, ``warn/fired_<reading>`` names which, and
``warn/evals`` counts the evaluations checked. ``rlhflab diagnose RUN`` reads them as the
``early_warning`` finding. The bars are our own, stated per reading below; the instrument
card (``bench/instrument_card.py``) measures how early and how often they fire.
"""

from __future__ import annotations

import math

import torch

from rlhflab.instruments.distribution_shift import fit_gaussian, mahalanobis

# The ridge of the reference's covariance, lambda = SHRINK * tr(Sigma) / d. On the demo world
# (200 SFT samples, 128 features; bench/warning_readings.py) a fresh SFT draw lay beyond the
# fitted draw's own 99th percentile 9.5-15% of the time at 0.01, 5.5-8.5% at 0.1: the larger
# ridge overfits less, and the percentile is taken out of sample either way.
SHRINK = 0.1
OUTLIER_QUANTILE = 0.99

# reading -> (bar, where it comes from). A reading fires when it exceeds its bar. The card's
# bars (bench/instrument_card.py --card card, bench/results/instrument_card.json) are each
# reading's largest value at any evaluation of the 12 healthy online runs of seeds 0-2; on the 16
# of seeds 3-6 none of the three fired. The outlier rate (4 of 16 fresh healthy runs past its
# fitted bar), the length drift (3 of 16) and the entropy drop (never before gold fell) are
# logged and not in the rule.
BARS: dict[str, tuple[float, str]] = {
    "feature_shift_ratio": (1.91, "instrument card: the healthy runs' largest, 1.90 (was 1.5, which fired on 8 of "
                                  "28 healthy runs)"),
    "exploit_gain": (0.57, "instrument card: the healthy runs' largest, 0.569 (was 0.4, diagnose's "
                           "reward_exploit_gain, which fired on 14 of 28 healthy runs)"),
    "kl_acceleration": (0.44, "instrument card: the healthy runs' largest, 0.434 nats"),
    "ensemble_ratio": (1.5, "own, not on the card (no ensemble there): members disagreeing half as much again as "
                            "on the SFT policy's samples; no published cut (Coste et al. 2024 read the spread)"),
    "proxy_up_judge_down": (0.5, "the flag, not on the card (no judge there): proxy up while the judge's interval "
                                 "lies below its best"),
}


def fit_reference(fit_features: torch.Tensor, check_features: torch.Tensor, shrink: float = SHRINK,
                  quantile: float = OUTLIER_QUANTILE) -> dict[str, torch.Tensor]:
    """The reference of one member: ``mean`` and ``precision`` of draw A's (N, d) features
    (``distribution_shift.fit_gaussian``), ``cut``, the ``quantile`` of draw B's distances to
    it (out of sample), and ``floor``, the distance of draw B's mean (the noise of a mean)."""
    mu, precision = fit_gaussian(fit_features, shrink)
    d = mahalanobis(check_features, mu, precision)
    return {"mean": mu, "precision": precision, "cut": torch.quantile(d, quantile),
            "floor": mean_shift(check_features, mu, precision)}


def outlier_rate(features: torch.Tensor, ref: dict[str, torch.Tensor]) -> float:
    """The share of rows of (N, d) ``features`` farther than ``ref["cut"]`` from the reference."""
    return float((mahalanobis(features, ref["mean"], ref["precision"]) > ref["cut"]).double().mean())


def mean_shift(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> float:
    """sqrt((xbar - mu)^T P (xbar - mu)) for the mean xbar of the rows of (N, d) ``features``."""
    return float(mahalanobis(features.double().mean(0, keepdim=True), mean, precision)[0])


def ensemble_spread(member_scores: torch.Tensor) -> float:
    """Mean over samples of the (population) std over members of (M, N) normalized scores."""
    return float(member_scores.double().std(0, unbiased=False).mean())


def feature_readings(features: list[torch.Tensor], refs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """``warn/outlier_rate``, ``warn/feature_shift``, ``warn/feature_shift_ratio`` of per-member
    (N, d) features against per-member references (``fit_reference``), averaged over members."""
    rates = [outlier_rate(f, r) for f, r in zip(features, refs)]
    shifts = [mean_shift(f, r["mean"], r["precision"]) for f, r in zip(features, refs)]
    ratios = [s / float(r["floor"]) if float(r["floor"]) > 0 else math.inf for s, r in zip(shifts, refs)]
    n = len(refs)
    return {"warn/outlier_rate": sum(rates) / n, "warn/feature_shift": sum(shifts) / n,
            "warn/feature_shift_ratio": sum(ratios) / n, "warn/n": float(features[0].shape[0])}


def proxy_judge_readings(evals: list[dict]) -> dict[str, float]:
    """From the evaluations so far (each with ``eval/proxy_mean``, ``eval/win_rate`` and its
    ``eval/win_rate_ci_high``), the last against the one with the best win-rate:
    ``warn/proxy_gain``, ``warn/judge_drop`` and the ``warn/proxy_up_judge_down`` flag; {}
    without a judge's win-rate."""
    judged = [e for e in evals if e.get("eval/win_rate") is not None]
    if not judged:
        return {}
    best, now = max(judged, key=lambda e: e["eval/win_rate"]), judged[-1]
    gain = now["eval/proxy_mean"] - best["eval/proxy_mean"]
    drop = best["eval/win_rate"] - now["eval/win_rate"]
    below = now.get("eval/win_rate_ci_high", now["eval/win_rate"]) < best["eval/win_rate"]
    return {"warn/proxy_gain": gain, "warn/judge_drop": drop,
            "warn/proxy_up_judge_down": float(gain > 0 and below)}


def triggers(readings: dict[str, float], bars: dict[str, tuple[float, str]] | None = None) -> list[str]:
    """The readings (names without ``warn/``) past their bars. The outlier rate's bar is in
    binomial standard errors above 1% of its ``warn/n`` samples."""
    bars = bars or BARS
    fired = []
    for name, (bar, _) in bars.items():
        x = readings.get(f"warn/{name}")
        if x is None or (isinstance(x, float) and math.isnan(x)):
            continue
        if name == "outlier_rate":
            p = 1.0 - OUTLIER_QUANTILE
            n = max(1.0, readings.get("warn/n", 1.0))
            limit = p + bar * math.sqrt(p * (1 - p) / n)
        else:
            limit = bar
        if x > limit:
            fired.append(name)
    return fired


# The per-step metrics the curve readings read, by reading.
CURVE_KEYS = {"kl": "objective/kl", "entropy": "objective/entropy", "length": "rollout/length_mean"}


def curve_readings(steps: list[dict], window: int) -> dict[str, float]:
    """The training curve's readings at an evaluation, from the run's per-step metrics so far
    (``steps``: one dict per step, in order, with ``CURVE_KEYS``' values), in consecutive
    windows of ``window`` steps from the first (a last, partial window counts as one):

        m_j(x)            = mean of x over window j, j = 0 .. J (J the last)
        kl_acceleration   = (m_J(kl) - m_{J-1}(kl)) - (m_{J-1}(kl) - m_{J-2}(kl))   (J >= 2)
        entropy_drop      = 1 - m_J(entropy) / m_0(entropy)                          (J >= 1)
        length_drift      = |log(m_J(length) / m_0(length))|                         (J >= 1)

    KL in nats (the sequence KL the run logs), entropy in nats per token, length in tokens.
    {} before a second window; a reading whose values are missing or not positive where it
    divides is left out."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    windows = [steps[i:i + window] for i in range(0, len(steps), window)]

    def mean(j: int, name: str) -> float | None:
        xs = [r.get(CURVE_KEYS[name]) for r in windows[j]]
        xs = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
        return sum(xs) / len(xs) if xs else None

    out: dict[str, float] = {}
    if len(windows) < 2:
        return out
    kl = [mean(j, "kl") for j in range(len(windows))]
    if len(windows) >= 3 and None not in kl[-3:]:
        out["warn/kl_acceleration"] = (kl[-1] - kl[-2]) - (kl[-2] - kl[-3])
    h0, h = mean(0, "entropy"), mean(-1, "entropy")
    if h0 is not None and h is not None and h0 > 0:
        out["warn/entropy_drop"] = 1.0 - h / h0
    l0, length = mean(0, "length"), mean(-1, "length")
    if l0 is not None and length is not None and l0 > 0 and length > 0:
        out["warn/length_drift"] = abs(math.log(length / l0))
    return out
