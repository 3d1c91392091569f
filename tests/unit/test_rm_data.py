"""Reward-model data: comparison groups, collection's pairs and rankings, rater agreement."""

import pytest

from rlhflab.algos.reward_model import agreement, rows_to_groups
from rlhflab.commands.collect import SampledGroup, borda, rate_groups
from rlhflab.instruments.agreement import pair_agreement, rater_agreement
from rlhflab.world.tasks import make_prompt


def test_agreement_of_votes():
    assert agreement([1, 1, 0]) == pytest.approx(2 / 3)
    assert agreement([0, 0, 0]) == 1.0
    assert agreement(None) == 1.0


def test_rows_without_group_are_groups_of_one_pair_and_fields_carry_over():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "votes": [1, 1, 0], "margin": 2.0},
        {"prompt": "p", "chosen": "a", "rejected": "c", "votes": [1, 1, 1], "chosen_eos": False},
    ]
    groups, counts = rows_to_groups(rows, weights="agreement", margin_scale=0.5)
    assert len(groups) == 2 and counts["data/pairs"] == 2
    g0, g1 = groups
    assert g0.responses == ["a", "b"] and g0.pairs == [(0, 1)]
    assert g0.margins == [1.0] and g0.weights == [pytest.approx(2 / 3)]
    assert g1.eos == [False, True] and g1.margins == [0.0] and g1.weights == [1.0]


def test_rows_of_one_group_share_responses_and_rankings():
    shared = {"group": 7, "responses": ["x", "y", "z"], "responses_eos": [True, True, False],
              "rankings": [[0, 1, 2], [1, 0, 2]]}
    rows = [
        {"prompt": "p", "chosen": "x", "rejected": "y", "votes": [1, 0], **shared},
        {"prompt": "p", "chosen": "x", "rejected": "z", "rejected_eos": False, **shared},
        {"prompt": "p", "chosen": "y", "rejected": "z", "rejected_eos": False, **shared},
    ]
    groups, counts = rows_to_groups(rows)
    assert len(groups) == 1
    g = groups[0]
    assert g.responses == ["x", "y", "z"] and g.eos == [True, True, False]
    assert g.pairs == [(0, 1), (0, 2), (1, 2)] and g.rankings == [[0, 1, 2], [1, 0, 2]]
    assert counts["data/rankings"] == 2


def test_the_same_text_with_and_without_eos_are_different_responses():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a", "rejected_eos": False, "group": 0}]
    (g,), _ = rows_to_groups(rows)
    assert g.responses == ["a", "a"] and g.eos == [True, False] and g.pairs == [(0, 1)]


def test_min_agreement_drops_split_votes():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "votes": v} for v in ([1, 1, 0], [1, 1, 1], [1, 0, 1, 1, 0])]
    groups, counts = rows_to_groups(rows, min_agreement=0.7)
    assert len(groups) == 1 and counts["data/dropped_agreement"] == 2


def test_borda_ranking_by_hand():
    # Points (n - 1 - position): item 0 gets 2+1+2 = 5, item 1 gets 1+2+0 = 3, item 2 gets 0+0+1 = 1.
    assert borda([[0, 1, 2], [1, 0, 2], [0, 2, 1]], 3) == [0, 1, 2]
    # A tie (each item 1 point) goes to the lower index.
    assert borda([[0, 1], [1, 0]], 2) == [0, 1]


class FixedPanel:
    """Returns the given rankings regardless of the responses."""

    def __init__(self, rankings):
        self.rankings = rankings
        self.seen = []

    def rank(self, prompt, responses, eos):
        self.seen.append((list(responses), list(eos)))
        return self.rankings


def test_rate_groups_pairs_votes_ties_duplicates_and_empties():
    import random

    prompt = make_prompt(random.Random(0), "open")
    # Four samples: a duplicate of "a", and an empty one: two distinct responses remain...
    # ...plus "c" truncated without EOS: three distinct.
    group = SampledGroup(prompt, ["a", "a", "", "c"], [True, True, True, False])
    panel = FixedPanel([[1, 0], [1, 0], [0, 1]])  # indices into the distinct ["a", "c"]
    rows, counts = rate_groups([group], panel)
    assert panel.seen == [(["a", "c"], [True, False])]
    assert counts["collect/duplicates"] == 1 and counts["collect/empty"] == 1 and counts["collect/no_eos"] == 1
    (row,) = rows
    # Two of three raters put "c" first, so "c" is chosen and the votes are oriented to it.
    assert row["chosen"] == "c" and row["rejected"] == "a"
    assert row["votes"] == [1, 1, 0]
    assert row["chosen_eos"] is False and row["rejected_eos"] is True
    assert row["rankings"] == [[1, 0], [1, 0], [0, 1]] and row["ranking"] == [1, 0]


