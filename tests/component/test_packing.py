"""Packed passes (``rlhflab.packing``): several sequences in one row, block-diagonal attention.

Every packed result is compared with the computation it replaces, written out here: each
sequence alone or right-padded in one batch, full logits, ``token_logprobs`` masked and
summed (a reward model: its own pooled score). Values and gradients must agree to float32
rounding (measured max relative differences ~4e-6 in values and gradients; tolerance 1e-4
of the largest entry, the tolerance ``can_pack`` itself uses). A model that cannot be packed
must be detected and fall back to padded passes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlhflab.algos.dpo import sequence_logps, tokenize_pairs
from rlhflab.algos.reward_model import _group_rewards, rows_to_groups, tokenize_groups
from rlhflab.algos.sft import train_sft
from rlhflab.config import load_config
from rlhflab.data import collate_sft
from rlhflab.logprobs import token_logprobs
from rlhflab.models import create_causal_lm
from rlhflab.packing import (
    bins_first_fit,
    can_pack,
    pack,
    packed_response_logps,
    response_logp_sums,
)
from rlhflab.reward_model import collate, create_reward_model, reward_head
from rlhflab.world import World
from tests.conftest import save_tiny_backbone


@pytest.fixture(scope="module")
def setup(tiny_config_path):
    cfg = load_config(tiny_config_path)
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    rows = world.preference_pairs(40, "pref")
    pairs, _ = tokenize_pairs(rows, tok, cfg.dpo.max_length)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    assert len({len(s.input_ids) for s in seqs}) > 4 and len({s.n_prompt for s in seqs}) > 1
    return cfg, world, tok, rows, seqs


def models(cfg, tok):
    return {arch: create_causal_lm(dataclasses.replace(cfg.model, arch=arch), tok, seed=1)
            for arch in ("gpt2", "llama")}


def one_padded_pass(model, seqs, pad_id):
    batch = collate_sft(seqs, pad_id)
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    return (token_logprobs(logits, ids) * batch["response_mask"]).sum(-1)


def grads_of(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    out.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def assert_close_grads(a: dict, b: dict):
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in a.values())
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-4 * scale, name


# ------------------------------------------------------------------------- layout


def test_first_fit_decreasing_bins():
    """Lengths 7, 5, 4, 3, 3, 2 in rows of 8, longest first, each into the first row with
    room: 7 -> row 0 (room 1); 5 -> row 1 (3); 4 -> row 2 (4); 3 -> row 1 (0); 3 -> row 2 (1);
    2 -> row 3. So rows [0], [1, 3], [2, 4], [5]."""
    assert bins_first_fit([7, 5, 4, 3, 3, 2], 8) == [[0], [1, 3], [2, 4], [5]]
    with pytest.raises(ValueError, match="does not fit"):
        bins_first_fit([9, 1], 8)


def test_first_fit_tree_equals_scanning_every_row():
    """The max-tree finds the row a scan of every row finds: the same bins on 500 random
    inputs (ties in length kept in index order, rows opened left to right), and none empty."""
    import random

    def scan(lengths, row_len):
        rows, room = [], []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
            if r is None:
                rows.append([])
                room.append(row_len)
                r = len(rows) - 1
            rows[r].append(i)
            room[r] -= lengths[i]
        return rows

    rng = random.Random(0)
    for _ in range(500):
        row_len = rng.randint(1, 40)
        lengths = [rng.randint(1, row_len) for _ in range(rng.randint(0, 70))]
        assert bins_first_fit(lengths, row_len) == scan(lengths, row_len)
    assert bins_first_fit([], 8) == []


def test_pack_layout_restarts_positions_and_blocks_attention():
    """Sequences [5, 6, 7] and [8, 9] in one row of 5 and [4] in a second row (padded with 0):
    positions 0 1 2 0 1 / 0 0 0 0 0, and token 3 (the 8) sees itself only, not 5, 6, 7."""
    p = pack([[5, 6, 7], [8, 9], [4]], pad_id=0, rows=[[0, 1], [2]])
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert p.row.tolist() == [0, 0, 1] and p.start.tolist() == [0, 3, 0] and p.length.tolist() == [3, 2, 1]
    m = p.attention_mask[0, 0].int()
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert p.attention_mask[1, 0].int().tolist()[3] == [0, 0, 0, 1, 0]  # a pad sees itself only
    r, c, seq = p.positions([1, 1, 1])
    assert list(zip(r.tolist(), c.tolist(), seq.tolist())) == [(0, 1, 0), (0, 2, 0), (0, 4, 1)]
    with pytest.raises(ValueError, match="exactly once"):
        pack([[5, 6], [7]], pad_id=0, rows=[[0]])


# ------------------------------------------------------------------------- causal LMs


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_log_probs_and_gradients_equal_one_padded_pass(setup, arch):
    cfg, _, tok, _, seqs = setup
    model = models(cfg, tok)[arch]
    assert can_pack(model, pad_id=tok.pad_token_id)
    w = torch.linspace(-1.0, 1.0, len(seqs))  # weights, so every sequence's gradient counts
    ref_out, ref_grads = grads_of(model, lambda: (one_padded_pass(model, seqs, tok.pad_token_id) * w).sum())
    for max_rows in (None, 3):  # one pass, and several passes of at most 3 packed rows
        lp, n = sequence_logps(model, seqs, tok.pad_token_id, "cpu", max_rows=max_rows, packed=True)
        assert n.tolist() == [len(s.input_ids) - s.n_prompt for s in seqs]
        assert_close(lp.detach(), one_padded_pass(model, seqs, tok.pad_token_id).detach())
        out, grads = grads_of(model, lambda rows=max_rows: (sequence_logps(
            model, seqs, tok.pad_token_id, "cpu", max_rows=rows, packed=True)[0] * w).sum())
        assert_close(out, ref_out)
        assert_close_grads(ref_grads, grads)


def test_packing_fills_rows(setup):
    """The point of packing: at most a few pad tokens per row, and fewer rows than sequences."""
    _, _, tok, _, seqs = setup
    p = pack([s.input_ids for s in seqs], tok.pad_token_id)
    filled = (p.input_ids != tok.pad_token_id).float().mean().item()
    assert p.input_ids.shape[0] < len(seqs) / 2 and filled > 0.9
    padded = collate_sft(seqs, tok.pad_token_id)["attention_mask"].float().mean().item()
    assert filled > padded


def test_packed_pass_without_logits_to_keep_gives_the_same(setup, monkeypatch):
    """Models whose forward lacks ``logits_to_keep`` get full logits, indexed afterwards."""
    import rlhflab.forward as forward_module

    cfg, _, tok, _, seqs = setup
    model = models(cfg, tok)["gpt2"]
    p = pack([s.input_ids for s in seqs], tok.pad_token_id)
    kept = packed_response_logps(model, p, [s.n_prompt for s in seqs])
    monkeypatch.setattr(forward_module, "forward_options", lambda m: {"use_cache": True, "logits_to_keep": False})
    full = packed_response_logps(model, p, [s.n_prompt for s in seqs])
    assert_close(kept.detach(), full.detach(), tol=1e-5)


class IntKeepOnly(torch.nn.Module):
    """A causal LM whose ``logits_to_keep`` takes an int or 1-D indices only, as
    transformers' models before 5.21 (a boolean (R, T) mask raises IndexError there)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() > 1:
            raise IndexError("too many indices for tensor of dimension 3")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, logits_to_keep=logits_to_keep)


