"""The freshly initialised model both libraries start SFT from: ``make_init.py CONFIG OUT``.

A GPT-2 of the preset's size over the world's tokenizer, saved with ``save_pretrained``
(safetensors, tokenizer included), so TRL loads it with ``AutoModelForCausalLM`` and
``AutoTokenizer`` and rlhflab with ``load_causal_lm``.
"""

from __future__ import annotations

import sys

from rlhflab.config import load_config
from rlhflab.models import count_parameters, create_causal_lm, save_pretrained_atomic
from rlhflab.world import World

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[3:])
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=cfg.sft.seed)
    save_pretrained_atomic(model, tok, sys.argv[2])
    print(f"{count_parameters(model)} parameters")
