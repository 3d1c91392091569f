"""Length-grouped passes in DPO, KTO and reward modeling compute what one padded pass did.

``algos.dpo.sequence_logps`` and ``algos.reward_model._group_rewards`` cut a micro-batch
into passes of similar length, trim each to its longest row, and (DPO) compute the lm head
only from the first response position. These tests compare them with the computation they
replaced, written out here: every sequence right-padded to the longest of the batch, one
forward pass, full logits, ``token_logprobs`` masked and summed. Values and gradients must
agree to float32 rounding (measured max relative differences ~1e-7; tolerance 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlhflab.algos.dpo import (
    attach_reference_logps,
    sequence_logps,
    tokenize_pairs,
    tokenize_unpaired,
)
from rlhflab.algos.reward_model import _group_rewards, bt_objective, rows_to_groups, tokenize_groups
from rlhflab.config import load_config
from rlhflab.data import collate_sft, pairs_to_unpaired
from rlhflab.forward import forward_options, length_groups
from rlhflab.logprobs import kept_token_logprobs, token_logprobs
from rlhflab.models import create_causal_lm, save_pretrained_atomic
from rlhflab.reward_model import collate, create_reward_model
from rlhflab.world import World


@pytest.fixture(scope="module")
def setup(tiny_config_path):
    cfg = load_config(tiny_config_path)
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=0)
    rows = world.preference_pairs(48, "pref")
    return cfg, world, tok, model, rows


def one_padded_pass(model, seqs, pad_id):
    """The previous ``sequence_logps``: one pass over all rows padded together."""
    batch = collate_sft(seqs, pad_id)
    ids = batch["input_ids"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    return (token_logprobs(logits, ids) * batch["response_mask"]).sum(-1), batch["response_mask"].sum(-1)


def grads_of(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    out.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(a: dict, b: dict):
    """Every entry within 1e-5 of the largest gradient entry of the model (some parameters,
    such as the final layer norm's bias of an untrained model, have gradients ~1e-9: float
    rounding is all they hold)."""
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in a.values())
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5 * scale, name


def test_log_probs_from_the_kept_logits_equal_the_full_masked_sum():
    """Logits of the last K positions only (``logits_to_keep``) give the same masked sums as
    the full (B, T, V) logits, when every response token is among the tokens they predict."""
    torch.manual_seed(0)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (start, end) in enumerate([(4, 9), (3, 7), (5, 9)]):  # first response token, end
        mask[b, start:end] = 1
    full = (token_logprobs(logits, ids) * mask).sum(-1)
    assert torch.allclose(kept_token_logprobs(logits, ids), token_logprobs(logits, ids)[:, 1:])
    for keep in (T, T - 3 + 1):  # all, or from the position before the earliest response token (3)
        lp = kept_token_logprobs(logits[:, -keep:], ids)
        assert lp.shape == (B, keep - 1)
        assert torch.allclose((lp * mask[:, T - keep + 1:]).sum(-1), full, atol=1e-6)


def test_dpo_grouped_passes_equal_one_padded_pass_with_gradients(setup):
    """Chosen + rejected of 16 pairs (lengths 9..40 here, so several passes), with a loss
    that weighs every sequence differently, so a mix-up of the order would show."""
    cfg, _, tok, model, rows = setup
    pairs, _ = tokenize_pairs(rows[:16], tok, cfg.dpo.max_length)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    lengths = [len(s.input_ids) for s in seqs]
    assert len(length_groups(lengths)) > 1 and len(set(lengths)) > 4  # really grouped, really mixed
    w = torch.linspace(-1.0, 2.0, len(seqs))
    ref_out, ref_grads = grads_of(model, lambda: (one_padded_pass(model, seqs, tok.pad_token_id)[0] * w).sum())
    new_out, new_grads = grads_of(model, lambda: (sequence_logps(model, seqs, tok.pad_token_id, "cpu")[0] * w).sum())
    assert new_out.item() == pytest.approx(ref_out.item(), rel=1e-6)
    assert_close_grads(ref_grads, new_grads)
    with torch.no_grad():
        old_lp, old_len = one_padded_pass(model, seqs, tok.pad_token_id)
        for rows_cap in (None, 5):
            lp, n = sequence_logps(model, seqs, tok.pad_token_id, "cpu", max_rows=rows_cap)
            assert torch.allclose(lp, old_lp, rtol=1e-5, atol=1e-5)
            assert torch.equal(n, old_len)


def test_kto_sequences_and_cached_reference_equal_the_old_chunked_passes(setup):
    """``attach_reference_logps`` now sorts all sequences by length before cutting passes;
    the cached values equal the old 64-pair chunks in data order to float rounding, for
    pairs and for KTO's examples and mismatched partners."""
    cfg, _, tok, model, rows = setup
    pairs, _ = tokenize_pairs(rows, tok, cfg.dpo.max_length)
    attach_reference_logps(model, pairs, tok.pad_token_id, "cpu", batch_size=8)
    with torch.no_grad():
        for i in range(0, len(pairs), 8):
            chunk = pairs[i:i + 8]
            old, _ = one_padded_pass(model, [p.chosen for p in chunk] + [p.rejected for p in chunk], tok.pad_token_id)
            new = torch.tensor([p.ref_chosen for p in chunk] + [p.ref_rejected for p in chunk])
            assert torch.allclose(new, old, rtol=1e-5, atol=1e-5)
    examples, _ = tokenize_unpaired(pairs_to_unpaired(rows[:20]), tok, cfg.dpo.max_length, seed=0)
    attach_reference_logps(model, examples, tok.pad_token_id, "cpu")
    with torch.no_grad():
        own, _ = one_padded_pass(model, [e.example for e in examples], tok.pad_token_id)
        mism, _ = one_padded_pass(model, [e.mismatched for e in examples], tok.pad_token_id)
    assert torch.allclose(torch.tensor([e.ref for e in examples]), own, rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.tensor([e.ref_mismatched for e in examples]), mism, rtol=1e-5, atol=1e-5)


