"""Load on the labeling app: many labelers submit votes at once through the real HTTP
server (``rlhflab label serve`` in a process of its own), on SQLite and on PostgreSQL.

Each labeler signs in through the login form and answers its queue through the JSON API
(``rlhflab.labeling.load``): every submission carries an idempotency key and is sent again
with the same key after a transport error or a 5xx. At the end the database is compared
with what was acknowledged: every acknowledged vote stored exactly once, none lost, none
twice, none stored unacknowledged; the run fails otherwise.

    .venv/bin/python bench/label_load.py --votes 10000 --labelers 50 --tag after
    .venv/bin/python bench/label_load.py --votes 2000 --labelers 50 --kill 0.5 --tag kill9

``--kill F`` kills the server with SIGKILL once a fraction F of the votes is acknowledged and
starts it again on the same port and database; the labelers wait and carry on.

Written to bench/results/label_load.json (runs are kept by tag, database, votes and kill):
votes/s, p50/p99 latency of ``POST /api/vote`` (first send to acknowledgement, retries
included) and of ``GET /api/next``, the server's and the load's CPU seconds, the machine's
load average before and after (the machine is shared: the wall-time figures are this
machine's at that load), and the check's counts. SQLite lives in a file on disk
(``synchronous=FULL``: every commit flushed); PostgreSQL is a throwaway cluster of Debian's
postgresql on loopback with its default durability (fsync on, synchronous_commit on).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from rlhflab.labeling.load import check_votes, percentile, run_load, server_process
from rlhflab.labeling.store import Store

RESULTS = Path(__file__).resolve().parent / "results" / "label_load.json"
OVERLAP = 5


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


@contextmanager
def postgres_cluster():
    """A throwaway cluster of Debian's postgresql on a free loopback port; yields its URL."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    bin_dir = Path(found[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="rlhflab-bench-pg-"))
    root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if root else []
    if root:
        shutil.chown(data, "postgres")
    from rlhflab.labeling.load import free_port

    port = free_port()
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "-A", "trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o",
                    f"-h 127.0.0.1 -p {port} -k {data} -c max_connections=200", "-l", str(data / "log"), "-w",
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", bin_dir, data
    finally:
        subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def postgres_cpu(data: Path) -> float:
    """CPU seconds of every process of the cluster (the postmaster and its backends)."""
    pid_file = data / "db" / "postmaster.pid"
    if not pid_file.exists():
        return float("nan")
    master = int(pid_file.read_text().split()[0])
    total = 0.0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.split("/")[2])
        if pid == master or int(fields[1]) == master:
            total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / os.sysconf(
                "SC_CLK_TCK")
    return total


def make_tasks(votes: int) -> list[dict]:
    """Enough tasks for ``votes`` answers at overlap 5 (and a tenth to spare): three pairs
    for every ranking of four."""
    n = int(votes / OVERLAP * 1.1) + 1
    return [{"prompt": f"prompt {i}: which answer is better?",
             "responses": [f"answer {j} to prompt {i}" for j in range(4 if i % 4 == 0 else 2)],
             "overlap": OVERLAP} for i in range(n)]


