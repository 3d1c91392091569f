"""Metric sinks. ``metrics.jsonl`` always: one flat dict with namespaced keys per line;
and, when the run was given trackers (``report_to``: TensorBoard, W&B, mlflow), the same
numbers through accelerate's ``accelerator.log``."""

from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path


class MetricsLog:
    """Append-only JSONL of step metrics; flushed every line so a crash loses nothing.

    The one sink the loops call: with ``accelerator`` given and its trackers started
    (``distributed.trackers``), every line's numbers also go to ``accelerator.log`` at the
    same step (text and missing values stay in the JSONL only)."""

    def __init__(self, path: str | Path | None, enabled: bool = True, accelerator=None) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        self.rows: list[dict] = []
        self._fh = self.path.open("a", encoding="utf-8") if self.enabled else None
        self._tracked = accelerator if enabled else None

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        self.rows.append(row)
        if self._fh is not None:
            safe = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            self._fh.write(json.dumps(safe) + "\n")
            self._fh.flush()
        if self._tracked is not None and getattr(self._tracked, "trackers", None):
            numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, Real)}
            if numbers:
                self._tracked.log(numbers, step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
