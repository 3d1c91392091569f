"""Online RL loops on a tiny model: learning, a frozen reference, resume after SIGKILL,
and 2 processes equal 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.algos.grpo import train_grpo
from rlhflab.algos.online import OnlineRun
from rlhflab.algos.rl_config import resolve_rl_config
from rlhflab.config import load_config
from rlhflab.distributed import make_accelerator
from rlhflab.models import load_causal_lm, load_tokenizer
from rlhflab.rewards import build_reward
from rlhflab.world import World
from tests.component.test_rl_rollout import tiny_policy_dir
from tests.conftest import ROOT, free_port, subprocess_env

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return tiny_policy_dir(tmp_path_factory.getbasetemp())


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_grpo_learns_and_the_reference_stays_frozen(policy_dir):
    """GRPO with the hackable reward -(number of words) from a random tiny policy: the policy
    learns to end early. Measured (rl.seed 0 and 1): mean score -11.4 over the first two
    steps -> -0.1 over steps 9-10 (12 words at most); the bar is a gain of 6 words. The reference is
    bit-identical to the weights on disk afterwards and never had a gradient, while the
    policy moved."""
    cfg = load_config(TINY, ["rl.steps=10", "rl.batch_size=32", "rl.lr=2e-2", "rl.eval_every=0",
                             "generation.max_new_tokens=12"])
    cfg.rl = resolve_rl_config(cfg.rl, "grpo")
    tok = load_tokenizer(policy_dir)
    policy, reference = load_causal_lm(policy_dir, tok), load_causal_lm(policy_dir, tok)
    world = World(cfg.world)
    run = OnlineRun(cfg, "grpo", make_accelerator(), policy, reference, tok, build_reward(None, ["length"]),
                    [p.text for p in world.prompts(64, "rl")])
    train_grpo(run)
    scores = [r["objective/scores"] for r in run.log.rows]
    assert len(scores) == 10
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 6
    on_disk = load_file(str(policy_dir / "model.safetensors"))
    ref_state = reference.state_dict()
    for name, tensor in on_disk.items():
        assert torch.equal(ref_state[name], tensor), name
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    moved = max((a - on_disk[n]).abs().max().item() for n, a in policy.state_dict().items() if n in on_disk)
    assert moved > 1e-3


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rlhflab.cli", *args]


def _env() -> dict:
    return {**subprocess_env(), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, policy_dir):
    """PPO (critic, two optimizer groups, adaptive KL controller) for 8 steps with a
    checkpoint every 2 steps. One run is killed with SIGKILL as soon as its first
    checkpoint exists and resumed with ``--resume``; it ends with the same per-step
    metrics and the same weights as a run that was never interrupted. Sampling is seeded
    per row and step, minibatches per step, so on CPU the two are bit-identical (measured
    max |diff| 0); the tolerance is 1e-6."""
    common = ["ppo", "--config", str(TINY), "--sft", str(policy_dir), "--reward-fn", "length",
              "--set", "rl.steps=8", "--set", "rl.batch_size=8", "--set", "rl.save_every=2",
              "--set", "rl.epochs=1", "--set", "rl.num_minibatches=2", "--set", "rl.eval_every=4",
              "--set", "rl.n_eval=8", "--set", "rl.kl_controller=adaptive", "--set", "rl.kl_target=0.5",
              "--set", "rl.kl_horizon=100", "--set", "generation.max_new_tokens=8", "--set", "rl.lr=3e-3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.Popen(_cli(common + ["--out", str(killed)]), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    assert json.loads(state.read_text())["step"] < 8

    from rlhflab.cli import main

    assert main(["ppo", "--resume", str(killed)]) == 0
    assert main(common + ["--out", str(full)]) == 0

    a, b = _rows(full / "metrics.jsonl"), _rows(killed / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, *range(1, 9)]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if key.startswith("time/") or not isinstance(value, float):
                continue
            assert rb[key] == pytest.approx(value, abs=1e-6), (ra["step"], key)
    for name in ("model/model.safetensors", "value.safetensors"):
        wa, wb = load_file(str(full / name)), load_file(str(killed / name))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6, name


@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process(tmp_path, policy_dir):
    """PPO at a global batch of 16 with one minibatch and 2 epochs: ``accelerate launch
    --num_processes 2`` (each process samples and scores its 8 rows, whitening and counts
    reduced over both) against one process. Rows are sampled from per-row seeds, so both
    layouts draw the same responses. Measured: metrics agree to 1.1e-5 relative at worst,
    weights to 6.7e-6 (float32 summation order); tolerances 1e-4 and 1e-4."""
    common = ["ppo", "--config", str(TINY), "--sft", str(policy_dir), "--reward-fn", "length",
              "--set", "rl.steps=3", "--set", "rl.batch_size=16", "--set", "rl.num_minibatches=1",
              "--set", "rl.epochs=2", "--set", "rl.eval_every=0", "--set", "generation.max_new_tokens=10",
              "--set", "rl.lr=3e-3"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", free_port(), "-m", "rlhflab.cli"]
    proc = subprocess.run(launch + common + ["--out", str(tmp_path / "dp")], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from rlhflab.cli import main

    assert main(common + ["--out", str(tmp_path / "sp")]) == 0
    assert json.loads((tmp_path / "dp" / "metrics.json").read_text())["processes"] == 2
    dp, sp = _rows(tmp_path / "dp" / "metrics.jsonl"), _rows(tmp_path / "sp" / "metrics.jsonl")
    assert len(dp) == len(sp) == 3
    for a, b in zip(dp, sp):
        for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "policy/approxkl",
                    "rollout/length_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for name in ("model/model.safetensors", "value.safetensors"):
        wa, wb = load_file(str(tmp_path / "dp" / name)), load_file(str(tmp_path / "sp" / name))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4, name
