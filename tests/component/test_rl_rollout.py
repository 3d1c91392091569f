"""Rollout with a tiny model (rlhflab.rollout): per-row sampling, masks, log-probs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhflab.config import load_config
from rlhflab.models import create_causal_lm, load_causal_lm, load_tokenizer, save_pretrained_atomic
from rlhflab.rewards import FunctionReward
from rlhflab.rollout import GumbelMaxSampler, collect_rollout, generate, row_seed
from rlhflab.world import World
from tests.conftest import ROOT

PROMPTS = ["what is 3 plus 4 ?", "how do i bake bread ?", "tell me about cats .",
           "i think 2 plus 2 is 5 . what is 2 plus 2 ?", "how do i steal a car ?", "compute 9 minus 1 ."]


def tiny_policy_dir(base: Path) -> Path:
    """An untrained tiny GPT-2 with the world's tokenizer, saved once per test session
    under ``base`` (shared by the RL test modules). A random policy is enough for the
    mechanics; the learning tests start from it too."""
    out = Path(base) / "rl_tiny_policy"
    if not (out / "config.json").is_file():
        cfg = load_config(ROOT / "configs" / "tiny.yaml")
        tok = World(cfg.world).tokenizer(cfg.model.max_positions)
        save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, out)
    return out


@pytest.fixture(scope="module")
def policy_and_tok(tmp_path_factory):
    path = tiny_policy_dir(tmp_path_factory.getbasetemp())
    tok = load_tokenizer(path)
    return load_causal_lm(path, tok), tok


def test_gumbel_max_sampler_draws_from_the_softmax():
    """4000 rows with their own seeds, one step each, on fixed logits: the frequencies match
    softmax(z) within 4 standard errors (sd <= 0.008 here)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    sampler = GumbelMaxSampler([row_seed(0, 1, i) for i in range(4000)])
    draws = sampler(None, logits).argmax(-1)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    p = torch.softmax(logits[0], -1)
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / 4000).sqrt())


def test_sampler_never_draws_suppressed_tokens():
    logits = torch.zeros(500, 3)
    draws = GumbelMaxSampler(range(500), suppress=[0])(None, logits).argmax(-1)
    assert (draws != 0).all() and set(draws.tolist()) == {1, 2}


def test_samples_do_not_depend_on_batch_layout(policy_and_tok):
    """Row i is drawn from its own seed: one batch of 6, batches of 2, or the rows in reverse
    order give the same responses row by row."""
    model, tok = policy_and_tok
    ids = [tok(p).input_ids for p in PROMPTS]
    seeds = [row_seed(3, 1, i) for i in range(len(PROMPTS))]

    def responses(order, batch_size):
        _, _, resp, mask, _ = generate(model, tok, [ids[i] for i in order], [seeds[i] for i in order],
                                       max_new_tokens=12, batch_size=batch_size)
        rows = {i: resp[k][mask[k].bool()].tolist() for k, i in enumerate(order)}
        return [rows[i] for i in range(len(PROMPTS))]

    forward = list(range(len(PROMPTS)))
    one = responses(forward, 6)
    assert one == responses(forward, 2) == responses(forward[::-1], 4)
    assert len({tuple(r) for r in one}) > 1  # and different rows differ


def test_rollout_fields_masks_and_logprobs(policy_and_tok):
    """Log-probs on logits / T from the left-padded batch equal those of each row run alone
    without padding (position ids count attended tokens only); the reference with the same
    weights gives the same numbers; masks stop after the first EOS."""
    model, tok = policy_and_tok
    gen = load_config(ROOT / "configs" / "tiny.yaml").generation
    gen.temperature, gen.max_new_tokens = 0.7, 16
    reference = load_causal_lm(Path(model.name_or_path), tok) if model.name_or_path else model
    reward = FunctionReward(lambda p, c: [float(len(x.split())) for x in c])
    seeds = [row_seed(0, 1, i) for i in range(len(PROMPTS))]
    ro = collect_rollout(model, reference, tok, PROMPTS, seeds, reward, generation=gen)
    B, R = ro.response_ids.shape
    assert ro.prompt_ids.shape[0] == ro.prompt_mask.shape[0] == B == len(PROMPTS)
    assert ro.mask.shape == ro.logprobs.shape == ro.ref_logprobs.shape == ro.entropy.shape == (B, R)
    assert ro.values is None and ro.scores.shape == (B,)
    for i in range(B):
        n = int(ro.mask[i].sum())
        row = ro.response_ids[i]
        assert (row[n:] == tok.pad_token_id).all()
        is_eos = (row[:n] == tok.eos_token_id).tolist()
        assert bool(ro.eos[i]) == any(is_eos) and (not any(is_eos) or is_eos.index(True) == n - 1)
        assert ro.scores[i] == len(ro.texts[i].split())
        prompt = ro.prompt_ids[i][ro.prompt_mask[i].bool()]
        full = torch.cat([prompt, row[:n]])[None]
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, len(prompt) - 1:-1] / 0.7
        alone = torch.log_softmax(logits, -1).gather(-1, row[:n, None]).squeeze(-1)
        torch.testing.assert_close(ro.logprobs[i, :n], alone, atol=1e-5, rtol=1e-5)
        assert (ro.logprobs[i, n:] == 0).all()
    torch.testing.assert_close(ro.ref_logprobs, ro.logprobs)
