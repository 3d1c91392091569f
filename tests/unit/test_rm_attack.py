"""The reward-model attack's math (instruments/rm_attack.py) against hand-derived values and
finite differences, its decode/re-encode filter, and the diagnose rule that reads it."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.diagnose import Thresholds, check_readings, diagnose
from rlhflab.instruments.rm_attack import (
    Scorer,
    introduced_ngrams,
    mean_interval,
    member_weights,
    one_hot_gradient,
    roundtrip_mask,
    sample_swaps,
    survives_roundtrip,
    top_substitutes,
)
from tests.user_models import bpe_tokenizer


def _tiny_classifier(vocab: int = 24, seed: int = 0):
    """A random tiny GPT-2 sequence classifier in float64 (finite differences need the digits)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=1, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(cfg).double().eval()


def test_the_one_hot_gradient_equals_finite_differences_of_the_reward():
    """g_t[v] = dR/de_t[v]: moving the one-hot row e_t by eps along token v moves the
    embeddings by eps W_v, so (R(E + eps W_v at t) - R(E - eps W_v at t)) / 2 eps = g_t[v]."""
    model = _tiny_classifier()
    W = model.get_input_embeddings().weight
    ids = torch.tensor([3, 7, 11, 5, 9, 2])

    def score(emb):
        return model(inputs_embeds=emb).logits[0, 0]

    positions = [1, 4, 5]
    g = one_hot_gradient(score, W, ids, positions)
    assert g.shape == (3, 24)
    eps = 1e-5
    base = W[ids].detach()
    with torch.no_grad():
        for row, t in enumerate(positions):
            for v in (0, 4, 7, 13, 23):
                up, down = base.clone(), base.clone()
                up[t] += eps * W[v]
                down[t] -= eps * W[v]
                fd = (score(up[None]) - score(down[None])) / (2 * eps)
                assert abs(float(fd) - float(g[row, v])) < 1e-7 * max(1.0, abs(float(fd)))


def test_the_served_rewards_gradient_weights_each_member_by_its_gain():
    """An ensemble's served reward is mean_m (gain_m r_m + bias_m): its one-hot gradient is
    sum_m (gain_m / M) g_m, checked against finite differences of the served score."""
    from rlhflab.reward_model import RewardModel

    members = [_tiny_classifier(seed=1), _tiny_classifier(seed=2)]
    rm = RewardModel(members, tokenizer=None, gains=[2.0, 0.5], biases=[1.0, -3.0])
    scorer = Scorer(rm)
    ids = [3, 7, 11, 5, 9]
    g = scorer.gradient(ids, [2])
    eps = 1e-5
    for v in (1, 6, 20):
        total = 0.0
        for m, model in enumerate(members):
            W = model.get_input_embeddings().weight
            with torch.no_grad():
                e = W[torch.tensor(ids)].clone()
                e_up, e_down = e.clone(), e.clone()
                e_up[2] += eps * W[v]
                e_down[2] -= eps * W[v]
                d = (model(inputs_embeds=e_up[None]).logits[0, 0] - model(inputs_embeds=e_down[None]).logits[0, 0])
            total += rm.gains[m] / 2 * float(d) / (2 * eps)
        assert abs(total - float(g[0, v])) < 1e-5 * max(1.0, abs(total))
    # and the exact scores are the served score of RewardModel.score's mean
    s = scorer.scores([ids, [4, 4, 4, 4, 4]])
    with torch.no_grad():
        raw = torch.stack([torch.stack([mm(input_ids=torch.tensor([x])).logits[0, 0] for x in (ids, [4] * 5)])
                           for mm in members])
    expect = (torch.tensor([[2.0], [0.5]], dtype=torch.float64) * raw + torch.tensor([[1.0], [-3.0]],
                                                                                        dtype=torch.float64)).mean(0)
    assert torch.allclose(s.double(), expect, atol=1e-5)


