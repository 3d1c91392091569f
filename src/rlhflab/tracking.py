"""Metric sinks. ``metrics.jsonl`` always: one flat dict with namespaced keys per line."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Append-only JSONL of step metrics; flushed every line so a crash loses nothing."""

    def __init__(self, path: str | Path | None, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None
        self.rows: list[dict] = []
        self._fh = self.path.open("a", encoding="utf-8") if self.enabled else None

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()}}
        self.rows.append(row)
        if self._fh is not None:
            safe = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            self._fh.write(json.dumps(safe) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
