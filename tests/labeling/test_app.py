"""The labeling app: every endpoint as nobody, a labeler and an admin; CSRF, escaping, sizes;
one vote stored once under concurrent submits; the bots' agreement against the world's."""

from __future__ import annotations

import json
import re
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from rlhflab.labeling.bots import expected_agreement, run_bots, running_server
from rlhflab.labeling.io import export_rows, readings
from rlhflab.labeling.server import create_app
from rlhflab.labeling.store import Store, Vote, hash_token
from rlhflab.world.tasks import parse_prompt

XSS = ['<script>alert(1)</script> sure.', '<img src=x onerror="alert(2)"> ok', '[click](javascript:alert(3)) and '
       '<a href="javascript:alert(4)">here</a>']
WORLD_PAIRS = [("what is 6 plus 7 ?", "13 .", "it is 13 . let me know if you need more ."),
               ("what is 2 plus 2 ?", "it is 4 .", "it is 5 ."),
               ("say something about trees .", "trees make oxygen from sunlight .", "certainly ! trees ."),
               ("what is 3 times 3 ?", "9 .", "the answer is 9 .")]


def scratch_dir() -> str:
    """A directory on tmpfs where there is one (commits need no disk flush there)."""
    return tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)


def sign_in(client, name: str, token: str) -> str:
    """Log ``client`` in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
    reply = client.post("/login", data={"name": name, "token": token, "csrf": csrf})
    assert reply.status_code == 303, reply.text
    return client.get("/api/next").json()["csrf"]


@pytest.fixture(scope="module")
def site():
    store = Store(f"sqlite:///{scratch_dir()}/labels.db")
    tokens = {name: store.create_user(name, role) for name, role in
              (("ada", "admin"), ("alice", "labeler"), ("bob", "labeler"))}
    store.add_tasks([{"prompt": p, "responses": [a, b], "overlap": 3} for p, a, b in WORLD_PAIRS])
    app = create_app(store, max_body=4096)
    clients = {}
    for name, token in tokens.items():
        c = TestClient(app, follow_redirects=False)
        clients[name] = (c, sign_in(c, name, token))
    clients["nobody"] = (TestClient(app, follow_redirects=False), "")
    return store, app, tokens, clients


# (method, path, body kind) -> expected status as nobody, labeler, admin; every POST carries
# its session's CSRF token (nobody has none)
ENDPOINTS = {
    ("GET", "/", None): (303, 303, 303),
    ("GET", "/login", None): (200, 200, 200),
    ("GET", "/label", None): (303, 200, 200),
    ("POST", "/label", "form"): (401, 400, 400),  # signed in: an empty answer is a bad request
    ("GET", "/api/next", None): (401, 200, 200),
    ("POST", "/api/vote", "json"): (401, 400, 400),
    ("GET", "/admin", None): (303, 403, 200),
    ("GET", "/admin/metrics", None): (401, 403, 200),
    ("POST", "/admin/guidelines", "form"): (401, 403, 303),
    ("GET", "/static/app.js", None): (200, 200, 200),
    ("GET", "/static/app.css", None): (200, 200, 200),
}


def call(client, csrf, method, path, kind, **extra):
    if method == "GET":
        return client.get(path, **extra)
    if kind == "json":
        return client.post(path, json={}, headers={"X-CSRF-Token": csrf, **extra.pop("headers", {})}, **extra)
    return client.post(path, data={"csrf": csrf, "guidelines": "Be careful."}, **extra)


def test_every_endpoint_as_nobody_labeler_and_admin(site):
    _, app, _, clients = site
    got = {}
    for method, path, kind in ENDPOINTS:
        got[(method, path)] = tuple(call(*clients[who], method, path, kind).status_code
                                    for who in ("nobody", "alice", "ada"))
    assert got == {(m, p): v for (m, p, _), v in ENDPOINTS.items()}
    assert clients["nobody"][0].get("/admin").headers["location"] == "/login"
    # a labeler's page has no link to the admin's
    assert 'href="/admin"' not in clients["alice"][0].get("/label").text
    assert 'href="/admin"' in clients["ada"][0].get("/label").text


def test_every_route_is_in_the_table():
    """A new endpoint must join ENDPOINTS (and so the role checks) or the login/logout tests."""
    app = create_app(Store("sqlite://"))
    paths = {(m, r.path) for r in app.app.app.routes for m in r.methods if m != "HEAD"}
    covered = {(m, p) for m, p, _ in ENDPOINTS} | {("POST", "/login"), ("POST", "/logout")}
    assert {(m, p.replace("{name}", "app.js")) for m, p in paths} - covered == set()


def test_post_without_csrf_token_or_from_a_foreign_origin_is_refused(site):
    store, _, _, clients = site
    client, csrf = clients["ada"]
    before = store.get_setting("guidelines")
    assert client.post("/admin/guidelines", data={"guidelines": "x"}).status_code == 403
    assert client.post("/admin/guidelines", data={"guidelines": "x", "csrf": "forged"}).status_code == 403
    assert client.post("/admin/guidelines", data={"guidelines": "x", "csrf": csrf},
                       headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post("/admin/guidelines", data={"guidelines": "x", "csrf": csrf},
                       headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post("/api/vote", json={"vote": 1, "key": "k" * 16, "answer": {"tie": True}}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    assert store.get_setting("guidelines") == before
    # the login form: its double-submit cookie must match
    fresh = TestClient(client.app, follow_redirects=False)
    assert fresh.post("/login", data={"name": "ada", "token": "x", "csrf": "x"}).status_code == 403
    # same origin is accepted
    assert client.post("/admin/guidelines", data={"guidelines": "# Rules", "csrf": csrf},
                       headers={"Origin": "http://testserver"}).status_code == 303


def test_session_cookie_flags_and_hashed_tokens(site):
    store, app, tokens, _ = site
    c = TestClient(app, follow_redirects=False)
    page = c.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)[1]
    wrong = c.post("/login", data={"name": "bob", "token": "wrong", "csrf": csrf})
    assert wrong.headers["location"].startswith("/login?") and "rlhflab_session" not in wrong.headers.get(
        "set-cookie", "")
    reply = c.post("/login", data={"name": "bob", "token": tokens["bob"], "csrf": csrf})
    cookie = [h.lower() for h in reply.headers.get_list("set-cookie") if h.startswith("rlhflab_session=")][0]
    assert "httponly" in cookie and "samesite=strict" in cookie
    for u in store.users():
        assert tokens[u.name] not in (u.token_hash, u.salt) and u.token_hash == hash_token(tokens[u.name], u.salt)
    assert "default-src 'none'" in reply.headers["content-security-policy"]
    assert "Wrong name or token." in c.get(wrong.headers["location"]).text
    assert "evil" not in c.get("/login?m=<b>evil</b>").text  # nothing from the URL is echoed


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def assert_nothing_executable(text: str) -> None:
    parser = Tags()
    parser.feed(text)
    for tag, attrs in parser.tags:
        assert tag not in ("img", "iframe", "object", "embed"), (tag, attrs)
        assert tag != "script" or attrs == {"src": "/static/app.js"}, attrs
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        assert not any((v or "").strip().lower().startswith("javascript:") for v in attrs.values()), (tag, attrs)


def test_model_responses_and_guidelines_are_rendered_escaped():
    store = Store("sqlite://")
    token = store.create_user("eve", "admin")
    store.add_tasks([{"prompt": XSS[0], "responses": XSS[1:], "overlap": 1},
                     {"prompt": "rank these", "responses": XSS, "overlap": 1}])
    store.set_setting("guidelines", "\n\n".join(XSS))
    client = TestClient(create_app(store), follow_redirects=False)
    csrf = sign_in(client, "eve", token)
    seen = 0
    for _ in range(2):
        page = client.get("/label").text
        assert "onerror" not in page or "onerror=&quot;" in page  # present only as escaped text
        assert_nothing_executable(page)
        assert "&lt;script&gt;" in page
        vote = int(re.search(r'name="vote" value="(\d+)"', page)[1])
        answer = {"answer": "A"} if 'value="A"' in page else {"answer": "rank", "ranking": "CBA"}
        reply = client.post("/label", data={"vote": vote, "key": f"key-{vote:08d}", "csrf": csrf, **answer})
        assert reply.status_code == 303
        seen += 1
    assert seen == 2 and "Nothing left" in client.get("/label").text
    assert_nothing_executable(client.get("/admin").text)


def test_a_labeler_reaches_only_their_own_votes(site):
    store, _, _, clients = site
    alice, alice_csrf = clients["alice"]
    bob, bob_csrf = clients["bob"]
    mine = alice.get("/api/next").json()
    theirs = bob.get("/api/next").json()
    assert set(mine) == {"done", "vote", "prompt", "responses", "csrf", "progress"}  # nothing says gold
    assert mine["vote"] != theirs["vote"]
    steal = bob.post("/api/vote", json={"vote": mine["vote"], "key": "stolen-key-1", "answer": {"tie": True}},
                     headers={"X-CSRF-Token": bob_csrf})
    assert steal.status_code == 404
    with store.session() as s:
        assert s.get(Vote, mine["vote"]).status == "served"
    # the form path too
    assert bob.post("/label", data={"vote": mine["vote"], "key": "stolen-key-2", "csrf": bob_csrf,
                                    "answer": "A"}).status_code == 404
    # a vote given in the order shown is stored in the task's own indices
    reply = alice.post("/api/vote", json={"vote": mine["vote"], "key": "alice-key-1", "answer": {"ranking": [1, 0]}},
                       headers={"X-CSRF-Token": alice_csrf})
    assert reply.json() == {"status": "stored", "vote": mine["vote"]}
    with store.session() as s:
        v = s.get(Vote, mine["vote"])
        assert v.answer == {"ranking": [v.shown[1], v.shown[0]]} and v.seconds is not None


def test_request_sizes_are_bounded(site):
    _, _, _, clients = site
    client, csrf = clients["alice"]
    big = {"vote": 1, "key": "k" * 16, "answer": {"tie": True}, "reason": "x" * 5000}
    assert client.post("/api/vote", json=big, headers={"X-CSRF-Token": csrf}).status_code == 413

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    assert client.post("/api/vote", content=chunks(), headers={"X-CSRF-Token": csrf,
                                                              "Content-Type": "application/json"}).status_code == 413


def test_a_vote_submitted_concurrently_is_stored_once(database_url):
    store = Store(database_url)
    token = store.create_user("carol", "labeler")
    store.add_tasks([{"prompt": p, "responses": [a, b], "overlap": 1} for p, a, b in WORLD_PAIRS])
    with running_server(create_app(store)) as url:
        client = httpx.Client(base_url=url, follow_redirects=False)
        csrf = sign_in(client, "carol", token)
        task = client.get("/api/next").json()
        body = {"vote": task["vote"], "key": "same-key-0001", "answer": {"ranking": [0, 1]}}
        replies = []

        def submit():
            with httpx.Client(base_url=url, cookies=client.cookies) as c:
                replies.append(c.post("/api/vote", json=body, headers={"X-CSRF-Token": csrf}).json())

        threads = [threading.Thread(target=submit) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r["status"] for r in replies) == ["duplicate"] * 7 + ["stored"]
        other = client.post("/api/vote", json={**body, "key": "other-key-0001"}, headers={"X-CSRF-Token": csrf})
        assert other.status_code == 409
        client.close()
    with store.session() as s:
        submitted = s.query(Vote).filter(Vote.status == "submitted").all()
    assert [(v.id, v.key) for v in submitted] == [(task["vote"], "same-key-0001")]


def test_bots_agreement_is_the_worlds_rater_agreement():
    """Three bots answer 30 world pairs through the API; the pairwise agreement the app
    measures must hold the world's agreement on those pairs, mean of p^2 + (1 - p)^2,
    within the measured 95% interval."""
    from rlhflab.config import load_config
    from rlhflab.world import World

    cfg = load_config(None)
    rows = World(cfg.world).preference_pairs(30, "labeling-test")
    # Three bots and an overlap of three: every bot answers every task, in its own order, so
    # with the shown orders seeded the votes are the same on every run.
    store = Store(f"sqlite:///{scratch_dir()}/labels.db", seed=0)
    store.add_tasks([{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "overlap": 3} for r in rows])
    store.add_tasks([{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "overlap": 1,
                      "gold": {"ranking": [0, 1]}} for r in rows[:2]])
    rater = cfg.world.rater
    with running_server(create_app(store)) as url:
        counts = run_bots(url, store.bot_accounts(3), rater, seed=3)
    assert sorted(counts.values()) == [32] * 3
    r = readings(store)
    a = r["agreement"]
    truth = sum(expected_agreement(parse_prompt(x["prompt"]), x["chosen"], x["rejected"], rater) for x in rows) / 30
    print(json.dumps({"measured": a["pairwise"], "interval": a["pairwise_interval"], "world": truth}))
    assert 0.6 < truth < 0.9 and a["units"] == 30
    assert abs(a["pairwise"] - truth) < a["pairwise_interval"]
    assert all(x["gold_items"] == 2 for x in r["labelers_table"])
    export, counts = export_rows(store)
    assert counts["rows"] == 30 and all(len(x["votes"]) == 3 and 2 * sum(x["votes"]) > 3 for x in export)


def test_export_is_what_the_reward_model_reads(tmp_path):
    from rlhflab.algos.reward_model import rows_to_groups
    from rlhflab.data import load_rows, write_jsonl

    store = Store("sqlite://")
    tokens = [store.create_user(f"u{i}", "labeler") for i in range(3)]
    store.add_tasks([{"prompt": "what is 2 plus 2 ?", "responses": ["4 .", "5 .", "it is 4 ."], "overlap": 3},
                     {"prompt": "what is 1 plus 1 ?", "responses": ["2 .", "3 ."], "overlap": 3}])
    answers = [{3: {"ranking": [0, 2, 1]}, 2: {"tie": True}}, {3: {"ranking": [2, 0, 1]}, 2: {"ranking": [0, 1]}},
               {3: {"ranking": [0, 2, 1]}, 2: {"both_bad": True}}]
    for i, token in enumerate(tokens):
        user = store.authenticate(f"u{i}", token)
        for _ in range(2):
            vote, task = store.next_vote(user)
            assert store.submit(user, vote.id, answers[i][len(task.responses)], f"key-{i}-{task.id}") == "stored"
        assert store.next_vote(user) is None
    rows, counts = export_rows(store)
    by_pair = {(r["chosen"], r["rejected"]): r for r in rows}
    # the ranking task: 0 > 2 twice of three, 0 > 1 and 2 > 1 always; the pair: one vote, one tie, one both bad
    assert by_pair[("4 .", "it is 4 .")]["votes"] == [1, 1, 0]
    assert by_pair[("4 .", "5 .")]["votes"] == [1, 1, 1]
    assert by_pair[("it is 4 .", "5 .")]["votes"] == [1, 1, 1]
    pair = by_pair[("2 .", "3 .")]
    assert (pair["votes"], pair["ties"], pair["both_bad"]) == ([1], 1, 1)
    assert counts == {"pairs": 4, "rows": 4}
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    loaded = load_rows(tmp_path / "prefs.jsonl", "preference")
    groups, _ = rows_to_groups(loaded)
    assert sorted(len(g.responses) for g in groups) == [2, 3]


def test_the_form_stores_each_answer_in_the_tasks_own_indices():
    store = Store("sqlite://")
    token = store.create_user("dan", "labeler")
    store.add_tasks([{"prompt": f"what is {i} plus 1 ?", "responses": [f"{i + 1} .", f"{i + 2} ."], "overlap": 1}
                     for i in range(5)])
    client = TestClient(create_app(store), follow_redirects=False)
    csrf = sign_in(client, "dan", token)
    for choice in ("A", "B", "tie", "both_bad", "skip"):
        page = client.get("/label").text
        for key in ("1", "2", "3", "4", "s"):  # every choice has its key
            assert f'data-key="{key}"' in page
        vote = int(re.search(r'name="vote" value="(\d+)"', page)[1])
        reply = client.post("/label", data={"vote": vote, "key": f"form-{choice}-key", "csrf": csrf,
                                            "answer": choice, "confidence": "4", "reason": "because"})
        assert reply.status_code == 303, reply.text
        with store.session() as s:
            v = s.get(Vote, vote)
            want = {"A": {"ranking": [v.shown[0], v.shown[1]]}, "B": {"ranking": [v.shown[1], v.shown[0]]},
                    "tie": {"tie": True}, "both_bad": {"both_bad": True}, "skip": None}[choice]
            assert (v.answer, v.status, v.confidence, v.reason) == (
                want, "skipped" if choice == "skip" else "submitted", 4, "because")
    assert "answered 5 of 5" in client.get("/label").text
    bad = client.post("/label", data={"vote": 1, "key": "form-bad-key", "csrf": csrf, "answer": "A",
                                      "confidence": "9"})
    assert bad.status_code == 400


def test_logout_ends_the_session_and_metrics_are_json_without_nan():
    store = Store("sqlite://")
    token = store.create_user("NaNa", "admin")
    client = TestClient(create_app(store), follow_redirects=False)
    csrf = sign_in(client, "NaNa", token)
    metrics = client.get("/admin/metrics")
    assert metrics.status_code == 200 and "NaN" not in metrics.text
    assert metrics.json()["agreement"]["pairwise"] is None
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert client.get("/api/next").status_code == 401
    assert client.get("/admin/metrics").status_code == 401
