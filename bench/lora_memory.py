"""Peak memory of DPO and PPO with full fine-tuning (the reference is a second copy of the
weights) against LoRA (the reference is the base with its adapters off), each run in a
fresh process on a CPU, read as the process's peak resident set size (getrusage).

    python bench/lora_memory.py --out /tmp/lora_memory        # -> bench/results/lora_memory.json

The model is a Llama created from a config (d_model 768, 8 layers, 12 heads: 76M
parameters, 302 MB of float32 weights) saved as the starting policy; the world's
preferences feed DPO, the world's gold utility is PPO's reward (no reward model, so that
the policy, its reference and the critic are what is measured). A few steps each: the peak
comes with the first optimizer step, when every tensor of a step exists at once.

Cases: ``dpo`` runs the reference at every step (``dpo.precompute_ref_logps=false``, the
reference lives as long as training); ``dpo-cached`` caches the reference's log-probs
first (rlhflab's default; full fine-tuning then frees its copy before the optimizer
exists); ``ppo``: policy, reference and critic (its own backbone, adapted too with LoRA).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.arch=llama", "model.d_model=768", "model.n_layers=8", "model.n_heads=12", "model.max_positions=96"]
RUN = MODEL + ["generation.max_new_tokens=16", "dpo.max_steps=3", "dpo.batch_size=8", "dpo.max_length=64",
               "dpo.eval_every=100", "dpo.world_eval_every=-1", "dpo.n_show=0", "world.n_preferences=64",
               "rl.steps=2", "rl.batch_size=8", "rl.eval_every=0", "rl.epochs=1", "rl.num_minibatches=1"]
CASES = {"dpo": ["dpo.precompute_ref_logps=false"], "dpo-cached": [], "ppo": []}
ARMS = {"full": ["lora.r=0"], "lora": ["lora.r=16", "lora.alpha=32"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(case: str, arm: str, sft: str, out: str) -> None:
    """One run in this (fresh) process; prints one JSON line."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from rlhflab import api

    cfg = api.load_config(str(ROOT / "configs" / "tiny.yaml"), RUN + CASES[case] + ARMS[arm])
    before = rss_mb()  # torch, transformers and rlhflab imported, no model yet
    t0 = time.perf_counter()
    if case.startswith("dpo"):
        api.dpo(cfg, out=out, sft=sft, overwrite=True)
    else:
        api.rl(cfg, "ppo", out=out, sft=sft, reward_fns=["gold"], overwrite=True)
    print(json.dumps({"case": case, "arm": arm, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before,
                      "seconds": time.perf_counter() - t0}))


def make_policy(path: Path) -> int:
    from rlhflab import api
    from rlhflab.models import count_parameters, create_causal_lm, save_pretrained_atomic
    from rlhflab.world import World

    cfg = api.load_config(str(ROOT / "configs" / "tiny.yaml"), RUN)
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=0)
    save_pretrained_atomic(model, tok, path)
    return count_parameters(model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="scratch directory for the runs")
    p.add_argument("--result", default=str(ROOT / "bench" / "results" / "lora_memory.json"))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--child", nargs=4, metavar=("CASE", "ARM", "SFT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    out = Path(args.out)
    sft = out / "sft"
    n_params = make_policy(sft / "model")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for case in args.cases.split(","):
        for arm in ARMS:
            proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--child", case, arm, str(sft),
                                   str(out / case / arm)],
                                  env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"lora_memory: {case}/{arm} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    by = {(r["case"], r["arm"]): r for r in rows}
    saved = {case: {"full_mb": by[case, "full"]["peak_rss_mb"], "lora_mb": by[case, "lora"]["peak_rss_mb"],
                    "saved_mb": by[case, "full"]["peak_rss_mb"] - by[case, "lora"]["peak_rss_mb"]}
             for case in args.cases.split(",")}
    result = {"command": "python bench/lora_memory.py --out " + str(out), "model": MODEL,
              "parameters": n_params, "weights_mb_fp32": n_params * 4 / 2**20, "settings": RUN, "cases": CASES,
              "arms": ARMS, "threads": int(env["OMP_NUM_THREADS"]), "runs": rows, "peak_rss": saved}
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
