"""Judges: the win-rate and its length-controlled version, a reward model, a local LM asked in
both orders, a Python callable."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.errors import InputError
from rlhflab.instruments.judges import (
    CallableJudge,
    LanguageModelJudge,
    RewardModelJudge,
    parse_judge,
    win_rate,
)
from rlhflab.instruments.win_rate import length_controlled_win_rate
from tests.user_models import bpe_tokenizer, tiny_causal_lm


def test_win_rate_is_the_mean_with_a_wilson_interval():
    w = win_rate([1.0, 0.0, 0.5, 1.0])
    assert w["win_rate"] == 0.625 and w["n"] == 4.0
    assert 0.0 < w["ci_low"] < 0.625 < w["ci_high"] < 1.0
    with pytest.raises(ValueError):
        win_rate([])


def test_length_controlled_win_rate_of_soft_labels_recovers_the_preference_at_equal_length():
    # Soft labels drawn exactly from logit p = a + b * d / rms(d): the cross-entropy is
    # minimised at (a, b) itself, so the fit returns sigmoid(a) = sigmoid(-0.5) = 0.37754.
    d = torch.linspace(-40, 60, 41, dtype=torch.float64)  # the judged answers are longer on average
    x = d / d.square().mean().sqrt()
    p = torch.sigmoid(-0.5 + 2.0 * x)
    lc = length_controlled_win_rate(p.tolist(), d.tolist())
    assert abs(lc - 1 / (1 + math.exp(0.5))) < 1e-5
    assert win_rate(p.tolist())["win_rate"] > lc + 0.1  # the raw mean (0.52 here) credits length


class _ScoreRM:
    def score(self, prompts, completions, eos=None, batch_size=64):
        return torch.tensor([float(len(c)) for c in completions])


def test_reward_model_judge_gives_hard_verdicts_and_margins():
    c = RewardModelJudge(_ScoreRM()).compare(["p"] * 3, ["aaa", "a", "aa"], ["a", "aaa", "aa"])
    assert c.prob_a == [1.0, 0.0, 0.5] and c.margins == [2.0, -2.0, 0.0]


class _FirstLetterModel(torch.nn.Module):
    """Always puts its mass on the token of 'A': a judge with the strongest position bias."""

    def __init__(self, vocab: int, a_token: int) -> None:
        super().__init__()
        self.vocab, self.a = vocab, a_token
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.a] = 20.0

        class Out:
            pass

        out = Out()
        out.logits = logits + 0 * self.w
        return out


def test_language_model_judge_cancels_and_reports_position_bias(tmp_path):
    tok = bpe_tokenizer()
    a_tok = tok("A)", add_special_tokens=False).input_ids[0]
    judge = LanguageModelJudge(_FirstLetterModel(len(tok), a_tok), tok)
    c = judge.compare(["hi"] * 4, ["yes", "no", "maybe", "sea"], ["no", "yes", "sea", "maybe"])
    # Says (A) whatever stands there: averaging both orders gives 1/2 for every pair.
    assert all(abs(p - 0.5) < 1e-6 for p in c.prob_a)
    assert c.readings["judge/position_bias"] == pytest.approx(0.5, abs=1e-6)
    assert c.readings["judge/order_agreement"] == 0.0
    # The judge's text goes through the chat template (ChatML) and ends in the answer prefix.
    text = judge.prompt_text("hi", "yes", "no")
    assert text.startswith("<|im_start|>user\nConsider the following conversation") and text.endswith(
        "<|im_start|>assistant\nThe answer is: (")


def test_language_model_judge_is_antisymmetric_on_a_real_model():
    tok = bpe_tokenizer()
    # An untrained model spreads its answer over the vocabulary: every answer is read here
    # (min_option_ratio=0) to check the algebra of the two orders.
    judge = LanguageModelJudge(tiny_causal_lm(tok, "qwen2"), tok, batch_size=3, min_option_ratio=0.0)
    a, b = ["yes", "the sea is blue", "no"], ["no", "paris", "two plus two is four"]
    ab = judge.compare(["q"] * 3, a, b)
    ba = judge.compare(["q"] * 3, b, a)
    for p, q in zip(ab.prob_a, ba.prob_a):
        assert 0.0 < p < 1.0 and p + q == pytest.approx(1.0, abs=1e-9)
    assert abs(ab.readings["judge/position_bias"] - ba.readings["judge/position_bias"]) < 1e-9


def test_language_model_judge_counts_unreadable_answers_never_as_ties():
    """An untrained model's letters hold about 2 / V of its mass: with the default rule (the
    likelier letter at least as likely as the rest of the vocabulary) every answer is
    unreadable, its P(a better) NaN, counted, and left out of the win-rate."""
    tok = bpe_tokenizer()
    judge = LanguageModelJudge(tiny_causal_lm(tok, "qwen2"), tok, batch_size=3)
    c = judge.compare(["q"] * 3, ["yes", "the sea is blue", "no"], ["no", "paris", "two plus two is four"])
    assert all(math.isnan(p) for p in c.prob_a) and c.readable == [False] * 3
    assert c.readings["judge/unreadable"] == 3.0 and c.readings["judge/unreadable_rate"] == 1.0
    with pytest.raises(ValueError, match="no readable pairs"):
        win_rate(c.prob_a)
    assert win_rate([0.2, float("nan"), 1.0]) == pytest.approx(
        {**win_rate([0.2, 1.0]), "unreadable": 1.0})


def test_callable_judge_and_specs():
    j = CallableJudge(lambda p, a, b: [1.0 if len(x) > len(y) else 0.0 for x, y in zip(a, b)], "py:len")
    assert j.compare(["p", "p"], ["long", "s"], ["s", "long"]).prob_a == [1.0, 0.0]
    with pytest.raises(InputError, match=r"returned 2 values for 1 pairs"):
        CallableJudge(lambda p, a, b: [1, 0], "py:x").compare(["p"], ["a"], ["b"])
    with pytest.raises(InputError, match=r"expected P\(a better\) in \[0, 1\]"):
        CallableJudge(lambda p, a, b: [2.0], "py:x").compare(["p"], ["a"], ["b"])
    assert parse_judge("rm:runs/rm") == ("rm", "runs/rm")
    assert parse_judge("py:my.mod:fn") == ("py", "my.mod:fn")
    with pytest.raises(InputError, match="field '--judge'"):
        parse_judge("gold")
