"""Run directories and atomic artifact writes.

A stage writes into its own output directory. A directory that already holds a run is
refused unless the user passes ``--overwrite``; every file is written to a temp name and
renamed, so an interrupted stage leaves no half-written artifact.

A run is written into a hidden sibling, ``.<name>.new-<pid>``, and renamed into place only
once it is complete: a first run onto nothing, a replacement (``--overwrite``) by setting
the earlier run aside (``.<name>.old-<pid>``), renaming the new one in and deleting the
earlier one. A run that fails or is killed leaves nothing where the run should be (a first
run) or the earlier run as it was (a replacement); what a killed run left beside it is
swept (or, killed between the two renames, the swap finished) by the next run into the
same directory. An online RL run is the one exception, so that a killed run can be
resumed: once its ``config.yaml`` and ``run.json`` are written, a first run is renamed
into place (``publish_run``) and trains there. A run that fails keeps what it finished
only where the stage asks (``keep``: an online run's checkpoint, the main job's finished
stages).

One writer at a time: while a process writes a run directory it holds an exclusive
``flock`` on ``.<name>.lock`` beside it (the kernel releases it when the process dies,
kill -9 included, so a lock is never stale). Another process that comes to write the
same directory is refused in one line naming the holder's pid, before it loads anything
(``check_out_dir``) or when it comes to write (``run_directory``); it does not wait.

A full disk (ENOSPC) while a run is written is one line naming the file and the space
left (``errors.disk_full_error``), after the unfinished run is removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from rlhflab.errors import InputError, disk_full_error, is_disk_full


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(where: Path, out: Path) -> None:
    """Try to create (and remove) a directory in ``where``: permissions, read-only file
    systems and full inode tables all show here, before any data is loaded."""
    probe = where / f".rlhflab-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        probe.mkdir()
    except OSError as err:
        raise InputError(f"cannot write the output directory in {where} ({err.strerror or err})",
                         file=str(out)) from None
    probe.rmdir()


def check_out_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an output directory that another process is writing (``check_unlocked``), that
    holds anything (unless ``overwrite``), one under a regular file, or one that cannot be
    written. Leaves nothing behind."""
    path = Path(path)
    check_unlocked(path)
    if path.is_symlink() and not path.exists():  # renaming a run onto it would fail after the work
        raise InputError(f"output path is a symbolic link to {os.readlink(path)}, which does not exist",
                         file=str(path))
    if path.exists() and not path.is_dir():
        raise InputError("output path exists and is not a directory", file=str(path))
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        if (path / "run.json").is_file() and not (path / "metrics.json").is_file():  # publish_run's, unfinished
            raise InputError(f"holds an online run that stopped before its end: continue it with --resume {path}, "
                             "or pass --overwrite to replace it", file=str(path))
        raise InputError("holds an earlier run; pass --overwrite to replace it", file=str(path))
    base, absolute = _nearest_existing(path), path.absolute()
    if not base.is_dir():
        raise InputError(f"output path is under {base}, a file, not a directory", file=str(path))
    # the run is written beside its place (or where its parents will be created), then renamed
    _check_writable(base if base != absolute else absolute.parent, path)
    return path


def check_out_file(path: str | Path) -> Path:
    """An output file's place: not a directory, not under a regular file, writable."""
    path = Path(path)
    if path.is_dir():
        raise InputError("output path is a directory, not a file", file=str(path))
    check_unlocked(path)
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise InputError(f"output path is under {base}, a file, not a directory", file=str(path))
    _check_writable(base, path)
    return path


def prepare_out_dir(path: str | Path, overwrite: bool) -> Path:
    """``check_out_dir``, then empty (if overwriting) and create the directory.

    For a small output written at once (an export, an evaluation's JSON); a training stage
    uses ``run_directory``, which keeps the earlier run until the new one is complete.
    """
    path = check_out_dir(path, overwrite)
    if path.is_dir() and overwrite:
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------
# One writer at a time

_HELD: dict[str, list[int]] = {}
"""Lock files this process holds: path -> [file descriptor, depth] (a run inside a run's
directory locks its own place; the same place locked twice is counted, not re-locked)."""


def lock_path(out: str | Path) -> Path:
    """``.<name>.lock`` beside ``out`` (in its real parent, so every spelling of one place
    meets the same lock)."""
    out = Path(os.path.abspath(out))
    return out.parent.resolve() / f".{out.name}.lock"


def _refuse_busy(out: Path, lock: Path) -> None:
    try:
        pid = lock.read_text().strip() or "unknown"
    except OSError:
        pid = "unknown"
    raise InputError(f"another rlhflab process (pid {pid}) is writing here now; wait for it to end or stop it "
                     "(one writer at a time)", file=str(out))


