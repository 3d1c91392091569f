"""Statistics of response text: length, diversity, repetition, keywords, filler. Pure."""

from __future__ import annotations

import math
from statistics import fmean

from rlhflab.world.gold import repetition_rate
from rlhflab.world.tasks import FILLERS, KEYWORDS


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile, q in [0, 100]."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over a set of responses (Li et al. 2016)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_stats(texts: list[str], eos: list[bool] | None = None,
               keywords: tuple[str, ...] = KEYWORDS) -> dict[str, float]:
    """Length percentiles, the share of empty responses (``length/empty_rate``) and of
    responses of at most one token (``length/short_rate``, empty included), distinct-1/2,
    within-response repetition, keyword density (per token), filler sentences per response,
    EOS rate, and the share of identical responses."""
    lengths = [len(t.split()) for t in texts]
    tokens = max(1, sum(lengths))
    return {
        "length/mean": fmean(lengths) if lengths else float("nan"),
        "length/p50": percentile(lengths, 50),
        "length/p90": percentile(lengths, 90),
        "length/max": float(max(lengths, default=0)),
        "length/empty_rate": fmean(n == 0 for n in lengths) if lengths else float("nan"),
        "length/short_rate": fmean(n <= 1 for n in lengths) if lengths else float("nan"),
        "diversity/distinct_1": distinct_n(texts, 1),
        "diversity/distinct_2": distinct_n(texts, 2),
        "diversity/repetition": fmean(repetition_rate(t.split()) for t in texts) if texts else 0.0,
        "diversity/duplicate_rate": 1 - len(set(texts)) / len(texts) if texts else 0.0,
        "keywords/density": sum(t.split().count(k) for t in texts for k in keywords) / tokens,
        "filler/per_response": fmean(sum(t.count(f) for f in FILLERS) for t in texts) if texts else 0.0,
        "rollout/eos_rate": fmean(eos) if eos else float("nan"),
    }