def test_forward_options_see_through_a_wrapper(setup):
    """DDP wraps the model in an object whose forward takes ``*args, **kwargs``; the options
    are read from the wrapped module, and a model without them gets neither keyword."""
    _, _, _, model, _ = setup

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a, **kw):
            return self.module(*a, **kw)

    assert forward_options(Wrapper(model)) == {"use_cache": True, "logits_to_keep": True}
    assert forward_options(torch.nn.Linear(2, 2)) == {"use_cache": False, "logits_to_keep": False}


@pytest.fixture(scope="module")
def rm_setup(setup, tmp_path_factory):
    cfg, _, tok, model, rows = setup
    out = tmp_path_factory.mktemp("grouped_rm") / "model"
    save_pretrained_atomic(model, tok, out)
    rm, rm_tok = create_reward_model(out, seed=0)
    for i, r in enumerate(rows):
        r["margin"] = 0.25 * (i % 3)
    groups, _ = rows_to_groups(rows, weights="agreement")
    tokenize_groups(groups, rm_tok, cfg.rm.max_length)
    return cfg, rm, rm_tok, groups


def test_rm_grouped_passes_equal_one_padded_pass_with_gradients(rm_setup):
    """The Bradley-Terry loss of 16 groups from rewards of length-grouped passes against one
    padded pass: loss and gradients to float rounding."""
    cfg, rm, tok, groups = rm_setup
    batch = groups[:16]
    seqs = [ids for g in batch for ids in g.ids]
    assert len(length_groups([len(s) for s in seqs])) > 1

    def old_rewards():
        ids, attn = collate(seqs, tok.pad_token_id)
        r = rm(input_ids=ids, attention_mask=attn).logits[:, 0].float()
        return list(torch.split(r, [len(g.ids) for g in batch]))

    def loss(rewards):
        return bt_objective(batch, rewards, cfg.rm)[0]

    ref_out, ref_grads = grads_of(rm, lambda: loss(old_rewards()))
    new_out, new_grads = grads_of(rm, lambda: loss(_group_rewards(rm, batch, tok.pad_token_id, "cpu")))
    assert new_out.item() == pytest.approx(ref_out.item(), rel=1e-6)
    assert_close_grads(ref_grads, new_grads)


