"""SFT with tiny models: accumulation and data parallelism equal one large batch."""

import subprocess
import sys

import pytest
import torch

from rlhflab.algos.sft import tokenize_rows, train_sft
from rlhflab.config import load_config
from rlhflab.models import create_causal_lm
from rlhflab.world import World
from tests.conftest import free_port, subprocess_env


def _train(cfg, micro):
    cfg.sft.micro_batch_size = micro
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=0)
    train, _ = tokenize_rows(world.sft_examples(128), tok, cfg.sft.max_length)
    held, _ = tokenize_rows(world.sft_examples(32, "sft_eval"), tok, cfg.sft.max_length)
    summary = train_sft(cfg.sft, model, tok, train, held)
    return model, summary


def test_gradient_accumulation_4x8_equals_batch_of_32(tiny_config_path):
    """Each micro-batch's NLL is divided by the token count of the whole batch, so four
    micro-batches of 8 accumulate exactly the gradient of one batch of 32; only float32
    summation order differs (measured max |diff| of weights after 4 steps ~1e-7)."""
    cfg = load_config(tiny_config_path, ["sft.max_steps=4", "sft.batch_size=32"])
    big, s_big = _train(cfg, None)
    small, s_small = _train(cfg, 8)
    assert s_small["train/loss"] == pytest.approx(s_big["train/loss"], rel=1e-5)
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_mean_of_micro_batch_means_would_differ(tiny_config_path):
    """Guard that the test above can fail: rows differ in length, so a naive per-micro-batch
    mean gives a different gradient from the token mean of the whole batch."""
    cfg = load_config(tiny_config_path)
    world = World(cfg.world)
    tok = world.tokenizer()
    train, _ = tokenize_rows(world.sft_examples(32), tok, 64)
    lengths = [len(x.input_ids) - x.n_prompt for x in train]
    per_micro = [sum(lengths[i:i + 8]) for i in range(0, 32, 8)]
    assert len(set(per_micro)) > 1


def _run_sft(args, launcher):
    cmd = launcher + ["-m", "rlhflab.cli", "sft", *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process(tmp_path, tiny_config_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo; see distributed.py)
    against one process at the same global batch of 32. Each process takes half of every
    global batch and gradients are averaged; the loss is normalized by the global token
    count, so the two runs compute the same updates up to float32 reduction order.
    Measured: held-out losses agree to ~1e-7 relative over 12 steps; tolerance 1e-5."""
    import json

    common = ["--config", str(tiny_config_path), "--set", "sft.max_steps=12", "--set", "sft.eval_every=4",
              "--set", "sft.n_samples=8"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", free_port()]
    _run_sft(common + ["--out", str(tmp_path / "dp")], accelerate)
    _run_sft(common + ["--out", str(tmp_path / "sp")], [sys.executable])

    def evals(d):
        rows = [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [r["eval/loss"] for r in rows if "eval/loss" in r]

    dp, sp = evals("dp"), evals("sp")
    assert json.loads((tmp_path / "dp" / "metrics.json").read_text())["train/processes"] == 2
    assert len(dp) == len(sp) == 4
    assert dp[-1] < dp[0]
    for a, b in zip(dp, sp):
        assert a == pytest.approx(b, rel=1e-5)
