"""Sampler/trainer log-prob gap of PPO's first update under each precision, on a trained
policy: decoding in float32 (what rlhflab does) or under the same autocast (docs/scaling.md).

    python bench/precision_mismatch.py runs/demo/sft configs/demo.yaml bf16 4 /tmp/ppo_bf16

Modes: no, bf16, bf16:autocast (decoding under autocast too)."""
import json
import sys
import time
from pathlib import Path

import rlhflab.algos.online as online
from rlhflab.commands.rl import run_rl
from rlhflab.config import load_config

sft, preset, mode, steps, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
mp, gen_autocast = mode.split(":") if ":" in mode else (mode, "fp32")
if gen_autocast == "autocast":
    orig = online.OnlineRun.rollout
    def rollout(self, step):
        with self.accelerator.autocast():
            return orig(self, step)
    online.OnlineRun.rollout = rollout
cfg = load_config(preset, [f"rl.steps={steps}", "rl.eval_every=0", f"rl.mixed_precision={mp}",
                           "rl.mismatch_tolerance=100"])
t = time.perf_counter()
run_rl(cfg, "ppo", out, sft=sft, reward_fns=["gold"], overwrite=True)
rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
rows = [r for r in rows if "rollout/logprob_diff_max" in r]
print(json.dumps({"mode": mode, "seconds": round(time.perf_counter() - t, 1),
                  "diff_max": max(r["rollout/logprob_diff_max"] for r in rows),
                  "diff_mean": sum(r["rollout/logprob_diff_mean"] for r in rows) / len(rows),
                  "first_ratio_mean_min": min(r["rollout/first_ratio_mean"] for r in rows)}))
