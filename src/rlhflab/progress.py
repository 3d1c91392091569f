"""Progress with the live figures that matter (loss, KL, reward): a rich bar on a terminal,
and plain log lines otherwise (nohup, SLURM, a pipe), so that a cluster job's log shows the
same figures as the bar.

Without a terminal a line is written to stderr at the first step, then at most every
``RLHFLAB_LOG_SECONDS`` seconds (default 30) and at the last step::

    [ppo] step 40/200 (20%)  1m12s elapsed, ~4m48s left  reward 0.41  kl 0.12  beta 0.05

Work that has no loop of its own to put a bar on (decoding batch after batch deep inside an
instrument) shows one when a command asks for it: inside ``with labelled("bon"):`` every call
of the decoding engine with more than one batch shows ``[bon] batch 3/40 ...``
(``generation.generate`` reads ``current_label``). Training loops, with their own bars, do
not ask.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time

LOG_SECONDS_DEFAULT = 30.0


def _figures(figures: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class _Bar:
    def __init__(self, progress, task) -> None:
        self.progress, self.task = progress, task

    def update(self, advance: int = 1, **figures: float) -> None:
        if self.progress is None:
            return
        self.progress.update(self.task, advance=advance, **({"stats": _figures(figures)} if figures else {}))


class _LogLines:
    """The bar's figures as plain lines, rate-limited by wall-clock time."""

    def __init__(self, total: int, description: str, stream, every_s: float, unit: str = "step") -> None:
        self.total, self.description, self.stream, self.every_s = total, description, stream, every_s
        self.unit = unit
        self.done = 0
        self.start = time.monotonic()
        self.last: float | None = None

    def update(self, advance: int = 1, **figures: float) -> None:
        self.done += advance
        now = time.monotonic()
        final = self.done >= self.total
        if self.last is not None and not final and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        left = f", ~{_clock(elapsed / self.done * (self.total - self.done))} left" if 0 < self.done < self.total else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        stats = _figures(figures)
        print(f"[{self.description}] {self.unit} {self.done}/{self.total}{share}  {_clock(elapsed)} elapsed{left}"
              + (f"  {stats}" if stats else ""), file=self.stream, flush=True)


def log_seconds() -> float:
    """``RLHFLAB_LOG_SECONDS`` (seconds between plain log lines), or 30."""
    raw = os.environ.get("RLHFLAB_LOG_SECONDS", "")
    try:
        value = float(raw) if raw.strip() else LOG_SECONDS_DEFAULT
    except ValueError:
        value = LOG_SECONDS_DEFAULT
    return value if value >= 0 else LOG_SECONDS_DEFAULT


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "step"):
    """``with progress_bar(n, "sft") as bar: bar.update(loss=...)``; silent when disabled.
    ``unit`` names what is counted in the plain lines ("step", "batch")."""
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.console import Console

    console = Console(file=sys.stderr)
    if not console.is_terminal:
        yield _LogLines(total, description, sys.stderr, log_seconds(), unit)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[stats]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, stats="")
        yield _Bar(progress, task)


_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("rlhflab_progress_label", default=None)


@contextlib.contextmanager
def labelled(label: str, enabled: bool = True):
    """Inside the block, long work without a loop of its own to show (the decoding engine's
    batches) shows progress under ``label`` (see the module docstring)."""
    token = _LABEL.set(label if enabled else None)
    try:
        yield
    finally:
        _LABEL.reset(token)


def current_label() -> str | None:
    """The label of the innermost ``labelled`` block, or None outside any."""
    return _LABEL.get()
