"""Sharded training: the accelerate presets of configs/accelerate/, what rlhflab refuses
(and why, one line naming ``distributed_type``), and torch's FSDP2 on rlhflab's models on a
CPU with gloo.

accelerate (1.15 here) sets FSDP up only on GPUs (``AcceleratorState`` turns a multi-GPU
state into FSDP; a MULTI_CPU one stays DDP), so a 2-process FSDP run of an rlhflab stage
cannot run here; torch's own ``fully_shard`` does, and is tested below on the tiny Llama
against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhflab import distributed
from rlhflab.errors import InputError
from tests.conftest import free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "configs" / "accelerate"
ENV_KEYS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE")


def test_every_preset_is_one_accelerate_reads():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp": ("MULTI_GPU", None), "fsdp1": ("FSDP", 1), "fsdp2": ("FSDP", 2),
                "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3)}
    assert {p.stem for p in PRESETS.glob("*.yaml")} == set(expected)
    for name, (kind, version) in expected.items():
        cfg = load_config_from_file(str(PRESETS / f"{name}.yaml"))
        assert str(cfg.distributed_type).endswith(kind), name
        if kind == "FSDP":
            assert cfg.fsdp_config["fsdp_version"] == version
            assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # saves gather whole weights
            assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        if kind == "DEEPSPEED":
            assert cfg.deepspeed_config["zero_stage"] == version


def test_an_fsdp_launch_on_a_cpu_is_refused_in_one_line(tmp_path):
    """Through accelerate launch with the FSDP2 preset: without the check the stage would run
    as plain DDP (measured: ``train/processes`` 2, parameters not sharded)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(PRESETS / "fsdp2.yaml"),
              "--num_processes", "2", "--main_process_port", free_port()]
    proc = subprocess.run(launch + ["-m", "rlhflab.cli", "sft", "--config", str(ROOT / "configs" / "tiny.yaml"),
                                    "--out", str(tmp_path / "sft")],
                          env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and not (tmp_path / "sft").exists()
    lines = [x for x in proc.stderr.splitlines() if "distributed_type" in x]
    assert lines and "FSDP (sft) needs GPUs" in lines[0] and "ddp.yaml" in lines[0]


@pytest.mark.parametrize(("env", "refused"), [
    ({}, False),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, False),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, True),
    ({"ACCELERATE_USE_FSDP": "true"}, True),
], ids=["ddp", "zero2", "zero3", "fsdp"])
def test_on_gpus_the_sharded_weights_are_refused_and_zero2_passes(monkeypatch, env, refused):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "has_accelerator", lambda: True)
    for section in ("sft", "rm", "dpo", "rl"):
        if refused:
            with pytest.raises(InputError, match="not supported.*whole model") as err:
                distributed.check_sharding(section)
            assert "distributed_type" in str(err.value) and "\n" not in str(err.value)
        else:
            distributed.check_sharding(section)


