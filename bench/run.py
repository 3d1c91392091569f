"""``make bench``: rlhflab against Hugging Face TRL on the same model, data and machine.

    .venv/bin/python bench/run.py [--stages sft,rm,dpo,...] [--repeats 3] [--threads 2]

1. Installs the peer into its own virtual environments (idempotent, a stamp file each):
   ``.venv-bench`` with TRL 1.16 (SFT, reward modeling, DPO, KTO, GRPO, RLOO) and
   ``.venv-bench/ppo`` with TRL 1.12, the last release with ``trl.experimental.ppo``.
2. Prepares shared inputs under ``runs/bench/``: the world exported as TRL-format JSONL
   with its tokenizer (``rlhflab world``), one freshly initialised GPT-2 of the demo size
   that both libraries start SFT from, and an SFT policy both start the later stages from.
3. For each stage, runs rlhflab and TRL alternately, each measurement in a fresh
   subprocess with the same thread count; several repeats; medians and ratios.
4. Measures the quality of the trained policies (gold utility, win-rate against the SFT
   policy, sampled KL) with the same evaluation code for both.
5. Writes ``bench/results/peers.json`` and the table between the README's markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
WORK = ROOT / "runs" / "bench"
RESULTS = BENCH / "results"
TORCH_SPEC = "torch==2.13.0"  # a local CPU wheel; any other spec pulls a multi-GB CUDA build
ENVS = {
    "trl": (ROOT / ".venv-bench", "trl==1.16.0"),
    "trl-ppo": (ROOT / ".venv-bench" / "ppo", "trl==1.12.0"),
}
PROFILERS = ("pyinstrument", "py-spy")
sys.path.insert(0, str(BENCH))

from stages import QUALITY_STAGES, STAGES, build_spec  # noqa: E402

# ------------------------------------------------------------------------ environments


def ensure_env(name: str, log) -> Path:
    """Create the peer's virtual environment once; a stamp records what is installed."""
    venv, trl_spec = ENVS[name]
    python = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    # the model code both libraries run must be the same: the transformers rlhflab runs on
    # (the lock's), not the newest that TRL's requirement would pull
    from importlib.metadata import version

    transformers_spec = f"transformers=={version('transformers')}"
    want = f"{TORCH_SPEC} {trl_spec} {transformers_spec} {' '.join(PROFILERS)}\n"
    if stamp.is_file() and stamp.read_text() == want and python.exists():
        return python
    log(f"installing {trl_spec} into {venv.relative_to(ROOT)} (once)")
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [TORCH_SPEC], check=True)  # first, so TRL's torch requirement is met
    subprocess.run(pip + [trl_spec, transformers_spec, *PROFILERS], check=True)
    stamp.write_text(want)
    return python


# ------------------------------------------------------------------------------ inputs


class ChildFailed(RuntimeError):
    pass


def run_checked(cmd: list[str], log_path: Path, env: dict | None = None) -> str:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env, cwd=ROOT)
        fh.write(proc.stdout)
    if proc.returncode:
        raise ChildFailed(f"exit {proc.returncode}; see {log_path.relative_to(ROOT)}")
    return proc.stdout


# The OpenMP wait policy of every child, the same for both libraries. "default" leaves
# OMP_WAIT_POLICY unset: libgomp's own policy (spin a while, then sleep), what a user gets,
# and right on an idle machine. On a shared machine spinning threads make a multi-threaded
# run 10-70x slower (measured: docs/benchmarks.md); BENCH_OMP_WAIT_POLICY=PASSIVE keeps the
# figures meaningful there, at a cost on an idle machine (every parallel region wakes
# sleeping threads).
OMP_WAIT_POLICY = os.environ.get("BENCH_OMP_WAIT_POLICY", "default")


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if OMP_WAIT_POLICY != "default":
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")
    return env


