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
