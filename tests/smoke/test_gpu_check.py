"""bench/gpu_check.py's CPU path: ``--tiny --device cpu`` runs SFT -> RM -> PPO and DPO in
bf16 with sdpa, with and without LoRA, in a fresh process, and writes every reading the GPU
run will report (finite numbers; the GPU memory null on a CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.conftest import load_bench, subprocess_env

ROOT = Path(__file__).resolve().parents[2]

STAGE_KEYS = {
    "sft": {"seconds", "peak_gpu_memory_mb", "peak_rss_mb", "examples_per_s", "gold", "eval_loss", "parameters",
            "response_tokens", "mfu_lower_bound"},
    "rm": {"seconds", "peak_gpu_memory_mb", "peak_rss_mb", "groups_per_s", "eval_accuracy"},
    "dpo": {"seconds", "peak_gpu_memory_mb", "peak_rss_mb", "pairs_per_s", "gold", "kl", "win_rate_gold",
            "eval_loss"},
    "ppo": {"seconds", "peak_gpu_memory_mb", "peak_rss_mb", "samples_per_s", "response_tokens_per_s",
            "rollout_share", "gold_initial", "gold", "kl", "rollout/logprob_diff_max", "rollout/logprob_diff_mean",
            "rollout/first_ratio_mean_min", "guard_would_stop"},
}


def _finite_readings(stage: dict, keys: set[str]) -> None:
    assert set(stage) == keys, set(stage) ^ keys
    assert stage["peak_gpu_memory_mb"] is None  # a CPU run: no GPU reading, not a zero
    for k, v in stage.items():
        if k not in ("peak_gpu_memory_mb", "guard_would_stop", "mfu_lower_bound"):
            assert isinstance(v, (int, float)) and math.isfinite(v), (k, v)


def test_the_gpu_check_runs_shrunk_on_a_cpu(tmp_path):
    out = tmp_path / "gc"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(out)], env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] is True and result["device"] == "cpu" and result["tiny"] is True
    assert "model.attn_implementation=sdpa" in result["overrides"] and "rl.mixed_precision=bf16" in result["overrides"]
    _finite_readings(result["sft"], STAGE_KEYS["sft"])
    assert result["sft"]["mfu_lower_bound"] is None and result["sft"]["response_tokens"] > 0  # no peak FLOP/s for a CPU
    engine = result["engine"]
    assert engine["prompts"] == 16 and engine["peak_gpu_memory_mb"] is None
    for side in ("engine", "hf_generate"):
        assert engine[side]["response_tokens"] > 0 and engine[side]["tokens_per_s"] > 0, side
    assert engine["engine_over_hf"] > 0
    assert set(result["arms"]) == {"full", "lora"}
    for arm, r in result["arms"].items():
        for stage in ("rm", "dpo", "ppo"):
            _finite_readings(r[stage], STAGE_KEYS[stage])
        assert r["ppo"]["guard_would_stop"] is False, arm  # the tiny model's bf16 gap is < 0.01 nats
        assert set(r["gold"]) == {"sft", "dpo", "ppo"} and all(math.isfinite(g) for g in r["gold"].values())
    # The adapters' run really is one: its saved DPO policy carries a peft adapter, the full arm's none.
    assert (out / "lora" / "dpo" / "model" / "adapter" / "adapter_config.json").is_file()
    assert not (out / "full" / "dpo" / "model" / "adapter").exists()


def test_a_bad_setting_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(tmp_path), "--set", "rl.steps=0"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "rl.steps" in proc.stderr


def test_the_full_size_settings_are_valid_and_make_a_100m_model():
    """The GPU run's own settings (not runnable here): they validate, with and without LoRA,
    and the created Llama has about 100M parameters (113M with the world's vocabulary)."""

    import torch

    from rlhflab import api
    from rlhflab.models import count_parameters, create_causal_lm
    from rlhflab.world import World

    gc = load_bench("gpu_check")
    cfg = api.load_config(str(ROOT / "configs" / "demo.yaml"), gc.FULL + gc.COMMON + gc.LORA)
    assert cfg.lora.r == 16 and cfg.rl.mixed_precision == "bf16" and cfg.model.attn_implementation == "sdpa"
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    with torch.device("meta"):
        model = create_causal_lm(cfg.model, tok)
    assert 90e6 < count_parameters(model) < 130e6


def test_a_stage_past_the_budget_is_recorded_as_skipped_and_the_check_fails(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(tmp_path), "--budget-s", "0"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] is False and result["sft"] == {"error": "skipped: past --budget-s"} and result["arms"] == {}
