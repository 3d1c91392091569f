"""The reward-model fixes, each measured against no fix, on the world where the truth is known.

    .venv/bin/python bench/rm_fixes.py [--size small|demo] [--seeds 0 1 2]
        [--conditions default keyword length] [--fixes none grad_penalty length_residual conservative]
        [--work runs/rm_fixes] [--out bench/results/rm_fixes.json]

Three rater conditions: the default raters (length bias 0.1 per token: the cost of a fix when
nothing is wrong), the keyword-biased raters (``world.rater.keyword_bias=0.5``: phrase gaming)
and the length-biased raters (``world.rater.length_bias=0.15``: length hacking, the README's
demonstration). Four reward models per condition and seed, each optimized by PPO from the same
SFT policy and measured by ``rlhflab eval`` against it:

- ``none``: ``rlhflab rm`` as it is;
- ``grad_penalty``: ``--set rm.grad_penalty=LAMBDA`` (``--grad-penalty``);
- ``length_residual``: ``--set rm.length_residual=true``. The flag changes the normalization
  only, so this reward model is the ``none`` model's weights renormalized (``residualize``
  below repeats ``commands.rm.run_rm``'s normalization step on the same reference samples):
  the same files ``rlhflab rm ... --set rm.length_residual=true`` writes, without training the
  same weights twice;
- ``conservative``: ``--ensemble 3`` and PPO with ``--set rl.rm_reduce=min`` (Coste et al. 2024).

One SFT policy (seed 0, the preset's size) serves every run: the raters do not enter SFT. A seed s sets
``rm.seed`` (the comparisons collected, the head, the data order) and ``rl.seed`` and the
evaluation's seed. Every stage runs as a user runs it (``rlhflab ...`` in a subprocess,
recorded in the JSON); a finished stage is kept in ``--work`` and skipped on the next call,
and the JSON is rewritten after every evaluation, so the grid can be run in pieces.

Readings per PPO arm (``rlhflab eval``, ``world.n_eval`` probes per family): gold, win-rate
against SFT by the gold judge, sampled KL to SFT, mean length and keyword density (the two
exploits' strength), and the reward model's own held-out accuracy and probes
(``rlhflab eval-rm``: padding and keyword win rates). ``summary`` holds mean and standard
deviation over the seeds that finished.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONDITIONS = {
    "default": [],
    "keyword": ["world.rater.keyword_bias=0.5"],
    "length": ["world.rater.length_bias=0.15"],
}
FIXES = ("none", "grad_penalty", "length_residual", "conservative")
# The sizes: the demo preset as it is, and a smaller one for a shared 2-core machine (its
# overrides are recorded in the JSON; see docs/reward-model.md, "The fixes, measured").
SIZES = {
    "demo": [],
    "small": ["rm.n_prompts=512", "rm.n_eval_prompts=64", "rm.n_reference=128",
              "rl.steps=40", "rl.eval_every=10", "rl.n_eval=64", "world.n_eval=20"],
}
EVAL_KEYS = ("gold/mean", "base/gold/mean", "win_rate/gold", "win_rate/gold_ci_low", "win_rate/gold_ci_high",
             "win_rate/gold_length_controlled", "kl/sequence_mean", "length/mean", "base/length/mean",
             "keywords/density", "base/keywords/density", "filler/per_response", "capability/accuracy")
RM_EVAL_KEYS = ("accuracy/labels", "accuracy/gold", "probe/length/win_rate", "probe/keyword/win_rate",
                "probe/length/corr_reward_length")
HEADLINE = ("gold/mean", "win_rate/gold", "kl/sequence_mean", "length/mean", "keywords/density",
            "rm/accuracy_labels", "rm/probe_keyword", "rm/probe_length")


def rlhflab(args: list[str], log: Path) -> tuple[list[str], float]:
    """Run ``rlhflab ARGS`` as a user would; the output goes to ``log``. Returns the command
    as a user types it and its wall time."""
    cmd = [sys.executable, "-m", "rlhflab.cli", *args]
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}; see {log}")
    return ["rlhflab", *args], time.perf_counter() - t


def sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def residualize(rm_none: Path, out: Path, config: Path, overrides: list[str], sft: Path) -> None:
    """``rm_none``'s weights with ``rm.length_residual``'s normalization, written to ``out``:
    ``commands.rm.run_rm``'s normalization step on the same reference samples (the SFT
    policy's samples of ``reference_texts``, drawn with seed rm.seed + 2)."""
    import shutil

    from rlhflab.commands.rm import _corr, reference_texts
    from rlhflab.config import load_config
    from rlhflab.models import resolve_model_dir
    from rlhflab.reward_model import RewardModel, length_normalization
    from rlhflab.world import World

    cfg = load_config(config, overrides)
    rm = RewardModel.load(rm_none)
    ps, rs, es, _ = reference_texts(cfg, World(cfg.world), resolve_model_dir(sft), [], rm.tokenizer,
                                    from_world=True)
    raw = rm.raw_member_scores(ps, rs, eos=es)
    lengths = rm.response_lengths(ps, rs, eos=es)
    for m in range(rm.n_members):
        rm.gains[m], rm.biases[m], rm.length_slopes[m] = length_normalization(raw[m], lengths)
    rm.meta["normalization"].update({"length_residual": True, "length_unit": "response tokens of this tokenizer, "
                                     "the end token not counted", "length_mean": lengths.mean().item(),
                                     "length_corr_raw": [_corr(raw[m], lengths) for m in range(rm.n_members)]})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(rm_none, tmp, ignore=shutil.ignore_patterns("model"))
    rm.save(tmp / "model")
    tmp.rename(out)


