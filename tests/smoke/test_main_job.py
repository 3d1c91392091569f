"""The main job as a user runs it: ``rlhflab run --config configs/tiny.yaml`` with no
overrides, in a fresh process, to the report (about 80 s on 2 cores).

The tiny preset is sized for seconds per stage, not for learning (its arms barely move
from SFT), so the test asserts what must hold at any size: every stage completes and
writes its artifacts, every arm is evaluated and diagnosed, and the online arms' sampler
and trainer agree (the readings that would have caught a decoding loop that lost its KV
cache: a first-step KL of 41 nats where it must be 0). The headline at the demo's size,
every arm improving gold over SFT, is ``tests/demo/test_main_job_demo.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(main_job_dir):
    return main_job_dir  # conftest's session fixture: the docs' tests read the same run


def test_every_stage_writes_its_artifacts_and_the_report(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    arms = ["ppo", "dpo", "grpo"]  # the preset's run.arms (the default)
    for stage in ["world", "sft", "rm", "rm_eval", *arms, *(f"eval_{a}" for a in arms), "bandit_frontier"]:
        assert stage in summary, stage
    for arm in arms:
        assert (run_dir / arm / "model" / "model.safetensors").is_file()
        for name in ("eval.json", "diagnosis.json", "samples.json"):
            assert (run_dir / "eval" / arm / name).is_file(), (arm, name)
    html = (run_dir / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and all(arm in html for arm in arms)


def test_every_arm_gets_a_verdict_with_its_evidence(run_dir):
    for arm in ("ppo", "dpo", "grpo"):
        diagnosis = json.loads((run_dir / "eval" / arm / "diagnosis.json").read_text())
        assert diagnosis["verdict"]
        proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "diagnose", str(run_dir / "eval" / arm)],
                              env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith(f"verdict: {diagnosis['verdict']}"), proc.stderr


@pytest.mark.parametrize("arm", ["ppo", "grpo"])
def test_online_arms_sampler_and_trainer_agree(run_dir, arm):
    """Every step logs the mismatch readings; at float precision (measured <= 1e-6 nats).
    At step 1 the policy is the reference, so the rollout's KL is 0 up to the same rounding."""
    rows = [json.loads(line) for line in (run_dir / arm / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] >= 1]
    assert steps and all("rollout/logprob_diff_max" in r for r in steps)
    assert max(r["rollout/logprob_diff_max"] for r in steps) < 1e-4
    assert all(r["rollout/first_ratio_mean"] == pytest.approx(1, abs=1e-4) for r in steps)
    assert steps[0]["objective/kl"] == pytest.approx(0, abs=1e-4)


def test_an_online_arms_bad_setting_stops_the_job_before_anything_is_written(tmp_path, capsys):
    """An RL setting that only an arm's resolution can judge (GRPO's groups of 3 do not divide
    a batch of 16) is caught before SFT trains, not after: one line, exit 2, no directory."""
    from rlhflab.cli import main

    out = tmp_path / "run"
    assert main(["run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out),
                 "--set", "rl.samples_per_prompt=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rl.batch_size" in err[0]
    assert not out.exists()
