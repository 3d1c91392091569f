"""Peak memory per process of SFT on 2 and 4 CPU processes (gloo), data-parallel (``sft.sharding=ddp``,
every process a whole copy of weights, gradients and AdamW's two moments) against sharded
(``sft.sharding=fsdp2``, each process one half of each), read as each process's peak
resident set size (getrusage), each arm in fresh processes.

    python bench/sharding_memory.py --out /tmp/sharding_memory   # -> bench/results/sharding_memory.json

The model is bench/lora_memory.py's Llama (d_model 768, 8 layers, 12 heads: 76M
parameters, 289 MB of float32 weights), created from its config; 3 SFT steps of 8 world
examples (8 / N per process, one micro-batch), no held-out set. Each process reports its peak
after training, and then, after ``distributed.gathered`` (the whole model loaded into rank
0's twin, what a save does), again: the sharded arm's rank 0 holds a whole copy then.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.arch=llama", "model.d_model=768", "model.n_layers=8", "model.n_heads=12", "model.max_positions=96"]
RUN = MODEL + ["sft.max_steps=3", "sft.batch_size=8", "sft.max_length=64", "sft.eval_every=100"]
ARMS = ("ddp", "fsdp2")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(arm: str, out: str) -> None:
    """One process of a 2-process launch: trains, writes ``<out>/<arm>-<rank>.json``."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from rlhflab.algos.sft import tokenize_rows, train_sft
    from rlhflab.config import load_config
    from rlhflab.distributed import gathered, make_accelerator
    from rlhflab.models import count_parameters, create_causal_lm
    from rlhflab.world import World

    cfg = load_config(ROOT / "configs" / "tiny.yaml", RUN + [f"sft.sharding={arm}"])
    acc = make_accelerator("no")
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    train, _ = tokenize_rows(world.sft_examples(64), tok, cfg.sft.max_length)
    before = peak_rss_mb()  # torch, transformers, rlhflab and the process group, no model yet
    model = create_causal_lm(cfg.model, tok, seed=0)
    n = count_parameters(model)
    t0 = time.perf_counter()
    summary = train_sft(cfg.sft, model, tok, train, [], None, acc)
    trained = peak_rss_mb()
    gathered(acc, model)
    record = {"arm": arm, "rank": acc.process_index, "processes": acc.num_processes, "parameters": n,
              "rss_before_model_mb": before, "peak_rss_training_mb": trained, "peak_rss_after_gather_mb": peak_rss_mb(),
              "train_loss": summary["train/loss"], "seconds": time.perf_counter() - t0}
    Path(out, f"{arm}-{acc.process_index}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", default=str(ROOT / "bench" / "results" / "sharding_memory.json"))
    ap.add_argument("--processes", type=int, nargs="+", default=[2, 4], help="launch sizes to measure")
    ap.add_argument("--child", nargs=2, metavar=("ARM", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for n in args.processes:
        for arm in ARMS:
            with socket.socket() as s:  # a port free on loopback now, for the launch's rendezvous
                s.bind(("127.0.0.1", 0))
                port = str(s.getsockname()[1])
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", port,
                   __file__, "--out", str(out), "--child", arm, str(out)]
            subprocess.run(cmd, env=env, check=True)
            runs += [json.loads((out / f"{arm}-{r}.json").read_text()) for r in range(n)]
    result = {"command": "python bench/sharding_memory.py --out /tmp/sharding_memory", "settings": RUN,
              "threads": int(env["OMP_NUM_THREADS"]), "processes": args.processes, "device": "cpu (gloo)",
              "runs": runs}
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"{r['arm']:6s} {r['processes']} processes, rank {r['rank']}: peak {r['peak_rss_training_mb']:.0f} MB training, "
              f"{r['peak_rss_after_gather_mb']:.0f} MB after the gather (before the model {r['rss_before_model_mb']:.0f})")


if __name__ == "__main__":
    main()
