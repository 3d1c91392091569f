"""The rollout's fast paths compute what the plain ones did: per-row Gumbel noise drawn in
blocks equals the step-by-step draws, and packed, length-grouped forward passes give the
log-probs, entropies, values and gradients of one left-padded pass."""

from __future__ import annotations

import pytest
import torch

from rlhflab.logprobs import entropy_from_logits, gather_logprobs
from rlhflab.models import load_causal_lm, load_tokenizer
from rlhflab.rollout import GumbelMaxSampler, forward_response, generate, row_seed
from tests.component.test_rl_rollout import PROMPTS, tiny_policy_dir


@pytest.fixture(scope="module")
def policy_and_tok(tmp_path_factory):
    path = tiny_policy_dir(tmp_path_factory.getbasetemp())
    tok = load_tokenizer(path)
    return load_causal_lm(path, tok), tok


def step_by_step_noise(seeds, steps: int, V: int) -> torch.Tensor:
    """The noise of the original sampler: one draw of V uniforms per row per step."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = []
    for _ in range(steps):
        u = torch.stack([torch.rand(V, generator=g, dtype=torch.float64) for g in gens])
        out.append(-torch.log(-torch.log(u.clamp(min=1e-300))))
    return torch.stack(out, 1).float()                                    # (B, steps, V)


@pytest.mark.parametrize("V,block", [(241, 24), (241, 5), (7, 3), (17, 1), (1000, 4)])
def test_block_noise_equals_step_by_step_noise(V, block):
    seeds = [row_seed(1, 2, i) for i in range(5)]
    steps = 11
    sampler = GumbelMaxSampler(seeds, block=block)
    zero = torch.zeros(len(seeds), V)
    got = torch.stack([sampler(None, zero) for _ in range(steps)], 1)
    assert torch.equal(got, step_by_step_noise(seeds, steps, V))


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
    p_ids, p_mask, r_ids, r_mask, _ = generate(model, tok, ids, [row_seed(4, 1, i) for i in range(len(ids))],
                                               max_new_tokens=14)
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
# The first update reuses its own forward pass for the old log-probs


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
    """Two steps with the old log-probs of the first update's rows read off its own forward
    pass, or from a separate rollout pass: the same metrics and the same weights (float
    tolerance)."""
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


@pytest.mark.parametrize("eos_bias", [0.5, 1.5, 2.0])
def test_decoding_only_unfinished_rows_draws_the_same_samples(policy_and_tok, eos_bias):
    """Finished rows leave the batch: the same responses as HF's loop that decodes every row
    to the end, with a policy that does end responses (EOS made likelier; with the largest
    bias every row ends before the last step)."""
    model, tok = policy_and_tok
    ids = [tok(p).input_ids for p in PROMPTS * 2]
    seeds = [row_seed(5, 1, i) for i in range(len(ids))]
    bias = model.lm_head.weight.new_zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = eos_bias
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out + bias)
    try:
        fast = generate(model, tok, ids, seeds, max_new_tokens=10, temperature=0.8, top_k=20, drop_finished=True)
        slow = generate(model, tok, ids, seeds, max_new_tokens=10, temperature=0.8, top_k=20, drop_finished=False)
    finally:
        handle.remove()
    lengths = fast[3].sum(-1)
    assert (lengths < 10).sum() >= 3 and len(set(lengths.tolist())) >= 4  # rows finish at different steps
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_sampling_pass_logprobs_equal_a_scoring_pass(policy_and_tok):
    """The log-probs and entropies the decoding loop records for its own tokens (logits / T,
    before top-k) equal those of a separate forward pass over prompt + response."""
    model, tok = policy_and_tok
    ids = [tok(p).input_ids for p in PROMPTS * 2]
    seeds = [row_seed(6, 1, i) for i in range(len(ids))]
    bias = model.lm_head.weight.new_zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 1.5
    handle = model.lm_head.register_forward_hook(lambda m, a, out: out + bias)
    try:
        p_ids, p_mask, r_ids, r_mask, _, lp, ent = generate(model, tok, ids, seeds, max_new_tokens=10,
                                                            temperature=0.7, top_k=20, with_logprobs=True)
        assert len(set(r_mask.sum(-1).tolist())) >= 4
        with torch.no_grad():
            want_lp, want_ent = padded_forward_response(model, p_ids, p_mask, r_ids, r_mask, temperature=0.7)
    finally:
        handle.remove()
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
    assert (lp[~r_mask.bool()] == 0).all()


def test_decode_threads_follow_the_wait_policy_and_keep_the_samples(policy_and_tok, monkeypatch):
    """Decode steps run on one thread only when OpenMP threads sleep while they wait and the
    step's products are small (``decode_threads``); the samples are the same either way
    (the log-probs to float rounding: the thread count changes the summation order)."""
    import rlhflab.rollout as rollout

    model, tok = policy_and_tok
    d = model.config.hidden_size
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        assert rollout.decode_threads(64, d) == 2
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        assert rollout.decode_threads(64, d) == 1
        assert rollout.decode_threads(64, 1024) == 2  # 64 x 1024^2 multiply-adds: worth two threads
        ids = [tok(p).input_ids for p in PROMPTS * 2]
        seeds = [row_seed(7, 1, i) for i in range(len(ids))]
        outs = []
        for policy in ("passive", "active"):  # one decode thread, then two
            monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            outs.append(generate(model, tok, ids, seeds, max_new_tokens=10, temperature=0.8, with_logprobs=True))
            assert torch.get_num_threads() == 2  # restored after decoding
    finally:
        torch.set_num_threads(before)
    for a, b in zip(outs[0][:5], outs[1][:5]):  # ids, masks, eos
        assert torch.equal(a, b)
    for a, b in zip(outs[0][5:], outs[1][5:]):  # log-probs and entropies
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
