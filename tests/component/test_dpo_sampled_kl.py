"""The sampled-KL instrument the DPO world monitor reports (instruments.policy_eval)."""

from __future__ import annotations

import copy

import torch

from rlhflab.config import load_config
from rlhflab.instruments.policy_eval import _sequence_logps, sampled_kl
from rlhflab.models import create_causal_lm
from rlhflab.sampling import left_pad
from rlhflab.world import World


def test_left_padded_rows_are_scored_as_if_unpadded(tiny_config_path):
    """Prompts of different lengths are left-padded for sampling; scoring must count
    positions over attended tokens as ``generate`` does, or a padded row is scored by a
    position-shifted model (before this was fixed the monitor reported -0.42 +- 0.11 nats
    for a DPO policy whose KL from SFT is 0.59 +- 0.07)."""
    cfg = load_config(tiny_config_path)
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=0)
    rows = [tok(t).input_ids for t in ("what is 3 plus 4 ?", "tell me about cats .", "how do i fix a bike ?")]
    response = tok("the answer is 7 .").input_ids + [tok.eos_token_id]
    p_ids, p_attn = left_pad(rows, tok.pad_token_id)
    resp = torch.tensor([response] * len(rows))
    mask = torch.ones_like(resp)
    batched = _sequence_logps(model, torch.cat([p_ids, resp], 1), torch.cat([p_attn, mask], 1), p_ids.shape[1], mask)
    for i, r in enumerate(rows):
        ids = torch.tensor([r + response])
        alone = _sequence_logps(model, ids, torch.ones_like(ids), len(r), torch.ones(1, len(response)))
        assert torch.allclose(batched[i], alone[0], atol=1e-4), (i, batched[i].item(), alone[0].item())


def test_sampled_kl_of_a_model_with_itself_is_zero_and_of_another_is_positive(tiny_config_path):
    cfg = load_config(tiny_config_path)
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=0)
    prompts = [p.text for p in world.prompts(32, "eval")]
    assert sampled_kl(model, copy.deepcopy(model), tok, prompts, max_new_tokens=8)["kl/sequence_mean"] == 0.0
    other = copy.deepcopy(model)
    with torch.no_grad():  # a clearly different reference: perturb every weight
        gen = torch.Generator().manual_seed(1)
        for p in other.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    kl = sampled_kl(model, other, tok, prompts, max_new_tokens=8)
    # measured: 48.6 +- 2.0 nats over 8 tokens
    assert kl["kl/sequence_mean"] > 3 * kl["kl/sequence_stderr"] > 0
