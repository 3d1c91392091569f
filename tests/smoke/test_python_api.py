"""The Python API example of docs/user-data.md, run as it is written there."""

from __future__ import annotations

import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    doc = (ROOT / "docs" / "user-data.md").read_text()
    section = doc[doc.index("## The Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    code = code.replace('"configs/tiny.yaml"', repr(str(ROOT / "configs" / "tiny.yaml")))
    namespace: dict = {}
    exec(compile(code, "docs/user-data.md", "exec"), namespace)
    verdict, kl = capsys.readouterr().out.strip().splitlines()[-1].rsplit(" ", 1)
    assert verdict == namespace["result"]["verdict"] and math.isfinite(float(kl))
    assert (tmp_path / "runs" / "api" / "grpo" / "model" / "model.safetensors").is_file()
    assert "win_rate/gold" in namespace["readings"]  # the world's instruments, gold judge included
