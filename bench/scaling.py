"""How step time and memory grow with model size and with response length, for rlhflab
and TRL side by side.

    .venv/bin/python bench/scaling.py [--repeats 1] [--threads 2] [--scale 1]

- model size: SFT (the settings of ``bench/run.py``) on three GPT-2 sizes over the world's
  tokenizer, both libraries starting from the same freshly initialised weights;
- response length: GRPO (the settings of ``bench/run.py``) from the SFT policy with
  ``max_new_tokens`` of 12, 24 and 48.

Writes ``bench/results/scaling.json`` (each run: seconds per optimizer step or per
rollout, samples/s, peak RSS).
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

SIZES = {"small": ["model.d_model=64", "model.n_layers=2", "model.n_heads=2"],
         "demo": [],
         "large": ["model.d_model=256", "model.n_layers=6", "model.n_heads=4"]}
LENGTHS = (12, 24, 48)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--config", default=str(run.ROOT / "configs" / "demo.yaml"))
    args = p.parse_args()
    args.stages, args.n_eval = "sft,grpo", 0
    log = print
    pythons = {"rlhflab": Path(sys.executable), "trl": run.ensure_env("trl", log)}
    paths = run.prepare(args, log)
    rows, loads = [], []

    def measure_pair(kind: str, value, spec0: dict) -> None:
        for r in range(args.repeats):
            for impl in (["rlhflab", "trl"] if r % 2 == 0 else ["trl", "rlhflab"]):
                spec = dict(spec0, impl=impl, out=str(run.WORK / "runs" / "scaling" / f"{kind}-{value}-{impl}"))
                res = run.measure(impl, pythons[impl], spec, args.threads, f"scaling-{kind}-{value}-{impl}-{r}")
                loads.extend([res["load_before"], res["load_after"]])
                updates = spec["steps"]
                row = {"kind": kind, "value": value, "impl": impl, "repeat": r,
                       "seconds_per_update": res["train_seconds"] / updates,
                       "samples_per_s": res["samples_per_s"], "peak_rss_mb": res["peak_rss_mb"],
                       "parameters": spec0.get("parameters")}
                rows.append(row)
                log(f"{kind}={value} {impl}: {row['seconds_per_update']:.3f} s/update, "
                    f"{row['peak_rss_mb']:.0f} MiB")

    for name, overrides in SIZES.items():
        init = run.WORK / f"init-{name}"
        if not (init / "config.json").is_file():
            out = run.run_checked([sys.executable, str(run.BENCH / "children" / "make_init.py"), args.config,
                                   str(init), *overrides], run.WORK / "logs" / f"init-{name}.log",
                                  run.child_env(args.threads))
            (init / "parameters.txt").write_text(out.split()[0])
        spec0 = dict(build_spec("sft", dict(paths, init=init), args),
                     parameters=int((init / "parameters.txt").read_text()))
        measure_pair("model_size", name, spec0)
    for length in LENGTHS:
        spec0 = dict(build_spec("grpo", paths, args), max_new_tokens=length)
        measure_pair("response_length", length, spec0)

    summary = {}
    for kind, value, impl in sorted({(r["kind"], str(r["value"]), r["impl"]) for r in rows}):
        sel = [r for r in rows if r["kind"] == kind and str(r["value"]) == value and r["impl"] == impl]
        summary.setdefault(kind, {}).setdefault(value, {})[impl] = {
            k: statistics.median(r[k] for r in sel) for k in ("seconds_per_update", "samples_per_s", "peak_rss_mb")}
        if sel[0]["parameters"]:
            summary[kind][value]["parameters"] = sel[0]["parameters"]
    out = {"command": shlex.join(["python", "bench/scaling.py", *sys.argv[1:]]),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads, "nproc": os.cpu_count(),
           "load": {"min": min(loads), "max": max(loads)}, "sizes": SIZES, "lengths": LENGTHS,
           "summary": summary, "runs": rows}
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    (run.RESULTS / "scaling.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