def main_process() -> bool:
    """Not a secondary process of a distributed launch (those never take the lock: the main
    process takes it for them)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def check_unlocked(out: str | Path) -> None:
    """Refuse ``out`` if another process holds its lock (one line naming its pid). Creates
    nothing."""
    import fcntl

    lock = lock_path(out)
    if str(lock) in _HELD or not main_process():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody is writing
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            _refuse_busy(Path(out), lock)
    finally:
        os.close(fd)


def acquire_lock(out: str | Path, wait_s: float = 0.5) -> None:
    """Take ``out``'s lock (``.<name>.lock`` beside it, holding this process's pid) or
    refuse in one line naming the process that holds it. A momentary holder (another
    process's ``check_unlocked``) is waited out for ``wait_s`` seconds; a writer is not."""
    import fcntl

    lock = lock_path(out)
    key = str(lock)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(err, lock) from None
            raise InputError(f"cannot create the lock file {lock.name} beside it ({err.strerror or err})",
                             file=str(out)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            _refuse_busy(Path(out), lock)
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # a writer that finished removed this file after we opened it: take the new one
    with contextlib.suppress(OSError):  # the pid is for the message of a refused writer; a full disk may not take it
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = [fd, 1]


def release_lock(out: str | Path) -> None:
    """Give ``out``'s lock back; the last release removes the lock file (still holding it,
    so a process that opened it meanwhile sees it gone and takes a new one)."""
    key = str(lock_path(out))
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _HELD[key]
    with contextlib.suppress(OSError):
        os.unlink(key)
    os.close(entry[0])


@contextlib.contextmanager
def writer_lock(out: str | Path):
    """Hold ``out``'s lock for the block (``acquire_lock``; released however it ends)."""
    acquire_lock(out)
    try:
        yield
    finally:
        release_lock(out)


# ---------------------------------------------------------------------------------------
# Writing a run beside its place and renaming it in once it is complete


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _siblings(out: Path, kind: str) -> list[tuple[Path, int]]:
    """Hidden siblings ``.<name>.<kind>-<pid>`` of ``out`` whose process is gone."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.{kind}-(\d+)$")
    found = []
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and not _alive(int(m.group(1))):
            found.append((p, int(m.group(1))))
    return found


def is_staging(path: str | Path) -> bool:
    """True for the hidden ``.<name>.new-<pid>`` directory a run is written in (deleted if
    the run fails)."""
    return re.match(r"^\..+\.new-\d+$", Path(path).name) is not None


def _place(out: str | Path) -> Path:
    """``out`` as an absolute path with ``.`` and ``..`` folded (``--out .`` has a name)."""
    return Path(os.path.abspath(out))


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def sweep_leftovers(out: str | Path) -> None:
    """Clean up after a run into ``out`` that was killed: delete its unfinished
    ``.<name>.new-<pid>``; if it was killed between renaming the earlier run aside and the
    new one in (``out`` missing, both siblings present), finish the swap; if only the
    earlier run is aside, put it back; else delete the earlier run it had set aside."""
    out = _place(out)
    for old, pid in _siblings(out, "old"):
        new = old.with_name(f".{out.name}.new-{pid}")
        if not out.exists() and new.is_dir():
            new.rename(out)  # complete: a run is set aside only once its successor is
        elif not out.exists():
            old.rename(out)
            continue
        shutil.rmtree(old, ignore_errors=True)
    for new, _ in _siblings(out, "new"):
        shutil.rmtree(new, ignore_errors=True)


def begin_run(out: str | Path, overwrite: bool) -> Path:
    """The directory a run writes into: a new hidden sibling of ``out``, which
    ``finish_run`` renames into place (over the earlier run, with ``overwrite``)."""
    check_out_dir(out, overwrite)
    out = _place(out)
    sweep_leftovers(out)
    work = out.with_name(f".{out.name}.new-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir()
    return work


_PUBLISHED: dict[Path, Path] = {}
"""Staging directories of first runs renamed into place early (``publish_run``) -> where."""


def publish_run(work: Path, out: str | Path, accelerator=None) -> Path:
    """Rename a first run's ``work`` into place now, before it is complete, and return where
    it goes on (``out``); a replacement stays in ``work`` until ``finish_run`` (the earlier
    run is kept to the end). For an online run, once the files that ``--resume`` reads are
    written: killed later, the run is found and resumed at ``out``."""
    work, dest = Path(work), _place(out)
    main = accelerator is None or accelerator.is_main_process
    where = work
    if main and work != dest and (not dest.exists() or _empty_dir(dest)):
        if dest.exists():
            dest.rmdir()
        work.rename(dest)
        _PUBLISHED[work] = dest
        where = dest
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        where = broadcast_object_list([where])[0]
    return Path(where)


def finish_run(work: Path, out: str | Path) -> Path:
    """Put the complete run in ``work`` at ``out``: the earlier run aside, the new one in
    (renames in one directory), the earlier one deleted."""
    out, work = _place(out), Path(work)
    if _PUBLISHED.pop(work, None) is not None or work == out:
        return out
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def abandon_run(work: Path, out: str | Path, keep: str | None = None) -> Path | None:
    """After a failed run: delete ``work``, so the earlier run at ``out`` stays as it was
    (or nothing is there). A run that holds ``keep`` (an online run's ``checkpoint``, the
    main job's ``summary.json``) is kept instead when nothing else is at ``out``: a first
    run already in place stays, one still beside its place is renamed in. Returns where
    what was kept lies, or None."""
    out, work = _place(out), Path(work)
    if _PUBLISHED.pop(work, None) is not None or work == out:  # a first run in place
        if keep and (out / keep).exists():
            return out
        shutil.rmtree(out, ignore_errors=True)
        return None
    if keep and (work / keep).exists() and (not out.exists() or _empty_dir(out)):
        if out.exists():
            out.rmdir()
        work.rename(out)
        return out
    shutil.rmtree(work, ignore_errors=True)
    return None


@contextlib.contextmanager
def run_directory(out: str | Path, overwrite: bool, accelerator=None, keep: str | None = None):
    """Yield the directory a stage writes into (``begin_run``, on the main process, which
    holds ``out``'s lock throughout; every process gets the same path); when the block
    completes, ``finish_run`` puts it at ``out``; when it raises, ``abandon_run``, and a
    full disk becomes one line naming the file and the space left."""
    main = accelerator is None or accelerator.is_main_process
    if main:
        acquire_lock(out)
    try:
        work = begin_run(out, overwrite) if main else None
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            work = broadcast_object_list([work])[0]
        try:
            yield Path(work)
        except BaseException as err:
            kept = abandon_run(Path(work), out, keep) if main else None
            if is_disk_full(err):
                raise disk_full_error(err, out, kept=kept, earlier=_place(out).exists() and kept is None,
                                      staged=(work, out)) from None
            raise
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if main:
            finish_run(Path(work), out)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    finally:
        if main:
            release_lock(out)


# ---------------------------------------------------------------------------------------
# Files


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become strings "inf"/"-inf"/"nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file, then rename); never emits NaN/Infinity literals."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file
        raise


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("not found", file=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", file=str(path)) from None


def check_finite_weights(module, what: str, out: str | Path | None = None) -> None:
    """Refuse to save a module with a non-finite floating-point weight (one line, exit 2)."""
    import torch

    for name, t in module.state_dict().items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"refusing to save {what}: weight {name} holds non-finite values (nan/inf); "
                             "training diverged (a learning rate too high, or a non-finite input)",
                             file=None if out is None else str(out))


_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+$")


def _sweep_tmp(out: Path) -> None:
    """Clean up after a save to ``out`` by a killed process: its temp directories are
    deleted; if it was killed between setting the earlier ``out`` aside and renaming the
    new one in, the (complete) new one is put in place, else the earlier one is put back."""
    if not out.parent.is_dir():
        return
    dead = {}
    for p in out.parent.iterdir():
        m = _TMP.match(p.name)
        if m and m.group("name") == out.name and not _alive(int(m.group("pid"))):
            dead.setdefault(int(m.group("pid")), []).append(p)
    for aside, pid in _siblings(out, "aside"):
        if not out.exists():
            done = dead.pop(pid, [])
            (done[0] if len(done) == 1 else aside).rename(out)
            for p in done[1:]:
                shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    for paths in dead.values():
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)


def recover_save(out: str | Path) -> None:
    """Finish or undo an ``atomic_directory`` save to ``out`` by a process that was killed
    (as the next save there would): an online run's checkpoint is found again before a
    resume reads it, even when the kill fell between its two renames."""
    _sweep_tmp(Path(out))


def _umask_modes(root: Path) -> None:
    """Give what was written under ``root`` the modes of a plain ``mkdir`` / ``open``
    under the process umask (some writers create private 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(out: str | Path):
    """Yield a temp directory beside ``out``; on success it replaces ``out`` by renames.

    An interrupted write leaves no half-written ``out``, and an existing ``out`` is replaced
    only once the new one is complete. Temp directories of a killed save are swept by the
    next save to the same place. Directories get the process umask's mode (as ``mkdir``).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_tmp(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        _umask_modes(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.aside-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_dir(path: str | Path, flag: str | None = None) -> Path:
    """The model directory a user names: a stage's output (its ``model/`` holds the model)
    or a model directory itself. One with no ``config.json`` either way is an InputError
    naming it and ``flag``, the option it came from. (Filesystem only: the CLI checks its
    arguments with it before importing torch.)"""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file():
        said = f"{flag}: " if flag else ""
        raise InputError(f"{said}not a run or model directory (no config.json)", file=str(path))
    return path