def _metric_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_sft_rm_and_dpo_sharded_on_two_processes_match_one_process(tmp_path):
    """``<stage>.sharding=fsdp2`` on two gloo processes (tests/component/fsdp_worker.py: each
    stage's training function, 4 AdamW steps with clipping, micro-batches of 4) against the
    plain loop on one.

    Measured: every logged figure (losses, accuracies, margins, gradient norms, held-out
    losses) within 3.6e-7 relative, or 1e-7 absolute for DPO's implicit rewards near 0 (but
    DPO's accuracy at step 1, where the policy is still the reference and each margin's sign
    is float noise of ~1e-8); weights within 2.2e-5 (a 2-process DDP run lands as far from one
    process: 3.3e-6 for both after 8 SFT steps of the CLI; AdamW divides by sqrt(v), so
    float32 reduction-order noise becomes ~1e-5 in weights); tolerance 1e-5 relative with 1e-6
    absolute, and 1e-4. One exception: the reward model's final-norm bias moves every reward
    alike, which the Bradley-Terry loss does not see, so its exact gradient is 0 and Adam
    turns float noise into steps of up to lr (1.2e-4 measured here, 1.3e-3 under DDP in a
    longer CLI run); bounded by steps x lr. DPO's monitor, handed the weights gathered on rank
    0 at steps 0, 2 and 4, sums them to within 2e-10 relative of the one-process policy's.
    Each saved model reloads in plain transformers with the gathered model's logits (exactly:
    Llama's rotary buffers, GPT-2's tied embeddings; 3e-8 where the loops fused GPT-2's
    gelu). Sampling inside ``distributed.whole_weights`` (3 prompts on rank 0, 4 on rank 1:
    different numbers of passes) draws exactly what the gathered whole model draws from the
    same seeds, and leaves the parameters sharded."""
    worker = str(ROOT / "tests" / "component" / "fsdp_worker.py")
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT) + ":" + env["PYTHONPATH"]
    runs = {"fsdp2": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      free_port(), worker, str(tmp_path / "fsdp2"), "fsdp2"],
            "one": [sys.executable, worker, str(tmp_path / "one"), "ddp"]}
    for cmd in runs.values():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    import torch
    from safetensors.torch import load_file

    sharded, one = (json.loads((tmp_path / n / "reload.json").read_text()) for n in ("fsdp2", "one"))
    assert sharded["processes"] == 2 and one["processes"] == 1
    for stage, lr in (("sft", 3e-3), ("rm", 3e-3), ("dpo", 5e-4)):
        assert sharded[f"{stage}_param_types"] == ["DTensor"], sharded[f"{stage}_plain"]  # resharded after eval
        assert one[f"{stage}_param_types"] == ["Parameter"]
        # saved, reloaded in transformers: the same logits, up to GPT-2's gelu, which the loops
        # fuse into one kernel (forward.fuse_activations) and a reload does not (measured 3e-8)
        assert sharded[stage] < 1e-6, stage
        a, b = (_metric_rows(tmp_path / n / stage / "metrics.jsonl") for n in ("fsdp2", "one"))
        assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            for k, v in rb.items():
                if k == "rewards/accuracies" and rb["step"] == 1:  # policy = reference: signs of float noise
                    continue
                assert ra[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (stage, rb["step"], k)
        if stage == "sft":  # whole_weights: each process's samples are the whole model's
            assert sharded["sft_after_decode"] == ["DTensor"]
            whole = json.loads((tmp_path / "fsdp2" / "sft" / "decode-whole.json").read_text())
            drawn = [json.loads((tmp_path / "fsdp2" / "sft" / f"decode-{r}.json").read_text()) for r in range(2)]
            assert [len(d) for d in drawn] == [3, 4] and drawn == whole
            assert len(set(drawn[1])) == 4  # sampled, not one string
        if stage == "dpo":
            assert [r["monitor/weight_sum"] for r in a if "monitor/weight_sum" in r] == \
                pytest.approx([r["monitor/weight_sum"] for r in b if "monitor/weight_sum" in r], rel=1e-7)
        wa, wb = (load_file(str(tmp_path / n / stage / "model" / "model.safetensors")) for n in ("fsdp2", "one"))
        assert wa.keys() == wb.keys()
        for k in wb:
            atol = 4 * lr if (stage, k) == ("rm", "transformer.ln_f.bias") else 1e-4
            assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), (stage, k, (wa[k] - wb[k]).abs().max())


class _Launch:
    """What ``check_strategy`` reads of an accelerator."""

    def __init__(self, processes: int) -> None:
        self.num_processes = processes


@pytest.mark.parametrize(("overrides", "section", "command", "message"), [
    (["sft.sharding=fsdp2"], "sft", None, "fsdp2 shards the weights over several processes and this launch has one"),
    (["sft.sharding=fsdp2"], "sft", "rs", "fsdp2 is not supported in rs yet"),
    (["dpo.sharding=fsdp2", "lora.r=4"], "dpo", None, "fsdp2 with LoRA adapters (lora.r=4) is not supported"),
    (["rm.sharding=fsdp2", "rm.grad_penalty=0.1"], "rm", None, "input-gradient penalty (rm.grad_penalty)"),
    (["sft.sharding=fsdp2", "sft.mixed_precision=fp16"], "sft", None, "use sft.mixed_precision=bf16"),
    (["sft.cpu_offload=true"], "sft", None, "set sft.sharding=fsdp2 or leave cpu_offload off"),
    (["sft.cpu_offload=true", "sft.sharding=fsdp2"], "sft", None, "on a CPU run they are there already"),
], ids=["one-process", "rs", "lora", "grad-penalty", "fp16", "offload-ddp", "offload-cpu"])
def test_a_sharding_that_would_not_run_as_asked_is_refused_in_one_line(monkeypatch, overrides, section, command,
                                                                        message):
    from rlhflab.config import load_config

    monkeypatch.setattr(distributed, "has_accelerator", lambda: False)
    cfg = load_config(None, overrides)
    processes = 1 if message.startswith("fsdp2 shards the weights") else 2
    with pytest.raises(InputError, match="sharding|cpu_offload") as err:
        distributed.check_strategy(getattr(cfg, section), section, _Launch(processes), cfg.lora.r, command)
    assert message in str(err.value) and "\n" not in str(err.value)
    field = "cpu_offload" if "offload" in overrides[0] else "sharding"
    assert err.value.field == f"{section}.{field}"
    for stage in distributed.SHARDED_STAGES:  # the same setting passes where it is supported
        plain = load_config(None, [f"{stage}.sharding=fsdp2"])
        distributed.check_strategy(getattr(plain, stage), stage, _Launch(2), 0)
