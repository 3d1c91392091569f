"""Speed of the online RL loops: rollout and update timed separately, per algorithm.

    .venv/bin/python bench/rl_speed.py [--sft DIR] [--rm DIR] [--algos ppo,grpo] [--steps 4]

Each algorithm runs in a fresh subprocess (so peak RSS is its own) on the demo-size model
(``configs/demo.yaml``: GPT-2, d=128, 4 layers) for ``--warmup`` untimed steps and then
``--steps`` timed rollout-and-update steps at the algorithm's defaults
(``rlhflab.registry.ONLINE_ALGORITHMS``), 64 responses per step, gold utility as the
reward unless ``--rm`` is given. Without ``--sft`` the policy is a freshly initialised
demo-size model, whose responses all run to ``max_new_tokens`` (the worst case); with an
SFT policy they end at its EOS.

Per algorithm: samples/s and response tokens/s over the whole step, generation tokens/s,
update tokens/s (response tokens per second of the update phase), the share of time in
generation and in the whole rollout, and the peak RSS. Written to
``bench/results/rl_speed.json`` with the machine, the thread count, the load average and
the exact command. No test asserts any of these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rlhflab.registry import ONLINE_ALGORITHMS  # torch-free

ROOT = Path(__file__).resolve().parents[1]
ALGOS = tuple(ONLINE_ALGORITHMS)


def child(args) -> dict:
    """One algorithm, timed; prints a JSON line."""
    import torch

    import rlhflab.rollout as rollout_mod
    from rlhflab.algos.online import OnlineRun
    from rlhflab.algos.ppo import ValueModel
    from rlhflab.algos.rl_config import resolve_rl_config
    from rlhflab.config import load_config
    from rlhflab.distributed import make_accelerator
    from rlhflab.models import (
        create_causal_lm,
        load_causal_lm,
        load_tokenizer,
        save_pretrained_atomic,
    )
    from rlhflab.rewards import build_reward
    from rlhflab.world import World

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"rl.steps={args.warmup + args.steps}",
                                                         f"rl.batch_size={args.batch_size}", "rl.eval_every=0"])
    cfg.rl = resolve_rl_config(cfg.rl, args.child)
    world = World(cfg.world)
    if args.sft:
        path = Path(args.sft) / "model" if (Path(args.sft) / "model").is_dir() else Path(args.sft)
    else:
        path = Path(args.work) / "untrained_demo_policy"
        if not (path / "config.json").is_file():
            tok = world.tokenizer(cfg.model.max_positions)
            save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, path)
    tok = load_tokenizer(path)
    policy, reference = load_causal_lm(path, tok), load_causal_lm(path, tok)
    value = ValueModel.from_causal_lm(policy) if ONLINE_ALGORITHMS.entry(args.child).options["critic"] else None
    reward = build_reward(args.rm, [] if args.rm else ["gold"])
    run = OnlineRun(cfg, args.child, make_accelerator(), policy, reference, tok, reward,
                    [p.text for p in world.prompts(cfg.world.n_prompts, "rl")], value_model=value)

    # Time generation inside the rollout, and count response tokens per step.
    gen_time = [0.0]
    original_generate = rollout_mod.generate

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = original_generate(*a, **k)
        gen_time[0] += time.perf_counter() - t
        return out

    rollout_mod.generate = timed_generate
    per_step = []
    original_end_step = run.end_step

    def end_step(step, ro, metrics, extra=None):
        per_step.append({"step": step, "tokens": float(ro.mask.sum()), "generate": gen_time[0],
                         "rollout": ro.seconds, "update": run.state["time_update"], "t": time.perf_counter()})
        return original_end_step(step, ro, metrics, extra)

    run.end_step = end_step
    trainer = ONLINE_ALGORITHMS[args.child]
    t0 = time.perf_counter()
    trainer(run)
    total = time.perf_counter() - t0
    timed = per_step[args.warmup:]
    before = per_step[args.warmup - 1] if args.warmup else {"generate": 0.0, "update": 0.0, "t": t0}
    seconds = timed[-1]["t"] - before["t"]
    generate = timed[-1]["generate"] - before["generate"]
    update = timed[-1]["update"] - before["update"]
    rollout = sum(s["rollout"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    samples = args.steps * args.batch_size
    rl = cfg.rl
    return {
        "algo": args.child, "steps_timed": args.steps, "batch_size": args.batch_size,
        "samples_per_prompt": rl.samples_per_prompt, "epochs": rl.epochs, "num_minibatches": rl.num_minibatches,
        "seconds": seconds, "seconds_total_incl_warmup": total,
        "seconds_generate": generate, "seconds_rollout": rollout, "seconds_update": update,
        "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
        "generate_tokens_per_s": tokens / generate, "update_tokens_per_s": tokens / update,
        "response_tokens_mean": tokens / samples,
        "share_generate": generate / seconds, "share_rollout": rollout / seconds, "share_update": update / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(), "policy": str(path),
    }


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sft", help="SFT run or model directory (default: an untrained demo-size model)")
    p.add_argument("--rm", help="reward model directory (default: the world's gold utility)")
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--steps", type=int, default=4, help="timed steps per algorithm")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=64, help="responses per step")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_rl"), help="scratch directory")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rl_speed.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine(), "algorithms": {}}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for algo in args.algos.split(","):
        cmd = [sys.executable, __file__, "--child", algo, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--work", args.work]
        cmd += ["--sft", args.sft] if args.sft else []
        cmd += ["--rm", args.rm] if args.rm else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return proc.returncode
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        results["algorithms"][algo] = row
        print(f"{algo:12s} {row['samples_per_s']:7.1f} samples/s {row['tokens_per_s']:8.0f} tok/s  "
              f"generation {100 * row['share_generate']:4.1f}%  rollout {100 * row['share_rollout']:4.1f}%  "
              f"update {100 * row['share_update']:4.1f}%  peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
