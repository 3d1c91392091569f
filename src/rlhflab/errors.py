"""Errors that reach the user as one line: bad input (exit code 2) and a run that cannot go on
(exit code 1)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: a file, a line (or, with ``unit="row"``, a row of a
    Parquet / Arrow table), a field, what was expected.

    The CLI prints ``str(err)`` on one line to stderr and exits with code 2.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        unit: str = "line",
    ) -> None:
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = ""
        if file is not None:
            at = "" if line is None else f":{line}" if unit == "line" else f":{unit} {line}"
            where = str(file) + at + ": "
        what = f"field '{field}': " if field is not None else ""
        super().__init__(f"{where}{what}{message}".replace("\n", " "))


class RunError(RuntimeError):
    """A run that must stop because its numbers would be wrong (for instance the sampler and
    the trainer disagree). The CLI prints ``str(err)`` on one line and exits with code 1."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\n", " "))


class NonFiniteError(InputError):
    """Training met a non-finite loss or gradient and stopped before the optimizer step
    (so the weights are those of the last good step; nothing is saved). Exit code 2."""


_DISK_FULL_WORDS = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded", "os error 122")


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` (or an exception it was raised from) is a full disk or quota:
    an OSError with errno ENOSPC / EDQUOT, or a library's error whose text says so
    (safetensors' and tokenizers' Rust writers report ``No space left on device (os error 28)``).
    An ``InputError`` is never one: it is already the one line."""
    import errno

    for e in _chain(err):
        if isinstance(e, InputError):
            return False
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(word in str(e).lower() for word in _DISK_FULL_WORDS):
            return True
    return False


def disk_full_error(err: BaseException, where, *, kept=None, earlier: bool = False, staged=None) -> InputError:
    """The one line for a full disk: the file that could not be written (``err``'s, else
    ``where``; one in a run's staging directory ``staged`` = (staging, place) named as it would
    be at its place), the space now free on its file system, and what became of the run:
    nothing kept, the earlier run as it was (``earlier``), or what it finished kept at ``kept``."""
    import shutil
    from pathlib import Path

    path = str(next((e.filename for e in _chain(err) if isinstance(e, OSError) and e.filename), None) or where)
    if staged is not None:
        work, final = (str(p) for p in staged)
        if path == work or path.startswith(work + "/"):
            path = final + path[len(work):]
    place = Path(path).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        usage = shutil.disk_usage(place)
        free = f"{_size(usage.free)} free of {_size(usage.total)} on the file system of {place}"
    except OSError:
        free = f"free space on the file system of {place} unknown"
    fate = (f"what the run finished is kept in {kept}" if kept is not None else
            "the earlier run is as it was" if earlier else "nothing of the run was kept")
    return InputError(f"no space left on device ({free}); {fate}; free some space and run it again",
                      file=str(path))


def _chain(err: BaseException | None):
    """``err`` and the exceptions it was raised from or during."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