def test_rm_accumulated_gradient_equals_one_batch(rm_setup):
    """Four micro-batches of 4 groups, each loss weighted by its share of the batch's pair
    weight, accumulate the gradient of the batch of 16 (the invariant behind
    ``test_rm_training``'s weight comparison, checked on the gradient itself: after AdamW
    a gradient entry near its eps turns float rounding into weight differences of a
    fraction of the learning rate)."""
    cfg, rm, tok, groups = rm_setup
    batch = groups[:16]
    total = sum(sum(g.weights) for g in batch)

    def accumulated(chunks):
        rm.zero_grad(set_to_none=True)
        for ch in chunks:
            loss, units, _ = bt_objective(ch, _group_rewards(rm, ch, tok.pad_token_id, "cpu"), cfg.rm)
            (loss * units / total).backward()
        return {n: p.grad.clone() for n, p in rm.named_parameters()}

    assert_close_grads(accumulated([batch]), accumulated([batch[i:i + 4] for i in range(0, 16, 4)]))


def test_grouped_training_is_the_same_run_as_before_on_a_copy(setup):
    """A cheap end-to-end guard: two DPO steps from the same start with a micro-batch of
    the whole batch and of 8 pairs give the same loss (the passes differ, the math not)."""
    from rlhflab.algos.dpo import train_dpo

    cfg, _, tok, model, rows = setup
    pairs, _ = tokenize_pairs(rows, tok, cfg.dpo.max_length)
    attach_reference_logps(model, pairs, tok.pad_token_id, "cpu")
    out = []
    for micro in (None, 8):
        d = copy.deepcopy(cfg.dpo)
        d.micro_batch_size, d.max_steps, d.batch_size, d.warmup_ratio = micro, 2, 16, 0.0
        out.append(train_dpo(d, copy.deepcopy(model), None, tok, pairs, [])["train/loss"])
    assert out[0] == pytest.approx(out[1], rel=1e-5)


def test_fused_gelu_is_the_same_function_and_leaves_the_weights_alone(setup, tmp_path):
    """``fuse_activations`` swaps GPT-2's ``gelu_new`` modules for torch's fused tanh GELU:
    one per block, the same log-probs and gradients to float rounding (measured ~1e-7),
    the same state dict, and the saved model reloads with ``gelu_new``."""
    from transformers.activations import NewGELUActivation

    from rlhflab.forward import fuse_activations
    from rlhflab.models import load_causal_lm

    cfg, _, tok, _, rows = setup
    model = create_causal_lm(cfg.model, tok, seed=0)  # the fixture's may be fused already
    pairs, _ = tokenize_pairs(rows[:8], tok, cfg.dpo.max_length)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    fused = copy.deepcopy(model)
    assert fuse_activations(fused) == cfg.model.n_layers
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    for (name, a), b in zip(model.state_dict().items(), fused.state_dict().values()):
        assert torch.equal(a, b), name
    ref_out, ref_grads = grads_of(model, lambda: sequence_logps(model, seqs, tok.pad_token_id, "cpu")[0].sum())
    new_out, new_grads = grads_of(fused, lambda: sequence_logps(fused, seqs, tok.pad_token_id, "cpu")[0].sum())
    assert new_out.item() == pytest.approx(ref_out.item(), rel=1e-6)
    assert_close_grads(ref_grads, new_grads)
    save_pretrained_atomic(fused, tok, tmp_path / "m")
    reloaded = load_causal_lm(tmp_path / "m", tok)
    assert sum(isinstance(m, NewGELUActivation) for m in reloaded.modules()) == cfg.model.n_layers


def test_sft_log_probs_from_the_first_response_position_equal_the_full_pass(setup):
    """SFT's passes ask for logits from the first response position on (and no KV cache):
    the NLL sum and its gradients equal the full-logits computation to float rounding."""
    from rlhflab.algos.sft import _nll_sum

    cfg, _, tok, model, rows = setup
    pairs, _ = tokenize_pairs(rows[:8], tok, cfg.dpo.max_length)
    seqs = [p.chosen for p in pairs]
    assert len({s.n_prompt for s in seqs}) > 1

    def old():
        batch = collate_sft(seqs, tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return -(token_logprobs(logits, batch["input_ids"]) * batch["response_mask"]).sum()

    ref_out, ref_grads = grads_of(model, old)
    new_out, new_grads = grads_of(model, lambda: _nll_sum(model, seqs, tok.pad_token_id, "cpu")[0])
    assert new_out.item() == pytest.approx(ref_out.item(), rel=1e-6)
    assert_close_grads(ref_grads, new_grads)
    assert _nll_sum(model, seqs, tok.pad_token_id, "cpu")[1].item() == sum(len(s.input_ids) - s.n_prompt for s in seqs)