def test_a_model_that_refuses_a_boolean_logits_to_keep_still_packs(setup):
    """The first packed pass finds out and reads every position's logits from then on: the
    same log-probs, and the model still passes the packing check."""
    from rlhflab.packing import _BOOL_KEEP, can_pack

    cfg, _, tok, _, seqs = setup
    inner = models(cfg, tok)["gpt2"]
    model = IntKeepOnly(inner)
    p = pack([s.input_ids for s in seqs], tok.pad_token_id)
    got = packed_response_logps(model, p, [s.n_prompt for s in seqs])
    assert _BOOL_KEEP[model] is False
    want = packed_response_logps(inner, p, [s.n_prompt for s in seqs])
    assert_close(got.detach(), want.detach(), tol=1e-5)
    assert can_pack(model, pad_id=tok.pad_token_id)


class IgnoresMask(torch.nn.Module):
    """A causal LM that drops the attention mask and position ids (as flash-attention
    kernels without varlen support do): packing would leak attention across sequences."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_model_that_ignores_the_mask_is_not_packed(setup):
    cfg, _, tok, _, seqs = setup
    model = IgnoresMask(models(cfg, tok)["gpt2"])
    assert not can_pack(model, pad_id=tok.pad_token_id)
    # The caller's fallback (one padded pass) is what a packed pass would have to equal.
    assert_close(response_logp_sums(model, seqs, tok.pad_token_id, "cpu", packed=False).detach(),
                 one_padded_pass(model.inner, seqs, tok.pad_token_id).detach(), tol=1e-5)


def test_sft_with_and_without_packing_trains_the_same(setup):
    """Three SFT steps, packed and in length-grouped padded passes: the same losses and
    weights to float rounding (AdamW amplifies rounding in near-zero gradients: 1e-4)."""
    cfg, world, tok, _, _ = setup
    from rlhflab.algos.sft import tokenize_rows

    examples, _ = tokenize_rows(world.sft_examples(64), tok, cfg.sft.max_length)
    runs = []
    for packing in (True, False):
        model = create_causal_lm(cfg.model, tok, seed=2)
        sft_cfg = dataclasses.replace(cfg.sft, packing=packing, max_steps=3, batch_size=16, eval_every=100)
        summary = train_sft(sft_cfg, model, tok, examples, examples[:16])
        runs.append((summary, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (a, wa), (b, wb) = runs
    assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
    assert a["eval/loss"] == pytest.approx(b["eval/loss"], rel=1e-4)
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() < 1e-4, name


# ------------------------------------------------------------------------- reward models


def test_packed_rewards_and_gradients_equal_the_models_own_scores(setup, tmp_path):
    cfg, _, tok, rows, _ = setup
    rm, rm_tok = create_reward_model(save_tiny_backbone(cfg, tmp_path / "sft"), seed=0)
    assert can_pack(rm, pad_id=rm_tok.pad_token_id, head=reward_head(rm))
    groups, _ = rows_to_groups(rows)
    tokenize_groups(groups, rm_tok, cfg.rm.max_length)
    seqs = [ids for g in groups for ids in g.ids]
    w = torch.linspace(-1.0, 1.0, len(seqs))

    def own():  # the model's own pooling, one padded batch
        ids, attn = collate(seqs, rm_tok.pad_token_id)
        return (rm(input_ids=ids, attention_mask=attn).logits[:, 0] * w).sum()

    def packed():
        return (torch.cat(_group_rewards(rm, groups, rm_tok.pad_token_id, "cpu", packed=True)) * w).sum()

    ref_out, ref_grads = grads_of(rm, own)
    out, grads = grads_of(rm, packed)
    assert_close(out, ref_out)
    assert_close_grads(ref_grads, grads)


def test_an_encoder_reward_model_is_not_packed(setup):
    """A BERT-style model scores a pooled first token per row: no per-sequence score in a
    packed row, so ``can_pack`` says no and training keeps padded passes."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg, _, tok, _, _ = setup
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    assert not can_pack(bert, pad_id=tok.pad_token_id, head=reward_head(bert))
