"""Before/after of packed rows and of length-grouped micro-batches in rlhflab's SFT loop,
and the choice of ``rlhflab.algos.sft.PASS_COST_TOKENS`` (used when packing is off).

    .venv/bin/python bench/sft_grouping.py [--repeats 3] [--threads 2]

Runs the SFT benchmark stage (the settings of ``bench/run.py``) with packing (the default),
and without it with the pass cost set to 1e12 (one forward pass per batch: the loop before
grouping) and to 32, 64 and 128 padded tokens, alternating, each run in a fresh subprocess;
writes
``bench/results/sft_grouping.json`` with medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from stages import build_spec  # noqa: E402

# name: (pass cost, packing)
VARIANTS = {"one_pass_per_batch (before)": (1e12, False), "pass_cost_32": (32, False), "pass_cost_64": (64, False),
            "pass_cost_128": (128, False), "packed (default)": (64, True)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--config", default=str(run.ROOT / "configs" / "demo.yaml"))
    args = p.parse_args()
    args.stages = "sft"
    paths = run.prepare(args, print)
    spec0 = build_spec("sft", paths, args)
    runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    loads = []
    for r in range(args.repeats):
        names = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
        for name in names:
            spec = dict(spec0, impl="rlhflab", pass_cost=VARIANTS[name][0], packing=VARIANTS[name][1],
                        out=str(run.WORK / "runs" / "sft_grouping" / f"{r}"))
            res = run.measure("rlhflab", Path(sys.executable), spec, args.threads, f"sft_grouping-{r}-{name.split()[0]}")
            loads += [res["load_before"], res["load_after"]]
            runs[name].append(res)
            print(f"{name} #{r}: {res['samples_per_s']:.1f} samples/s, {res['samples_per_cpu_s']:.1f} per CPU-s "
                  f"(load {res['load_before']:.1f})", flush=True)
    medians = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
    cpu = {k: statistics.median(x["samples_per_cpu_s"] for x in v) for k, v in runs.items()}
    before = medians["one_pass_per_batch (before)"]
    before_cpu = cpu["one_pass_per_batch (before)"]
    out = {"command": shlex.join(["python", "bench/sft_grouping.py", *sys.argv[1:]]),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads, "settings": spec0,
           "load": {"min": min(loads), "max": max(loads)}, "nproc": os.cpu_count(),
           "median_samples_per_s": medians, "speedup_vs_before": {k: v / before for k, v in medians.items()},
           "median_samples_per_cpu_s": cpu, "cpu_speedup_vs_before": {k: v / before_cpu for k, v in cpu.items()},
           "runs": runs}
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    path = run.RESULTS / "sft_grouping.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"median_samples_per_s": medians, "median_samples_per_cpu_s": cpu, "load": out["load"]},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