def test_rate_groups_drops_even_splits_and_single_response_groups():
    import random

    prompt = make_prompt(random.Random(0), "open")
    rows, counts = rate_groups([SampledGroup(prompt, ["a", "b"], [True, True])], FixedPanel([[0, 1], [1, 0]]))
    assert rows == [] and counts["collect/ties"] == 1
    rows, counts = rate_groups([SampledGroup(prompt, ["a", "a"], [True, True])], FixedPanel([[0]]))
    assert rows == [] and counts["collect/groups_dropped"] == 1


def test_rate_groups_with_the_world_panel_writes_all_pairs():
    import random

    from rlhflab.world.labeler import RaterConfig, RaterPanel

    prompt = make_prompt(random.Random(1), "arithmetic")
    answers = [f"the answer is {n} ." for n in range(4)]
    rows, counts = rate_groups([SampledGroup(prompt, answers, [True] * 4)], RaterPanel(RaterConfig(), seed=0))
    assert counts["collect/pairs"] == len(rows) == 6  # C(4, 2); three votes never tie
    for r in rows:
        assert 2 * sum(r["votes"]) > len(r["votes"])
        assert sorted(r["ranking"]) == [0, 1, 2, 3] and len(r["rankings"]) == 3


def test_pair_agreement_by_hand():
    # 3 votes, 2 for chosen: majority 2/3; two raters agree w.p. (2*1 + 1*0) / (3*2) = 1/3.
    assert pair_agreement([1, 1, 0]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert pair_agreement([1, 1, 1]) == (1.0, 1.0)
    assert pair_agreement([1]) == (1.0, None)


def test_rater_agreement_by_hand():
    rows = [{"votes": [1, 1, 1]}, {"votes": [1, 1, 0]}, {"votes": [1, 0, 1, 0, 1]}, {"prompt": "no votes"}]
    a = rater_agreement(rows)
    assert a["agreement/pairs"] == 3
    assert a["agreement/majority_mean"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert a["agreement/unanimous_frac"] == pytest.approx(1 / 3)
    assert a["agreement/below_0.6_frac"] == 0.0  # 3/5 = 0.6 is not below
    # q: 1, 1/3, (3*2 + 2*1) / (5*4) = 0.4.
    assert a["agreement/rater_rater"] == pytest.approx((1 + 1 / 3 + 0.4) / 3)
    assert a["agreement/chosen_is_majority_frac"] == 1.0
    assert rater_agreement([{"prompt": "x"}]) == {"agreement/pairs": 0}


def test_what_collect_writes_reads_back_through_the_checked_loader(tmp_path):
    """Every field ``rlhflab collect`` writes passes ``load_rows``'s checks and gives the
    same groups as the rows in memory, including a text sampled both with and without EOS
    (two responses to the reward model, so not an identical pair)."""
    import random

    from rlhflab.data import load_rows, write_jsonl

    prompt = make_prompt(random.Random(0), "open")
    group = SampledGroup(prompt, ["a", "c", "c", "b"], [True, True, False, True])
    panel = FixedPanel([[2, 1, 0, 3], [1, 2, 0, 3], [2, 0, 1, 3]])
    rows, _ = rate_groups([group], panel)
    assert any(r["chosen"] == r["rejected"] for r in rows)  # "c" with and without EOS
    write_jsonl(tmp_path / "c.jsonl", rows)
    back = load_rows(tmp_path / "c.jsonl", "preference")
    assert back == rows
    (g_mem,), _ = rows_to_groups(rows)
    (g_file,), _ = rows_to_groups(back)
    assert (g_file.responses, g_file.eos, g_file.pairs, g_file.rankings) == \
        (g_mem.responses, g_mem.eos, g_mem.pairs, g_mem.rankings)


@pytest.mark.parametrize("changes,field", [
    ({"rankings": [[0, 3]]}, "rankings"),  # an index past the responses: an IndexError later
    ({"responses_eos": [True]}, "responses_eos"),
    ({"group": [0]}, "group"),  # unhashable: a TypeError when groups are merged
    ({"margin": float("nan")}, "margin"),  # a NaN margin makes the whole loss NaN
])
def test_fields_that_would_break_grouping_are_refused_on_load(tmp_path, changes, field):
    import json

    from rlhflab.data import load_rows
    from rlhflab.errors import InputError

    row = {"prompt": "p", "chosen": "x", "rejected": "y", "group": 0, "responses": ["x", "y"],
           "responses_eos": [True, True], "rankings": [[0, 1]], **changes}
    (tmp_path / "r.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match=rf"r\.jsonl:1: field '{field}'"):
        load_rows(tmp_path / "r.jsonl", "preference")
