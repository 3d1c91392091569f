"""What the decoding engine's Gumbel noise costs per decode step, by where it comes from
(``rlhflab.generation``): ``GumbelNoise`` (one CPU generator per row, float64, drawn in
blocks of steps) against ``CounterNoise`` (a hash of (seed, step, token) in elementwise torch
ops, computed on the logits' device), at the demo's vocabulary and a real one.

    .venv/bin/python bench/noise.py [--device cpu|cuda] [--rows 64] [--steps 24]

Appends to ``bench/results/noise.json``: milliseconds per step (mean over ``--steps`` steps of
fresh noise objects, 3 repeats, the best kept) per (vocabulary, source), the device, the
thread count and the load average. On a GPU the generator's time includes the copy of the
B x V float64 block to the device, which is what the counter draw removes.
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

from rlhflab.generation import CounterNoise, GumbelNoise, row_seed  # noqa: E402


def per_step_ms(kind: str, rows: int, steps: int, V: int, device: str) -> float:
    best = float("inf")
    seeds = [row_seed(0, 0, i) for i in range(rows)]
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        noise = CounterNoise(seeds, steps, device) if kind == "counter" else GumbelNoise(seeds, steps)
        for t in range(steps):
            x = noise.at(t, V).to(device, torch.float32)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / steps * 1e3)
        del x
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "noise.json")
    args = ap.parse_args()
    result = {"command": shlex.join(["python", "bench/noise.py", *sys.argv[1:]]), "device": args.device,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": args.rows,
              "steps": args.steps, "ms_per_step": {}}
    for V in (241, 151936):
        for kind in ("generator", "counter"):
            ms = per_step_ms(kind, args.rows, args.steps, V, args.device)
            result["ms_per_step"][f"V={V}/{kind}"] = round(ms, 3)
            print(f"V={V:>6} {kind:>9}: {ms:8.3f} ms/step", flush=True)
    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.write_text(json.dumps([*old, result], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
