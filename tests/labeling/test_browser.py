"""The labeling app in a real browser: Playwright drives Debian's Chromium through the
labeler's page with the mouse and with the keys, and the admin's page; at 1280x800 and at
a phone's 390x844 every control is on the page, inside its width, and overlaps no other.

The screenshots go to a temporary directory, or to the directory ``RLHFLAB_SCREENSHOTS``
names (docs/images for the pictures in docs/labeling.md):

    RLHFLAB_SCREENSHOTS=docs/images .venv/bin/python -m pytest -q tests/labeling/test_browser.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from rlhflab.labeling.bots import run_bots, running_server
from rlhflab.labeling.server import create_app
from rlhflab.labeling.store import Store, Vote

from .test_app import WORLD_PAIRS, scratch_dir

SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
CONTROLS = "button, input:not([type=hidden]), select, textarea, nav a, summary"
BLOCKS = ".response, pre.prompt, table"
GUIDELINES = ("Prefer the response that is **correct**, then helpful, then short.\n\n"
              "A response that agrees with a wrong claim of the user is wrong. Choose *both bad* when neither "
              "answers the question.")
LENA = [("what is 6 plus 7 ?", ["13 .", "it is 13 . let me know if you need more ."]),
        ("what is 5 plus 5 ?", ["10 .", "it is 11 ."]),
        ("say something about rivers .", ["rivers carry water to the sea .", "certainly ! rivers .",
                                          "rivers are wet .", "the nile is a long river in africa ."]),
        ("what is 2 times 4 ?", ["8 .", "the answer is 8 ."]),
        ("what is 9 minus 3 ?", ["6 .", "it is 7 ."])]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium): no browser to drive")
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the test extra) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path())
        yield b
        b.close()


@pytest.fixture(scope="module")
def app_url():
    """A server with three bots' answers on eight world pairs (the admin's page has readings)
    and a queue for the labeler lena: four pairs and a ranking of four."""
    store = Store(f"sqlite:///{scratch_dir()}/labels.db", seed=0)
    store.set_setting("guidelines", GUIDELINES)
    store.add_tasks([{"prompt": p, "responses": [a, b], "overlap": 3} for p, a, b in WORLD_PAIRS * 2])
    tokens = {"ada": store.create_user("ada", "admin"), "lena": store.create_user("lena", "labeler")}
    with running_server(create_app(store)) as url:
        from rlhflab.config import load_config

        run_bots(url, store.bot_accounts(3), load_config(None).world.rater, seed=1)
        store.add_tasks([{"prompt": p, "responses": r, "overlap": 1} for p, r in LENA])
        yield store, url, tokens


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("RLHFLAB_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def boxes(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(selector, """els => els.map(e => {
        const r = e.getBoundingClientRect(), s = getComputedStyle(e);
        return {what: e.tagName + ' ' + (e.innerText || e.name || '').trim().slice(0, 24),
                x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
                shown: s.visibility !== 'hidden' && s.display !== 'none' && +s.opacity > 0};
    })""")


def overlap(a: dict, b: dict) -> float:
    dx = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
    dy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
    return max(0.0, dx) * max(0.0, dy)


def check_layout(page, width: int, expect: list[str]) -> None:
    """Every control shown, inside the page's width, overlapping no other control and no
    block (a response, the prompt, a table); the blocks overlap no other block; nothing
    scrolls sideways; the controls ``expect`` names (text starts) are among them."""
    controls, blocks = boxes(page, CONTROLS), boxes(page, BLOCKS)
    names = [c["what"] for c in controls]
    for want in expect:
        assert any(w.split(" ", 1)[1].startswith(want) for w in names if " " in w), (want, names)
    for c in controls + blocks:
        assert c["shown"] and c["w"] > 0 and c["h"] > 0, c
        assert c["x"] >= 0 and c["x"] + c["w"] <= width + 0.5, (c, width)
    for i, a in enumerate(controls):
        for b in controls[i + 1:] + blocks:
            assert overlap(a, b) == 0, (a, b)
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            assert overlap(a, b) == 0, (a, b)
    assert page.evaluate("document.documentElement.scrollWidth") <= width


def sign_in(browser, url: str, name: str, token: str, size: str):
    w, h = SIZES[size]
    context = browser.new_context(viewport={"width": w, "height": h})
    page = context.new_page()
    page.goto(f"{url}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=token]", token)
    with page.expect_navigation():
        page.click("button[type=submit]")
    return context, page


def vote_id(page) -> int:
    return int(page.get_attribute("input[name=vote]", "value"))


def stored(store: Store, vote: int) -> Vote:
    with store.session() as s:
        return s.get(Vote, vote)


def test_the_labelers_page_with_the_mouse_and_the_keys(browser, app_url, shots):
    store, url, tokens = app_url
    context, page = sign_in(browser, url, "lena", tokens["lena"], "desktop")
    assert page.url.endswith("/label") and "correct" in page.inner_text(".guidelines")
    pair = ["A is better", "B is better", "tie", "both bad", "skip", "log out", "label"]
    check_layout(page, 1280, pair)
    page.screenshot(path=shots / "labeling-labeler-desktop.png", full_page=True)
    total = int(page.inner_text(".progress").split(" of ")[1])  # LENA and what the bots skipped
    assert total >= len(LENA)
    done, pairs = [], 0
    while len(done) < total:
        vote = vote_id(page)
        responses = len(page.query_selector_all(".response"))
        before = page.inner_text(".progress")
        if responses == 4:  # the ranking: letters typed with the keys, then Enter
            check_layout(page, 1280, ["submit", "skip"])
            page.screenshot(path=shots / "labeling-ranking-desktop.png", full_page=True)
            for key in "CADB":
                page.keyboard.press(key.lower())
            assert page.input_value("#ranking") == "CADB"
            with page.expect_navigation():
                page.keyboard.press("Enter")
            v = stored(store, vote)
            assert v.answer == {"ranking": [v.shown[2], v.shown[0], v.shown[3], v.shown[1]]}
        elif pairs == 0:  # the mouse: a confidence, a reason, then the button
            page.select_option("select[name=confidence]", "4")
            page.click("textarea[name=reason]")
            page.keyboard.type("A is right and short.")
            with page.expect_navigation():
                page.click("button[value=A]")
            v = stored(store, vote)
            assert (v.answer, v.confidence, v.reason) == ({"ranking": v.shown}, 4, "A is right and short.")
        elif pairs == 1:  # the key 2: B is better
            with page.expect_navigation():
                page.keyboard.press("2")
            v = stored(store, vote)
            assert v.answer == {"ranking": [v.shown[1], v.shown[0]]}
        elif pairs == 2:  # the key 3: a tie
            with page.expect_navigation():
                page.keyboard.press("3")
            assert stored(store, vote).answer == {"tie": True}
        else:  # s skips
            with page.expect_navigation():
                page.keyboard.press("s")
            assert stored(store, vote).status == "skipped"
        pairs += responses == 2
        assert page.inner_text(".progress") != before
        done.append(vote)
    assert "Nothing left in your queue" in page.inner_text("main")
    assert f"answered {total} of {total}" in page.inner_text(".progress") and pairs >= 3
    context.close()


def test_the_labelers_page_at_a_phones_width(browser, app_url, shots):
    store, url, tokens = app_url
    name = "pia"
    if not any(u.name == name for u in store.users()):
        tokens[name] = store.create_user(name, "labeler")
        store.add_tasks([{"prompt": p, "responses": r, "overlap": 1} for p, r in LENA[2:4]])
    context, page = sign_in(browser, url, name, tokens[name], "phone")
    expect = {2: ["A is better", "B is better", "tie", "both bad", "skip"], 4: ["submit", "skip"]}
    seen = set()
    while seen != {2, 4}:  # a pair and the ranking, whichever comes first in pia's order
        assert "Nothing left" not in page.inner_text("main"), seen
        n = len(page.query_selector_all(".response"))
        check_layout(page, 390, expect[n] + ["log out"])
        if n not in seen:
            page.screenshot(path=shots / f"labeling-{'ranking' if n == 4 else 'labeler'}-phone.png", full_page=True)
        seen.add(n)
        with page.expect_navigation():
            if n == 4:
                page.fill("#ranking", "ABCD")
                page.click("button[value=rank]")
            else:
                page.click("button[value=B]")
    context.close()


def test_the_admins_page(browser, app_url, shots):
    store, url, tokens = app_url
    for size, (w, _) in SIZES.items():
        context, page = sign_in(browser, url, "ada", tokens["ada"], size)
        page.goto(f"{url}/admin")
        text = page.inner_text("main")
        assert "Fleiss" in text and "Krippendorff" in text and "bot-01" in text
        check_layout(page, w, ["save", "log out", "admin"])
        page.screenshot(path=shots / f"labeling-admin-{size}.png", full_page=True)
        context.close()
    # the guidelines edited with the mouse reach the labeler's page
    context, page = sign_in(browser, url, "ada", tokens["ada"], "desktop")
    page.goto(f"{url}/admin")
    page.fill("textarea[name=guidelines]", GUIDELINES + "\n\nNever reward *flattery*.")
    with page.expect_navigation():
        page.click("text=save")
    assert store.get_setting("guidelines").endswith("Never reward *flattery*.")
    page.goto(f"{url}/label")
    assert "Never reward flattery." in page.inner_text(".guidelines")
    context.close()