def readings(eval_dir: Path, rm_eval_dir: Path, ppo_dir: Path, rm_dir: Path) -> dict:
    ev = json.loads((eval_dir / "eval.json").read_text())
    out = {k: ev[k] for k in EVAL_KEYS if k in ev}
    rm_ev = json.loads((rm_eval_dir / "rm_eval.json").read_text())
    out.update({"rm/accuracy_labels": rm_ev.get("accuracy/labels"), "rm/accuracy_gold": rm_ev.get("accuracy/gold"),
                "rm/probe_length": rm_ev.get("probe/length/win_rate"),
                "rm/probe_keyword": rm_ev.get("probe/keyword/win_rate"),
                "rm/corr_reward_length": rm_ev.get("probe/length/corr_reward_length")})
    rl = json.loads((ppo_dir / "metrics.json").read_text())
    out.update({f"ppo/{k}": rl[k] for k in ("objective/kl", "objective/scores", "gold/initial", "gold/final",
                                              "gold/best", "gold/best_step") if k in rl})
    rows = [json.loads(x) for x in (ppo_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out["curve"] = [{"step": r["step"], "kl": r.get("objective/kl"), "gold": r["gold/mean"],
                     "length": r.get("rollout/length_mean")} for r in rows if "gold/mean" in r]
    rm_summary = json.loads((rm_dir / "metrics.json").read_text())
    out["rm/seconds"] = rm_summary.get("train/seconds")
    return out


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation (n - 1) over seeds per (condition, fix) of the headline readings."""
    out: dict = {}
    for run in runs:
        fix = f"grad_penalty={run['grad_penalty']:g}" if run["fix"] == "grad_penalty" else run["fix"]
        out.setdefault(run["condition"], {}).setdefault(fix, []).append(run["readings"])
    table: dict = {}
    for cond, fixes in out.items():
        for fix, rs in fixes.items():
            row = {"seeds": len(rs)}
            for key in HEADLINE:
                xs = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
                if xs:
                    mean = sum(xs) / len(xs)
                    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
                    row[key] = {"mean": mean, "sd": sd, "values": xs}
            table.setdefault(cond, {})[fix] = row
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    ap.add_argument("--fixes", nargs="+", choices=FIXES, default=list(FIXES))
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"),
                    help="the preset the sizes apply to (configs/tiny.yaml checks the script in seconds)")
    ap.add_argument("--grad-penalty", type=float, default=0.01, help="rm.grad_penalty of the grad_penalty fix "
                    "(its runs are kept per value)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "rm_fixes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rm_fixes.json")
    args = ap.parse_args()

    config = args.config
    size = SIZES[args.size]
    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if (record.get("size"), record.get("config")) != (args.size, str(config)):
        record = {}
    record.update({"command": shlex.join(["python", "bench/rm_fixes.py", *sys.argv[1:]]), "size": args.size,
                   "size_overrides": size, "config": str(config), "conditions": CONDITIONS,
                   "stages": record.get("stages", {}),
                   "runs": record.get("runs", [])})
    done = {(r["condition"], r["fix"], r["seed"], r.get("grad_penalty")) for r in record["runs"]}

    def save() -> None:
        record["summary"] = summarize(record["runs"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(args.out)

    def stage(name: str, out: Path, cmd: list[str], marker: str = "metrics.json") -> None:
        if (out / marker).is_file():
            return
        if out.exists():
            cmd = [*cmd, "--overwrite"]
        print(f"[rm_fixes] {name}: {shlex.join(['rlhflab', *cmd])}", flush=True)
        shown, seconds = rlhflab(cmd, out.with_name(out.name + ".log"))
        record["stages"][name] = {"command": shlex.join(shown), "seconds": seconds}
        save()

    sft = args.work / "sft"  # the sizes leave SFT as the preset has it: one SFT policy for both
    stage("sft", sft, ["sft", "--config", str(config), "--out", str(sft)])
    for seed in args.seeds:
        for cond in args.conditions:
            base = [*size, *CONDITIONS[cond]]
            d = work / cond / f"s{seed}"
            d.mkdir(parents=True, exist_ok=True)
            rm_sets = [*base, f"rm.seed={seed}"]
            for fix in args.fixes:
                lam = args.grad_penalty if fix == "grad_penalty" else None
                if (cond, fix, seed, lam) in done:
                    continue
                name = f"grad_penalty{lam:g}" if lam is not None else fix  # a directory per lambda
                rm_dir = d / f"rm_{name}"
                rl_sets = [*base, f"rl.seed={seed}"]
                if fix == "none":
                    stage(f"{cond}/s{seed}/rm_none", rm_dir, ["rm", "--config", str(config), *sets(rm_sets),
                                                             "--sft", str(sft), "--out", str(rm_dir)])
                elif fix == "grad_penalty":
                    stage(f"{cond}/s{seed}/rm_{name}", rm_dir,
                          ["rm", "--config", str(config), *sets([*rm_sets, f"rm.grad_penalty={args.grad_penalty}"]),
                           "--sft", str(sft), "--out", str(rm_dir)])
                elif fix == "length_residual":
                    stage(f"{cond}/s{seed}/rm_none", d / "rm_none", ["rm", "--config", str(config), *sets(rm_sets),
                                                                     "--sft", str(sft), "--out", str(d / "rm_none")])
                    if not (rm_dir / "model").is_dir():
                        t = time.perf_counter()
                        residualize(d / "rm_none", rm_dir, config, [*rm_sets, "rm.length_residual=true"], sft)
                        record["stages"][f"{cond}/s{seed}/rm_length_residual"] = {
                            "command": shlex.join(["rlhflab", "rm", "--config", str(config),
                                                   *sets([*rm_sets, "rm.length_residual=true"]), "--sft", str(sft),
                                                   "--out", str(rm_dir)]),
                            "made_by": "residualize(): rm_none's weights renormalized", "seconds": time.perf_counter() - t}
                elif fix == "conservative":
                    stage(f"{cond}/s{seed}/rm_conservative", rm_dir,
                          ["rm", "--config", str(config), *sets(rm_sets), "--ensemble", "3", "--sft", str(sft),
                           "--out", str(rm_dir)])
                    rl_sets.append("rl.rm_reduce=min")
                ppo = d / f"ppo_{name}"
                stage(f"{cond}/s{seed}/ppo_{name}", ppo, ["ppo", "--config", str(config), *sets(rl_sets),
                                                         "--sft", str(sft), "--rm", str(rm_dir), "--out", str(ppo)])
                ev = d / f"eval_{name}"
                stage(f"{cond}/s{seed}/eval_{name}", ev, ["eval", "--config", str(config), *sets(base), "--policy",
                                                         str(ppo), "--base", str(sft), "--seed", str(seed),
                                                         "--out", str(ev)], marker="eval.json")
                rm_ev = d / f"rm_eval_{name}"
                stage(f"{cond}/s{seed}/rm_eval_{name}", rm_ev,
                      ["eval-rm", "--config", str(config), *sets(base), "--rm", str(rm_dir), "--data",
                       str(rm_dir / "data" / "eval.jsonl"), "--out", str(rm_ev)], marker="rm_eval.json")
                record["runs"].append({"condition": cond, "fix": fix, "seed": seed, "grad_penalty": lam,
                                       "readings": readings(ev, rm_ev, ppo, rm_dir)})
                save()
    save()
    print(json.dumps(record["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
