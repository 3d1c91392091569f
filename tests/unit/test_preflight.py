"""A mistyped path is refused before torch and transformers are imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")

PROBE = """
import sys
from rlhflab.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules)
print(rc, ",".join(heavy) or "-")
"""


@pytest.mark.parametrize(("argv", "needle"), [
    (["sft", "--config", TINY, "--data", "{d}/nope.jsonl", "--out", "{d}/o"], "nope.jsonl: cannot open"),
    (["dpo", "--config", TINY, "--sft", "{d}", "--out", "{d}/o"], "--sft: not a run or model directory"),
    (["eval", "--policy", "{d}/p", "--base", "{d}/p", "--prompts", "{d}/p.jsonl", "--out", "{d}/o"],
     "p.jsonl: cannot open"),
    (["grpo", "--config", TINY, "--sft", "{d}/none", "--out", "{d}/o"], "--sft: not a run or model directory"),
    (["sft", "--config", TINY, "--out", "{d}/file/o"], "not a directory"),
])
def test_bad_paths_fail_before_the_libraries_load(tmp_path, argv, needle):
    (tmp_path / "file").write_text("x")
    args = [a.replace("{d}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    rc, heavy = proc.stdout.split()
    assert rc == "2" and heavy == "-", (proc.stdout, proc.stderr)
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
