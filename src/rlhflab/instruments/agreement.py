"""Rater agreement of a preference file with votes ("labeler agreement", as Stiennon et al. 2020 and Ouyang et al. 2022 report it).

For a pair with n votes of which k favour ``chosen``:

    majority agreement   a = max(k, n - k) / n
    rater-rater agreement  q = [k (k - 1) + (n - k)(n - k - 1)] / [n (n - 1)]

q is the unbiased estimate of the probability that two different raters agree on the
pair (sampling two votes without replacement), so its mean over pairs is the practical
ceiling for any model that predicts a single rater's vote (human raters: 0.73-0.77).
Pairs with a majority agreement below 0.6 are candidates for filtering (``--min-agreement``).
"""

from __future__ import annotations

from statistics import fmean


def pair_agreement(votes: list[int]) -> tuple[float, float | None]:
    """(majority agreement a, rater-rater agreement q or None for a single vote)."""
    n, k = len(votes), sum(votes)
    a = max(k, n - k) / n
    q = (k * (k - 1) + (n - k) * (n - k - 1)) / (n * (n - 1)) if n >= 2 else None
    return a, q


def rater_agreement(rows: list[dict], low: float = 0.6) -> dict[str, float]:
    """Agreement statistics over the rows that carry ``votes``.

    Keys: ``agreement/pairs`` (rows with votes), ``agreement/votes_mean`` (votes per pair),
    ``agreement/majority_mean`` (mean a), ``agreement/unanimous_frac`` (a = 1),
    ``agreement/below_0.6_frac`` (a < 0.6), ``agreement/rater_rater`` (mean q over pairs
    with at least two votes), ``agreement/chosen_is_majority_frac`` (rows whose chosen
    side has at least half the votes; below 1 means the labels are not majority labels).
    """
    voted = [r["votes"] for r in rows if r.get("votes")]
    if not voted:
        return {"agreement/pairs": 0}
    stats = [pair_agreement(v) for v in voted]
    qs = [q for _, q in stats if q is not None]
    return {
        "agreement/pairs": len(voted),
        "agreement/votes_mean": fmean(len(v) for v in voted),
        "agreement/majority_mean": fmean(a for a, _ in stats),
        "agreement/unanimous_frac": fmean(a == 1.0 for a, _ in stats),
        f"agreement/below_{low:g}_frac": fmean(a < low for a, _ in stats),
        "agreement/rater_rater": fmean(qs) if qs else float("nan"),
        "agreement/chosen_is_majority_frac": fmean(2 * sum(v) >= len(v) for v in voted),
    }
