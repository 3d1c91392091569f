"""Adversarial pairs against a reward model's exploit, measured against no fix, on the world.

    .venv/bin/python bench/rm_adversarial.py [--seeds 0 1 2] [--bias world.rater.keyword_bias=1.0]
        [--work runs/rm_adversarial] [--out bench/results/rm_adversarial.json] [--sft DIR]

One SFT policy (``rlhflab sft --config configs/demo.yaml``) serves every run. Per seed s, with
the biased raters (``--bias``, default the keyword bias 1.0) and ``rm.seed = world.seed =
rl.seed = s``:

1. ``none``: ``rlhflab rm`` (comparisons collected from the SFT policy), then
   ``rlhflab attack-rm --rm RM --policy SFT`` at its defaults;
2. ``raters``: ``rlhflab rm --data RM/data/train.jsonl --eval-data RM/data/eval.jsonl
   --adversarial ATTACK``: the same comparisons plus the attack's adversarial pairs, labelled
   by the world's (biased) raters;
3. ``unbiased``: the same pairs labelled by the gold utility (a stand-in for labellers without
   the raters' bias: ``votes`` [1, 1, 1] for the side gold prefers, ties dropped), given to
   ``rlhflab rm --adversarial`` the same way;

then each reward model attacked again, optimized by PPO from the SFT policy
(``rlhflab ppo``) and the policy measured against SFT (``rlhflab eval``). Readings: the
reward model's held-out accuracy, the first exploit pattern's gain before and after (the
``adversarial/...`` readings of ``rlhflab rm``), the new attack's first-ranked pattern and the
keyword probe, and of the PPO arm gold, the gold win-rate against SFT, the KL and the keyword
density. Finished stages are kept in ``--work`` and skipped; the JSON is rewritten after
every seed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
ARMS = ("none", "raters", "unbiased")


def _run(argv: list[str], log: list[dict]) -> None:
    t = time.time()
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "rlhflab"), *argv], capture_output=True, text=True)
    log.append({"command": "rlhflab " + shlex.join(argv), "seconds": round(time.time() - t, 1)})
    if proc.returncode != 0:
        raise SystemExit(f"failed: rlhflab {shlex.join(argv)}\n{proc.stderr[-2000:]}")


def gold_labelled(attack: Path, out: Path) -> None:
    """The attack's adversarial pairs with gold's labels, beside a copy of its attack.json."""
    from rlhflab.world.gold import gold_utility

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in (attack / "adversarial.jsonl").read_text().splitlines():
        r = json.loads(line)
        gc = gold_utility(r["prompt"], r["chosen"], r["chosen_eos"])
        gr = gold_utility(r["prompt"], r["rejected"], r["rejected_eos"])
        if gc == gr:
            continue
        if gr > gc:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"], "chosen_eos": r["rejected_eos"],
                 "rejected_eos": r["chosen_eos"]}
        rows.append({**r, "votes": [1, 1, 1]})
    (out / "adversarial.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "attack.json").write_text((attack / "attack.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bias", default="world.rater.keyword_bias=1.0")
    ap.add_argument("--work", default="runs/rm_adversarial")
    ap.add_argument("--out", default="bench/results/rm_adversarial.json")
    ap.add_argument("--sft", help="an SFT run to use (default: trained in --work)")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.is_file() else {"seeds": {}}
    result.update(bias=args.bias)
    log: list[dict] = result.setdefault("commands", [])  # earlier calls' commands kept
    sft = Path(args.sft) if args.sft else work / "sft"
    if not (sft / "model").is_dir():
        _run(["sft", "--config", "configs/demo.yaml", "--out", str(sft)], log)
    cfg = ["--config", "configs/demo.yaml"]
    for s in args.seeds:
        sets = [x for kv in (args.bias, f"rm.seed={s}", f"world.seed={s}", f"rl.seed={s}") for x in ("--set", kv)]
        d = {arm: work / f"s{s}_{arm}" for arm in ARMS}
        if not (d["none"] / "rm" / "metrics.json").is_file():
            _run(["rm", *cfg, "--sft", str(sft), "--out", str(d["none"] / "rm"), "--overwrite", *sets], log)
        if not (d["none"] / "attack" / "attack.json").is_file():
            _run(["attack-rm", "--rm", str(d["none"] / "rm"), "--policy", str(sft), "--out", str(d["none"] / "attack"),
                  "--seed", str(s), "--overwrite"], log)
        gold_labelled(d["none"] / "attack", work / f"s{s}_gold_pairs")
        data = ["--data", str(d["none"] / "rm" / "data" / "train.jsonl"), "--eval-data",
                str(d["none"] / "rm" / "data" / "eval.jsonl")]
        for arm, pairs in (("raters", d["none"] / "attack"), ("unbiased", work / f"s{s}_gold_pairs")):
            if not (d[arm] / "rm" / "metrics.json").is_file():
                _run(["rm", *cfg, "--sft", str(sft), *data, "--adversarial", str(pairs), "--out", str(d[arm] / "rm"),
                      "--overwrite", *sets], log)
            if not (d[arm] / "attack" / "attack.json").is_file():
                _run(["attack-rm", "--rm", str(d[arm] / "rm"), "--policy", str(sft), "--out", str(d[arm] / "attack"),
                      "--seed", str(s), "--overwrite"], log)
        seed = {}
        for arm in ARMS:
            if not (d[arm] / "ppo" / "metrics.json").is_file():
                _run(["ppo", *cfg, "--sft", str(sft), "--rm", str(d[arm] / "rm"), "--out", str(d[arm] / "ppo"),
                      "--overwrite", *sets], log)
            if not (d[arm] / "eval" / "eval.json").is_file():
                _run(["eval", *cfg, "--policy", str(d[arm] / "ppo"), "--base", str(sft), "--rm", str(d[arm] / "rm"),
                      "--out", str(d[arm] / "eval"), "--overwrite", *sets], log)
            m = json.loads((d[arm] / "rm" / "metrics.json").read_text())
            a = json.loads((d[arm] / "attack" / "attack.json").read_text())
            e = json.loads((d[arm] / "eval" / "eval.json").read_text())
            seed[arm] = {
                "rm/eval_accuracy": m.get("eval/accuracy"),
                **{k: m[k] for k in ("adversarial/pairs", "adversarial/rater_prefers_clean", "adversarial/accuracy",
                                     "adversarial/top_gain_before", "adversarial/top_gain_after") if k in m},
                "attack/top_pattern": a.get("rm_attack/top_pattern"), "attack/top_gain": a.get("rm_attack/top_gain"),
                "attack/top_gain_ci_low": a.get("rm_attack/top_gain_ci_low"),
                "attack/exploits": a.get("rm_attack/exploits"),
                "attack/keyword_probe_gain": max(a["probes"][k]["gain"] for k in a["probes"] if k.startswith("keyword")),
                **{f"ppo/{k}": e.get(k) for k in ("gold/mean", "base/gold/mean", "win_rate/gold", "win_rate/gold_ci_low",
                                                  "win_rate/gold_ci_high", "kl/sequence_mean", "keywords/density",
                                                  "base/keywords/density", "length/mean")}}
        result["seeds"][str(s)] = seed
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(s, json.dumps(seed), flush=True)


if __name__ == "__main__":
    main()
