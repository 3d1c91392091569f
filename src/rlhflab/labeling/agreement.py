"""Agreement among labelers: pure functions over their answers.

An answer is any hashable category (for a pair: which response won, ``tie`` or
``both_bad``). ``items`` is a list of units, each the list of the answers it received, one
per labeler who answered (missing answers are simply absent); ``n_i`` is the number of
answers of unit i and ``n_ik`` how many of them are category k.

The measures, each in its function's docstring:

- pairwise agreement (the probability that two labelers agree on a unit, as Stiennon et
  al. 2020 and Ouyang et al. 2022 report "labeler agreement");
- agreement with the majority;
- Cohen's kappa (two labelers, Cohen 1960);
- Fleiss' kappa (n labelers, Fleiss 1971);
- Krippendorff's alpha, nominal, missing answers allowed (Krippendorff 2011);
- position bias: P(the response shown first is chosen) - 1/2; on rankings of K responses,
  the mean of 1/2 - r/(K - 1), r the rank (0 best) given to the response shown first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence


def _units(items: Sequence[Sequence[Hashable]]) -> list[Counter]:
    """Units with at least two answers, as category counts."""
    return [Counter(u) for u in items if len(u) >= 2]


def pairwise_agreement(items: Sequence[Sequence[Hashable]]) -> float:
    """Mean over units with n_i >= 2 answers of

        P_i = sum_k n_ik (n_ik - 1) / [n_i (n_i - 1)],

    the fraction of ordered pairs of different labelers who gave the same answer (the
    unbiased estimate of the probability that two labelers agree). NaN without such units."""
    units = _units(items)
    if not units:
        return float("nan")
    return sum(sum(c * (c - 1) for c in u.values()) / (sum(u.values()) * (sum(u.values()) - 1))
               for u in units) / len(units)


def majority_agreement(items: Sequence[Sequence[Hashable]]) -> float:
    """Mean over units with at least one answer of a_i = max_k n_ik / n_i, the fraction of
    answers that side with the unit's majority. NaN without answers."""
    units = [Counter(u) for u in items if u]
    if not units:
        return float("nan")
    return sum(max(u.values()) / sum(u.values()) for u in units) / len(units)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two labelers' answers on the same units (a[i], b[i]):

        kappa = (p_o - p_e) / (1 - p_e),   p_o = (1/N) sum_i [a_i = b_i],
        p_e = sum_k (N_ak / N)(N_bk / N),

    N_ak the number of units labeler a put in category k. 1 when p_e = 1 and the labelers
    agree everywhere (one category used by both), NaN for no units."""
    if len(a) != len(b):
        raise ValueError(f"two labelers' answers differ in length: {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return float("nan")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if p_e == 1.0:
        return 1.0 if p_o == 1.0 else float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def fleiss_kappa(items: Sequence[Sequence[Hashable]]) -> float:
    """Fleiss' kappa over units with n_i >= 2 answers:

        kappa = (P_bar - P_e) / (1 - P_e),
        P_bar = mean_i P_i,  P_i = sum_k n_ik (n_ik - 1) / [n_i (n_i - 1)],
        P_e = sum_k p_k^2,   p_k = sum_i n_ik / sum_i n_i.

    With the same number of answers per unit this is Fleiss (1971); with unequal numbers,
    the same formula with p_k pooled over all answers. NaN without units or when every
    answer is one category (P_e = 1)."""
    units = _units(items)
    if not units:
        return float("nan")
    p_bar = pairwise_agreement(items)
    total = Counter()
    for u in units:
        total.update(u)
    n = sum(total.values())
    p_e = sum((c / n) ** 2 for c in total.values())
    if p_e == 1.0:
        return float("nan")
    return (p_bar - p_e) / (1.0 - p_e)


def krippendorff_alpha_nominal(items: Sequence[Sequence[Hashable]]) -> float:
    """Krippendorff's alpha for nominal data, missing answers allowed (Krippendorff 2011,
    "Computing Krippendorff's alpha-reliability"). Units with m_u >= 2 answers are pairable;
    the coincidences o_ck = sum_u (number of c-k pairs of different labelers in u) / (m_u - 1),
    n_c = sum_k o_ck, n = sum_c n_c (the pairable answers), and

        alpha = 1 - D_o / D_e = [(n - 1) sum_c o_cc - sum_c n_c (n_c - 1)]
                                / [n (n - 1) - sum_c n_c (n_c - 1)].

    NaN without pairable units or when every pairable answer is one category."""
    units = _units(items)
    if not units:
        return float("nan")
    o_diag = 0.0
    n_c: Counter = Counter()
    for u in units:
        m = sum(u.values())
        o_diag += sum(c * (c - 1) for c in u.values()) / (m - 1)
        n_c.update(u)
    n = sum(n_c.values())
    expected = sum(c * (c - 1) for c in n_c.values())
    denominator = n * (n - 1) - expected
    if denominator == 0:
        return float("nan")
    return ((n - 1) * o_diag - expected) / denominator


def position_bias(first_chosen: Sequence[bool]) -> float:
    """P(the response shown first is chosen) - 1/2, over pairwise answers that chose one of
    the two (ties and "both bad" left out): (1/N) sum_j [first chosen in answer j] - 1/2.
    0 for a labeler who ignores the order; positive for one who favours the left. NaN for
    no answers."""
    return rank_position_bias([(0 if x else 1, 2) for x in first_chosen])


def rank_position_bias(first_ranks: Sequence[tuple[int, int]]) -> float:
    """Position bias over rankings of any size: each answer is (r, K), r the rank (0 best,
    K - 1 worst) the labeler gave the response shown first among K, and

        bias = (1/N) sum_j [1/2 - r_j / (K_j - 1)],

    which is 0 in expectation for a labeler who ignores the order (r uniform on 0..K-1 has
    mean (K - 1)/2), +1/2 for one who always ranks the first shown best and -1/2 for one who
    always ranks it last. For pairs (K = 2) it is ``position_bias``: P(first chosen) - 1/2.
    NaN for no answers."""
    if not first_ranks:
        return float("nan")
    for r, k in first_ranks:
        if k < 2 or not 0 <= r < k:
            raise ValueError(f"rank {r} of {k} responses: expected 0 <= rank < K, K >= 2")
    return sum(0.5 - r / (k - 1) for r, k in first_ranks) / len(first_ranks)


def mean_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """(mean, half-width of its normal-approximation interval z * s / sqrt(N)), s the sample
    standard deviation; the half-width is NaN below two values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, z * s / math.sqrt(n)
