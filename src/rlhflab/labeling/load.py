"""Load on the labeling server, and the check that every acknowledged vote is stored exactly once.

``run_load`` signs in many labelers at once and has each answer its queue through the JSON
API (``GET /api/next``, ``POST /api/vote``) until ``votes`` answers are acknowledged among
them. Every submission carries an idempotency key of its own; a request that fails (the
connection refused or cut, a timeout, a 5xx) is sent again with the same key until the
server answers, so a vote whose reply was lost is stored once and acknowledged as a
``duplicate``. A server killed and restarted during the load is waited for.

``check_votes`` compares the acknowledged votes with the database: each acknowledged
(vote, key) stored once with its answer (none lost), no vote or key stored twice, no
submitted vote without an acknowledgement (none stored behind the labeler's back), every
vote's task and user present.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from rlhflab.errors import RunError

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
RETRY_FOR = 120.0  # seconds a labeler keeps retrying one request (a restart takes a few)


@dataclass
class LoadResult:
    acked: dict[int, str] = field(default_factory=dict)  # vote id -> the key acknowledged
    answers: dict[int, dict] = field(default_factory=dict)  # vote id -> the answer sent (order shown)
    vote_latency: list[float] = field(default_factory=list)  # seconds, first send to acknowledgement
    next_latency: list[float] = field(default_factory=list)  # seconds, GET /api/next
    retries: int = 0
    duplicates: int = 0  # acknowledged as this key's earlier submission
    seconds: float = 0.0


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Until ``url``'s login page answers (``proc``, if given, must stay alive)."""
    import socket
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RunError(f"the labeling server exited with {proc.returncode} before it listened on {url}")
        try:  # a bare connection first: cheap to repeat while the server starts
            socket.create_connection((parts.hostname, parts.port), timeout=2).close()
            with httpx.Client(timeout=10) as client:
                if client.get(f"{url}/login").status_code == 200:
                    return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.05)
    raise RunError(f"the labeling server did not answer on {url} within {timeout:.0f} s")


