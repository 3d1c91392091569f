"""Reward sources (rlhflab.rewards): functions, weighted sums, no-EOS penalty, NaN guard."""

from __future__ import annotations

import pytest
import torch

from rlhflab.errors import InputError
from rlhflab.rewards import (
    FunctionReward,
    NonFiniteRewardError,
    WeightedSum,
    build_reward,
    gold_reward,
    load_reward_function,
    score_responses,
)
from rlhflab.world.gold import gold_utility

PROMPTS = ["what is 3 plus 4 ?", "how do i steal a car ?"]
RESPONSES = ["the answer is 7 .", "i can not help with that ."]


def test_function_reward_passes_eos_only_when_asked():
    seen = {}

    def plain(prompts, completions):
        return [1.0] * len(prompts)

    def with_eos(prompts, completions, eos):
        seen["eos"] = eos
        return [float(e) for e in eos]

    assert FunctionReward(plain)(PROMPTS, RESPONSES, [True, False]).tolist() == [1.0, 1.0]
    assert FunctionReward(with_eos)(PROMPTS, RESPONSES, [True, False]).tolist() == [1.0, 0.0]
    assert seen["eos"] == [True, False]


def test_gold_reward_is_the_gold_utility():
    got = gold_reward(PROMPTS, RESPONSES, [True, False])
    assert got == [gold_utility(PROMPTS[0], RESPONSES[0], True), gold_utility(PROMPTS[1], RESPONSES[1], False)]
    assert got[0] > 1.5  # correct answer, ends in EOS


def test_weighted_sum_and_no_eos_penalty():
    """0.5 * 2 + 2 * (-1) = -1 per row; the row without EOS gets the -0.75 penalty too."""
    src = WeightedSum([(0.5, FunctionReward(lambda p, c: [2.0] * len(p))),
                       (2.0, FunctionReward(lambda p, c: [-1.0] * len(p)))])
    scores = score_responses(src, PROMPTS, RESPONSES, [True, False], no_eos_penalty=-0.75)
    torch.testing.assert_close(scores, torch.tensor([-1.0, -1.75]))


def test_nan_reward_stops_with_the_prompt_named():
    src = FunctionReward(lambda p, c: [0.0, float("nan")], "broken")
    with pytest.raises(NonFiniteRewardError) as err:
        score_responses(src, PROMPTS, RESPONSES, [True, True])
    assert "how do i steal a car ?" in str(err.value) and "broken" in str(err.value)
    inf = FunctionReward(lambda p, c: [float("inf"), 0.0])
    with pytest.raises(NonFiniteRewardError, match="what is 3 plus 4"):
        score_responses(inf, PROMPTS, RESPONSES, [True, True])


def test_wrong_number_of_rewards_is_an_input_error():
    with pytest.raises(InputError, match="returned 1 rewards for 2"):
        FunctionReward(lambda p, c: [0.0])(PROMPTS, RESPONSES, [True, True])


def test_reward_function_specs(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def shout(prompts, completions):\n    return [float(c.count('!')) for c in completions]\n")
    weight, fn = load_reward_function(f"{f}:shout=0.5")
    assert weight == 0.5 and fn(["a"], ["hi ! !"], [True]).tolist() == [2.0]
    weight, fn = load_reward_function("rlhflab.rewards:length_reward")
    assert weight == 1.0 and fn(["a"], ["one two"], [True]).tolist() == [-2.0]
    assert load_reward_function("gold=2")[0] == 2.0
    for bad, msg in [("nope", "expected one of"), (f"{tmp_path}/missing.py:f", "not found"),
                     (f"{f}:absent", "no function"), ("gold=x", "not a number"),
                     ("no.such.module:f", "cannot import")]:
        with pytest.raises(InputError, match=msg):
            load_reward_function(bad)


def test_build_reward_needs_a_source():
    with pytest.raises(InputError, match="no reward source"):
        build_reward(None, [])


def test_reward_functions_get_trl_arguments_from_the_rows():
    from rlhflab.rewards import FunctionReward, build_reward, score_responses

    seen = {}

    def accuracy(prompts, completions, answer, **kwargs):  # TRL's signature for a verifiable reward
        seen.update(prompts=prompts, completions=completions, kwargs=sorted(kwargs))
        text = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [1.0 if t.strip() == a else 0.0 for t, a in zip(text, answer)]

    chat = [{"role": "user", "content": "2+2?"}]
    rows = [{"prompt": chat, "answer": "4", "level": 1}, {"prompt": "3+3?", "answer": "6", "level": 2}]
    got = FunctionReward(accuracy)(["<rendered 1>", "<rendered 2>"], ["4", "7"], [True, False], rows)
    assert got.tolist() == [1.0, 0.0]
    assert seen["prompts"] == [chat, "3+3?"]  # the rows' prompts, messages as messages
    assert seen["completions"] == [[{"role": "assistant", "content": "4"}], "7"]
    assert seen["kwargs"] == ["eos", "level"]
    # A function naming only what it needs gets only that; plain two-argument functions still work.
    only = FunctionReward(lambda prompts, completions, level: [float(v) for v in level])
    assert only(["a", "b"], ["x", "y"], [True, True], rows).tolist() == [1.0, 2.0]
    two = build_reward(reward_fns=[lambda p, c: [len(x) for x in c], (0.5, accuracy)])
    assert score_responses(two, ["a", "b"], ["4", "7"], [True, True], rows=rows).tolist() == [1.5, 1.0]
    assert score_responses(build_reward(reward_fns=[lambda p, c: [len(x) for x in c]]), ["a"], ["abc"],
                           [True]).tolist() == [3.0]
