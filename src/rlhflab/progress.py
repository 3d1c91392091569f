"""Progress bars with the live figures that matter (loss, KL, reward), via rich."""

from __future__ import annotations

import contextlib
import sys


class _Bar:
    def __init__(self, progress, task) -> None:
        self.progress, self.task = progress, task

    def update(self, advance: int = 1, **figures: float) -> None:
        if self.progress is None:
            return
        stats = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        self.progress.update(self.task, advance=advance, **({"stats": stats} if figures else {}))


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True):
    """``with progress_bar(n, "sft") as bar: bar.update(loss=...)``; silent when disabled."""
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[stats]}"))
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, stats="")
        yield _Bar(progress, task)