def prepare(args, log) -> dict:
    """World export, initial model, SFT policy (each made once, reused while present)."""
    py = sys.executable
    world = WORK / "world"
    if not (world / "preferences.jsonl").is_file():
        log("exporting the world (rlhflab world)")
        run_checked([py, "-m", "rlhflab.cli", "world", "--config", args.config, "--out", str(world),
                     "--overwrite"], WORK / "logs" / "world.log", child_env(args.threads))
    init = WORK / "init"
    if not (init / "config.json").is_file():
        log("creating the initial model")
        run_checked([py, str(BENCH / "children" / "make_init.py"), args.config, str(init)],
                    WORK / "logs" / "init.log", child_env(args.threads))
    sft = WORK / "sft"
    if not (sft / "model" / "config.json").is_file():
        log("training the SFT policy the later stages start from (rlhflab sft)")
        run_checked([py, "-m", "rlhflab.cli", "sft", "--config", args.config, "--out", str(sft), "--overwrite",
                     "--model", str(init)], WORK / "logs" / "sft_policy.log", child_env(args.threads))
    paths = {"world": world, "init": init, "sft": sft / "model"}
    if "ppo" in args.stages.split(","):  # PPO needs a reward model (the same for both)
        rm = WORK / "rm"
        if not (rm / "model" / "reward_model.json").is_file():
            log("training the reward model PPO uses (rlhflab rm --world-pairs)")
            run_checked([py, "-m", "rlhflab.cli", "rm", "--config", args.config, "--out", str(rm), "--overwrite",
                         "--sft", str(sft), "--world-pairs"], WORK / "logs" / "rm_policy.log",
                        child_env(args.threads))
        paths["rm"] = rm / "model"
    return paths


# ---------------------------------------------------------------------------- measuring


