"""Run directories and atomic artifact writes.

A stage writes into its own output directory. A directory that already holds a run is
refused unless the user passes ``--overwrite``; every file is written to a temp name and
renamed, so an interrupted stage leaves no half-written artifact.

Replacing a run (``run_directory`` with ``--overwrite``): the new run is written into a
hidden sibling, ``.<name>.new-<pid>``; only once it is complete is the earlier run renamed
aside (``.<name>.old-<pid>``), the new one renamed in, and the earlier one deleted. A run
that fails or is killed before that leaves the earlier run as it was; what a killed run
left beside it is swept (or, killed between the two renames, the swap finished) by the
next run into the same directory. A first run into a new directory writes in place, so
its progress can be watched and an online RL run killed mid-way can be resumed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from rlhflab.errors import InputError


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
    """Refuse an output directory that holds anything (unless ``overwrite``), one under a
    regular file, or one that cannot be written. Leaves nothing behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError("output path exists and is not a directory", file=str(path))
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError("holds an earlier run; pass --overwrite to replace it", file=str(path))
    base, absolute = _nearest_existing(path), path.absolute()
    if not base.is_dir():
        raise InputError(f"output path is under {base}, a file, not a directory", file=str(path))
    if base != absolute:
        _check_writable(base, path)  # where the directory will be created
    elif any(path.iterdir()):
        _check_writable(absolute.parent, path)  # a replacement is written beside the earlier run
    else:
        _check_writable(absolute, path)
    return path


def check_out_file(path: str | Path) -> Path:
    """An output file's place: not a directory, not under a regular file, writable."""
    path = Path(path)
    if path.is_dir():
        raise InputError("output path is a directory, not a file", file=str(path))
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
# Replacing a run only once the new one is complete


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
    """True for the hidden ``.<name>.new-<pid>`` directory a replacement run is written in
    (deleted if the run fails)."""
    return re.match(r"^\..+\.new-\d+$", Path(path).name) is not None


def sweep_leftovers(out: str | Path) -> None:
    """Clean up after a run into ``out`` that was killed: delete its unfinished
    ``.<name>.new-<pid>``; if it was killed between renaming the earlier run aside and the
    new one in (``out`` missing, both siblings present), finish the swap; if only the
    earlier run is aside, put it back; else delete the earlier run it had set aside."""
    out = Path(out)
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
    """The directory a run writes into: ``out`` itself (created) when it holds no run,
    else (``overwrite``) a new hidden sibling that ``finish_run`` renames over ``out``."""
    out = check_out_dir(out, overwrite)
    sweep_leftovers(out)
    if out.is_dir() and any(out.iterdir()):
        work = out.with_name(f".{out.name}.new-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        return work
    out.mkdir(parents=True, exist_ok=True)
    return out


def finish_run(work: Path, out: str | Path) -> Path:
    """Put the complete run in ``work`` at ``out``: the earlier run aside, the new one in
    (renames in one directory), the earlier one deleted."""
    out = Path(out)
    if Path(work) == out:
        return out
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    Path(work).rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def abandon_run(work: Path, out: str | Path, keep: str | None = None) -> None:
    """After a failed run: delete a hidden ``work`` directory (the earlier run at ``out``
    stays as it was). A first run written in place is deleted too, unless it holds
    ``keep`` (an online run's ``checkpoint``, to resume from)."""
    work = Path(work)
    if work != Path(out) or not (keep and (work / keep).exists()):
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def run_directory(out: str | Path, overwrite: bool, accelerator=None, keep: str | None = None):
    """Yield the directory a stage writes into (``begin_run``, on the main process; every
    process gets the same path); when the block completes, ``finish_run`` puts it at
    ``out``; when it raises, ``abandon_run``."""
    main = accelerator is None or accelerator.is_main_process
    work = begin_run(out, overwrite) if main else None
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        work = broadcast_object_list([work])[0]
    try:
        yield Path(work)
    except BaseException:
        if main:
            abandon_run(Path(work), out, keep)
        raise
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if main:
        finish_run(Path(work), out)
    if accelerator is not None:
        accelerator.wait_for_everyone()


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
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


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
