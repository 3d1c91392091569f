"""Run directories and atomic artifact writes.

A stage writes into its own output directory. A directory that already holds a run is
refused unless the user passes ``--overwrite``; every file is written to a temp name and
renamed, so an interrupted stage leaves no half-written artifact.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhflab.errors import InputError


def check_out_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an output directory that holds anything, unless ``overwrite``. Writes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError("output path exists and is not a directory", file=str(path))
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise InputError("holds an earlier run; pass --overwrite to replace it", file=str(path))
    return path


def prepare_out_dir(path: str | Path, overwrite: bool) -> Path:
    """``check_out_dir``, then empty (if overwriting) and create the directory."""
    path = check_out_dir(path, overwrite)
    if path.is_dir() and overwrite:
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


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


@contextlib.contextmanager
def atomic_directory(out: str | Path):
    """Yield a temp directory beside ``out``; on success it replaces ``out`` by renames.

    An interrupted write leaves no half-written ``out``, and an existing ``out`` is replaced
    only once the new one is complete.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