def one_run(db: str, url: str, args, pg_data: Path | None) -> dict:
    store = Store(url)
    tasks = make_tasks(args.votes)
    store.add_tasks(tasks)
    accounts = store.bot_accounts(args.labelers)
    load = {"before": os.getloadavg()}
    kills: list[dict] = []
    with server_process(url) as (served, start, holder):
        server_cpu = [0.0]  # CPU of the processes killed so far
        lock = threading.Lock()

        def on_ack(n: int) -> None:
            if args.kill is None or kills or n < args.kill * args.votes:
                return
            with lock:
                if kills:
                    return
                proc = holder["proc"]
                server_cpu[0] += cpu_of(proc.pid)
                t0 = time.perf_counter()
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills.append({"at_acknowledged": n})
                start()
                kills[-1]["restart_seconds"] = time.perf_counter() - t0

        pg0 = postgres_cpu(pg_data) if pg_data else None
        c0 = self_cpu()
        result = run_load(served, accounts, args.votes, seed=args.seed, on_ack=on_ack)
        client_cpu = self_cpu() - c0
        server_cpu[0] += cpu_of(holder["proc"].pid)
        pg = postgres_cpu(pg_data) - pg0 if pg_data else None
    load["after"] = os.getloadavg()
    check = check_votes(store, result)
    n = len(result.acked)
    return {
        "database": db, "votes": args.votes, "labelers": args.labelers, "tasks": len(tasks), "overlap": OVERLAP,
        "kill": args.kill, "kills": kills, "acknowledged": n, "seconds": round(result.seconds, 2),
        "votes_per_s": round(n / result.seconds, 2),
        "vote_latency_ms": {"p50": round(1000 * percentile(result.vote_latency, 0.5), 1),
                            "p99": round(1000 * percentile(result.vote_latency, 0.99), 1),
                            "max": round(1000 * max(result.vote_latency), 1)},
        "next_latency_ms": {"p50": round(1000 * percentile(result.next_latency, 0.5), 1),
                            "p99": round(1000 * percentile(result.next_latency, 0.99), 1)},
        "retries": result.retries, "acknowledged_as_duplicate": result.duplicates,
        "cpu_seconds": {"server": round(server_cpu[0], 1), "load_generator": round(client_cpu, 1),
                        "postgresql": None if pg is None else round(pg, 1)},
        "server_cpu_ms_per_vote": round(1000 * server_cpu[0] / n, 2),
        "loadavg": load, "check": check,
        "exactly_once": all(v == 0 for k, v in check.items() if k not in ("acknowledged", "stored"))
        and check["stored"] == check["acknowledged"] == n,
    }


def labeling_code() -> str | None:
    """The last commit of src/rlhflab/labeling (others commit elsewhere meanwhile), with
    '+uncommitted' when the working tree's labeling code differs from it."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", "log", "-1", "--format=%h", "--", "src/rlhflab/labeling"], capture_output=True,
                          text=True, cwd=root)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/rlhflab/labeling"], capture_output=True,
                           text=True, cwd=root).stdout.strip()
    return (done.stdout.strip() or None) and done.stdout.strip() + ("+uncommitted" if dirty else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--votes", type=int, default=10_000)
    p.add_argument("--labelers", type=int, default=50)
    p.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    p.add_argument("--kill", type=float, help="kill -9 the server once this fraction of the votes is acknowledged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="current", help="the name the runs are kept under (e.g. before, after)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    out = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    out["what"] = ("labelers answering through the HTTP API at once, every vote with an idempotency key and "
                   "retried with it; the check compares the database with the acknowledged votes")
    out["machine"] = {"cpus": os.cpu_count(), "note": "shared with other jobs: see each run's loadavg"}
    ok = True
    for db in args.db.split(","):
        if db == "sqlite":
            where = Path(tempfile.mkdtemp(prefix="rlhflab-bench-", dir="/var/tmp"))
            try:
                run = one_run(db, f"sqlite:///{where}/labels.db", args, None)
            finally:
                shutil.rmtree(where, ignore_errors=True)
            run["where"] = "a file on disk (/var/tmp), WAL, synchronous=FULL"
        elif db == "postgresql":
            with postgres_cluster() as (url, bin_dir, data):
                run = one_run(db, url, args, data)
            run["where"] = f"Debian's PostgreSQL ({bin_dir.parent.name}), throwaway cluster on loopback, defaults"
        else:
            raise SystemExit(f"--db: expected sqlite or postgresql, got {db!r}")
        run.update(tag=args.tag, labeling_code=labeling_code(), command="python bench/label_load.py " + " ".join(sys.argv[1:]),
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        print(json.dumps(run), flush=True)
        ok &= run["exactly_once"]
        out["runs"] = [r for r in out["runs"] if (r["tag"], r["database"], r["votes"], r.get("kill")) !=
                       (args.tag, db, args.votes, args.kill)] + [run]
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
