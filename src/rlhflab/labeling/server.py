"""The labeling web app (Starlette): server-rendered pages, a JSON API, nothing loaded from
elsewhere.

| method | path                | who            | what                                                    |
|--------|---------------------|----------------|---------------------------------------------------------|
| GET    | /                   | anyone         | to the labeler's page (or the login)                    |
| GET    | /login              | anyone         | the login form (name and token)                         |
| POST   | /login              | anyone         | a session cookie for a right name and token             |
| POST   | /logout             | signed in      | ends the session                                        |
| GET    | /label              | signed in      | the labeler's page: guidelines, progress, the next task |
| POST   | /label              | signed in      | an answer from the page's form                          |
| GET    | /api/next           | signed in      | the next task as JSON, responses in the order shown     |
| POST   | /api/vote           | signed in      | an answer as JSON                                       |
| GET    | /admin              | admin          | throughput, agreement, gold accuracy, position bias, low-agreement tasks; the guidelines |
| GET    | /admin/metrics      | admin          | the same readings as JSON                               |
| POST   | /admin/guidelines   | admin          | sets the guidelines (Markdown)                          |
| GET    | /static/app.js, .css| anyone         | the page's keyboard shortcuts and style                 |

Security: a session is a random cookie (HttpOnly, SameSite=Strict; its SHA-256 is stored);
every POST needs the session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``;
the login form's is a double-submit cookie) and is refused with a foreign ``Origin`` or
``Sec-Fetch-Site: cross-site``; request bodies are bounded (``max_body``); every text from a
model or a file is HTML-escaped, the guidelines are Markdown rendered with raw HTML off and
unsafe links dropped, and the Content-Security-Policy lets the page run only its own script.
A labeler reaches only their own assignment: another's vote is "not found".

Database calls run in Starlette's thread pool (a page is a plain function, which Starlette
runs there; a POST reads its body on the event loop and then calls the store with
``run_in_threadpool``), so one request waiting on the database does not hold up the others
(bench/label_load.py measures it).
"""

from __future__ import annotations

import hmac
import html
import json
import math
import secrets
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route

from rlhflab.labeling.store import Store, User, check_answer

SESSION_COOKIE = "rlhflab_session"
LOGIN_COOKIE = "rlhflab_login"
MAX_BODY = 64 * 1024
MAX_REASON = 2000
LOGIN_MESSAGES = {"wrong": "Wrong name or token."}
LETTERS = "ABCDEFGHIJ"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
DEFAULT_GUIDELINES = ("Read the prompt, then every response. Prefer the response that is correct, helpful "
                      "and honest; length is not quality. *Tie* when they are equally good, *both bad* when "
                      "neither is acceptable.")


