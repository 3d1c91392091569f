"""Quality of a trained policy, the same code for rlhflab's and TRL's models.

``evaluate.py POLICY_DIR SFT_DIR CONFIG N``: on N held-out world prompts (split "eval"),
samples one response per prompt from the policy and from the SFT policy (same seed,
temperature 1, the preset's generation length) and prints ``RESULT {...}`` with

- ``gold/mean``: mean gold utility of the policy's samples (``world.gold.gold_utility``);
- ``gold/sft_mean``: the same for the SFT policy;
- ``gold/win_rate_vs_sft``: P(gold(policy sample) > gold(SFT sample)), ties count 1/2;
- ``kl/sequence_mean``: sampled sequence KL(policy || SFT) (``instruments.policy_eval.sampled_kl``).
"""

from __future__ import annotations

import json
import sys
from statistics import fmean

import torch

from rlhflab.config import load_config
from rlhflab.instruments.policy_eval import sampled_kl, world_sample_metrics
from rlhflab.models import load_causal_lm, load_tokenizer
from rlhflab.sampling import sample
from rlhflab.world import World
from rlhflab.world.gold import gold_utility

if __name__ == "__main__":
    policy_dir, sft_dir, config, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(config)
    g = cfg.generation
    world = World(cfg.world)
    prompts = world.prompts(n, "eval")
    tok = load_tokenizer(sft_dir)
    policy, sft = load_causal_lm(policy_dir, tok), load_causal_lm(sft_dir, tok)
    kw = dict(temperature=1.0, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=0)
    pol = sample(policy, tok, [p.text for p in prompts], **kw)
    ref = sample(sft, tok, [p.text for p in prompts], **kw)
    gp = [gold_utility(p, c.text, c.eos) for p, c in zip(prompts, pol)]
    gs = [gold_utility(p, c.text, c.eos) for p, c in zip(prompts, ref)]
    out = world_sample_metrics(pol, prompts)
    out["gold/sft_mean"] = fmean(gs)
    out["gold/win_rate_vs_sft"] = fmean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gp, gs))
    out.update(sampled_kl(policy, sft, tok, [p.text for p in prompts], max_new_tokens=g.max_new_tokens,
                          batch_size=g.batch_size))
    print("RESULT " + json.dumps(out), flush=True)
