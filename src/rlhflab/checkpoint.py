"""Atomic checkpoints of an online RL run, and resuming from them.

A checkpoint is one directory, written to a temporary name beside its destination and
renamed into place, so a run killed at any moment (SIGKILL included) leaves either the
previous checkpoint or the new one, never a half-written mix:

    checkpoint/
      policy.safetensors      policy weights (tied weights stored once)
      value.safetensors       critic weights (PPO)
      optimizer.safetensors   optimizer tensors (AdamW moments and step counts)
      optimizer.json          optimizer hyper-parameters and layout
      scheduler.json          LR scheduler state
      rng.safetensors         torch CPU (and CUDA) RNG states
      state.json              step, KL controller, early-stopping and timing state,
                              Python RNG state

Everything is safetensors or JSON: nothing is unpickled on resume, so a checkpoint from
an untrusted source cannot run code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from rlhflab.errors import InputError

FILES = ("policy.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
         "rng.safetensors", "state.json")


# ---------------------------------------------------------------------------------------
# Optimizer and RNG state as tensors + JSON


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer ``state_dict()`` -> (tensors by name, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars,
            "indices": [str(i) for i in state_dict["state"]]}
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``flatten_optimizer_state``."""
    state: dict[int, dict[str, Any]] = {int(i): dict(meta["scalars"].get(i, {})) for i in meta["indices"]}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state[int(idx)][name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------
# Save / load


def save_checkpoint(path: str | Path, *, policy: torch.nn.Module, optimizer, scheduler, state: dict,
                    value: torch.nn.Module | None = None) -> Path:
    """Write a checkpoint atomically (temp dir, then rename over the old one). Weights with
    a non-finite value are refused, so the last checkpoint is always a good one."""
    from rlhflab.artifacts import atomic_directory, check_finite_weights

    path = Path(path)
    check_finite_weights(policy, "a checkpoint of the policy", path)
    if value is not None:
        check_finite_weights(value, "a checkpoint of the value model", path)
    with atomic_directory(path) as tmp:
        save_model(policy, str(tmp / "policy.safetensors"))
        if value is not None:
            save_model(value, str(tmp / "value.safetensors"))
        tensors, meta = flatten_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / "scheduler.json").write_text(json.dumps(sched))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_meta}, indent=1))
    return path


def read_state(path: str | Path) -> dict:
    """The ``state.json`` of a checkpoint (step, controller, ...), validated."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise InputError(f"not a complete checkpoint (missing {', '.join(missing)})", file=str(path))
    try:
        return json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"state.json is not valid JSON ({err})", file=str(path)) from None


def load_checkpoint(path: str | Path, *, policy: torch.nn.Module, optimizer, scheduler,
                    value: torch.nn.Module | None = None) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; returns ``state.json``."""
    path = Path(path)
    state = read_state(path)
    load_model(policy, str(path / "policy.safetensors"))
    if value is not None:
        if not (path / "value.safetensors").is_file():
            raise InputError("checkpoint has no value model", file=str(path))
        load_model(value, str(path / "value.safetensors"))
    optimizer.load_state_dict(unflatten_optimizer_state(
        load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())))
    sched = json.loads((path / "scheduler.json").read_text())
    sched["lr_lambdas"] = [None] * len(sched.get("base_lrs", []))
    scheduler.load_state_dict(sched)
    set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    return state