def test_member_weights_by_hand():
    """gains (2, 0.5), biases (1, -3), raw (1, 4): normalized s = (3, -1), mean 1, std 2.
    mean: gain_m / 2 = (1, 0.25); min: only the lower member, (0, 0.5); mean - 0.5 std:
    dR/ds_m = 1/2 - 0.5 (s_m - 1) / (2 * 2) = (0.25, 0.75), times the gains = (0.5, 0.375)."""
    raw, gains, biases = torch.tensor([1.0, 4.0]), [2.0, 0.5], [1.0, -3.0]
    assert member_weights(raw, gains, biases, "mean", 1.0).tolist() == [1.0, 0.25]
    assert member_weights(raw, gains, biases, "min", 1.0).tolist() == [0.0, 0.5]
    assert torch.allclose(member_weights(raw, gains, biases, "mean_minus_std", 0.5), torch.tensor([0.5, 0.375]))


def test_top_substitutes_rank_the_gradient_among_allowed_tokens_but_the_current_one():
    grad = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3],
                         [0.8, 0.2, 0.6, 0.1, 0.95]])
    allowed = torch.tensor([True, True, True, True, False])  # token 4 never (special, or no round trip)
    current = torch.tensor([1, 0])  # token 1 sits at position 0, token 0 at position 1
    subs = top_substitutes(grad, allowed, current, k=2)
    assert subs.tolist() == [[3, 2], [2, 1]]


def test_sample_swaps_draw_distinct_swaps_or_all_of_them():
    subs = torch.tensor([[3, 2], [2, 1]])
    assert sorted(sample_swaps(subs, 10, torch.Generator().manual_seed(0))) == [(0, 2), (0, 3), (1, 1), (1, 2)]
    drawn = sample_swaps(subs, 3, torch.Generator().manual_seed(0))
    assert len(drawn) == 3 and len(set(drawn)) == 3 and set(drawn) <= {(0, 2), (0, 3), (1, 1), (1, 2)}


def test_mean_interval_by_hand():
    """[1, 2, 3]: mean 2, sd 1, half-width 1.96 / sqrt(3) = 1.1316."""
    m, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(hi - m, 1.959963984540054 / math.sqrt(3)) and math.isclose(m - lo, hi - m)
    assert mean_interval([0.5]) == (0.5, 0.5, 0.5)


def test_introduced_ngrams_cover_a_change_and_are_new():
    """before "a b c d", after "a x c d" (position 1 changed): the new n-grams covering it,
    each with its place i / (len - n)."""
    got = dict(introduced_ngrams([1, 2, 3, 4], [1, 9, 3, 4], [1], max_n=2))
    assert got == {(9,): 1 / 3, (1, 9): 0.0, (9, 3): 0.5}
    # a suffix: every n-gram of the appended tokens is new, placed at the end
    got = dict(introduced_ngrams([1, 2], [1, 2, 7, 7], [2, 3], max_n=1))
    assert got == {(7,): 2 / 3}


def test_the_roundtrip_filter_drops_special_tokens_and_tokens_that_do_not_reencode():
    tok = bpe_tokenizer()
    mask = roundtrip_mask(tok, len(tok) + 5)
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>")}
    assert not any(mask[i] for i in special)
    assert not mask[len(tok):].any()  # rows of the embedding table past the vocabulary
    # byte-level pieces of a multi-byte character decode to U+FFFD and re-encode to something else
    fragments = [v for v in range(len(tok)) if tok.decode([v]) == "\ufffd"]
    assert fragments and not any(mask[v] for v in fragments)
    whole = tok(" the", add_special_tokens=False).input_ids
    assert len(whole) == 1 and mask[whole[0]]
    # a sequence: merged pieces survive; the same text spelt in single characters does not
    merged = tok("hello there", add_special_tokens=False).input_ids
    spelt = [tok.convert_tokens_to_ids(c) for c in "hello"]
    assert survives_roundtrip(tok, [merged, spelt]) == [True, False]


def test_the_world_tokenizer_allows_every_word_and_no_special_token(tiny_config_path):
    from rlhflab.config import load_config
    from rlhflab.world import World

    tok = World(load_config(tiny_config_path).world).tokenizer()
    mask = roundtrip_mask(tok, len(tok))
    assert [i for i in range(len(tok)) if not mask[i]] == sorted(tok.all_special_ids)


# ------------------------------------------------------------------ the diagnose rule