class LimitBody:
    """ASGI middleware: 413 for a body over ``max_body`` bytes, declared or streamed."""

    def __init__(self, app, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await PlainTextResponse("request too large", 413)(scope, receive, send)
        # The body is read whole before the app runs (it is small by then), and replayed.
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await PlainTextResponse("request too large", 413)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class SecurityHeaders:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            # same-origin, not no-referrer: under no-referrer Chromium sends a
                            # form's POST with "Origin: null", which same_origin() refuses
                            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"),
                            (b"cache-control", b"no-store")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def e(text: Any) -> str:
    """HTML-escaped text (quotes too)."""
    return html.escape(str(text), quote=True)


def as_text(value: Any) -> str:
    """A prompt or response as plain text: a string, or conversational messages as
    'role: content' lines."""
    if isinstance(value, list):
        return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    return str(value)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def render_markdown(text: str) -> str:
    """Markdown to HTML with raw HTML escaped and only safe links (markdown-it's CommonMark
    with ``html`` off; its link check drops javascript:, vbscript:, file: and data: URLs)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).render(text)


def page(title: str, body: str, user: User | None = None, csrf: str = "") -> HTMLResponse:
    nav = ""
    if user is not None:
        admin = '<a href="/admin">admin</a> ' if user.role == "admin" else ""
        nav = (f'<nav><a href="/label">label</a> {admin}<span>{e(user.name)} ({e(user.role)})</span> '
               f'<form method="post" action="/logout" class="inline"><input type="hidden" name="csrf" '
               f'value="{e(csrf)}"><button type="submit">log out</button></form></nav>')
    return HTMLResponse(f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
                        f'content="width=device-width, initial-scale=1"><title>{e(title)}</title>'
                        f'<link rel="stylesheet" href="/static/app.css"></head><body>{nav}<main>{body}</main>'
                        f'<script src="/static/app.js"></script></body></html>')


def create_app(store: Store, *, max_body: int = MAX_BODY):
    """The app over ``store`` (an ASGI application)."""

    def current(request: Request) -> tuple[User, str] | None:
        return store.session_user(request.cookies.get(SESSION_COOKIE))

    def same_origin(request: Request) -> bool:
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:  # a client that is no browser (browsers send Origin with every POST)
            return True
        host = request.headers.get("host", "")
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host

    async def read_form(request: Request) -> dict[str, str]:
        kind = request.headers.get("content-type", "")
        if not kind.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            return {}
        form = await request.form(max_files=0, max_fields=50, max_part_size=max_body)
        return {k: v for k, v in form.items() if isinstance(v, str)}

    def refuse(status: int, text: str, api: bool) -> Response:
        return JSONResponse({"error": text}, status) if api else PlainTextResponse(text, status)

    async def guarded_post(request: Request, api: bool):
        """(user, form or JSON body) of a POST that passes the session and CSRF checks, or a
        refusal."""
        if not same_origin(request):
            return refuse(403, "cross-site request refused", api)
        who = await run_in_threadpool(current, request)
        if who is None:
            return refuse(401, "sign in first", api)
        user, csrf = who
        if api:
            try:
                data = json.loads(await request.body() or b"null")
            except (ValueError, UnicodeDecodeError):
                return refuse(400, "expected a JSON object", api)
            if not isinstance(data, dict):
                return refuse(400, "expected a JSON object", api)
            given = request.headers.get("x-csrf-token", "")
        else:
            data = await read_form(request)
            given = data.get("csrf", "")
        if not given or not hmac.compare_digest(given.encode(), csrf.encode()):
            return refuse(403, "missing or wrong CSRF token", api)
        return user, csrf, data

    # -- login ----------------------------------------------------------------------------
    async def login_form(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        message = LOGIN_MESSAGES.get(request.query_params.get("m", ""), "")  # fixed texts, nothing reflected
        body = (f'<h1>Sign in</h1>{f"<p class=note>{message}</p>" if message else ""}'
                f'<form method="post" action="/login" class="login"><label>name <input name="name" '
                f'autocomplete="username" required maxlength="64"></label><label>token <input name="token" '
                f'type="password" autocomplete="current-password" required maxlength="200"></label>'
                f'<input type="hidden" name="csrf" value="{e(token)}"><button type="submit">sign in</button></form>')
        response = page("Sign in", body)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", path="/login",
                            secure=request.url.scheme == "https")
        return response

    async def login(request: Request) -> Response:
        if not same_origin(request):
            return refuse(403, "cross-site request refused", False)
        form = await read_form(request)
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), form.get("csrf", "").encode()):
            return refuse(403, "missing or wrong CSRF token", False)
        user = await run_in_threadpool(store.authenticate, form.get("name", "")[:64], form.get("token", "")[:200])
        if user is None:
            return RedirectResponse("/login?m=wrong", 303)
        sid, _ = await run_in_threadpool(store.open_session, user)
        response = RedirectResponse("/admin" if user.role == "admin" else "/label", 303)
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(request: Request) -> Response:
        checked = await guarded_post(request, api=False)
        if isinstance(checked, Response):
            return checked
        await run_in_threadpool(store.close_session, request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def index(request: Request) -> Response:
        return RedirectResponse("/label" if current(request) else "/login", 303)

    # -- labeling -------------------------------------------------------------------------
    def assignment(user: User):
        for _ in range(3):  # two tabs asking at once may race for the same task: ask again
            try:
                return store.next_vote(user)
            except Exception as err:  # IntegrityError from the unique (task, user)
                if "UNIQUE" not in str(err).upper():
                    raise
        return store.next_vote(user)

    def label_page(request: Request) -> Response:
        who = current(request)
        if who is None:
            return RedirectResponse("/login", 303)
        user, csrf = who
        guidelines = render_markdown(store.get_setting("guidelines", DEFAULT_GUIDELINES))
        done, total = store.progress(user)
        head = (f'<details class="guidelines" open><summary>Guidelines</summary>{guidelines}</details>'
                f'<p class="progress">answered {done} of {total} <progress value="{done}" max="{max(total, 1)}">'
                f'</progress></p>')
        got = assignment(user)
        if got is None:
            return page("Labeling", head + "<p class=done>Nothing left in your queue. Thank you.</p>", user, csrf)
        vote, task = got
        n = len(task.responses)
        cards = "".join(f'<section class="response"><h2>{LETTERS[p]}</h2><pre>{e(as_text(task.responses[i]))}</pre>'
                        f'</section>' for p, i in enumerate(vote.shown))
        if n == 2:
            choices = ('<div class="choices">'
                       '<button name="answer" value="A" data-key="1">A is better <kbd>1</kbd></button>'
                       '<button name="answer" value="B" data-key="2">B is better <kbd>2</kbd></button>'
                       '<button name="answer" value="tie" data-key="3">tie <kbd>3</kbd></button>'
                       '<button name="answer" value="both_bad" data-key="4">both bad <kbd>4</kbd></button>'
                       '<button name="answer" value="skip" data-key="s" class="skip">skip <kbd>s</kbd></button></div>')
        else:
            letters = LETTERS[:n]
            choices = (f'<div class="choices"><label>ranking, best first (type the letters {letters}) '
                       f'<input name="ranking" id="ranking" data-letters="{letters}" maxlength="{n}" '
                       f'pattern="[{letters}{letters.lower()}]{{{n}}}" autocomplete="off"></label>'
                       '<button name="answer" value="rank" data-key="Enter">submit <kbd>Enter</kbd></button>'
                       '<button name="answer" value="skip" data-key="s" class="skip" formnovalidate>skip '
                       '<kbd>s</kbd></button></div>')
        body = (f'{head}<form method="post" action="/label" class="task" id="task">'
                f'<h2>Prompt</h2><pre class="prompt">{e(as_text(task.prompt))}</pre>'
                f'<div class="responses n{n}">{cards}</div>{choices}'
                '<div class="extra"><label>confidence <select name="confidence"><option value="">-</option>'
                + "".join(f'<option value="{c}">{c}</option>' for c in range(1, 6)) +
                f'</select></label><label>reason <textarea name="reason" maxlength="{MAX_REASON}" rows="2">'
                f'</textarea></label></div><input type="hidden" name="vote" value="{vote.id}">'
                f'<input type="hidden" name="key" value="{e(secrets.token_hex(16))}">'
                f'<input type="hidden" name="csrf" value="{e(csrf)}"></form>')
        return page("Labeling", body, user, csrf)

    def parse_common(data: dict) -> tuple[int, str, int | None, str | None] | str:
        try:
            vote_id = int(data.get("vote"))
        except (TypeError, ValueError):
            return "vote: expected the vote's id"
        key = data.get("key")
        if not isinstance(key, str) or not 8 <= len(key) <= 64:
            return "key: expected an idempotency key of 8-64 characters"
        confidence = data.get("confidence")
        if confidence in ("", None):
            confidence = None
        else:
            try:
                confidence = int(confidence)
            except (TypeError, ValueError):
                return "confidence: expected 1-5"
            if not 1 <= confidence <= 5:
                return "confidence: expected 1-5"
        reason = data.get("reason") or None
        if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
            return f"reason: expected text of at most {MAX_REASON} characters"
        return vote_id, key, confidence, reason

    def record(user: User, vote_id: int, key: str, shown_answer: Any, confidence, reason) -> tuple[int, dict]:
        """Store an answer given in the order shown; (HTTP status, JSON body)."""
        got = store.vote_of(user, vote_id)
        if got is None:
            return 404, {"error": "no such vote in your queue"}
        vote, task = got
        skip = shown_answer == {"skip": True}
        answer = None
        if not skip:
            try:
                answer = check_answer(shown_answer, len(task.responses))
            except ValueError as err:
                return 400, {"error": f"answer: {err}"}
            if "ranking" in answer:  # positions shown -> the task's response indices
                answer = {"ranking": [vote.shown[p] for p in answer["ranking"]]}
        status = store.submit(user, vote_id, answer, key, confidence=confidence, reason=reason, skip=skip)
        code = {"stored": 200, "duplicate": 200, "conflict": 409, "missing": 404}[status]
        return code, {"status": status, "vote": vote_id}

    async def label_submit(request: Request) -> Response:
        checked = await guarded_post(request, api=False)
        if isinstance(checked, Response):
            return checked
        user, _, form = checked
        common = parse_common(form)
        if isinstance(common, str):
            return PlainTextResponse(common, 400)
        choice = form.get("answer", "")
        if choice == "skip":
            answer = {"skip": True}
        elif choice in ("A", "B"):
            answer = {"ranking": [0, 1] if choice == "A" else [1, 0]}
        elif choice in ("tie", "both_bad"):
            answer = {choice: True}
        elif choice == "rank":
            letters = form.get("ranking", "").strip().upper()
            if not letters or any(c not in LETTERS for c in letters):
                return PlainTextResponse("ranking: expected the response letters, best first", 400)
            answer = {"ranking": [LETTERS.index(c) for c in letters]}
        else:
            return PlainTextResponse("answer: expected A, B, tie, both_bad, rank or skip", 400)
        code, body = await run_in_threadpool(record, user, *common[:2], answer, *common[2:])
        if code != 200 and body.get("status") != "conflict":
            return PlainTextResponse(body.get("error", body.get("status", "")), code)
        return RedirectResponse("/label", 303)

    def api_next(request: Request) -> Response:
        who = current(request)
        if who is None:
            return JSONResponse({"error": "sign in first"}, 401)
        user, csrf = who
        got = assignment(user)
        done, total = store.progress(user)
        if got is None:
            return JSONResponse({"done": True, "csrf": csrf, "progress": [done, total]})
        vote, task = got
        return JSONResponse({"done": False, "vote": vote.id, "prompt": task.prompt,
                             "responses": [task.responses[i] for i in vote.shown], "csrf": csrf,
                             "progress": [done, total]})

    async def api_vote(request: Request) -> Response:
        checked = await guarded_post(request, api=True)
        if isinstance(checked, Response):
            return checked
        user, _, data = checked
        common = parse_common(data)
        if isinstance(common, str):
            return JSONResponse({"error": common}, 400)
        code, body = await run_in_threadpool(record, user, *common[:2], data.get("answer"), *common[2:])
        return JSONResponse(body, code)

    # -- admin ----------------------------------------------------------------------------
    def admin_only(request: Request, api: bool):
        who = current(request)
        if who is None:
            return RedirectResponse("/login", 303) if not api else JSONResponse({"error": "sign in first"}, 401)
        if who[0].role != "admin":
            return refuse(403, "admins only", api)
        return who

    def admin_page(request: Request) -> Response:
        who = admin_only(request, api=False)
        if isinstance(who, Response):
            return who
        from rlhflab.labeling.io import readings, readings_html

        user, csrf = who
        guidelines = store.get_setting("guidelines", DEFAULT_GUIDELINES)
        body = (readings_html(readings(store)) +
                f'<h2>Guidelines</h2><form method="post" action="/admin/guidelines"><textarea name="guidelines" '
                f'rows="8" maxlength="{max_body // 2}">{e(guidelines)}</textarea><input type="hidden" name="csrf" '
                f'value="{e(csrf)}"><button type="submit">save</button></form>')
        return page("Admin", body, user, csrf)

    def admin_metrics(request: Request) -> Response:
        who = admin_only(request, api=True)
        if isinstance(who, Response):
            return who
        from rlhflab.labeling.io import readings

        return JSONResponse(finite(readings(store)))

    async def admin_guidelines(request: Request) -> Response:
        checked = await guarded_post(request, api=False)
        if isinstance(checked, Response):
            return checked
        user, _, form = checked
        if user.role != "admin":
            return PlainTextResponse("admins only", 403)
        await run_in_threadpool(store.set_setting, "guidelines", form.get("guidelines", "")[: max_body // 2])
        return RedirectResponse("/admin", 303)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "app.js":
            return Response(APP_JS, media_type="text/javascript")
        if name == "app.css":
            return Response(APP_CSS, media_type="text/css")
        return PlainTextResponse("not found", 404)

    routes = [
        Route("/", index),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/label", label_page, methods=["GET"]),
        Route("/label", label_submit, methods=["POST"]),
        Route("/api/next", api_next, methods=["GET"]),
        Route("/api/vote", api_vote, methods=["POST"]),
        Route("/admin", admin_page, methods=["GET"]),
        Route("/admin/metrics", admin_metrics, methods=["GET"]),
        Route("/admin/guidelines", admin_guidelines, methods=["POST"]),
        Route("/static/{name}", static, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    return SecurityHeaders(LimitBody(app, max_body))


APP_JS = r"""
(function () {
  var form = document.getElementById('task');
  if (!form) return;
  var ranking = document.getElementById('ranking');
  document.addEventListener('keydown', function (ev) {
    var t = ev.target;
    if (t && (t.tagName === 'TEXTAREA' || t.tagName === 'SELECT' || (t.tagName === 'INPUT' && t !== ranking))) return;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ranking && t !== ranking && /^[a-jA-J]$/.test(ev.key)) {
      var letter = ev.key.toUpperCase();
      if (ranking.dataset.letters.indexOf(letter) >= 0 && ranking.value.toUpperCase().indexOf(letter) < 0) {
        ranking.value += letter;
      }
      ev.preventDefault();
      return;
    }
    if (ranking && ev.key === 'Backspace' && t !== ranking) { ranking.value = ranking.value.slice(0, -1); ev.preventDefault(); return; }
    var button = form.querySelector('button[data-key="' + ev.key + '"]');
    if (button && !(ranking && ev.key === 's' && t === ranking)) { ev.preventDefault(); button.click(); }
  });
})();
"""

APP_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
nav { display: flex; gap: 1em; align-items: center; padding: .5em 1em; background: #eee; flex-wrap: wrap; }
main { padding: 1em; max-width: 1200px; margin: auto; }
pre { white-space: pre-wrap; word-break: break-word; background: #fff; border: 1px solid #ddd; padding: .6em; }
.responses { display: grid; gap: 1em; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); }
.choices, .extra { display: flex; flex-wrap: wrap; gap: .5em; margin: 1em 0; align-items: center; }
button { padding: .5em .9em; font-size: 1em; cursor: pointer; }
kbd { font-size: .8em; border: 1px solid #aaa; border-radius: 3px; padding: 0 .3em; }
.inline { display: inline; }
.login label { display: block; margin: .5em 0; }
table { border-collapse: collapse; margin: .5em 0 1.5em; display: block; max-width: 100%; overflow-x: auto; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
textarea { width: 100%; box-sizing: border-box; }
"""
