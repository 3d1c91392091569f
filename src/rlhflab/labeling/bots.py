"""The world's raters as labelers: each bot signs in and votes through the HTTP API, as a
person's browser would (login form with its CSRF cookie, the session cookie, the CSRF
header, an idempotency key per submission).

A bot is one rater of ``rlhflab.world.labeler`` with one vote per comparison: on a pair it
prefers a with probability sigmoid((u_a - u_b) / noise), on K responses it ranks by
Plackett-Luce, independently of the other bots given the responses. So two bots agree on a
pair with probability p^2 + (1 - p)^2 (``expected_agreement``), and the agreement the app
measures on their votes estimates the world's rater agreement. Prompts that are not the
world's are skipped.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace

from rlhflab.errors import RunError
from rlhflab.world.labeler import RaterConfig, RaterPanel, preference_probability
from rlhflab.world.tasks import parse_prompt

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@contextmanager
def running_server(app, host: str = "127.0.0.1"):
    """Serve ``app`` with uvicorn on a free port of ``host`` in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.01)
    if not server.started:
        raise RunError(f"the labeling server did not start on {host}:{port}")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class Bot:
    """One rater signed in to the server at ``url``."""

    def __init__(self, url: str, name: str, token: str, rater: RaterConfig, seed: int) -> None:
        import httpx

        self.name = name
        self.client = httpx.Client(base_url=url, timeout=60, follow_redirects=False)
        self.panel = RaterPanel(replace(rater, votes=1), seed=seed)
        page = self.client.get("/login")
        csrf = _CSRF.search(page.text)
        reply = self.client.post("/login", data={"name": name, "token": token, "csrf": csrf[1] if csrf else ""})
        if reply.status_code != 303 or "label" not in reply.headers.get("location", "") and \
                "admin" not in reply.headers.get("location", ""):
            raise RunError(f"bot {name} could not sign in to {url}: HTTP {reply.status_code}")

    def answer(self, prompt, responses: list) -> dict:
        """This rater's answer in the order shown, or a skip for a prompt not the world's."""
        parsed = parse_prompt(prompt) if isinstance(prompt, str) else None
        if parsed is None or not all(isinstance(r, str) for r in responses):
            return {"skip": True}
        return {"ranking": self.panel.rank(parsed, responses)[0]}

    def step(self) -> bool:
        """Answer the next task; False when the queue is empty."""
        task = self.client.get("/api/next")
        if task.status_code != 200:
            raise RunError(f"bot {self.name}: GET /api/next: HTTP {task.status_code}")
        body = task.json()
        if body["done"]:
            return False
        vote = {"vote": body["vote"], "key": uuid.uuid4().hex, "answer": self.answer(body["prompt"], body["responses"])}
        for attempt in range(5):  # the same key again after a lost reply: stored once
            try:
                reply = self.client.post("/api/vote", json=vote, headers={"X-CSRF-Token": body["csrf"]})
                break
            except Exception:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        if reply.status_code != 200:
            raise RunError(f"bot {self.name}: POST /api/vote: HTTP {reply.status_code} {reply.text[:200]}")
        return True

    def close(self) -> None:
        self.client.close()


def run_bots(url: str, accounts: list[tuple[str, str]], rater: RaterConfig, seed: int = 0,
             max_answers: int | None = None) -> dict[str, int]:
    """Every bot (name, token) answers its queue until it is empty (or ``max_answers`` each),
    one thread per bot. Returns answers per bot."""
    counts: dict[str, int] = {}
    errors: list[BaseException] = []

    def work(i: int, name: str, token: str) -> None:
        try:
            bot = Bot(url, name, token, rater, seed=seed * 1000 + i)
            n = 0
            while (max_answers is None or n < max_answers) and bot.step():
                n += 1
            counts[name] = n
            bot.close()
        except BaseException as err:  # reported below, after every thread ends
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, n, t)) for i, (n, t) in enumerate(accounts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return counts


def expected_agreement(prompt, a: str, b: str, rater: RaterConfig) -> float:
    """The probability that two of the world's raters agree on the pair (a, b):
    p^2 + (1 - p)^2, p = P(a preferred) (``world.labeler.preference_probability``)."""
    p = preference_probability(prompt, a, b, rater)
    return p * p + (1 - p) * (1 - p)
