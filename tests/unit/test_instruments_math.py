"""Pure instrument math: text statistics, length-controlled win-rate, the Gao et al. fit."""

import math

import pytest

from rlhflab.instruments.overoptimization import curve_readings, fit_gao
from rlhflab.instruments.text_stats import distinct_n, percentile, text_stats


def test_distinct_n_by_hand():
    """'a b a b' and 'a b c': unigrams a,b,a,b,a,b,c -> 3 distinct of 7; bigrams ab,ba,ab,ab,bc
    -> 3 distinct of 5."""
    assert distinct_n(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 90) == 5


def test_text_stats_counts_keywords_fillers_and_duplicates():
    texts = ["certainly , the answer is 7 .", "the answer is 7 . i hope this helps .", "the answer is 7 ."]
    s = text_stats(texts, [True, True, False])
    assert s["length/mean"] == pytest.approx((7 + 10 + 5) / 3)
    assert s["keywords/density"] == pytest.approx(1 / 22)
    assert s["filler/per_response"] == pytest.approx(1 / 3)
    assert s["rollout/eos_rate"] == pytest.approx(2 / 3)
    assert s["diversity/duplicate_rate"] == 0.0
    assert text_stats(["x .", "x ."])["diversity/duplicate_rate"] == 0.5


def test_text_stats_counts_empty_and_one_token_responses():
    """Lengths 0, 1, 0 (whitespace only) and 3: two empty of four, three of at most one token."""
    s = text_stats(["", " 7 ", "  \n ", "the answer ."])
    assert s["length/empty_rate"] == pytest.approx(2 / 4) and s["length/short_rate"] == pytest.approx(3 / 4)
    assert text_stats(["the answer is 7 ."])["length/short_rate"] == 0.0
    assert math.isnan(text_stats([])["length/empty_rate"])


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    """Wins decided by length alone: longer always wins. Raw win-rate 0.5 over a symmetric
    set, and 0.5 at zero length difference; a policy that wins at equal length keeps it."""
    from rlhflab.instruments.win_rate import length_controlled_win_rate

    dlen = [-3, -2, -1, 1, 2, 3] * 10
    wins = [1.0 if d > 0 else 0.0 for d in dlen]
    assert length_controlled_win_rate(wins, dlen) == pytest.approx(0.5, abs=0.01)
    # Wins everywhere with longer answers, and 80% at equal length:
    dlen2 = [0] * 50 + [5] * 50
    wins2 = [1.0] * 40 + [0.0] * 10 + [1.0] * 50
    assert length_controlled_win_rate(wins2, dlen2) == pytest.approx(0.8, abs=0.02)


def test_gao_rl_fit_recovers_known_parameters():
    """R(d) = d (alpha - beta log d) with alpha = 1, beta = 0.5: peak at d* = e^(1/0.5 - 1) = e,
    R* = 0.5 e = 1.359."""
    d = [0.2 * i for i in range(1, 30)]
    gold = [x * (1 - 0.5 * math.log(x)) for x in d]
    fit = fit_gao(d, gold, "rl")
    assert fit["alpha"] == pytest.approx(1.0, abs=1e-9) and fit["beta_g"] == pytest.approx(0.5, abs=1e-9)
    assert fit["d_peak"] == pytest.approx(math.e) and fit["gold_gain_peak"] == pytest.approx(0.5 * math.e)
    assert fit["r2"] == pytest.approx(1.0)


def test_gao_bon_fit_peak():
    """R(d) = d (2 - d): peak at d* = alpha / (2 beta) = 1, R* = 1."""
    d = [0.1 * i for i in range(1, 20)]
    fit = fit_gao(d, [x * (2 - x) for x in d], "bon")
    assert fit["d_peak"] == pytest.approx(1.0) and fit["gold_gain_peak"] == pytest.approx(1.0)


def test_curve_readings_detect_a_gold_peak_with_rising_proxy():
    kl = [0, 1, 2, 4, 8, 16]
    gold = [0.0, 0.4, 0.6, 0.5, 0.2, -0.1]
    proxy = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    r = curve_readings(kl, gold, proxy)
    assert r["overopt/gold_peak"] == 0.6 and r["overopt/gold_peak_kl"] == 2
    assert r["overopt/gold_drop_from_peak"] == pytest.approx(0.7)
    assert r["overopt/proxy_gain_after_peak"] == pytest.approx(1.5)
    assert math.isfinite(r["overopt/fit_d_peak"])


def test_free_text_refusal_detector():
    from rlhflab.instruments.user_eval import is_refusal

    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("sorry , i can not help with that .")
    assert not is_refusal("First, preheat the oven. I can help more if needed.")


def test_gao_fit_says_when_its_peak_is_an_extrapolation():
    """A curve still rising at the last point: the formula's d* lies past the measured d, so
    the fit flags no peak within the measured KL (whatever large number d* is)."""
    d = [0.1 * i for i in range(1, 10)]
    gold = [x * (3 - 0.1 * math.log(x)) for x in d]  # d* = e^(3 / 0.1 - 1) = e^29, far beyond 0.9
    fit = fit_gao(d, gold, "rl")
    assert fit["d_peak"] > 1e12 and fit["peak_in_range"] == 0.0 and fit["d_max"] == pytest.approx(0.9)
    within = fit_gao([0.2 * i for i in range(1, 30)], [x * (1 - 0.5 * math.log(x)) for x in
                                                       [0.2 * i for i in range(1, 30)]], "rl")
    assert within["peak_in_range"] == 1.0  # d* = e = 2.72 inside (0.2, 5.8)
