"""The decoding engine's 4-D attention masks (``rlhflab.generation``), before and after:
whole ``generate`` calls of 64 prompts x 24 tokens of the benchmark's SFT policy, with the
engine's 4-D boolean masks and with transformers building its own from the 2-D mask at every
step, alternating, on 2 threads; and the samples of both, compared.

    .venv/bin/python bench/decode_masks.py [--calls 40]

Needs the benchmark inputs of ``bench/run.py`` (``runs/bench/sft``, ``runs/bench/world``).
Prints, and appends to ``bench/results/decode_masks.json``: milliseconds per call (median,
minimum) each way, and whether the samples and log-probs were the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rlhflab.generation as generation
    from rlhflab.algos.online import fuse_activations

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=40, help="generate calls each way")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    sft = ROOT / "runs" / "bench" / "sft" / "model"
    model, tok = AutoModelForCausalLM.from_pretrained(sft), AutoTokenizer.from_pretrained(sft)
    fuse_activations(model)  # as the online stages call it
    prompts = [json.loads(x)["prompt"] for x in (ROOT / "runs" / "bench" / "world" / "prompts.jsonl").open()][:16]
    ids = [tok(x)["input_ids"] for x in prompts for _ in range(4)]  # prompts of several lengths: left padding
    four_d = generation._reads_4d_masks

    def call(seed: int, masks_4d: bool):
        generation._reads_4d_masks = four_d if masks_4d else (lambda model, pad: False)
        return generation.generate(model, ids, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   seeds=list(range(seed, seed + len(ids))), max_new_tokens=24, batch_size=64,
                                   record_logprobs=True)

    same = True
    for seed in range(3):
        a, b = call(seed * 64, True), call(seed * 64, False)
        same &= torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    ms: dict[str, list[float]] = {"4d": [], "2d": []}
    for r in range(args.calls):
        for name in ("4d", "2d") if r % 2 == 0 else ("2d", "4d"):
            t = time.perf_counter()
            call(r, name == "4d")
            ms[name].append(1000 * (time.perf_counter() - t))
    generation._reads_4d_masks = four_d
    result = {"command": shlex.join(["python", "bench/decode_masks.py", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_1min": os.getloadavg()[0],
              "same_samples_and_logprobs": bool(same),
              **{f"ms_{k}": {"median": sorted(v)[len(v) // 2], "min": min(v), "n": len(v)} for k, v in ms.items()}}
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results" / "decode_masks.json"
    runs = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(runs + [result], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
