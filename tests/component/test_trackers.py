"""Trackers through accelerate: the numbers of metrics.jsonl also reach TensorBoard's event
files and a wandb offline run, read back here from their files."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rlhflab.config import load_config, report_to_overrides
from rlhflab.errors import InputError
from tests.conftest import subprocess_env

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


def _cli(args, tmp_path: Path) -> None:
    env = subprocess_env()
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path),
               MLFLOW_TRACKING_URI=(tmp_path / "mlruns").as_uri(), MLFLOW_ALLOW_FILE_STORE="true")
    proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _jsonl(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r.pop("step"): r for r in rows}


def _tensorboard(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _wandb_history(run_file: Path) -> dict[int, dict]:
    """The history records of an offline run's ``run-<id>.wandb``: wandb's LevelDB-style log
    (a 7-byte ':W&B' header, 32 KiB blocks of records with a 7-byte crc/length/type header,
    types full=1, first=2, middle=3, last=4) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, out = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                out[row.pop("_step")] = row
    return out


def test_sft_metrics_reach_tensorboard_and_wandb(tmp_path, tiny_config_path):
    trackers = "tensorboard,wandb,mlflow" if _has("mlflow") else "tensorboard,wandb"
    _cli(["sft", "--config", str(tiny_config_path), "--out", str(tmp_path / "sft"), "--report-to", trackers,
          "--set", "sft.max_steps=8"], tmp_path)
    out = tmp_path / "sft"
    logged = _jsonl(out / "metrics.jsonl")
    assert sorted(logged) == [0, 4, 8]
    tb = _tensorboard(out / "sft")
    assert sorted(tb["train/loss"]) == [4, 8] and sorted(tb["eval/loss"]) == [0, 8]
    for step, row in logged.items():
        for key, value in row.items():  # float32 in the event file
            assert tb[key][step] == pytest.approx(value, rel=1e-6), (key, step)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    assert sorted(history) == [0, 4, 8]
    for step, row in logged.items():
        for key, value in row.items():
            assert history[step][key] == pytest.approx(value, rel=1e-12), (key, step)
    if "mlflow" in trackers:  # file store: one metric file per key, "timestamp value step" lines
        files = list((tmp_path / "mlruns").glob("*/*/metrics/train/loss"))
        assert len(files) == 1
        steps = {int(line.split()[2]): float(line.split()[1]) for line in files[0].read_text().splitlines()}
        assert steps == pytest.approx({s: r["train/loss"] for s, r in logged.items() if "train/loss" in r})


def test_ppo_metrics_reach_tensorboard(tmp_path, tiny_config_path):
    """The online stage logs through the same sink: every step's objective/scores."""
    _cli(["sft", "--config", str(tiny_config_path), "--out", str(tmp_path / "sft"), "--set", "sft.max_steps=4"],
         tmp_path)
    _cli(["ppo", "--config", str(tiny_config_path), "--sft", str(tmp_path / "sft"), "--reward-fn", "gold",
          "--out", str(tmp_path / "ppo"), "--report-to", "tensorboard", "--set", "rl.steps=2"], tmp_path)
    logged = _jsonl(tmp_path / "ppo" / "metrics.jsonl")
    tb = _tensorboard(tmp_path / "ppo" / "ppo")
    scores = {s: r["objective/scores"] for s, r in logged.items() if "objective/scores" in r}
    assert sorted(scores) == [1, 2]
    assert tb["objective/scores"] == pytest.approx(scores, rel=1e-6)


def test_report_to_flag_sets_every_stage_and_is_checked():
    cfg = load_config(None, report_to_overrides("tensorboard, wandb"))
    assert cfg.sft.report_to == cfg.rm.report_to == cfg.dpo.report_to == cfg.rl.report_to == ["tensorboard", "wandb"]
    assert load_config(None).sft.report_to == []
    with pytest.raises(InputError, match="rl.report_to|sft.report_to"):
        load_config(None, report_to_overrides("tensorbored"))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_wandb_without_a_key_is_one_line_before_training(tmp_path, tiny_config_path, capsys, monkeypatch):
    """No API key and online mode: wandb's own error, once, and its half-started tracker
    cleaned up quietly (it was a second traceback from ``finish``); nothing trained or kept."""
    import rlhflab.algos.sft as sft
    from rlhflab.cli import main

    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_SILENT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setattr(sft, "train_sft", lambda *a, **k: pytest.fail("trained without its tracker"))
    out = tmp_path / "sft"
    assert main(["sft", "--config", str(tiny_config_path), "--out", str(out), "--report-to", "wandb",
                 "--set", "sft.max_steps=2", "--set", "world.n_sft=64", "--set", "world.n_sft_eval=8"]) == 2
    line = _one_error_line(capsys)
    assert "cannot start the trackers wandb" in line and "nothing was trained" in line and "API key" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("tracker", ["mlflow", "tensorboard", "wandb"])
def test_a_tracker_that_is_not_installed_is_one_line_before_any_model(tracker, tmp_path, tiny_config_path, capsys,
                                                                      monkeypatch):
    """accelerate drops a tracker it cannot import with a library warning, and the run
    tracked nothing: refused naming the field and the package, before a model is loaded."""
    import accelerate.utils

    import rlhflab.commands.sft as sft_command
    from rlhflab.cli import main
    from rlhflab.distributed import TRACKER_PACKAGES

    monkeypatch.setattr(accelerate.utils, TRACKER_PACKAGES[tracker][0], lambda: False)
    monkeypatch.setattr(sft_command, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "sft"
    assert main(["sft", "--config", str(tiny_config_path), "--out", str(out), "--report-to", f"tensorboard,{tracker}",
                 "--set", "sft.max_steps=2"]) == 2
    line = _one_error_line(capsys)
    assert "field 'sft.report_to'" in line and f"pip install {tracker}" in line
    assert not out.exists()


def test_mlflow_really_missing_is_refused(tmp_path, tiny_config_path, capsys):
    """The same without a stand-in, where mlflow is not installed (this environment)."""
    if _has("mlflow"):
        pytest.skip("mlflow is installed here")
    from rlhflab.cli import main

    assert main(["sft", "--config", str(tiny_config_path), "--out", str(tmp_path / "sft"), "--report-to", "mlflow"]) == 2
    assert "pip install mlflow" in _one_error_line(capsys)
