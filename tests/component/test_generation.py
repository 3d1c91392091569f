"""The decoding engine (rlhflab.generation) on tiny GPT-2, Llama and Qwen2 models: greedy
decoding equals HF ``generate``, the recorded log-probs equal a scoring pass, dropping
finished rows draws the same samples, rows do not depend on the batch layout, and the
noise and filters are what they claim."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhflab.generation import (
    CounterNoise,
    GumbelNoise,
    cache_keyword,
    decode_threads,
    generate,
    hash32,
    row_seed,
    top_k_filter,
    top_p_filter,
)
from rlhflab.logprobs import entropy_from_logits, gather_logprobs
from rlhflab.world import World
from tests.component.test_rl_rollout import PROMPTS


@pytest.fixture(scope="module")
def tok():
    from rlhflab.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    return World(cfg.world).tokenizer(64)


def _model(arch: str, tok, seed: int = 0):
    special = dict(bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    V = len(tok)
    torch.manual_seed(seed)
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, **special))
    elif arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         **special))
    else:
        m = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         **special))
    return m.eval()


ARCHS = ["gpt2", "llama", "qwen2"]


def _eos_bias(model, tok, bias: float):
    """A forward hook making EOS likelier, so that rows end at different steps."""
    b = torch.zeros(model.config.vocab_size)
    b[tok.eos_token_id] = bias
    return model.get_output_embeddings().register_forward_hook(lambda m, a, out: out + b)


def _ids(tok, n=2):
    return [tok(p).input_ids for p in PROMPTS * n]


def scoring_pass(model, gen, temperature):
    """One left-padded forward pass over prompt + response, position ids from the mask."""
    P = gen.prompt_ids.shape[1]
    ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    attn = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1] / temperature
    m = gen.response_mask.bool()
    return (torch.where(m, gather_logprobs(logits, gen.response_ids), torch.zeros(())),
            torch.where(m, entropy_from_logits(logits), torch.zeros(())))


@pytest.mark.parametrize("arch,bias", [("gpt2", 0.3), ("llama", 0.2), ("qwen2", 0.2)])
def test_greedy_decoding_equals_hf_generate(tok, arch, bias):
    """Greedy rows are HF ``generate``'s greedy rows, token for token (pad suppressed in
    both, everything after EOS pad). The EOS bias of each model is one under which some rows
    end early and others run to the limit (found by trying 0.02-0.5: an untrained model's
    logits are close together)."""
    model = _model(arch, tok)
    handle = _eos_bias(model, tok, bias)
    try:
        ids = _ids(tok)
        gen = generate(model, ids, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, greedy=True,
                       max_new_tokens=12, batch_size=5)
        want = []
        for row in ids:  # one prompt per call: no padding on HF's side
            out = model.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                 do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, suppress_tokens=[tok.pad_token_id])
            want.append(out[0, len(row):].tolist())
    finally:
        handle.remove()
    got = [r[m.bool()].tolist() for r, m in zip(gen.response_ids, gen.response_mask)]
    want = [w[:w.index(tok.eos_token_id) + 1] if tok.eos_token_id in w else w for w in want]
    assert got == want
    assert len({len(g) for g in got}) >= 2 and gen.eos.any()  # rows end at different steps


@pytest.mark.parametrize("arch", ARCHS)
def test_recorded_logprobs_equal_a_scoring_pass(tok, arch):
    """The log-probs and entropies recorded while sampling (logits / T, before top-k) equal
    a separate forward pass over prompt + response, to float precision."""
    model = _model(arch, tok, seed=1)
    handle = _eos_bias(model, tok, 1.5)
    try:
        ids = _ids(tok)
        gen = generate(model, ids, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       seeds=[row_seed(6, 1, i) for i in range(len(ids))], temperature=0.7, top_k=20,
                       max_new_tokens=10, record_logprobs=True)
        lp, ent = scoring_pass(model, gen, 0.7)
    finally:
        handle.remove()
    assert len(set(gen.lengths.tolist())) >= 4
    torch.testing.assert_close(gen.logprobs, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen.entropy, ent, atol=1e-5, rtol=1e-5)
    assert (gen.logprobs[~gen.response_mask.bool()] == 0).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("eos_bias", [0.5, 2.0])
def test_dropping_finished_rows_draws_the_same_samples(tok, arch, eos_bias):
    """Finished rows leave the batch and the KV cache: the same responses and log-probs as
    decoding every row to the end."""
    model = _model(arch, tok, seed=2)
    handle = _eos_bias(model, tok, eos_bias)
    try:
        ids = _ids(tok)
        kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  seeds=[row_seed(5, 1, i) for i in range(len(ids))], temperature=0.8, top_k=20, top_p=0.95,
                  max_new_tokens=10, record_logprobs=True)
        fast = generate(model, ids, drop_finished=True, **kw)
        slow = generate(model, ids, drop_finished=False, **kw)
    finally:
        handle.remove()
    assert (fast.lengths < 10).sum() >= 3 and len(set(fast.lengths.tolist())) >= 3
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "eos"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("noise", ["generator", "counter"])
def test_samples_do_not_depend_on_batch_layout(tok, noise):
    """Row i is drawn from its own seed: one batch of 6, batches of 2, or the rows in reverse
    order give the same responses row by row, with either noise."""
    model = _model("gpt2", tok)
    ids = [tok(p).input_ids for p in PROMPTS]
    seeds = [row_seed(3, 1, i) for i in range(len(PROMPTS))]

    def responses(order, batch_size):
        g = generate(model, [ids[i] for i in order], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     seeds=[seeds[i] for i in order], max_new_tokens=12, batch_size=batch_size, noise=noise)
        rows = {i: g.response_ids[k][g.response_mask[k].bool()].tolist() for k, i in enumerate(order)}
        return [rows[i] for i in range(len(PROMPTS))]

    forward = list(range(len(PROMPTS)))
    one = responses(forward, 6)
    assert one == responses(forward, 2) == responses(forward[::-1], 4)
    assert len({tuple(r) for r in one}) > 1  # and different rows differ


def test_the_kv_cache_goes_under_the_installed_keyword(tok):
    """The engine hands its cache to the forward under the keyword the model declares; a
    forward that ignores it would decode without context and break the scoring-pass test."""
    import inspect

    model = _model("gpt2", tok)
    params = inspect.signature(model.forward).parameters
    assert cache_keyword(model) in params


def test_pad_equal_to_eos_is_refused(tok):
    model = _model("gpt2", tok)
    with pytest.raises(ValueError, match="pad token"):
        generate(model, [[1, 2]], pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, greedy=True)


# ---------------------------------------------------------------------------------------
# Noise and filters


def step_by_step_noise(seeds, steps: int, V: int) -> torch.Tensor:
    """One draw of V uniforms per row per step, Gumbel-transformed."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = []
    for _ in range(steps):
        u = torch.stack([torch.rand(V, generator=g, dtype=torch.float64) for g in gens])
        out.append(-torch.log(-torch.log(u.clamp(min=1e-300))))
    return torch.stack(out, 1)                                              # (B, steps, V)


