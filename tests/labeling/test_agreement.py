"""The agreement measures against worked examples with published values, and small cases
derived by hand."""

from __future__ import annotations

import math

import pytest

from rlhflab.labeling.agreement import (
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha_nominal,
    majority_agreement,
    mean_interval,
    pairwise_agreement,
    position_bias,
    rank_position_bias,
)

# Fleiss' kappa's worked example (Wikipedia, "Fleiss' kappa"): 10 subjects, 14 raters each,
# 5 categories; the counts n_ik. Published: P_bar = 0.378, P_e = 0.213, kappa = 0.210.
FLEISS_TABLE = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def _from_counts(table):
    return [[k for k, c in enumerate(row) for _ in range(c)] for row in table]


def test_fleiss_kappa_worked_example():
    items = _from_counts(FLEISS_TABLE)
    assert pairwise_agreement(items) == pytest.approx(0.378, abs=5e-4)
    assert fleiss_kappa(items) == pytest.approx(0.210, abs=5e-4)


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", the example with
# missing values: 4 observers, 12 units. Published nominal alpha = 0.743.
_ = None
KRIPPENDORFF = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, _, _, _],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _, 3],
    [_, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _],
]


def test_krippendorff_alpha_worked_example_with_missing_values():
    items = [[v for v in unit if v is not None] for unit in zip(*KRIPPENDORFF)]
    assert krippendorff_alpha_nominal(items) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_by_hand():
    # Units [a, a], [a, b], [b, b]: o_aa = 2, o_bb = 2, o_ab = o_ba = 1; n_a = n_b = 3, n = 6.
    # alpha = [(5)(4) - (6 + 6)] / [30 - 12] = 8 / 18.
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"], ["b", "b"], ["a"]]) == pytest.approx(8 / 18)
    assert math.isnan(krippendorff_alpha_nominal([["a"], ["b"]]))


def test_cohen_kappa_worked_example():
    # 50 units: both yes 20, a yes b no 5, a no b yes 10, both no 15 (Wikipedia, "Cohen's
    # kappa"): p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["x", "x"], ["x", "x"]) == 1.0
    with pytest.raises(ValueError):
        cohen_kappa(["x"], ["x", "y"])


def test_two_raters_fleiss_and_cohen_by_hand():
    # Two raters, units (a,a), (a,b), (b,b), (b,b): P_bar = 3/4; pooled p_a = 3/8, p_b = 5/8,
    # P_e = 34/64; Fleiss = (3/4 - 34/64) / (30/64) = 14/30.
    items = [["a", "a"], ["a", "b"], ["b", "b"], ["b", "b"]]
    assert pairwise_agreement(items) == pytest.approx(0.75)
    assert fleiss_kappa(items) == pytest.approx(14 / 30)
    # Cohen: p_o = 3/4, rater 1 (a,a,b,b), rater 2 (a,b,b,b): p_e = (2*1 + 2*3)/16 = 1/2 -> 1/2.
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "b", "b"]) == pytest.approx(0.5)


def test_pairwise_and_majority_agreement_by_hand():
    # [1,1,0]: 2 of 6 ordered pairs agree... k(k-1) + (n-k)(n-k-1) = 2 + 0 over 6 = 1/3; majority 2/3.
    assert pairwise_agreement([[1, 1, 0]]) == pytest.approx(1 / 3)
    assert majority_agreement([[1, 1, 0], [1]]) == pytest.approx((2 / 3 + 1) / 2)
    assert pairwise_agreement([[1, 1, 1, 1]]) == 1.0
    assert math.isnan(pairwise_agreement([[1]]))


def test_position_bias_by_hand():
    assert position_bias([True, True, True, False]) == pytest.approx(0.25)
    assert position_bias([True, False]) == 0.0
    assert math.isnan(position_bias([]))


def test_rank_position_bias_by_hand():
    # K = 4: the first shown ranked best (+1/2), last (-1/2), second (1/2 - 1/3 = 1/6): mean 1/18
    assert rank_position_bias([(0, 4), (3, 4), (1, 4)]) == pytest.approx(1 / 18)
    # pairs: the same as position_bias
    assert rank_position_bias([(0, 2), (0, 2), (0, 2), (1, 2)]) == pytest.approx(0.25)
    # every rank once, any K: no bias
    assert rank_position_bias([(r, 5) for r in range(5)]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        rank_position_bias([(4, 4)])


def test_position_bias_of_rankings_in_the_admins_readings():
    """A labeler who ranks the responses in the order shown has +1/2 on rankings of four,
    one who ranks them in reverse -1/2, whatever the orders drawn."""
    from rlhflab.labeling.io import readings
    from rlhflab.labeling.store import Store

    store = Store("sqlite://")
    tokens = {n: store.create_user(n, "labeler") for n in ("first", "last")}
    store.add_tasks([{"prompt": f"p{i}", "responses": ["a", "b", "c", "d"], "overlap": 2} for i in range(6)])
    for name, token in tokens.items():
        user = store.authenticate(name, token)
        while (got := store.next_vote(user)) is not None:
            vote, _ = got
            order = list(vote.shown) if name == "first" else list(reversed(vote.shown))
            assert store.submit(user, vote.id, {"ranking": order}, f"{name}-{vote.id:06d}") == "stored"
    table = {x["name"]: x for x in readings(store)["labelers_table"]}
    assert (table["first"]["position_bias"], table["last"]["position_bias"]) == (0.5, -0.5)
    assert table["first"]["position_answers"] == 6


def test_mean_interval_by_hand():
    mean, half = mean_interval([0.0, 1.0, 0.0, 1.0])
    # s = sqrt(1/3), half = 1.96 * sqrt(1/3) / 2
    assert mean == 0.5 and half == pytest.approx(1.96 * math.sqrt(1 / 3) / 2)
