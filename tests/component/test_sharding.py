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


@pytest.mark.slow
def test_torch_fsdp2_shards_rlhflab_models_on_a_cpu_and_matches_one_process(tmp_path):
    """Two gloo processes, each decoder layer of the tiny Llama ``fully_shard``-ed (DTensor
    parameters), one SGD step on halves of a fixed batch, against one process on the whole
    batch. Measured: loss equal to 4e-8 relative, weights to 7.5e-9 after the step (float32
    reduction order); tolerance 1e-6. Without the x W scale the weights end up to 0.034 away."""
    worker = str(ROOT / "tests" / "component" / "fsdp_worker.py")
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT) + ":" + env["PYTHONPATH"]
    runs = {"fsdp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     free_port(), worker, str(tmp_path / "fsdp.json"), "--fsdp"],
            "one": [sys.executable, worker, str(tmp_path / "one.json")]}
    for cmd in runs.values():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fsdp", "one"))
    assert a["world_size"] == 2 and a["param_types"] == ["DTensor"] and b["param_types"] == ["Parameter"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    import torch

    assert a["weights"].keys() == b["weights"].keys()
    for k in b["weights"]:
        assert torch.allclose(torch.tensor(a["weights"][k]), torch.tensor(b["weights"][k]), atol=1e-6), k