EXPLOIT = {"rm_attack/top_pattern": "certainly", "rm_attack/top_gain": 1.2, "rm_attack/top_gain_ci_low": 0.9,
           "rm_attack/top_gain_ci_high": 1.5, "rm_attack/gold_gain": -0.5}


def _finding(readings):
    return next((f for f in diagnose(check_readings(readings))["findings"] if f["name"] == "reward_exploit"), None)


def test_reward_exploit_fires_on_a_large_context_independent_gain_that_gold_does_not_pay():
    f = _finding(EXPLOIT)
    assert f is not None and f["severity"] == "fail"
    assert "'certainly'" in f["evidence"] and "+1.20" in f["evidence"] and "gold changes -0.50" in f["evidence"]
    assert "rlhflab rm --adversarial" in f["fix"]


@pytest.mark.parametrize("change", [
    {"rm_attack/top_gain_ci_low": Thresholds().reward_exploit_gain - 0.01},  # not clearly paid for
    {"rm_attack/gold_gain": 0.4},  # gold rises with it: a real improvement
])
def test_reward_exploit_stays_quiet_otherwise(change):
    assert _finding({**EXPLOIT, **change}) is None


def test_reward_exploit_reads_a_judge_where_there_is_no_gold():
    base = {k: v for k, v in EXPLOIT.items() if k != "rm_attack/gold_gain"}
    assert "judge prefers it in 30%" in _finding({**base, "rm_attack/judge_win_rate": 0.3})["evidence"]
    assert _finding({**base, "rm_attack/judge_win_rate": 0.8}) is None
    # no truth at all: not measured, never a verdict
    result = diagnose(check_readings(base))
    assert "reward_exploit" in result["not_measured"] and "--judge" in result["to_measure"]["reward_exploit"]


def test_readings_without_an_attack_do_not_list_the_rule():
    assert "reward_exploit" not in diagnose({"kl/sequence_mean": 1.0})["not_measured"]


def test_the_pattern_is_text_and_only_it():
    from rlhflab.errors import InputError

    with pytest.raises(InputError, match="rm_attack/top_gain.*expected a number"):
        check_readings({**EXPLOIT, "rm_attack/top_gain": "big"})
    with pytest.raises(InputError, match="rm_attack/top_pattern.*expected text"):
        check_readings({**EXPLOIT, "rm_attack/top_pattern": 3})


def test_adversarial_pairs_pit_each_exploit_against_the_clean_response(tiny_config_path):
    """A found response that beat its start, an exploit pattern at three places (first, where
    found, last) and an exploit probe, each against the clean response, in TRL's pair format
    with the marker column; a search that lost and a pattern that is no exploit give none."""
    from rlhflab.config import load_config
    from rlhflab.instruments.rm_attack import adversarial_pairs
    from rlhflab.world import World

    tok = World(load_config(tiny_config_path).world).tokenizer()
    record = {
        "exploits": [{"prompt": "what is 2 plus 3 ?", "start": "the answer is 5 .", "found": "the answer is 5 . small",
                      "gain": 1.0, "mode": "suffix", "eos": True},
                     {"prompt": "what is 2 plus 3 ?", "start": "the answer is 5 .", "found": "the cats is 5 .",
                      "gain": -0.2, "mode": "swap", "eos": True}],
        "patterns": [{"text": "certainly", "place": 0.5, "exploit": True},
                     {"text": "small", "place": 1.0, "exploit": False}],
        "probes": {"agreement": {"exploit": True}, "length": {"exploit": False}},
        "held_out": [{"prompt": "tell me about cats .", "response": "cats are small pets .", "eos": True}],
    }
    rows = adversarial_pairs(record, tok)
    got = [(r["origin"], r["rejected"]) for r in rows]
    assert got == [("search:suffix", "the answer is 5 . small"),
                   ("pattern:certainly", "certainly cats are small pets ."),
                   ("pattern:certainly", "cats are certainly small pets ."),
                   ("pattern:certainly", "cats are small pets . certainly"),
                   ("probe:agreement", "you are right , cats are small pets .")]
    assert all(r["adversarial"] is True and r["chosen"] in ("the answer is 5 .", "cats are small pets .")
               for r in rows)
