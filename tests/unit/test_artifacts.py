"""Atomic writes: an interrupted save leaves no half-written artifact and no earlier run lost."""

import pytest

from rlhflab.artifacts import check_out_dir, prepare_out_dir, write_json
from rlhflab.config import load_config
from rlhflab.errors import InputError
from rlhflab.models import create_causal_lm, save_pretrained_atomic
from rlhflab.world import World


class _Boom(RuntimeError):
    pass


def _tiny():
    cfg = load_config(None, ["model.d_model=16", "model.n_layers=1", "model.n_heads=2"])
    tok = World(cfg.world).tokenizer()
    return create_causal_lm(cfg.model, tok), tok


def test_interrupted_save_leaves_nothing_and_keeps_the_old_model(tmp_path, monkeypatch):
    model, tok = _tiny()
    out = tmp_path / "model"
    save_pretrained_atomic(model, tok, out)
    before = sorted(p.name for p in out.iterdir())

    def fail(*a, **k):
        raise _Boom("disk full")

    monkeypatch.setattr(tok, "save_pretrained", fail)
    with pytest.raises(_Boom):
        save_pretrained_atomic(model, tok, out)
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier model is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp directory left behind


def test_out_dir_rules(tmp_path):
    run = tmp_path / "run"
    prepare_out_dir(run, overwrite=False)
    (run / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="holds an earlier run"):
        check_out_dir(run, overwrite=False)
    prepare_out_dir(run, overwrite=True)
    assert list(run.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        check_out_dir(tmp_path / "file", overwrite=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # a run renamed onto it would fail at its end
    with pytest.raises(InputError, match="symbolic link to .*gone, which does not exist"):
        check_out_dir(tmp_path / "dangling", overwrite=True)


def test_write_json_never_emits_non_finite_literals(tmp_path):
    write_json(tmp_path / "m.json", {"a": float("inf"), "b": [float("nan"), 1.0]})
    text = (tmp_path / "m.json").read_text()
    assert "Infinity" not in text and "NaN" not in text and '"inf"' in text


# ---------------------------------------------------------------------------------------
# The run directory: one writer at a time, written beside its place


def _hold(lock, tmp_path):
    """Another process holding ``lock`` with flock (as a live run does), its pid inside."""
    import subprocess
    import sys

    code = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\nprint('held', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    import signal

    from rlhflab.artifacts import acquire_lock, lock_path, release_lock

    out = tmp_path / "run"
    assert lock_path(out) == tmp_path.resolve() / ".run.lock"
    holder = _hold(lock_path(out), tmp_path)
    try:
        with pytest.raises(InputError, match=rf"pid {holder.pid}\) is writing here now"):
            acquire_lock(out)
        with pytest.raises(InputError, match=f"pid {holder.pid}"):
            check_out_dir(out, overwrite=False)  # refused before anything is loaded, nothing created
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock"]  # the file stays, its lock does not
    acquire_lock(out)
    acquire_lock(out)  # the same place twice in one process: counted, not re-locked
    assert lock_path(out).read_text().strip() == str(__import__("os").getpid())
    release_lock(out)
    assert lock_path(out).exists()
    release_lock(out)
    assert list(tmp_path.iterdir()) == []  # the last release removes the lock file


def test_a_first_run_is_written_beside_its_place(tmp_path):
    from rlhflab.artifacts import abandon_run, begin_run, finish_run, publish_run

    out = tmp_path / "runs" / "a"
    work = begin_run(out, overwrite=False)
    assert work.parent == out.parent and work.name.startswith(".a.new-") and not out.exists()
    (work / "metrics.json").write_text("{}")
    finish_run(work, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["a"] and (out / "metrics.json").is_file()
    # failed: nothing at its place; failed holding what the stage keeps: renamed in
    b = tmp_path / "b"
    abandon_run(begin_run(b, overwrite=False), b)
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]
    work = begin_run(b, overwrite=False)
    (work / "summary.json").write_text("{}")
    assert abandon_run(work, b, keep="summary.json") == b.absolute() and (b / "summary.json").is_file()
    # published early (an online run): in place from then on; failed without a checkpoint: gone
    c = tmp_path / "c"
    work = begin_run(c, overwrite=False)
    assert publish_run(work, c) == c.absolute() and c.is_dir() and not work.exists()
    assert abandon_run(work, c, keep="checkpoint") is None and not c.exists()
