"""DPO on soft labels (``label_prob``, as ``rlhflab rlaif`` writes them) through the loop:
rows without one train as before, rows with one train on the cross-entropy against it, and
micro-batches still add up to one batch (rlhflab.algos.dpo, losses.dpo_loss(targets=))."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhflab.algos.dpo import attach_reference_logps, tokenize_pairs, train_dpo
from rlhflab.config import load_config
from rlhflab.models import create_causal_lm
from rlhflab.world import World


@pytest.fixture(scope="module")
def setup(tiny_config_path):
    cfg = load_config(tiny_config_path)
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=0)
    return cfg, tok, model, world.preference_pairs(64, "pref"), world.preference_pairs(16, "pref_eval")


def _train(setup, rows, held_rows, loss="dpo", micro=None):
    cfg, tok, model, _, _ = setup
    d = copy.deepcopy(cfg.dpo)
    d.loss, d.micro_batch_size, d.max_steps, d.batch_size = loss, micro, 3, 32
    d.precompute_ref_logps, d.lr, d.warmup_ratio = True, 2e-3, 0.0
    train, _ = tokenize_pairs(rows, tok, d.max_length)
    held, _ = tokenize_pairs(held_rows, tok, d.max_length)
    attach_reference_logps(model, train, tok.pad_token_id, "cpu")
    attach_reference_logps(model, held, tok.pad_token_id, "cpu")
    policy = copy.deepcopy(model)
    return policy, train_dpo(d, policy, None, tok, train, held)


def _soft(rows, p):
    return [{**r, "label_prob": p} for r in rows]


def test_label_prob_of_one_is_the_hard_run_and_soft_labels_change_it(setup):
    """label_prob 1 on every row trains as the rows without it (same loss to float noise:
    -1 * log sigmoid(z) - 0 * log sigmoid(-z)); 0.6 pulls the margin toward log(0.6/0.4) and
    changes the run; the held-out loss is the soft one too."""
    _, _, _, rows, held = setup
    hard_policy, hard = _train(setup, rows, held)
    assert hard["dpo/soft_labels"] is False
    one_policy, one = _train(setup, _soft(rows, 1.0), _soft(held, 1.0))
    assert one["dpo/soft_labels"] is True
    for key in ("train/loss", "eval/loss", "rewards/margins"):
        assert one[key] == pytest.approx(hard[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(hard_policy.parameters(), one_policy.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    _, soft = _train(setup, _soft(rows, 0.6), _soft(held, 0.6))
    assert abs(soft["train/loss"] - hard["train/loss"]) > 1e-3
    assert abs(soft["eval/loss"] - hard["eval/loss"]) > 1e-3


def test_soft_labels_accumulate_exactly(setup):
    """Each micro-batch gets its own pairs' targets: four chunks of 8 are one batch of 32
    (per-pair labels spread over [0.55, 0.95] so a misaligned slice would show)."""
    _, _, _, rows, held = setup
    mixed = [{**r, "label_prob": 0.55 + 0.4 * (i % 5) / 4} for i, r in enumerate(rows)]
    big, s_big = _train(setup, mixed, held)
    small, s_small = _train(setup, mixed, held, micro=8)
    assert s_small["train/loss"] == pytest.approx(s_big["train/loss"], rel=1e-5)
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_hard_label_loss_says_it_ignores_label_prob(setup, capsys):
    _, _, _, rows, held = setup
    _, summary = _train(setup, _soft(rows, 0.7), held, loss="ipo")
    assert summary["dpo/soft_labels"] is False
    assert "label_prob is not used" in capsys.readouterr().err