def measure(impl: str, python: Path, spec: dict, threads: int, tag: str, busy: int = 0) -> dict:
    """One run of one library in a fresh process; with ``busy`` > 0, that many pure-Python
    busy loops spin on the last CPUs while it runs (another user's job, as in
    ``bench/contention.py``)."""
    if busy:
        from contention import Spinners, busy_now

        cpus = sorted(os.sched_getaffinity(0))
        with Spinners(busy, cpus[-1] if busy == 1 else None):
            before = busy_now()
            result = measure(impl, python, spec, threads, tag)
        return dict(result, busy_cores_before=before)
    spec_path = WORK / "specs" / f"{tag}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1))
    child = BENCH / "children" / ("rlhflab_child.py" if impl == "rlhflab" else "trl_child.py")
    cmd = [str(python), str(child), str(spec_path)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = child_env(threads)
    if impl != "rlhflab":  # the TRL reward functions score with rlhflab.world.gold (pure Python)
        env["PYTHONPATH"] = str(ROOT / "src")
    out = run_checked(cmd, WORK / "logs" / f"{tag}.log", env)
    wall = time.perf_counter() - t0
    line = next(x for x in out.splitlines()[::-1] if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result.update(process_seconds=wall, load_before=load0, load_after=os.getloadavg()[0])
    return result


def evaluate(model_dir: Path, paths: dict, args, tag: str) -> dict:
    """Quality of a trained policy against the SFT policy (same code for both libraries)."""
    cmd = [sys.executable, str(BENCH / "children" / "evaluate.py"), str(model_dir), str(paths["sft"]),
           args.config, str(args.n_eval)]
    out = run_checked(cmd, WORK / "logs" / f"{tag}.eval.log", child_env(args.threads))
    line = next(x for x in out.splitlines()[::-1] if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


SUMMARY_KEYS = ("samples_per_s", "samples_per_cpu_s", "cpu_seconds", "tokens_per_s", "gen_tokens_per_s", "train_tokens_per_s", "train_seconds",
                "peak_rss_mb", "overhead_share", "process_seconds",
                # an rlhflab online loop cut into its parts (common.loop_parts; TRL has no such timers)
                "share/generate", "share/scoring", "share/update", "share/rest")
QUALITY_KEYS = ("gold/mean", "gold/win_rate_vs_sft", "kl/sequence_mean", "samples/length_mean")


def summarise(stage: str, runs: dict[str, list[dict]], quality: dict[str, list[dict]]) -> dict:
    out: dict = {"medians": {}, "ratio": {}}
    for impl, rs in runs.items():
        out["medians"][impl] = {k: median_of(rs, k) for k in SUMMARY_KEYS if median_of(rs, k) is not None}
        if quality.get(impl):
            out["medians"][impl].update({k: median_of(quality[impl], k) for k in QUALITY_KEYS
                                         if median_of(quality[impl], k) is not None})
    a, b = out["medians"].get("rlhflab", {}), out["medians"].get("trl", {})
    for k in ("samples_per_s", "samples_per_cpu_s", "tokens_per_s", "gen_tokens_per_s", "train_tokens_per_s",
              "peak_rss_mb"):
        if a.get(k) and b.get(k):
            out["ratio"][k] = a[k] / b[k]
    return out


# ----------------------------------------------------------------------------- reporting


def machine_info(pythons: dict[str, Path]) -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name, py in pythons.items():
        code = ("import json,torch,transformers;v={'torch':torch.__version__,'transformers':transformers.__version__}\n"
                "try:\n import trl;v['trl']=trl.__version__\nexcept ImportError: pass\nprint(json.dumps(v))")
        try:
            versions[name] = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                                                       check=True).stdout)
        except (subprocess.CalledProcessError, json.JSONDecodeError):
            versions[name] = {}
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def fmt(x, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: dict) -> str:
    m = results["machine"]
    load = results["load"]
    lines = [
        f"Measured by `{results['command']}` on {m['cpu_model'] or 'an unknown CPU'} ({m['nproc']} cores), "
        f"{results['threads']} thread{'s' if results['threads'] != 1 else ''} per run (OMP_WAIT_POLICY={results['omp_wait_policy']})"
        + (f", **{results['busy_loops']} busy loop{'s' if results['busy_loops'] > 1 else ''} spinning beside every "
           "run** (another user's job on the machine)" if results.get("busy_loops") else "")
        + ", medians of "
        f"{results['repeats']} alternating runs, each in a fresh process. Load average {load['min']:.1f}-"
        f"{load['max']:.1f} during the runs"
        + (" (**a shared, loaded machine: absolute figures are low and noisy; the ratios are the message**)"
           if load["max"] > 1.5 + results.get("busy_loops", 0) else "")
        + f". TRL {m['versions'].get('trl', {}).get('trl', '?')} (PPO: "
        f"{m['versions'].get('trl-ppo', {}).get('trl', '?')}), torch {m['versions'].get('rlhflab', {}).get('torch', '?')}"
        f", transformers {m['versions'].get('rlhflab', {}).get('transformers', '?')}. Method and analysis: "
        f"`docs/benchmarks.md`; raw numbers: `{results.get('file', 'bench/results/peers.json')}`.",
        "",
        "| stage | rlhflab samples/s | TRL samples/s | rlhflab / TRL | rlhflab / TRL in CPU time "
        "| rlhflab tokens/s | TRL tokens/s | rlhflab peak RSS MiB | TRL peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    online = []
    for stage, s in results["stages"].items():
        if "skipped" in s:
            lines.append(f"| {stage} | {s['skipped']} | | | | | | | |")
            continue
        a, b = s["summary"]["medians"].get("rlhflab", {}), s["summary"]["medians"].get("trl", {})
        ratio = s["summary"]["ratio"].get("samples_per_s")
        lines.append(
            f"| {stage} | {fmt(a.get('samples_per_s'), '.1f')} | {fmt(b.get('samples_per_s'), '.1f')} "
            f"| **{fmt(ratio, '.2f')}x** | {fmt(s['summary']['ratio'].get('samples_per_cpu_s'), '.2f')}x "
            f"| {fmt(a.get('tokens_per_s'))} | {fmt(b.get('tokens_per_s'))} "
            f"| {fmt(a.get('peak_rss_mb'))} | {fmt(b.get('peak_rss_mb'))} |")
        if "gold/mean" in a or "gold/mean" in b or "overhead_share" in a:
            online.append((stage, a, b))
    if online:
        lines += [
            "",
            "| stage | generated tokens/s in generate (rlhflab / TRL) | non-generation tokens/s | "
            "overhead share | gold utility | gold win-rate vs SFT | sampled KL vs SFT, nats |",
            "|---|---|---|---|---|---|---|",
        ]
        for stage, a, b in online:
            def pair(key, spec=".2f", a=a, b=b):
                if a.get(key) is None and b.get(key) is None:
                    return ""
                return f"{fmt(a.get(key), spec)} / {fmt(b.get(key), spec)}"
            lines.append(f"| {stage} | {pair('gen_tokens_per_s', '.0f')} | {pair('train_tokens_per_s', '.0f')} "
                         f"| {pair('overhead_share', '.0%')} | {pair('gold/mean')} | {pair('gold/win_rate_vs_sft')} "
                         f"| {pair('kl/sequence_mean')} |")
    par = results.get("parity")
    if par:
        lines += ["", f"Parity on one batch of {par['n_pairs']} pairs, same weights: DPO loss {par['dpo']['loss_rlhflab']:.6f}"
                  f" (rlhflab) vs {par['dpo']['loss_trl']:.6f} (TRL), gradients differ by "
                  f"{par['dpo']['grad_rel_diff']:.1e} (relative L2); reward-model loss {par['rm']['loss_rlhflab']:.6f} vs "
                  f"{par['rm']['loss_trl']:.6f}, gradients {par['rm']['grad_rel_diff']:.1e}."]
    return "\n".join(lines)


def write_readme_table(table: str, marker: str = "bench") -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n## Benchmarks against TRL\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}", encoding="utf-8")


# ---------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="runs per library and stage (alternating)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every child (OMP_NUM_THREADS)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="preset the settings come from")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of updates (quick runs: 0.2)")
    p.add_argument("--n-eval", type=int, default=200, help="held-out prompts in the quality evaluation")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="N busy loops beside every measured run (1: pinned to the last CPU); the results go to "
                        "peers_busy.json and the README's busy table")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/peers.json, "
                                                  "peers_busy.json with --busy)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    p.add_argument("--no-parity", action="store_true", help="skip the numerical parity check")
    args = p.parse_args(argv)
    args.out = args.out or str(RESULTS / ("peers_busy.json" if args.busy else "peers.json"))
    if not 0 <= args.busy < len(os.sched_getaffinity(0)):
        p.error(f"--busy must leave a CPU for the measured run: 0 to {len(os.sched_getaffinity(0)) - 1}, "
                f"got {args.busy}")
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

    pythons = {"rlhflab": Path(sys.executable)}
    for s in stages:
        env_name = STAGES[s]["trl_env"]
        if env_name and env_name not in pythons:
            pythons[env_name] = ensure_env(env_name, log)
    paths = prepare(args, log)
    results: dict = {
        "command": shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads, "repeats": args.repeats,
        "omp_wait_policy": OMP_WAIT_POLICY, "busy_loops": args.busy,
        "config": os.path.relpath(args.config, ROOT), "machine": machine_info(pythons), "stages": {},
    }
    loads: list[float] = []
    for stage in stages:
        info = STAGES[stage]
        missing = info["available"]()
        if missing:
            log(f"{stage}: skipped ({missing})")
            results["stages"][stage] = {"skipped": missing}
            continue
        runs: dict[str, list[dict]] = {"rlhflab": [], "trl": []}
        quality: dict[str, list[dict]] = {"rlhflab": [], "trl": []}
        spec0 = build_spec(stage, paths, args)
        for r in range(args.repeats):
            order = ["rlhflab", "trl"] if r % 2 == 0 else ["trl", "rlhflab"]
            for impl in order:
                if impl == "trl" and not info["trl_env"]:
                    continue
                spec = dict(spec0, impl=impl, out=str(WORK / "runs" / stage / f"{impl}-{r}"))
                try:
                    res = measure(impl, pythons["rlhflab" if impl == "rlhflab" else info["trl_env"]], spec,
                                  args.threads, f"{stage}-{impl}-{r}{'-busy' if args.busy else ''}", args.busy)
                except ChildFailed as err:
                    log(f"{stage} {impl} #{r}: FAILED ({err})")
                    runs[impl].append({"error": str(err)})
                    continue
                loads += [res["load_before"], res["load_after"]]
                log(f"{stage} {impl} #{r}: {res['samples_per_s']:.1f} samples/s, "
                    f"peak RSS {res['peak_rss_mb']:.0f} MiB")
                if stage in QUALITY_STAGES:
                    try:
                        q = evaluate(Path(spec["out"]) / "model", paths, args, f"{stage}-{impl}-{r}")
                    except ChildFailed as err:
                        log(f"{stage} {impl} #{r}: quality evaluation FAILED ({err})")
                        runs[impl].append(res)
                        continue
                    res["quality"] = q
                    quality[impl].append(q)
                    log(f"{stage} {impl} #{r}: gold {q['gold/mean']:.3f}, win-rate vs SFT "
                        f"{q['gold/win_rate_vs_sft']:.3f}, KL {q['kl/sequence_mean']:.2f}")
                runs[impl].append(res)
        results["stages"][stage] = {"settings": spec0, "runs": runs, "summary": summarise(stage, runs, quality)}
    if not args.no_parity and "trl" in pythons:
        from parity import run_parity

        log("parity check: DPO and reward-model loss and gradients on one batch")
        cfg = __import__("rlhflab.config", fromlist=["load_config"]).load_config(args.config)
        results["parity"] = run_parity(WORK / "parity", pythons["trl"], paths["sft"],
                                       paths["world"] / "preferences.jsonl", n=16, beta=cfg.dpo.beta,
                                       max_length=cfg.dpo.max_length, threads=args.threads,
                                       env=child_env(args.threads))
        for k in ("dpo", "rm"):
            p = results["parity"][k]
            log(f"parity {k}: loss {p['loss_rlhflab']:.6f} vs {p['loss_trl']:.6f}, "
                f"gradient relative difference {p['grad_rel_diff']:.1e}")
    results["load"] = {"min": min(loads, default=0.0), "max": max(loads, default=0.0),
                       "median": statistics.median(loads) if loads else 0.0}
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(args.out).resolve()
    results["file"] = str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    print(table)
    if not args.no_readme:
        write_readme_table(table, "bench-busy" if args.busy else "bench")
    log(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
