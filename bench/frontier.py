"""Gold utility against KL for both libraries: a beta sweep, so quality is compared along
the reward-KL frontier instead of at one beta whose KL differs between the libraries.

    .venv/bin/python bench/frontier.py [--stages dpo,grpo] [--betas 0.03,0.1,0.3] [--threads 2]

Each (stage, beta, library) is trained once with the settings of ``bench/run.py`` and
scored by ``bench/children/evaluate.py`` (gold utility, win-rate against SFT, sampled KL).
Writes ``bench/results/frontier.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from stages import STAGES, build_spec  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="dpo,grpo")
    p.add_argument("--betas", default="0.03,0.1,0.3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--config", default=str(run.ROOT / "configs" / "demo.yaml"))
    p.add_argument("--reevaluate", action="store_true",
                   help="score the models of the last sweep again (bench/results/frontier.json), no training")
    args = p.parse_args()
    if args.reevaluate:
        return reevaluate(args)
    stages = args.stages.split(",")
    betas = [float(b) for b in args.betas.split(",")]
    pythons = {"rlhflab": Path(sys.executable)}
    for s in stages:
        pythons.setdefault(STAGES[s]["trl_env"], run.ensure_env(STAGES[s]["trl_env"], print))
    paths = run.prepare(argparse.Namespace(**vars(args)), print)
    points, loads = [], []
    for stage in stages:
        for i, beta in enumerate(betas):
            for impl in (["rlhflab", "trl"] if i % 2 == 0 else ["trl", "rlhflab"]):
                tag = f"frontier-{stage}-{beta:g}-{impl}"
                spec = dict(build_spec(stage, paths, args), beta=beta, impl=impl,
                            out=str(run.WORK / "runs" / "frontier" / tag))
                py = pythons["rlhflab" if impl == "rlhflab" else STAGES[stage]["trl_env"]]
                try:
                    res = run.measure(impl, py, spec, args.threads, tag)
                    q = run.evaluate(Path(spec["out"]) / "model", paths, args, tag)
                except run.ChildFailed as err:
                    print(f"{tag}: FAILED ({err})", flush=True)
                    continue
                loads += [res["load_before"], res["load_after"]]
                points.append({"stage": stage, "beta": beta, "impl": impl, "samples_per_s": res["samples_per_s"],
                               "lr": spec["lr"], "updates": spec["steps"], **q})
                print(f"{stage} beta={beta:g} {impl}: gold {q['gold/mean']:.3f}, win-rate "
                      f"{q['gold/win_rate_vs_sft']:.3f}, KL {q['kl/sequence_mean']:.2f}", flush=True)
    command = shlex.join(["python", "bench/frontier.py", *sys.argv[1:]])
    for pt in points:
        pt["command"] = command
    path = run.RESULTS / "frontier.json"
    kept = []  # points of other stages from an earlier sweep stay
    if path.is_file():
        kept = [pt for pt in json.loads(path.read_text())["points"] if pt["stage"] not in stages]
    out = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads,
           "load": {"min": min(loads, default=0), "max": max(loads, default=0)}, "n_eval": args.n_eval,
           "points": kept + points}
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def reevaluate(args) -> int:
    """Score the saved models of the last sweep again with the current evaluation code."""
    path = run.RESULTS / "frontier.json"
    out = json.loads(path.read_text())
    paths = run.prepare(argparse.Namespace(**{**vars(args), "stages": ""}), print)
    for pt in out["points"]:
        tag = f"frontier-{pt['stage']}-{pt['beta']:g}-{pt['impl']}"
        q = run.evaluate(run.WORK / "runs" / "frontier" / tag / "model", paths, args, tag)
        pt.update(q)
        print(f"{tag}: gold {q['gold/mean']:.3f}, KL {q['kl/sequence_mean']:.2f}", flush=True)
    out["reevaluated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
