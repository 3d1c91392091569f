"""Why decode steps run on one thread under a passive OpenMP wait policy
(``rlhflab.generation.decode_threads``): a decode-sized product and a whole decoding call,
one thread against two, under the policy this process was started with.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/decode_threads.py
    .venv/bin/python bench/decode_threads.py            # libgomp's default policy

Needs the benchmark inputs of ``bench/run.py`` (``runs/bench/sft``, ``runs/bench/world``).
Prints, and appends to ``bench/results/decode_threads.json``: microseconds per
(64, 128) x (128, 384) product on 1 and 2 threads, and milliseconds per ``generate`` call of
64 prompts x 24 tokens of the benchmark's SFT policy with the decode steps on 2 threads
(``PASSIVE_DECODE_WORK = 0``) and as the rule decides.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def product_us(threads: int, reps: int = 2000) -> float:
    torch.set_num_threads(threads)
    x, w = torch.randn(64, 128), torch.randn(384, 128)
    for _ in range(50):
        torch.nn.functional.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - t0) / reps * 1e6


def generate_ms(work: int, calls: int = 20) -> float:
    import rlhflab.generation as generation
    from rlhflab.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(2)
    generation.PASSIVE_DECODE_WORK = work
    tok = load_tokenizer(ROOT / "runs/bench/sft/model")
    model = load_causal_lm(ROOT / "runs/bench/sft/model", tok)
    lines = (ROOT / "runs/bench/world/prompts.jsonl").read_text().splitlines()[:64]
    ids = [tok(json.loads(x)["prompt"]).input_ids for x in lines]

    def run(k: int):
        return generation.generate(model, ids, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   seeds=[generation.row_seed(0, k, i) for i in range(len(ids))],
                                   max_new_tokens=24, record_logprobs=True)

    for k in range(3):
        run(k)
    t0 = time.perf_counter()
    for k in range(calls):
        run(k)
    return (time.perf_counter() - t0) / calls * 1000


def main() -> int:
    from rlhflab.generation import PASSIVE_DECODE_WORK

    out = {"command": shlex.join(["python", "bench/decode_threads.py", *sys.argv[1:]]),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "finished": None, "load": os.getloadavg()[0],
           "product_us": {"1": product_us(1), "2": product_us(2)},
           "generate_ms": {"decode_on_2_threads": generate_ms(0), "rule": generate_ms(PASSIVE_DECODE_WORK)}}
    out["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    print(json.dumps(out, indent=1))
    path = ROOT / "bench/results/decode_threads.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(runs + [out], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
