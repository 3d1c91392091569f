"""Labelers at once against `rlhflab label serve` in a process of its own, killed with
SIGKILL in the middle and started again: every acknowledged vote stored exactly once, the
database consistent, the labeler's page where it was. (Votes per second and latency:
bench/label_load.py.)"""

from __future__ import annotations

import os
import re
import signal
import threading

import httpx
import pytest
from sqlalchemy import delete, text, update

from rlhflab.labeling.bots import running_server
from rlhflab.labeling.load import LoadResult, check_votes, run_load, server_process
from rlhflab.labeling.server import create_app
from rlhflab.labeling.store import Store, Vote

from .test_app import sign_in


def tasks(n: int, overlap: int, rankings: bool = True) -> list[dict]:
    """``n`` tasks, every fifth a ranking of four (with ``rankings``), the others pairs."""
    return [{"prompt": f"prompt {i}", "responses": [f"answer {j} of {i}" for j in range(
        4 if rankings and i % 5 == 0 else 2)], "overlap": overlap} for i in range(n)]


def kill(holder) -> None:
    proc = holder["proc"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def consistent(store: Store) -> None:
    """SQLite's own check of the file, and the rows' invariants on either database."""
    with store.session() as s:
        if store.engine.dialect.name == "sqlite":
            assert s.execute(text("PRAGMA integrity_check")).scalar() == "ok"
            assert s.execute(text("PRAGMA foreign_key_check")).all() == []
        rows = s.query(Vote).all()
    for v in rows:
        if v.status == "submitted":
            assert v.answer is not None and v.key and v.submitted_at is not None
        elif v.status == "served":
            assert v.answer is None and v.key is None


def test_a_kill_9_loses_no_acknowledged_vote_and_the_labelers_page_recovers(database_url):
    """4 labelers submit 60 votes; the server is killed with SIGKILL at the 25th
    acknowledgement and started again on the same port, and the labelers retry with the same
    keys: every acknowledged vote stored once, the database consistent. A fifth labeler had
    a page open all along: after the restart it shows the same task (the assignment is in
    the database), its form is accepted and the next task follows."""
    store = Store(database_url)
    store.add_tasks(tasks(30, overlap=3))  # room for more than 60 answers: a queue seen empty ends a labeler
    accounts = store.bot_accounts(4)
    token = store.create_user("lena", "labeler")
    kills = []
    with server_process(database_url) as (url, start, holder):
        page_client = httpx.Client(base_url=url, follow_redirects=False)
        csrf = sign_in(page_client, "lena", token)
        page = page_client.get("/label").text
        vote = re.search(r'name="vote" value="(\d+)"', page)[1]
        answer = {"answer": "B"} if 'value="B"' in page else {"answer": "rank", "ranking": "DCBA"}
        lock = threading.Lock()

        def on_ack(n: int) -> None:
            with lock:
                if n >= 25 and not kills:
                    kill(holder)
                    kills.append(n)
                    with pytest.raises(httpx.TransportError):
                        page_client.get("/label")
                    start()

        result = run_load(url, accounts, votes=60, on_ack=on_ack)
        again = page_client.get("/label")
        assert again.status_code == 200 and re.search(r'name="vote" value="(\d+)"', again.text)[1] == vote
        reply = page_client.post("/label", data={"vote": vote, "key": "after-restart-1", "csrf": csrf, **answer})
        assert reply.status_code == 303 and reply.headers["location"] == "/label"
        after = page_client.get("/label").text
        assert "answered 1 of" in after and re.search(r'name="vote" value="(\d+)"', after)[1] != vote
        page_client.close()
    assert len(kills) == 1 and result.retries > 0  # the kill cut requests off
    check = check_votes(store, result)
    assert check == {"acknowledged": 60, "stored": 61, "lost": 0, "stored_unacknowledged": 1, "keys_twice": 0,
                     "task_user_twice": 0, "orphans": 0, "wrong_answer": 0}  # the unacknowledged one is lena's
    with store.session() as s:
        v = s.get(Vote, int(vote))
        assert (v.status, v.key) == ("submitted", "after-restart-1")
        assert v.answer == ({"ranking": [v.shown[1], v.shown[0]]} if answer["answer"] == "B"
                            else {"ranking": [v.shown[3], v.shown[2], v.shown[1], v.shown[0]]})
    consistent(store)


def test_the_check_finds_a_lost_a_changed_and_an_unacknowledged_vote():
    store = Store("sqlite://")
    store.add_tasks(tasks(10, overlap=1))
    accounts = store.bot_accounts(2)
    with running_server(create_app(store)) as url:
        result = run_load(url, accounts, votes=6)
    assert check_votes(store, result)["lost"] == 0
    acked = sorted(result.acked)
    with store.session.begin() as s:
        s.execute(delete(Vote).where(Vote.id == acked[0]))
        s.execute(update(Vote).where(Vote.id == acked[1]).values(key="another-key"))
        s.execute(update(Vote).where(Vote.id == acked[2]).values(answer={"ranking": [9, 9]}))
    partial = LoadResult(acked={v: k for v, k in result.acked.items() if v != acked[3]},
                         answers={v: a for v, a in result.answers.items() if v != acked[3]})
    check = check_votes(store, partial)
    assert (check["lost"], check["stored_unacknowledged"], check["stored"]) == (2, 1, 5)
    assert check["wrong_answer"] == 1


def test_a_request_waiting_on_the_database_does_not_hold_up_the_others():
    """One labeler's page is held inside a database call; another's API request is answered
    meanwhile (with the calls on the event loop it waited for the first: served one at a
    time)."""
    store = Store("sqlite://")
    store.add_tasks(tasks(4, overlap=2))
    tokens = {n: store.create_user(n, "labeler") for n in ("slow", "fast")}
    held, release = threading.Event(), threading.Event()
    get_setting = store.get_setting

    def slow_get_setting(*args):  # the labeler's page reads the guidelines
        held.set()
        assert release.wait(30)
        return get_setting(*args)

    with running_server(create_app(store)) as url:
        clients = {n: httpx.Client(base_url=url, follow_redirects=False, timeout=30) for n in tokens}
        for n, c in clients.items():
            sign_in(c, n, tokens[n])
        store.get_setting = slow_get_setting
        replies = []
        page = threading.Thread(target=lambda: replies.append(clients["slow"].get("/label").status_code))
        page.start()
        assert held.wait(30)
        try:
            fast = clients["fast"].get("/api/next", timeout=10)
        finally:
            release.set()
            page.join()
        assert fast.status_code == 200 and fast.json()["vote"] and replies == [200]
        for c in clients.values():
            c.close()
