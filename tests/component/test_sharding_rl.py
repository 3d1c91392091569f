"""Online RL sharded on torch's FSDP2 (``rl.sharding=fsdp2``), on CPU processes with gloo:
two processes against one (tests/component/fsdp_worker.py ``rl``), and the one-process launch
refused. A file of its own so that the suite's workers run it beside the offline stages'
sharding tests (tests/component/test_sharding.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.component.test_sharding import ROOT, _metric_rows
from tests.conftest import free_port, subprocess_env


def _launch_rl_worker(tmp_path: Path) -> None:
    """tests/component/fsdp_worker.py's online RL (``rl``) on two gloo processes sharded and on one."""
    worker = str(ROOT / "tests" / "component" / "fsdp_worker.py")
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT) + ":" + env["PYTHONPATH"]
    runs = [[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
             worker, str(tmp_path / "fsdp2"), "fsdp2", "rl"],
            [sys.executable, worker, str(tmp_path / "one"), "ddp", "rl"]]
    for cmd in runs:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_online_rl_sharded_on_two_processes_matches_one_process(tmp_path):
    """``rl.sharding=fsdp2``: GRPO and PPO through ``run_rl`` (the CLI's path) on two gloo
    processes against one process (tests/component/fsdp_worker.py ``rl``: 3 steps of 8 rows,
    one minibatch of all rows and two epochs, micro-batches of 2, clipping at 0.5, held-out
    gold evaluations at steps 0, 2 and 3, each sharded run's policy, reference and critic
    sharded to the end). PPO stops early after step 2 (the untrained policy's gold does not
    move) and restores step 0's policy, saved gathered in best/, into its shards: exactly
    the starting weights, while its critic keeps what it learned. GRPO cut after 2 steps, with
    a checkpoint at step 1 (weights and AdamW's moments gathered whole), and resumed to 3 is
    the uninterrupted sharded run bit for bit: every figure, sample and weight.

    Measured: every logged figure within 1e-6 relative, but for small differences of nearly
    equal numbers (the sequence KL, 1e-5 relative and 1.8e-7 absolute; the explained variance,
    4e-6 relative) and float noise around 0 (the KL at step 1, where the policy is the
    reference: +-6e-8; the sampler/trainer gap, ~5e-8 either way, which on one process is as
    far from 0); tolerance 1e-5 relative with 1e-6 absolute. The weights within 5.4e-6
    (GRPO's policy after 6 AdamW steps) and 4.3e-7 (PPO's critic after 4): AdamW divides by
    sqrt(v), so float32 reduction-order noise grows to ~1e-5 in weights (the offline stages
    land as far, test above); tolerance 5e-5. The samples drawn with the weights gathered for each rollout
    (each process its half of the prompts) are the one-process run's, text for text, at
    every step. The saved model (gathered on rank 0) reloads in plain transformers with the
    gathered weights' logits to 3e-8 (the run fuses GPT-2's gelu, a reload does not)."""
    _launch_rl_worker(tmp_path)
    import torch
    from safetensors.torch import load_file

    for algo in ("grpo", "ppo"):
        sharded, one = (json.loads((tmp_path / n / algo / "reload.json").read_text()) for n in ("fsdp2", "one"))
        assert sharded["processes"] == 2 and one["processes"] == 1
        models = ["policy", "reference"] + (["value"] if algo == "ppo" else [])
        assert sharded["types"] == {m: ["DTensor"] for m in models}, sharded["types"]
        assert one["types"] == {m: ["Parameter"] for m in models}
        assert sharded["reload"] < 1e-6 and one["reload"] < 1e-6
        a, b = (_metric_rows(tmp_path / n / algo / "run" / "metrics.jsonl") for n in ("fsdp2", "one"))
        steps = [1, 2, 3] if algo == "grpo" else [1, 2]
        assert [r["step"] for r in a] == [r["step"] for r in b] == [0, *steps]
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            for k, v in rb.items():
                if isinstance(v, float) and not k.startswith("time/"):
                    assert ra[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (algo, rb["step"], k)
        for step in steps:
            texts = [json.loads((tmp_path / "fsdp2" / algo / "samples" / f"{r}-{step}.json").read_text())
                     for r in (0, 1)]
            alone = json.loads((tmp_path / "one" / algo / "samples" / f"0-{step}.json").read_text())
            assert [len(t) for t in texts] == [4, 4] and texts[0] + texts[1] == alone, (algo, step)
        assert len(set(alone)) > 1  # sampled, not one string
        if algo == "grpo":  # resumed from its checkpoint: the uninterrupted run exactly
            resumed = _metric_rows(tmp_path / "fsdp2" / algo / "resumed" / "metrics.jsonl")
            assert [{k: v for k, v in r.items() if not k.startswith("time/")} for r in resumed] == \
                [{k: v for k, v in r.items() if not k.startswith("time/")} for r in a]
            wr, wu = (load_file(str(tmp_path / "fsdp2" / algo / d / "model" / "model.safetensors"))
                      for d in ("resumed", "run"))
            assert wr.keys() == wu.keys() and all(torch.equal(wr[k], wu[k]) for k in wu)
            for name in ("0-3.json", "1-3.json"):
                assert (tmp_path / "fsdp2" / algo / "resumed-samples" / name).read_text() == \
                    (tmp_path / "fsdp2" / algo / "samples" / name).read_text()
        files = ["model/model.safetensors"] + (["value.safetensors"] if algo == "ppo" else [])
        for name in files:
            wa, wb = (load_file(str(tmp_path / n / algo / "run" / name)) for n in ("fsdp2", "one"))
            assert wa.keys() == wb.keys()
            for k in wb:
                assert torch.allclose(wa[k], wb[k], atol=5e-5, rtol=0), (algo, name, k, (wa[k] - wb[k]).abs().max())
        start = load_file(str(tmp_path / "fsdp2" / "sft" / "model.safetensors"))
        final = load_file(str(tmp_path / "fsdp2" / algo / "run" / "model" / "model.safetensors"))
        summary = json.loads((tmp_path / "fsdp2" / algo / "run" / "metrics.json").read_text())
        if algo == "grpo":  # it trained
            assert (final["transformer.wte.weight"] - start["transformer.wte.weight"]).abs().max() > 1e-3
        else:  # stopped early, the best (first) policy restored
            assert summary["early_stop/restored_best"] and summary["steps"] == 2
            assert final.keys() == start.keys() and all(torch.equal(final[k], start[k]) for k in start)


def test_a_sharded_online_run_on_one_process_exits_with_one_line(tmp_path):
    """The CLI, one process: the refusal comes before any model loads (the --sft directory
    holds only a config.json, which the CLI looks for) or anything is written, exit code 2."""
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "grpo", "--config", str(ROOT / "configs" / "tiny.yaml"),
                           "--sft", str(tmp_path / "sft"), "--reward-fn", "gold", "--out", str(tmp_path / "o"),
                           "--set", "rl.sharding=fsdp2"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "field 'rl.sharding': fsdp2 shards the weights over several processes" in proc.stderr
    assert not (tmp_path / "o").exists()
