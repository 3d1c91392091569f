"""rlhflab on a busy machine: real commands, before and after the thread choice of
``rlhflab.threads``, with controlled busy loops.

    .venv/bin/python bench/contention.py                       # 3 repeats, every condition
    .venv/bin/python bench/contention.py --repeats 1 --conditions idle,busy1 --commands sft

Each measurement is a fresh process, timed from its start to its exit (imports included:
what a user waits for), under one *condition*:

- ``idle``: the machine as it is (other people's work included: the load average before
  every run is recorded);
- ``busy1``: one pure-Python spinning process pinned to the last usable CPU (each busy loop
  runs in a session of its own, as another user's job would);
- ``load3``: three spinning processes, unpinned (with the command, 4 runnable on 2 cores);
- ``late1`` (``sft`` only): one spinning loop pinned to the last CPU, started ``--late-s``
  seconds after the command, which chose its threads on the machine as it was.

and one *arm*: ``before`` (what torch picked before: ``OMP_NUM_THREADS`` = the usable CPUs,
libgomp's default wait policy, ``RLHFLAB_THREADS=off``) and ``after`` (the automatic choice:
none of ``OMP_NUM_THREADS``, ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``RLHFLAB_THREADS``
set). Arms alternate (before first in even repeats, after first in odd ones).

Commands: ``sft`` (``rlhflab sft`` on the tiny preset, epochs raised to take about 10-20 s),
``grpo`` (``rlhflab grpo``, 20 steps, from a tiny SFT policy made once), and ``trl-sft``:
the SFT training loop of TRL (``bench/children/trl_child.py`` in ``.venv-bench``, made by
``make bench``) against rlhflab's (``bench/children/rlhflab_child.py``), on the same tiny
initial model and data, TRL with torch's defaults (what a TRL user gets) and rlhflab with
``rlhflab.threads``' choice for the state at its start (arm ``after``) or the old defaults
(arm ``before``); there the figure is the training loop's seconds.

Writes ``bench/results/contention.json`` after every run (a cut-short run keeps what it
measured): the command line, the machine, every run (seconds, CPU seconds, load average
before, the thread line, the SFT weights' SHA-256), medians, spreads and the goals' ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rlhflab import threads  # noqa: E402

WORK = ROOT / "runs" / "contention"
OUT = ROOT / "bench" / "results" / "contention.json"
PY = str(ROOT / ".venv" / "bin" / "python")
TRL_PY = ROOT / ".venv-bench" / "bin" / "python"
TINY = str(ROOT / "configs" / "tiny.yaml")
OURS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "RLHFLAB_THREADS", "MKL_NUM_THREADS")
TIMEOUT_S = 900  # a run still going after this is stopped; its time is a lower bound
# a busy loop that ends when the benchmark does (its parent gone), however that ends
SPIN = ("import os, sys\nparent = os.getppid()\nif len(sys.argv) > 1: os.sched_setaffinity(0, {int(sys.argv[1])})\n"
        "i = 0\nwhile i != 10_000_000 or os.getppid() == parent:\n    i = 0 if i == 10_000_000 else i + 1")


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT / "src"))
    return env


def arm_env(arm: str, cpus: int) -> dict:
    env = base_env()
    if arm == "before":
        env.update(OMP_NUM_THREADS=str(cpus), RLHFLAB_THREADS="off")
    return env


def busy_now(seconds: float = 0.5) -> float | None:
    """Cores' worth of work on the usable CPUs right now (the busy loops included)."""
    return threads.Sample().busy(seconds)


