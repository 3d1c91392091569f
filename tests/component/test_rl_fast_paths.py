"""The rollout's fast paths compute what the plain ones did: packed, length-grouped forward
passes give the log-probs, entropies, values and gradients of one left-padded pass, and the
first update's forward pass done early gives the same training. (The decoding engine's own
checks are in test_generation.py.)"""

from __future__ import annotations

import pytest
import torch

from rlhflab.generation import generate, row_seed
from rlhflab.logprobs import entropy_from_logits, gather_logprobs
from rlhflab.models import load_causal_lm, load_tokenizer
from rlhflab.rollout import forward_response
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
    for fn in (lambda: forward_response(critic, *batch, values=True, packing=packing),
               lambda: padded_forward_response(critic, *batch, values=True)):
        critic.zero_grad(set_to_none=True)
        out = fn()
        (out * weights).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in critic.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# The first update's forward pass, run early


def _one_step(policy_dir, algo: str, defer: bool, monkeypatch, overrides=()):
    from rlhflab.algos.grpo import train_grpo
    from rlhflab.algos.online import OnlineRun, resolve_rl_config
    from rlhflab.algos.reinforce import train_reinforce
    from rlhflab.config import load_config
    from rlhflab.distributed import make_accelerator
    from rlhflab.rewards import build_reward
    from rlhflab.world import World
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["rl.steps=2", "rl.batch_size=16", "rl.lr=1e-2",
                                                       "rl.eval_every=0", "generation.max_new_tokens=8",
                                                       *overrides])
    cfg.rl = resolve_rl_config(cfg.rl, algo)
    tok = load_tokenizer(policy_dir)
    policy, reference = load_causal_lm(policy_dir, tok), load_causal_lm(policy_dir, tok)
    if not defer:
        monkeypatch.setattr(OnlineRun, "_first_update_rows", lambda self, perm: None)
    run = OnlineRun(cfg, algo, make_accelerator(), policy, reference, tok, build_reward(None, ["length"]),
                    [p.text for p in World(cfg.world).prompts(32, "rl")])
    (train_grpo if algo == "grpo" else train_reinforce)(run)
    monkeypatch.undo()
    return policy.state_dict(), run.log.rows


@pytest.mark.parametrize("algo,overrides", [("grpo", ()), ("rloo", ()), ("reinforce++", ()),
                                            ("grpo", ("rl.entropy_coef=0.01", "rl.micro_batch_size=4"))])
def test_first_update_forward_gives_the_same_training(tmp_path_factory, monkeypatch, algo, overrides):
    """Two steps with the first update's first forward pass run right after the rollout (its
    entropy then completes the rollout's metrics), or inside the update: the same metrics
    and the same weights (float tolerance)."""
    policy_dir = tiny_policy_dir(tmp_path_factory.getbasetemp())
    fast, fast_rows = _one_step(policy_dir, algo, True, monkeypatch, overrides)
    slow, slow_rows = _one_step(policy_dir, algo, False, monkeypatch, overrides)
    # Adam divides by sqrt(v): on coordinates whose gradient is ~0 float rounding of the
    # log-probs moves the step by up to ~1e-3 of lr (1e-2 here)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name], atol=1e-4, rtol=1e-4)
    assert len(fast_rows) == len(slow_rows) == 2
    for a, b in zip(fast_rows, slow_rows):
        assert a.keys() == b.keys()
        for k in a:
            if k.startswith("time/"):
                continue
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
