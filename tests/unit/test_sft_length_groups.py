"""``forward.length_groups``: how one process's slice of a batch is cut into passes.

The gradient does not depend on the cut (every pass's loss is divided by the global token
count; ``tests/component/test_sft_training.py`` checks that accumulation equals one batch),
so these tests only check that the cut is a partition, respects the cap, and pads less.
"""

import math

from rlhflab.forward import length_groups


def padded(lengths, groups):
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def test_partition_of_all_rows_sorted_by_length():
    lengths = [5, 30, 6, 29, 7, 64, 12, 12]
    groups = length_groups(lengths)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_cap_and_no_grouping():
    lengths = list(range(1, 33))
    assert all(len(g) <= 8 for g in length_groups(lengths, max_rows=8))
    # with an infinite pass cost, as few passes as the cap allows: the loop before grouping
    assert len(length_groups(lengths, pass_cost=math.inf)) == 1
    assert [len(g) for g in length_groups(lengths, max_rows=8, pass_cost=math.inf)] == [8, 8, 8, 8]


def test_grouping_pads_less_than_one_pass():
    """One long row among short ones: one pass pads every row to 64 (8 x 64 = 512 tokens);
    the long row alone costs 64 + 7 x 6 = 106 tokens plus one extra pass (64)."""
    lengths = [5, 6, 6, 4, 64, 5, 6, 5]
    groups = length_groups(lengths, pass_cost=64)
    assert groups[-1] == [4]
    assert padded(lengths, groups) == 7 * 6 + 64
    assert padded(lengths, groups) + 64 * len(groups) < padded(lengths, [list(range(8))]) + 64


def test_zero_pass_cost_gives_no_padding():
    lengths = [3, 9, 3, 9, 5]
    groups = length_groups(lengths, pass_cost=0)
    assert padded(lengths, groups) == sum(lengths)