class Spinners:
    """``n`` pure-Python busy loops, pinned to ``cpu`` (None: unpinned), for the ``with`` block
    (or started ``delay`` seconds into it)."""

    def __init__(self, n: int, cpu: int | None = None) -> None:
        self.n, self.cpu, self.procs = n, cpu, []

    def start(self) -> None:
        extra = [] if self.cpu is None else [str(self.cpu)]
        # each in a session of its own, as another user's job: with the kernel's autogroup
        # scheduling, CPU time is shared between sessions first, so a loop in the benchmark's
        # own session would take its share from the measured command alone
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN, *extra], start_new_session=True)
                      for _ in range(self.n)]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []

    def __enter__(self):
        self.start()
        time.sleep(1.0)  # running before the command starts and samples the machine
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_one(argv: list[str], env: dict, late: Spinners | None, late_s: float) -> dict:
    r0 = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if late is not None:
        time.sleep(late_s)
        late.start()
    timed_out = False
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:  # recorded as a lower bound
        proc.kill()
        out, err = proc.communicate()
        timed_out = True
    finally:
        if late is not None:
            late.stop()
        if proc.poll() is None:  # the benchmark itself stopped
            proc.kill()
    wall = time.perf_counter() - t0
    r1 = os.times()
    if proc.returncode != 0 and not timed_out:
        raise SystemExit(f"{shlex.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    line = next((x for x in err.splitlines() if x.startswith("rlhflab: ") and "thread" in x), None)
    rec = {"seconds": wall, "cpu_seconds": (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system),
           "thread_line": line, "rc": proc.returncode, "timed_out": timed_out}
    result = next((x for x in out.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if result and not timed_out:  # a bench child: its training loop's own clock
        res = json.loads(result[len("RESULT "):])
        rec.update(train_seconds=res["train_seconds"], train_cpu_seconds=res.get("cpu_seconds"),
                   child_threads=res.get("threads"))
    return rec


def prepare(log) -> dict:
    """The tiny world, the initial model both SFT loops start from, and the SFT policy GRPO
    starts from (each made once, reused while present)."""
    env = base_env() | {"OMP_NUM_THREADS": "1"}
    steps = [
        (WORK / "world" / "sft.jsonl", [PY, "-m", "rlhflab.cli", "world", "--config", TINY, "--out", str(WORK / "world"),
                                        "--overwrite"]),
        (WORK / "init" / "config.json", [PY, str(ROOT / "bench" / "children" / "make_init.py"), TINY, str(WORK / "init")]),
        (WORK / "base" / "model" / "config.json", [PY, "-m", "rlhflab.cli", "sft", "--config", TINY, "--out",
                                                   str(WORK / "base"), "--overwrite"]),
    ]
    for done, argv in steps:
        if not done.is_file():
            log(f"preparing: {shlex.join(argv)}")
            subprocess.run(argv, env=env, cwd=ROOT, check=True, capture_output=True)
    return {"world": WORK / "world", "init": WORK / "init", "base": WORK / "base"}


def commands(args, paths: dict) -> dict[str, dict]:
    """name -> how to run it: argv per library/arm."""
    sft = ["rlhflab", "sft", "--config", TINY, "--set", f"sft.epochs={args.sft_epochs}", "--out",
           str(WORK / "out" / "sft"), "--overwrite"]
    grpo = ["rlhflab", "grpo", "--config", TINY, "--sft", str(paths["base"]), "--reward-fn", "gold",
            "--set", f"rl.steps={args.grpo_steps}",
            "--out", str(WORK / "out" / "grpo"), "--overwrite"]
    out = {"sft": {"argv": sft}, "grpo": {"argv": grpo}}
    if TRL_PY.is_file():
        spec = {"stage": "sft", "seed": 0, "model": str(paths["init"]), "data": str(paths["world"] / "sft.jsonl"),
                "steps": args.trl_steps, "batch_size": 32, "max_length": 48, "lr": 3e-3, "warmup_ratio": 0.05,
                "schedule": "cosine", "max_grad_norm": 1.0}
        out["trl-sft"] = {"spec": spec}
    return out


def spec_argv(impl: str, spec: dict, n_threads: int, tag: str) -> list[str]:
    path = WORK / "specs" / f"{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec | {"threads": n_threads, "out": str(WORK / "out" / tag)}))
    py = str(TRL_PY) if impl == "trl" else PY
    child = "trl_child.py" if impl == "trl" else "rlhflab_child.py"
    return [py, str(ROOT / "bench" / "children" / child), str(path)]


def measure(name: str, how: dict, arm: str, cond: str, cpus: int, late: Spinners | None, args) -> list[dict]:
    """One run of rlhflab (and, for trl-sft, one of TRL) under the condition already set up."""
    recs = []
    if "argv" in how:
        argv = [str(ROOT / ".venv" / "bin" / how["argv"][0]), *how["argv"][1:]]
        env = arm_env(arm, cpus)
        rec = run_one(argv, env, late, args.late_s)
        if name == "sft":
            rec["weights_sha256"] = sha256(WORK / "out" / "sft" / "model" / "model.safetensors")
        recs.append(dict(rec, library="rlhflab"))
        return recs
    # the training loops: rlhflab's with the arm's threads, TRL's with torch's defaults
    env = arm_env(arm, cpus)
    if arm == "after":  # what the CLI would choose now (the busy loops already run)
        choice = threads.configure(env)
        n = choice.threads or cpus
        line = choice.line
    else:
        n, line = cpus, None
    rec = run_one(spec_argv("rlhflab", how["spec"], n, f"rlhflab-{arm}"), env, late, args.late_s)
    recs.append(dict(rec, library="rlhflab", thread_line=line))
    if arm == "after":  # TRL once per repeat and condition: torch's defaults, as its users get them
        trl_env = base_env()
        trl_env["PYTHONPATH"] = str(ROOT / "src")  # as bench/run.py: rlhflab's world for the reward functions
        rec = run_one(spec_argv("trl", how["spec"], cpus, "trl"), trl_env, late, args.late_s)
        recs.append(dict(rec, library="trl", arm="torch defaults"))
    return recs


def spread(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarise(runs: list[dict], cpus: int) -> dict:
    out: dict = {}
    for r in runs:
        key = "train_seconds" if "train_seconds" in r else "seconds"
        out.setdefault(r["command"], {}).setdefault(r["condition"], {}).setdefault(
            f"{r['library']}:{r['arm']}", []).append(r[key])
    summary = {c: {cond: {arm: spread(v) for arm, v in arms.items()} for cond, arms in conds.items()}
               for c, conds in out.items()}
    goals = {}
    for c, conds in summary.items():
        idle = conds.get("idle", {}).get("rlhflab:after", {}).get("median")
        idle_before = conds.get("idle", {}).get("rlhflab:before", {}).get("median")
        for cond, arms in conds.items():
            a, b = arms.get("rlhflab:after", {}).get("median"), arms.get("rlhflab:before", {}).get("median")
            t = arms.get("trl:torch defaults", {}).get("median")
            goals.setdefault(c, {})[cond] = {
                "after_vs_idle_after": a / idle if a and idle else None,
                "before_vs_idle_before": b / idle_before if b and idle_before else None,
                "before_over_after": b / a if a and b else None,
                "trl_over_rlhflab_after": t / a if a and t else None,
            }
    return {"summary": summary, "ratios": goals,
            "goals": {"busy1": "after_vs_idle_after <= 2.2 (the physical limit is 2)",
                      "load3": f"after_vs_idle_after <= about L/C = 4/{cpus} (3 loops + the command on {cpus} cores)",
                      "trl": "trl_over_rlhflab_after >= 1 under every condition"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conditions", default="idle,busy1,load3", help="comma-separated: idle, busy1, load3, late1")
    ap.add_argument("--commands", default="sft,grpo,trl-sft", help="comma-separated: sft, grpo, trl-sft")
    ap.add_argument("--sft-epochs", type=float, default=8.0, help="sft.epochs of the timed rlhflab sft")
    ap.add_argument("--grpo-steps", type=int, default=10)
    ap.add_argument("--trl-steps", type=int, default=50, help="updates of 32 rows in the SFT loops (trl-sft)")
    ap.add_argument("--late-s", type=float, default=3.0, help="late1: seconds before the busy loop starts")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # so that the busy loops stop too

    def log(msg: str) -> None:
        print(f"[contention {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    cpus, ids = threads.usable_cpus()
    paths = prepare(log)
    cmds = {k: v for k, v in commands(args, paths).items() if k in args.commands.split(",")}
    missing = [c for c in args.commands.split(",") if c not in cmds]
    result = {
        "command": shlex.join(["python", "bench/contention.py", *sys.argv[1:]]),
        "machine": {"cpus": cpus, "cpu_ids": ids, "processor": _cpu_model(), "platform": platform.platform()},
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None,
        "note": "a shared machine: other people's work runs beside the benchmark; the load average and the "
                "busy cores before every run are recorded, arms alternate, medians over repeats",
        "arms": {"before": {"OMP_NUM_THREADS": str(cpus), "RLHFLAB_THREADS": "off", "OMP_WAIT_POLICY": "(unset)"},
                 "after": "none of OMP_NUM_THREADS, OMP_WAIT_POLICY, GOMP_SPINCOUNT, RLHFLAB_THREADS set"},
        "autogroup": _autogroup(),
        "conditions": {"idle": "the machine as it is", "busy1": f"one spinning Python loop pinned to CPU {ids[-1]}",
                       "load3": "three spinning Python loops, unpinned",
                       "late1": f"one spinning loop pinned to CPU {ids[-1]}, started {args.late_s} s after the command"},
        "commands": {k: (shlex.join(v["argv"]) if "argv" in v else {"spec": v["spec"]}) for k, v in cmds.items()},
        "missing": {c: "no .venv-bench (make bench builds it)" for c in missing if c == "trl-sft"},
        "runs": [],
    }
    conditions = args.conditions.split(",")
    for rep in range(args.repeats):
        arms = ["before", "after"] if rep % 2 == 0 else ["after", "before"]
        for cond in conditions:
            for name, how in cmds.items():
                if cond == "late1" and name != "sft":
                    continue  # one command shows it (the bench children's threads are fixed at their start)
                for arm in arms:
                    load0, busy0 = os.getloadavg()[0], None
                    late = None
                    if cond == "busy1":
                        ctx = Spinners(1, ids[-1])
                    elif cond == "load3":
                        ctx = Spinners(3)
                    else:
                        ctx = None
                        late = Spinners(1, ids[-1]) if cond == "late1" else None
                    if ctx is not None:
                        ctx.__enter__()
                    try:
                        busy0 = busy_now()
                        recs = measure(name, how, arm, cond, cpus, late, args)
                    finally:
                        if ctx is not None:
                            ctx.__exit__()
                    for rec in recs:
                        rec = {"command": name, "condition": cond, "repeat": rep, "arm": rec.pop("arm", arm),
                               "load_before": load0, "busy_cores_before": busy0, "load_after": os.getloadavg()[0],
                               **rec}
                        result["runs"].append(rec)
                        log(f"{name} {cond} {rec['library']}:{rec['arm']} repeat {rep}: "
                            f"{rec.get('train_seconds', rec['seconds']):.1f} s (load {load0:.1f}, busy {busy0:.1f})")
                    result.update(summarise(result["runs"], cpus))
                    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"summary": result.get("summary"), "ratios": result.get("ratios")}, indent=1))
    return 0


def _autogroup() -> str | None:
    try:
        return open("/proc/sys/kernel/sched_autogroup_enabled").read().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        return next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _versions() -> dict:
    code = "import json, torch, transformers; print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__}))"
    out = {"rlhflab": json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True,
                                                env=base_env() | {"OMP_NUM_THREADS": "1"}).stdout)}
    if TRL_PY.is_file():
        code_trl = code.replace("'transformers': transformers.__version__", "'transformers': transformers.__version__, "
                                "'trl': __import__('trl').__version__")
        out["trl"] = json.loads(subprocess.run([str(TRL_PY), "-c", code_trl], capture_output=True, text=True,
                                               env=base_env() | {"OMP_NUM_THREADS": "1"}).stdout)
    return out


if __name__ == "__main__":
    sys.exit(main())
