"""A throwaway PostgreSQL cluster on loopback for the labeling tests: Debian's postgresql
(installed with apt-get where it is missing and the tests run as root), initdb in a temporary
directory, the server on a free port of 127.0.0.1, stopped at the end of the session.
Skipped, saying why, only where it cannot be installed or started."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _install() -> str | None:
    """apt-get install postgresql, or why it cannot be."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL is not installed and the tests are not root with apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            return f"apt-get could not install postgresql: {(done.stderr or done.stdout).strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg (the label extra) is not installed")
    bin_dir = _bin_dir()
    if bin_dir is None:
        why = _install()
        bin_dir = _bin_dir()
        if bin_dir is None:
            pytest.skip(why or "postgresql installed but initdb not found")
    root = os.geteuid() == 0
    data = Path(tempfile.mkdtemp(prefix="rlhflab-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if root else []
    if root:
        shutil.chown(data, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = subprocess.run([*as_postgres, str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "postgres",
                           "-A", "trust", "--no-sync", "-E", "UTF8"], capture_output=True, text=True, timeout=300)
    if init.returncode != 0:
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    options = f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off -c full_page_writes=off"
    start = subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-o", options,
                            "-l", str(data / "log"), "-w", "-t", "120", "start"], capture_output=True, text=True,
                           timeout=300)
    if start.returncode != 0:
        log = (data / "log").read_text() if (data / "log").exists() else ""
        pytest.skip(f"PostgreSQL did not start: {(start.stderr + log).strip()[-300:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # the Store picks psycopg 3
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """A fresh, empty database: SQLite on tmpfs where there is one, or a new database of the
    throwaway PostgreSQL cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(dir='/dev/shm' if Path('/dev/shm').is_dir() else None)}/labels.db"
    import uuid

    import psycopg

    base = request.getfixturevalue("postgres_url")
    name = f"labels_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + f"/{name}"
