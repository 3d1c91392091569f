"""rlhflab rlaif on the world's pairs: soft labels that rlhflab's preference reader takes, the
instruments, and a malformed constitution or pairs file refused in one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

from rlhflab.data import load_rows


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rlhflab.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_rlaif_labels_world_pairs(tmp_path):
    from rlhflab.commands.world import export_world
    from rlhflab.config import load_config

    export_world(load_config("configs/tiny.yaml"), tmp_path / "w")
    r = _cli("rlaif", "--pairs", str(tmp_path / "w" / "preferences.jsonl"), "--out", str(tmp_path / "r"), cwd=".")
    assert r.returncode == 0, r.stderr
    rows = load_rows(tmp_path / "r" / "pairs.jsonl", "preference")
    assert rows and all(0.5 <= x["label_prob"] <= 1.0 and x["source"] == "ai" for x in rows)
    m = json.loads((tmp_path / "r" / "rlaif.json").read_text())
    assert m["rlaif/pairs"] == len(rows) and m["rlaif/unreadable"] == 0.0
    for key in ("rlaif/agree_gold", "rlaif/agree_human", "rlaif/ece", "judge/position_bias",
                "rlaif/agree_gold/principle/harmless", "rlaif/agree_gold/benign"):
        assert key in m
    # a bad constitution: file, line, field; exit 2, nothing written
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles:\n  - id: x\n    aspect: kindness\n    critique: a\n    revision: b\n    comparison: c\n")
    r = _cli("rlaif", "--pairs", str(tmp_path / "w" / "preferences.jsonl"), "--constitution", str(bad),
             "--out", str(tmp_path / "r2"), cwd=".")
    assert r.returncode == 2 and f"{bad}:3: field 'aspect'" in r.stderr and not (tmp_path / "r2").exists()
    # a bad label_prob in a pairs file
    row = {"prompt": "what is 1 plus 1 ?", "chosen": "2 .", "rejected": "3 .", "label_prob": 1.5}
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    r = _cli("rlaif", "--pairs", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "r3"), cwd=".")
    assert r.returncode == 2 and "p.jsonl:1: field 'label_prob'" in r.stderr