@pytest.mark.parametrize("V,budget", [(241, 10**9), (241, 241 * 5 * 5), (7, 7 * 5 * 3), (17, 1), (1000, 4000 * 5)])
def test_block_noise_equals_step_by_step_noise(monkeypatch, V, budget):
    """Drawn in blocks of any size (the budget sets it), the noise is the step-by-step noise."""
    import rlhflab.generation as generation

    monkeypatch.setattr(generation, "NOISE_BUDGET", budget)
    seeds = [row_seed(1, 2, i) for i in range(5)]
    noise = GumbelNoise(seeds, max_steps=11)
    got = torch.stack([noise.at(t, V) for t in range(11)], 1)
    assert torch.equal(got, step_by_step_noise(seeds, 11, V))
    rows = torch.tensor([4, 1])
    assert torch.equal(GumbelNoise(seeds, 11).at(0, V, rows), got[rows, 0])


def test_gumbel_max_draws_from_the_softmax():
    """4000 rows with their own seeds, one step each, on fixed logits: the frequencies match
    softmax(z) within 4 standard errors (sd <= 0.008 here)."""
    z = torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    noise = GumbelNoise([row_seed(0, 1, i) for i in range(4000)], max_steps=1).at(0, 4)
    freq = torch.bincount((z + noise).argmax(-1), minlength=4).double() / 4000
    p = torch.softmax(z, -1)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / 4000).sqrt())


