"""Rollout with a tiny model (rlhflab.rollout): per-row sampling, masks, log-probs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhflab.config import load_config
from rlhflab.generation import row_seed
from rlhflab.models import create_causal_lm, load_causal_lm, load_tokenizer, save_pretrained_atomic
from rlhflab.rewards import FunctionReward
from rlhflab.rollout import collect_rollout
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
    assert ro.sampler_logprobs is ro.logprobs  # not rescored: the sampler's are the old log-probs
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
    rescored = collect_rollout(model, reference, tok, PROMPTS, seeds, reward, generation=gen, rescore=True)
    assert torch.equal(rescored.response_ids, ro.response_ids)
    torch.testing.assert_close(rescored.logprobs, rescored.sampler_logprobs, atol=1e-5, rtol=1e-5)
