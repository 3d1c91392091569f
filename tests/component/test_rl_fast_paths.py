"""The rollout's fast paths compute what the plain ones did: packed, length-grouped forward
passes give the log-probs, entropies, values and gradients of one left-padded pass. (The
decoding engine's own checks are in test_generation.py.)"""

from __future__ import annotations

import pytest
import torch

from rlhflab.generation import generate, row_seed
from rlhflab.logprobs import entropy_from_logits, gather_logprobs
from rlhflab.models import load_causal_lm, load_tokenizer
from rlhflab.rollout import forward_response, forward_values
from tests.component.test_rl_rollout import PROMPTS, tiny_policy_dir


@pytest.fixture(scope="module")
def policy_and_tok(tmp_path_factory):
    path = tiny_policy_dir(tmp_path_factory.getbasetemp())
    tok = load_tokenizer(path)
    return load_causal_lm(path, tok), tok


def padded_forward_response(model, prompt_ids, prompt_mask, response_ids, response_mask, *, temperature=1.0,
                            values=False):
    """The previous implementation: one left-padded pass, position ids from the mask."""
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    mask = response_mask.bool()
    if values:
        v = model(input_ids=ids, attention_mask=attn, position_ids=pos)[:, P - 1:-1]
        return torch.where(mask, v, torch.zeros_like(v))
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1] / temperature
    lp = torch.where(mask, gather_logprobs(logits, response_ids), torch.zeros(()))
    ent = torch.where(mask, entropy_from_logits(logits), torch.zeros(()))
    return lp, ent


@pytest.fixture(scope="module")
def batch(policy_and_tok):
    model, tok = policy_and_tok
    prompts = PROMPTS * 3
    ids = [tok(p).input_ids for p in prompts]
    g = generate(model, ids, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 seeds=[row_seed(4, 1, i) for i in range(len(ids))], max_new_tokens=14)
    p_ids, p_mask, r_ids, r_mask = g.prompt_ids, g.prompt_mask, g.response_ids, g.response_mask
    # responses of many lengths (a random policy rarely ends early): cut each row's mask
    cut = torch.randint(1, r_ids.shape[1] + 1, (len(ids),), generator=torch.Generator().manual_seed(0))
    r_mask = r_mask * (torch.arange(r_ids.shape[1])[None] < cut[:, None])
    r_ids = torch.where(r_mask.bool(), r_ids, torch.full_like(r_ids, tok.pad_token_id))
    assert len(set(r_mask.sum(-1).tolist())) > 5
    return p_ids, p_mask, r_ids, r_mask


# packing=True: one pass of several rows per packed row (``rlhflab.packing``); otherwise the
# rows' real tokens moved left, in length groups or in one pass.
@pytest.mark.parametrize("grouped,packing", [(True, False), (False, False), (None, True)])
def test_packed_forward_equals_padded_forward(policy_and_tok, batch, grouped, packing):
    from rlhflab.packing import can_pack

    model, tok = policy_and_tok
    assert can_pack(model, pad_id=tok.pad_token_id)
    with torch.no_grad():
        lp, ent = forward_response(model, *batch, temperature=0.7, with_entropy=True, grouped=grouped,
                                   packing=packing)
        ref_lp, ref_ent = padded_forward_response(model, *batch, temperature=0.7)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packing", [True, False])
def test_packed_forward_gradients_equal_padded_forward(policy_and_tok, batch, packing):
    """Several passes (or one of packed rows), one backward: the same gradient as one padded pass."""
    model, _ = policy_and_tok
    weights = torch.linspace(-1, 1, batch[2].numel()).view(batch[2].shape)
    grads = []
    for fn in (lambda: forward_response(model, *batch, temperature=0.7, packing=packing)[0],
               lambda: padded_forward_response(model, *batch, temperature=0.7)[0]):
        model.zero_grad(set_to_none=True)
        (fn() * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("packing", [True, False])
def test_packed_values_equal_padded_values(policy_and_tok, batch, packing):
    """A critic's values, in one pass of packed rows or in length groups, with gradients."""
    from rlhflab.algos.ppo import ValueModel
    from rlhflab.packing import can_pack

    model, tok = policy_and_tok
    critic = ValueModel.from_causal_lm(model)
    torch.nn.init.normal_(critic.head.weight, std=0.5)
    assert can_pack(critic, pad_id=tok.pad_token_id, values=True)
    weights = torch.linspace(-1, 1, batch[2].numel()).view(batch[2].shape)
    grads, outs = [], []
    for fn in (lambda: forward_values(critic, *batch, packing=packing),
               lambda: padded_forward_response(critic, *batch, values=True)):
        critic.zero_grad(set_to_none=True)
        out = fn()
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in critic.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