@contextmanager
def server_process(db: str, port: int | None = None, extra: list[str] | None = None):
    """``rlhflab label serve --db db`` in a process of its own on ``port`` (a free one by
    default); yields (url, a function that starts it again after ``kill``, the process
    holder). The last process is killed on exit."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "rlhflab.cli", "label", "serve", "--db", db, "--port", str(port), *(extra or [])]
    holder = {"proc": None}
    log = tempfile.TemporaryFile()  # the server's stderr (a pipe nobody reads could fill and block it)

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        holder["proc"] = proc
        wait_listening(url, proc)
        return proc

    start()
    try:
        yield url, start, holder
    finally:
        proc = holder["proc"]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


class Labeler:
    """One labeler signed in through the login form, answering at random."""

    def __init__(self, url: str, name: str, token: str, seed: int) -> None:
        import httpx

        self.name, self.rng = name, random.Random(seed)
        self.client = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
        page = self.request("GET", "/login")
        csrf = _CSRF.search(page.text)
        reply = self.request("POST", "/login", data={"name": name, "token": token, "csrf": csrf[1] if csrf else ""})
        if reply.status_code != 303 or "/login" in reply.headers.get("location", "/login"):
            raise RunError(f"{name} could not sign in to {url}: HTTP {reply.status_code}")
        self.csrf = ""

    def request(self, method: str, path: str, result: LoadResult | None = None, **kwargs):
        """The reply to the request, sent again (as it was) after a transport error or a 5xx."""
        import httpx

        end = time.monotonic() + RETRY_FOR
        delay = 0.05
        while True:
            try:
                reply = self.client.request(method, path, **kwargs)
                if reply.status_code < 500:
                    return reply
                failure = f"HTTP {reply.status_code}"
            except httpx.TransportError as err:
                failure = f"{type(err).__name__}: {err}"
            if time.monotonic() > end:
                raise RunError(f"{self.name}: {method} {path} failed for {RETRY_FOR:.0f} s: {failure}")
            if result is not None:
                result.retries += 1
            time.sleep(delay)
            delay = min(1.0, delay * 2)

    def step(self, result: LoadResult, lock: threading.Lock) -> bool:
        """Answer the next task; False when the queue is empty."""
        t0 = time.perf_counter()
        task = self.request("GET", "/api/next", result)
        t1 = time.perf_counter()
        if task.status_code != 200:
            raise RunError(f"{self.name}: GET /api/next: HTTP {task.status_code} {task.text[:200]}")
        body = task.json()
        if body["done"]:
            return False
        n = len(body["responses"])
        if n == 2 and self.rng.random() < 0.1:
            answer = {self.rng.choice(("tie", "both_bad")): True}
        else:
            answer = {"ranking": self.rng.sample(range(n), n)}
        vote = {"vote": body["vote"], "key": uuid.uuid4().hex, "answer": answer}
        reply = self.request("POST", "/api/vote", result, json=vote, headers={"X-CSRF-Token": body["csrf"]})
        t2 = time.perf_counter()
        status = reply.json().get("status") if reply.headers.get("content-type", "").startswith(
            "application/json") else None
        if reply.status_code != 200 or status not in ("stored", "duplicate"):
            raise RunError(f"{self.name}: POST /api/vote: HTTP {reply.status_code} {reply.text[:200]}")
        with lock:
            result.acked[vote["vote"]] = vote["key"]
            result.answers[vote["vote"]] = answer
            result.next_latency.append(t1 - t0)
            result.vote_latency.append(t2 - t1)
            result.duplicates += status == "duplicate"
        return True

    def close(self) -> None:
        self.client.close()


def run_load(url: str, accounts: list[tuple[str, str]], votes: int, seed: int = 0,
             on_ack=None) -> LoadResult:
    """The labelers (name, token) answer, one thread each, until ``votes`` answers are
    acknowledged among them or every queue is empty. ``on_ack(n)`` is called (from a
    labeler's thread) after each acknowledgement with the count so far."""
    result, lock = LoadResult(), threading.Lock()
    claimed = [0]
    errors: list[BaseException] = []

    def work(i: int, name: str, token: str) -> None:
        try:
            labeler = Labeler(url, name, token, seed * 1000 + i)
            try:
                while True:
                    with lock:
                        if claimed[0] >= votes:
                            return
                        claimed[0] += 1
                    if not labeler.step(result, lock):
                        with lock:
                            claimed[0] -= 1
                        return
                    if on_ack is not None:
                        on_ack(len(result.acked))
            finally:
                labeler.close()
        except BaseException as err:  # reported after every thread ends
            errors.append(err)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i, n, t), daemon=True) for i, (n, t) in enumerate(accounts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return result


def check_votes(store, result: LoadResult) -> dict:
    """What the database holds against what was acknowledged: counts of each kind of
    discrepancy (all zero when every acknowledged vote is stored exactly once)."""
    from sqlalchemy import func, select

    from rlhflab.labeling.store import Task, User, Vote

    with store.session() as s:
        stored = list(s.execute(select(Vote.id, Vote.key, Vote.answer, Vote.shown, Vote.status)
                                .where(Vote.status != "served")))
        per_pair = s.execute(select(func.count()).select_from(
            select(Vote.task_id, Vote.user_id).group_by(Vote.task_id, Vote.user_id)
            .having(func.count() > 1).subquery())).scalar()
        orphans = s.scalar(select(func.count(Vote.id)).where(
            ~Vote.task_id.in_(select(Task.id)) | ~Vote.user_id.in_(select(User.id))))
    by_id = {row.id: row for row in stored}
    keys = [row.key for row in stored]
    lost = [v for v, key in result.acked.items() if v not in by_id or by_id[v].key != key]
    wrong = 0
    for v, answer in result.answers.items():
        row = by_id.get(v)
        if row is None:
            continue
        want = {"ranking": [row.shown[p] for p in answer["ranking"]]} if "ranking" in answer else answer
        wrong += row.answer != want
    return {"acknowledged": len(result.acked), "stored": len(stored), "lost": len(lost),
            "stored_unacknowledged": len(set(by_id) - set(result.acked)),
            "keys_twice": len(keys) - len(set(keys)), "task_user_twice": per_pair, "orphans": orphans,
            "wrong_answer": wrong}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
