"""What length-grouped passes would save in DPO and reward modeling (a proposal for
``algos/dpo.py`` and ``algos/reward_model.py``, measured without changing them).

    .venv/bin/python bench/grouping_probe.py [--threads 1] [--batches 10]

Times the policy passes of DPO (summed response log-probs of chosen + rejected, forward +
backward, ``algos.dpo.sequence_logps``) on random batches of 32 of the world's pairs with
the SFT policy: one pass per batch (what the loop does) against passes cut by
``forward.length_groups`` over each pair's longer sequence. The gradient is the same
either way (the losses are normalized by the global batch). Writes
``bench/results/grouping_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from common import read_jsonl

    from rlhflab.algos.dpo import sequence_logps, tokenize_pairs
    from rlhflab.forward import length_groups
    from rlhflab.models import load_causal_lm, load_tokenizer

    paths = run.prepare(argparse.Namespace(config=str(run.ROOT / "configs" / "demo.yaml"), threads=args.threads,
                                           stages=""), print)
    tok = load_tokenizer(paths["sft"])
    model = load_causal_lm(paths["sft"], tok)
    pairs, _ = tokenize_pairs(read_jsonl(paths["world"] / "preferences.jsonl"), tok, 64)
    random.seed(0)
    batches = [random.sample(pairs, 32) for _ in range(args.batches)]

    def run_batches(pass_cost: float) -> tuple[float, float]:
        t0, passes = time.perf_counter(), 0
        for b in batches:
            lengths = [max(len(e.chosen.input_ids), len(e.rejected.input_ids)) for e in b]
            for idx in length_groups(lengths, pass_cost=pass_cost / 2):  # a pair is two rows
                seqs = [b[i].chosen for i in idx] + [b[i].rejected for i in idx]
                lp, _ = sequence_logps(model, seqs, tok.pad_token_id, "cpu")
                (lp.sum() / len(b)).backward()
                passes += 1
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, passes / len(batches)

    times: dict[str, list[float]] = {"one_pass": [], "grouped": []}
    passes = {}
    for _ in range(args.repeats):
        for name, cost in (("one_pass", 1e12), ("grouped", 64)):
            seconds, passes[name] = run_batches(cost)
            times[name].append(seconds)
            print(f"{name}: {seconds:.2f} s for {args.batches} batches ({passes[name]:.1f} passes per batch)",
                  flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"command": " ".join(["python", "bench/grouping_probe.py", *sys.argv[1:]]), "threads": args.threads,
           "load": os.getloadavg()[0], "batches_of_32_pairs": args.batches, "seconds": times,
           "median_seconds": med, "passes_per_batch": passes, "speedup": med["one_pass"] / med["grouped"]}
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / "grouping_probe.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"speedup of the DPO policy passes with length groups: {out['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
