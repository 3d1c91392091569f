"""The labeling database: SQLAlchemy 2 models and the operations the server and commands run.

Tables:

| table    | one row per                        | what                                                    |
|----------|------------------------------------|---------------------------------------------------------|
| users    | person (or bot)                    | name, role (``labeler`` or ``admin``), scrypt hash of the token and its salt |
| sessions | logged-in browser                  | SHA-256 of the session cookie, the user, the CSRF token, expiry |
| tasks    | prompt with 2..K responses         | overlap (how many labelers answer it), metadata, ``gold`` (the known answer) or null |
| votes    | (task, labeler), unique            | the order shown, status (served / submitted / skipped), the answer, confidence, reason, served and submitted times, seconds spent, the submission's idempotency key |
| settings | key                                | the guidelines (Markdown)                               |

An answer, in the task's own response indices (never the order shown): ``{"ranking": [i, j, ...]}``
(best first; a pairwise "better" is a ranking of two), ``{"tie": true}`` or
``{"both_bad": true}`` (pairs only).

The schema is Alembic's (``migrations/``): opening a database upgrades it to the newest
revision (``migrate``), so ``rlhflab label serve`` and ``label load`` bring a database made by
an earlier version up to date.

SQLite (``sqlite:///labels.db``) runs in WAL mode with a busy timeout, so readers never block
the writer. A submission is one conditional UPDATE (``... WHERE status = 'served'``): a vote
submitted twice, concurrently or not, is stored once, and the second submission with the
same idempotency key is acknowledged as the same vote.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    cast,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from rlhflab.errors import InputError

ROLES = ("labeler", "admin")
SESSION_HOURS = 12
ABANDONED = timedelta(hours=1)
# scrypt's cost: N = 2^14, r = 8, p = 1 (16 MiB, the parameters RFC 7914 section 2 cites for
# interactive logins).
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "maxmem": 64 * 1024 * 1024, "dklen": 32}


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    salt: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(128))
    created: Mapped[datetime] = mapped_column(DateTime, default=now)


class LoginSession(Base):
    __tablename__ = "sessions"
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    csrf: Mapped[str] = mapped_column(String(64))
    expires: Mapped[datetime] = mapped_column(DateTime)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt: Mapped[Any] = mapped_column(JSON)
    responses: Mapped[list] = mapped_column(JSON)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    overlap: Mapped[int] = mapped_column(Integer, default=3)
    gold: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    created: Mapped[datetime] = mapped_column(DateTime, default=now)


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    shown: Mapped[list] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="served")
    answer: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    confidence: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    served_at: Mapped[datetime] = mapped_column(DateTime, default=now)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)


class Setting(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


def hash_token(token: str, salt: str) -> str:
    """scrypt(token, salt) in hex (``SCRYPT``'s cost)."""
    return hashlib.scrypt(token.encode(), salt=bytes.fromhex(salt), **SCRYPT).hex()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_answer(answer: Any, n: int) -> dict:
    """The answer in its stored form, or ValueError saying what is wrong (``n`` responses)."""
    if not isinstance(answer, dict) or len(answer) != 1:
        raise ValueError("expected one of {ranking: [...]}, {tie: true}, {both_bad: true}")
    (kind, value), = answer.items()
    if kind in ("tie", "both_bad"):
        if value is not True or n != 2:
            raise ValueError(f"{kind} is an answer for a pair, given as true")
        return {kind: True}
    if kind != "ranking" or not isinstance(value, list):
        raise ValueError("expected one of {ranking: [...]}, {tie: true}, {both_bad: true}")
    if sorted(value) != list(range(n)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"a ranking lists every response once, 0..{n - 1}")
    return {"ranking": list(value)}


class Store:
    """The database at ``url`` (a SQLAlchemy URL), its tables created if missing."""

    def __init__(self, url: str, seed: int | None = None) -> None:
        """``seed`` fixes the order each labeler is shown (for tests and demos); by default it
        is drawn from the operating system's randomness."""
        if url.startswith(("postgresql://", "postgres://")):  # the driver the label extra installs
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        self.url, self.seed = url, seed
        try:
            memory = url in ("sqlite://", "sqlite:///:memory:")  # one connection, or each its own database
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}
                                        if url.startswith("sqlite") else {},
                                        **({"poolclass": StaticPool} if memory else {}))
        except Exception as err:  # a malformed URL or a missing driver
            raise InputError(f"cannot use the database URL {url!r}: {err}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            migrate(self.engine)
        except Exception as err:
            raise InputError(f"cannot open the database {url!r}: {str(err).splitlines()[0]}") from None
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self._assigning = threading.Lock()

    # -- people ---------------------------------------------------------------------------
    def create_user(self, name: str, role: str) -> str:
        """A new user; returns their token (shown once: only its scrypt hash is stored)."""
        if role not in ROLES:
            raise InputError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise InputError(f"name: expected 1-64 letters, digits, '-', '_' or '.', got {name!r}")
        token = secrets.token_urlsafe(24)
        salt = secrets.token_hex(16)
        with self.session.begin() as s:
            if s.scalar(select(User).where(User.name == name)) is not None:
                raise InputError(f"name: a user {name!r} exists already")
            s.add(User(name=name, role=role, salt=salt, token_hash=hash_token(token, salt)))
        return token

    def bot_accounts(self, n: int) -> list[tuple[str, str]]:
        """``n`` labelers named bot-01, bot-02, ..., created or given a new token; (name, token)."""
        accounts = []
        with self.session.begin() as s:
            for i in range(1, n + 1):
                name, token, salt = f"bot-{i:02d}", secrets.token_urlsafe(24), secrets.token_hex(16)
                user = s.scalar(select(User).where(User.name == name))
                if user is None:
                    s.add(User(name=name, role="labeler", salt=salt, token_hash=hash_token(token, salt)))
                else:
                    user.salt, user.token_hash = salt, hash_token(token, salt)
                accounts.append((name, token))
        return accounts

    def authenticate(self, name: str, token: str) -> User | None:
        with self.session() as s:
            user = s.scalar(select(User).where(User.name == name))
        if user is None:
            hash_token(token, "00" * 16)  # the same work for an unknown name
            return None
        return user if hmac.compare_digest(hash_token(token, user.salt), user.token_hash) else None

    def open_session(self, user: User) -> tuple[str, str]:
        """A new login session: (cookie value, CSRF token)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self.session.begin() as s:
            s.add(LoginSession(id_hash=_sha256(sid), user_id=user.id, csrf=csrf,
                               expires=now() + timedelta(hours=SESSION_HOURS)))
        return sid, csrf

    def session_user(self, sid: str | None) -> tuple[User, str] | None:
        """(user, CSRF token) of a live session, or None."""
        if not sid or len(sid) > 128:
            return None
        with self.session() as s:
            row = s.get(LoginSession, _sha256(sid))
            if row is None or row.expires < now():
                return None
            return s.get(User, row.user_id), row.csrf

    def close_session(self, sid: str) -> None:
        with self.session.begin() as s:
            row = s.get(LoginSession, _sha256(sid))
            if row is not None:
                s.delete(row)

    def users(self) -> list[User]:
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.id)))

    # -- tasks and votes ------------------------------------------------------------------
    def add_tasks(self, tasks: list[dict]) -> int:
        """Tasks as dicts: prompt, responses, overlap, and optional meta and gold."""
        with self.session.begin() as s:
            for t in tasks:
                s.add(Task(prompt=t["prompt"], responses=t["responses"], meta=t.get("meta") or {},
                           overlap=t.get("overlap", 3), gold=t.get("gold")))
        return len(tasks)

    def add_answered(self, items: list[tuple[dict, list[dict]]]) -> tuple[int, int]:
        """Tasks answered elsewhere (an import): each (task, votes), a vote ``{"labeler",
        "answer", "seconds"}`` in the task's own indices, shown in that order. A labeler not
        here yet is created (role labeler, a token nobody is told: they sign in only once an
        admin gives them a new one). A second answer of one labeler on one task is left out.
        Returns (tasks, votes) stored."""
        names = {v["labeler"] for _, votes in items for v in votes}
        known = {u.name for u in self.users()}
        for name in sorted(names - known):
            self.create_user(name, "labeler")
        stored = 0
        with self.session.begin() as s:
            ids = {u.name: u.id for u in s.scalars(select(User))}
            for t, votes in items:
                task = Task(prompt=t["prompt"], responses=t["responses"], meta=t.get("meta") or {},
                            overlap=t.get("overlap", 3), gold=t.get("gold"))
                s.add(task)
                s.flush()
                seen = set()
                for v in votes:
                    if v["labeler"] in seen:
                        continue
                    seen.add(v["labeler"])
                    answer = check_answer(v["answer"], len(t["responses"]))
                    s.add(Vote(task_id=task.id, user_id=ids[v["labeler"]], shown=list(range(len(t["responses"]))),
                               status="submitted", answer=answer, served_at=now(), submitted_at=now(),
                               seconds=v.get("seconds")))
                    stored += 1
        return len(items), stored

    def next_vote(self, user: User) -> tuple[Vote, Task] | None:
        """The user's current assignment: one served and not yet answered, else a new one
        (a task they have not seen whose answers are fewer than its overlap, or a gold task
        they have not seen), in an order of their own; None when their queue is empty.
        Assignments are made one at a time in this process (two labelers asking at once
        would both see a task's last open place)."""
        with self._assigning:
            return self._next_vote(user)

    def _next_vote(self, user: User) -> tuple[Vote, Task] | None:
        with self.session.begin() as s:
            open_vote = s.scalar(select(Vote).where(Vote.user_id == user.id, Vote.status == "served"))
            if open_vote is not None:
                return open_vote, s.get(Task, open_vote.task_id)
            seen = select(Vote.task_id).where(Vote.user_id == user.id)
            taken = self._taken()
            # The user's own order over the open tasks (gold mixed in where it falls), chosen
            # by the database: one row comes back, not every open task.
            task = s.scalar(select(Task).where(Task.id.not_in(seen))
                            .where((Task.gold.is_not(None)) | (taken < Task.overlap))
                            .order_by(_order_key(user.id), Task.id).limit(1))
            if task is None:
                return None
            shown = list(range(len(task.responses)))
            rng = secrets.SystemRandom() if self.seed is None else random.Random(f"{self.seed}/{user.id}/{task.id}")
            rng.shuffle(shown)
            vote = Vote(task_id=task.id, user_id=user.id, shown=shown, status="served", served_at=now())
            s.add(vote)
            s.flush()
            return vote, task

    def vote_of(self, user: User, vote_id: int) -> tuple[Vote, Task] | None:
        """The user's own vote ``vote_id`` with its task, or None (another's vote included)."""
        with self.session() as s:
            vote = s.get(Vote, vote_id)
            if vote is None or vote.user_id != user.id:
                return None
            return vote, s.get(Task, vote.task_id)

    def _taken(self):
        """A task's answers plus its assignments served less than ``ABANDONED`` ago (one left
        open longer goes back to the queue, and its labeler may still answer it)."""
        return (select(func.count(Vote.id))
                .where(Vote.task_id == Task.id, Vote.status != "skipped",
                       (Vote.status != "served") | (Vote.served_at > now() - ABANDONED))
                .correlate(Task).scalar_subquery())

    def submit(self, user: User, vote_id: int, answer: Any, key: str, *, confidence: int | None = None,
               reason: str | None = None, skip: bool = False) -> str:
        """Store one answer: ``stored``, ``duplicate`` (this key's submission is stored
        already), ``conflict`` (the vote was answered under another key) or ``missing`` (no
        such vote of this user). ``answer`` is in the task's response indices."""
        t = now()
        with self.session.begin() as s:
            vote = s.get(Vote, vote_id)
            if vote is None or vote.user_id != user.id:
                return "missing"
            seconds = max(0.0, (t - vote.served_at).total_seconds())
            result = s.execute(
                update(Vote).where(Vote.id == vote_id, Vote.user_id == user.id, Vote.status == "served")
                .values(status="skipped" if skip else "submitted", answer=None if skip else answer,
                        confidence=confidence, reason=reason, key=key, submitted_at=t, seconds=seconds))
            if result.rowcount == 1:
                return "stored"
        with self.session() as s:
            vote = s.get(Vote, vote_id)
            return "duplicate" if vote.key == key else "conflict"

    def progress(self, user: User) -> tuple[int, int]:
        """(answered by the user, answered + still open to them)."""
        with self.session() as s:
            done = s.scalar(select(func.count(Vote.id)).where(Vote.user_id == user.id, Vote.status != "served"))
            seen = select(Vote.task_id).where(Vote.user_id == user.id, Vote.status != "served")
            taken = self._taken()
            open_ = s.scalar(select(func.count(Task.id)).where(Task.id.not_in(seen))
                             .where((Task.gold.is_not(None)) | (taken < Task.overlap)))
            return done, done + open_

    def votes(self) -> list[tuple[Vote, Task, User]]:
        """Every answered vote (submitted or skipped) with its task and user."""
        with self.session() as s:
            return list(s.execute(select(Vote, Task, User).join(Task, Vote.task_id == Task.id)
                                  .join(User, Vote.user_id == User.id)
                                  .where(Vote.status != "served").order_by(Vote.id)))

    def tasks(self) -> list[Task]:
        with self.session() as s:
            return list(s.scalars(select(Task).order_by(Task.id)))

    # -- settings -------------------------------------------------------------------------
    def get_setting(self, key: str, default: str = "") -> str:
        with self.session() as s:
            row = s.get(Setting, key)
            return row.value if row is not None else default

    def set_setting(self, key: str, value: str) -> None:
        with self.session.begin() as s:
            row = s.get(Setting, key)
            if row is None:
                s.add(Setting(key=key, value=value))
            else:
                row.value = value


_P = 2_147_483_647  # 2^31 - 1, prime: every product below stays under 2^62 (64-bit integers in SQL)


def _order_key(user_id: int):
    """A per-labeler shuffle of the tasks as a SQL expression of the task's id, fixed for the
    pair (user, task): k = (48271 id + 69621 (user + 1) + 12345) mod P, then k^2 mod P (the
    Lehmer multiplier 48271; squaring breaks the linear order the first step leaves)."""
    k = (cast(Task.id, BigInteger) * 48271 + (69621 * (user_id + 1) + 12345)) % _P
    return (k * k) % _P


INITIAL = "0001"  # the schema as it was before migrations (migrations/versions/0001_initial.py)


def migrate(engine) -> str:
    """Bring the database to the newest schema with Alembic (migrations/); returns the
    revision. An empty database gets every revision; one created before migrations (its
    tables there, no ``alembic_version``) is stamped with the initial revision, whose schema
    it has, and upgraded from there."""
    from alembic import command
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from sqlalchemy import inspect

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and {"users", "sessions", "tasks", "votes", "settings"} <= tables:
            command.stamp(cfg, INITIAL)
        command.upgrade(cfg, "head")
        return MigrationContext.configure(conn).get_current_revision()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged vote survives a crash of the machine too
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