def _lowbias32(x: int) -> int:
    """The hash by hand, in Python integers mod 2^32."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_hash32_equals_the_hash_by_hand():
    xs = [0, 1, 2, 12345, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1, 0xDEADBEEF]
    assert hash32(torch.tensor(xs)).tolist() == [_lowbias32(x) for x in xs]


def test_counter_noise_by_hand_and_per_row():
    """The draw of row i, step t, token v from its seed alone (as the docstring derives it),
    whatever rows beside it; rows with one seed share their noise."""
    seeds = [row_seed(1, 2, i) for i in range(5)] + [row_seed(1, 2, 0)]
    noise = CounterNoise(seeds)
    got = noise.at(3, 7)
    s, t, v = seeds[2], 3, 4
    k = _lowbias32(_lowbias32(_lowbias32(s >> 32) ^ (s & 0xFFFFFFFF)) ^ t)
    a, b = _lowbias32(k ^ _lowbias32(2 * v)), _lowbias32(k ^ _lowbias32(2 * v + 1))
    u = (a * 2**21 + (b >> 11) + 0.5) / 2**53
    assert got[2, 4].item() == pytest.approx(-math.log(-math.log(u)), rel=1e-12)
    rows = torch.tensor([4, 1])
    assert torch.equal(CounterNoise([seeds[4], seeds[1]]).at(3, 7), got[rows])
    assert torch.equal(noise.at(3, 7, rows), got[rows])
    assert torch.equal(got[0], got[5]) and not torch.equal(got[0], got[1])
    assert not torch.equal(noise.at(4, 7), got)  # steps differ


def test_counter_gumbel_max_draws_from_the_softmax():
    """As for the generators: 4000 rows, one step, on fixed logits, within 4 standard errors;
    and a token's draw is uncorrelated with its neighbour's over rows and steps."""
    z = torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    noise = CounterNoise([row_seed(0, 1, i) for i in range(4000)])
    freq = torch.bincount((z + noise.at(0, 4)).argmax(-1), minlength=4).double() / 4000
    p = torch.softmax(z, -1)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / 4000).sqrt())
    g = torch.cat([noise.at(t, 2) for t in range(5)])  # 20000 pairs of neighbouring tokens
    r = torch.corrcoef(g.T)[0, 1]
    assert abs(r) < 4 / math.sqrt(len(g))
    assert abs(g.mean().item() - 0.5772) < 4 * (math.pi / math.sqrt(6)) / math.sqrt(g.numel())  # Euler's gamma


def test_filters_equal_hf_warpers():
    """top-k and top-p keep what HF's warpers keep (ties included)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 50, generator=g)
    z[0, :5] = 1.0  # ties at the k-th value
    for k in (1, 5, 20):
        want = TopKLogitsWarper(k)(None, z.clone())
        assert torch.equal(top_k_filter(z, k), want)
    for p in (0.1, 0.5, 0.9, 0.999):
        want = TopPLogitsWarper(p)(None, z.clone())
        assert torch.equal(top_p_filter(z, p), want)
    assert torch.equal(top_k_filter(z, 0), z) and torch.equal(top_p_filter(z, 1.0), z)


def test_top_p_by_hand():
    """p = (0.5, 0.3, 0.15, 0.05): top-p 0.7 keeps the first two (0.5 < 0.7 <= 0.8), 0.5
    keeps only the first, 0.96 keeps all four (0.95 < 0.96)."""
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(top_p_filter(z, p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.96) == [True, True, True, True]


def test_decode_threads_follow_the_wait_policy_and_keep_the_samples(tok, monkeypatch):
    """Decode steps run on one thread only when OpenMP threads sleep while they wait and the
    step's products are small; the samples are the same either way (the log-probs to float
    rounding: the thread count changes the summation order)."""
    model = _model("gpt2", tok)
    d = model.config.hidden_size
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        assert decode_threads(64, d) == 2
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        assert decode_threads(64, d) == 1
        assert decode_threads(64, 1024) == 2  # 64 x 1024^2 multiply-adds: worth two threads
        ids = _ids(tok)
        seeds = [row_seed(7, 1, i) for i in range(len(ids))]
        outs = []
        for policy in ("passive", "active"):  # one decode thread, then two
            monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            outs.append(generate(model, ids, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 seeds=seeds, max_new_tokens=10, temperature=0.8, record_logprobs=True))
            assert torch.get_num_threads() == 2  # restored after decoding
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0].response_ids, outs[1].response_ids)
    torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_four_d_masks_draw_the_samples_of_two_d_masks(tok, arch, monkeypatch):
    """Left-padded prompts decoded with the engine's 4-D boolean masks give the samples and
    log-probs that transformers' own masks (built from the 2-D mask at every step) give; a
    model with sliding-window layers keeps transformers' masks."""
    import rlhflab.generation as generation

    model = _model(arch, tok, seed=3)
    handle = _eos_bias(model, tok, 0.5)
    try:
        assert generation._reads_4d_masks(model, tok.pad_token_id)
        ids = _ids(tok)
        assert len({len(r) for r in ids}) >= 2  # prompts of different lengths: left padding
        kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  seeds=[row_seed(7, 1, i) for i in range(len(ids))], temperature=0.9, max_new_tokens=10,
                  record_logprobs=True)
        four = generate(model, ids, **kw)
        monkeypatch.setattr(generation, "_reads_4d_masks", lambda model, pad: False)
        two = generate(model, ids, **kw)
    finally:
        handle.remove()
    assert torch.equal(four.response_ids, two.response_ids)
    torch.testing.assert_close(four.logprobs, two.logprobs, atol=1e-6, rtol=1e-6)
    monkeypatch.undo()
    windowed = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            use_sliding_window=True, sliding_window=8, max_window_layers=0,
                                            pad_token_id=tok.pad_token_id))
    assert not generation._reads_4d_masks(windowed, tok.pad_token_id)
