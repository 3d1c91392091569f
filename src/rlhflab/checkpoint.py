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

Loading checks everything before it changes anything (``check_checkpoint``: every file
present, every safetensors header against its file's size, every JSON file's shape;
``load_checkpoint``: every tensor's name, shape and dtype against the model, the optimizer
and the RNG), so a damaged checkpoint is one line naming the file, and the run it belongs
to stays as it was.
"""

from __future__ import annotations

import json
import math
import random
import struct
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


def whole_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with each state tensor of a sharded parameter (FSDP2's
    DTensors: AdamW's moments) gathered whole (``full_tensor``, an all-gather: every process
    must call it, and gets the whole state); the same as ``state_dict()`` unsharded."""
    from torch.distributed.tensor import DTensor

    state_dict = optimizer.state_dict()
    # each entry is the optimizer's own dict of a parameter's state: copied, not changed
    state_dict["state"] = {index: {name: value.full_tensor() if isinstance(value, DTensor) else value
                                   for name, value in entry.items()}
                           for index, entry in state_dict["state"].items()}  # one order on every process
    return state_dict


def _shard_like(state_dict: dict, optimizer) -> dict:
    """A whole optimizer state (``whole_optimizer_state``, read back) with each tensor of a
    sharded parameter's shape cut to this process's shard of it, placed as the parameter is
    (``distribute_tensor`` of the local copy: every process read the whole file)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state_dict["param_groups"] for i in group["params"]]
    for index, p in zip(saved, params):
        entry = state_dict["state"].get(index)
        if entry is None or not isinstance(p, DTensor):
            continue
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
                entry[name] = distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    return state_dict


def _is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _load_weights(module: torch.nn.Module, file: Path) -> None:
    """The file's weights into ``module`` (checked by ``_check_module`` first); a sharded
    module keeps this process's shard of each (``set_model_state_dict`` with the full state
    dict; every process must call it)."""
    if not _is_sharded(module):
        load_model(module, str(file))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, load_file(str(file)), options=StateDictOptions(full_state_dict=True, strict=False))


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
                    value: torch.nn.Module | None = None, optimizer_state: dict | None = None) -> Path:
    """Write a checkpoint atomically (temp dir, then rename over the old one). Weights with
    a non-finite value are refused, so the last checkpoint is always a good one.
    ``optimizer_state``: the optimizer's state dict when it is not ``optimizer.state_dict()``
    (a sharded run's, gathered whole by ``whole_optimizer_state``; the modules are then the
    whole models gathered for saving)."""
    from rlhflab.artifacts import atomic_directory, check_finite_weights

    path = Path(path)
    check_finite_weights(policy, "a checkpoint of the policy", path)
    if value is not None:
        check_finite_weights(value, "a checkpoint of the value model", path)
    with atomic_directory(path) as tmp:
        save_model(policy, str(tmp / "policy.safetensors"))
        if value is not None:
            save_model(value, str(tmp / "value.safetensors"))
        tensors, meta = flatten_optimizer_state(optimizer.state_dict() if optimizer_state is None else optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / "scheduler.json").write_text(json.dumps(sched))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_meta}, indent=1))
    return path


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
             "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_MAX_HEADER = 100 * 2 ** 20


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors file's header, checked against the file:
    a header that is JSON and fits, every tensor's byte range the size of its dtype and
    shape, the ranges back to back and ending where the file ends. A file cut short (or
    with bytes after its tensors) is an InputError naming it. Reads the header only."""
    cut = "; the checkpoint was not completely written"
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InputError(f"cut short: {len(head)} bytes, not a safetensors file{cut}", file=str(path))
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > min(size - 8, _MAX_HEADER):
                raise InputError(f"cut short or not safetensors: its header claims {n} bytes, the file holds "
                                 f"{size - 8} after the length{cut}", file=str(path))
            raw = fh.read(n)
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror or err})", file=str(path)) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError("its safetensors header is not valid JSON", file=str(path)) from None
    if not isinstance(header, dict):
        raise InputError("its safetensors header is not a JSON object", file=str(path))
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and entry.get("dtype") in _ITEMSIZE
              and isinstance(entry.get("shape"), list) and all(_whole(d) for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(_whole(d) for d in entry["data_offsets"]))
        if not ok:
            raise InputError(f"tensor {name!r}: expected dtype, shape and data_offsets in the header", file=str(path))
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * _ITEMSIZE[entry["dtype"]]:
            raise InputError(f"tensor {name!r}: {end - begin} bytes for shape {entry['shape']} of {entry['dtype']}",
                             file=str(path))
        ranges.append((begin, end))
        tensors[name] = (entry["dtype"], tuple(entry["shape"]))
    at = 0
    for begin, end in sorted(ranges):
        if begin != at:
            raise InputError("its tensors' byte ranges overlap or leave gaps", file=str(path))
        at = end
    if at != size - 8 - n:
        what = "cut short" if at > size - 8 - n else "longer than its tensors"
        raise InputError(f"{what}: the header describes {at} bytes of tensors, the file holds {size - 8 - n}"
                         + (cut if at > size - 8 - n else ""), file=str(path))
    return tensors


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror or err})", file=str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"not valid JSON ({err}); the checkpoint was not completely written", file=str(path)) from None


def _expect(ok: bool, path: Path, field: str, what: str) -> None:
    if not ok:
        raise InputError(f"expected {what}", file=str(path), field=field)


_KL_STATUS = ("ok", "caution", "warning")
ONLINE_STATE: dict[str, tuple[Any, str]] = {
    "best_eval": (lambda v: v is None or _number(v), "a finite number or null"),
    "best_step": (lambda v: v is None or _whole(v), "a whole number or null"),
    "bad_evals": (_whole, "a whole number >= 0"),
    "stopped_early": (lambda v: isinstance(v, bool), "true or false"),
    "kl_status_steps": (lambda v: isinstance(v, dict) and set(v) == set(_KL_STATUS) and all(map(_whole, v.values())),
                        f"a count for each of {', '.join(_KL_STATUS)}"),
    "time_rollout": (lambda v: _number(v) and v >= 0, "seconds >= 0"),
    "time_update": (lambda v: _number(v) and v >= 0, "seconds >= 0"),
    "last_status": (lambda v: v in _KL_STATUS, f"one of {', '.join(_KL_STATUS)}"),
    "evals": (lambda v: isinstance(v, list) and all(isinstance(e, dict) and _whole(e.get("step")) for e in v),
              "a list of evaluations, each with its step"),
    "kl_controller": (lambda v: isinstance(v, dict) and _number(v.get("value"))
                      and all(_number(x) for x in v.values()), "an object with a finite 'value'"),
    "algo": (lambda v: isinstance(v, str), "the algorithm's name"),
}
"""The fields of an online run's ``state.json`` (``algos.online.OnlineRun.checkpoint_state``)
and what each must hold."""


def _check_state(state: Any, path: Path, *, online: bool, algo: str | None, kl_keys: tuple[str, ...]) -> dict:
    _expect(isinstance(state, dict), path, "state", "a JSON object with the step and the run's state")
    step = state.get("step")
    _expect(_whole(step), path, "step", f"a whole number >= 0, got {step!r}")
    rng = state.get("rng")
    python = rng.get("python") if isinstance(rng, dict) else None
    _expect(isinstance(python, list) and len(python) == 3 and _whole(python[0]) and isinstance(python[1], list)
            and len(python[1]) == 625 and all(_whole(x) for x in python[1]) and (python[2] is None or _number(python[2])),
            path, "rng", "the Python RNG state [version, 625 whole numbers, gauss]")
    if online:
        state = dict(state)
        if "best_gold" in state and "best_eval" not in state:  # checkpoints written before user-data evaluation
            state["best_eval"] = state.pop("best_gold")
        for key, (ok, what) in ONLINE_STATE.items():
            _expect(key in state and ok(state[key]), path, key, what)
        for key in kl_keys:
            _expect(_number(state["kl_controller"].get(key)), path, f"kl_controller.{key}", "a finite number")
        if algo is not None:
            _expect(state["algo"] == algo, path, "algo", f"{algo} (this checkpoint is of a {state['algo']} run)")
    return state


def check_checkpoint(path: str | Path, *, value: bool = False, online: bool = False, algo: str | None = None,
                     kl_keys: tuple[str, ...] = ()) -> dict:
    """Read and check every file of the checkpoint at ``path`` without building anything:
    each present (``value.safetensors`` too, with ``value``), each safetensors header against
    its file (``safetensors_header``), each JSON file's shape; with ``online`` the whole of
    an online run's ``state.json`` (``ONLINE_STATE``, of ``algo``, its KL controller holding
    ``kl_keys``). Returns ``state.json``. Any flaw is an InputError naming the file."""
    path = Path(path)
    files = FILES + (("value.safetensors",) if value else ())
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise InputError(f"not a complete checkpoint (missing {', '.join(missing)})", file=str(path))
    for name in files:
        if name.endswith(".safetensors"):
            safetensors_header(path / name)
    meta = _read_json(path / "optimizer.json")
    opt = path / "optimizer.json"
    _expect(isinstance(meta, dict), opt, "optimizer", "a JSON object with param_groups, scalars and indices")
    groups = meta.get("param_groups")
    _expect(isinstance(groups, list) and groups and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                       and all(_whole(i) for i in g["params"]) for g in groups),
            opt, "param_groups", "a list of parameter groups, each with its params' indices")
    _expect(isinstance(meta.get("indices"), list) and all(isinstance(i, str) and i.isdigit() for i in meta["indices"]),
            opt, "indices", "a list of parameter indices")
    _expect(isinstance(meta.get("scalars"), dict) and all(isinstance(v, dict) for v in meta["scalars"].values()),
            opt, "scalars", "an object of per-parameter scalars")
    known = {i for g in groups for i in g["params"]}
    stray = [i for i in [*meta["indices"], *meta["scalars"]] if not (i.isdigit() and int(i) in known)]
    _expect(not stray, opt, "indices", f"indices of parameters in param_groups (parameter {stray[0] if stray else ''} "
            "has state but is in none of param_groups)")
    sched = _read_json(path / "scheduler.json")
    sch = path / "scheduler.json"
    _expect(isinstance(sched, dict), sch, "scheduler", "a JSON object (the LR scheduler's state)")
    _expect(_whole(sched.get("last_epoch")), sch, "last_epoch", "a whole number >= 0")
    _expect(isinstance(sched.get("base_lrs"), list) and len(sched["base_lrs"]) == len(groups)
            and all(_number(x) for x in sched["base_lrs"]),
            sch, "base_lrs", f"a learning rate for each of the {len(groups)} parameter groups")
    return _check_state(_read_json(path / "state.json"), path / "state.json", online=online, algo=algo,
                        kl_keys=kl_keys)


def read_state(path: str | Path) -> dict:
    """The ``state.json`` of a checkpoint (step, controller, ...), every file checked
    (``check_checkpoint``)."""
    return check_checkpoint(path)


def _kind(v) -> str:
    if isinstance(v, bool):
        return "true or false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, (list, tuple)):
        return "a list"
    return "null" if v is None else type(v).__name__


def _check_module(module: torch.nn.Module, file: Path) -> None:
    """The file's tensors are the module's: every name known, shapes and dtypes equal, and
    every weight present (weights tied to another are stored once)."""
    from torch.distributed.tensor import DTensor

    stored = safetensors_header(file)
    expected = module.state_dict()
    param_ids = {name: id(p) for name, p in module.named_parameters(remove_duplicate=False)}
    for name, (dtype, shape) in stored.items():
        if name not in expected:
            raise InputError(f"tensor {name!r} is not one of the model's (a checkpoint of another model?)",
                             file=str(file))
        t = expected[name]
        if tuple(t.shape) != shape or _TORCH_DTYPE.get(t.dtype) != dtype:
            raise InputError(f"tensor {name!r} is {dtype} {list(shape)}, the model's is "
                             f"{_TORCH_DTYPE.get(t.dtype, t.dtype)} {list(t.shape)}", file=str(file))
    groups: dict[tuple, list[str]] = {}
    for name, t in expected.items():  # tied weights share storage; safetensors keeps one name
        if isinstance(t, DTensor):  # a shard of FSDP2's has no storage of its own: tied = one Parameter
            key = ("param", param_ids.get(name, name))
        else:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else (name,)
        groups.setdefault(key, []).append(name)
    for names in groups.values():
        if not any(n in stored for n in names):
            raise InputError(f"tensor {names[0]!r} is missing", file=str(file))


_ADAMW = ("lr", "betas", "eps", "weight_decay")


def _check_optimizer(optimizer, tensors_file: Path, meta_file: Path) -> dict:
    """The optimizer state in the two files, unflattened, checked against ``optimizer``: the
    same parameter groups and hyper-parameters, each state tensor of a known parameter and
    of its shape, every parameter with state holding the same entries."""
    meta = _read_json(meta_file)
    current = optimizer.state_dict()["param_groups"]
    groups = meta["param_groups"]
    if len(groups) != len(current):
        raise InputError(f"{len(groups)} parameter groups, the optimizer has {len(current)}", file=str(meta_file),
                         field="param_groups")
    params: dict[int, torch.Tensor] = {}
    for g, (saved, now, live) in enumerate(zip(groups, current, optimizer.param_groups)):
        if len(saved["params"]) != len(now["params"]):
            raise InputError(f"group {g} holds {len(saved['params'])} parameters, the optimizer's "
                             f"{len(now['params'])}", file=str(meta_file), field="param_groups")
        for key, value in now.items():  # a key of another torch release may be absent; AdamW's own may not
            if key in saved and _kind(saved[key]) != _kind(value) or key not in saved and key in _ADAMW:
                raise InputError(f"group {g}: expected {_kind(value)}", file=str(meta_file), field=key)
        params.update(zip(saved["params"], live["params"]))
    stored = safetensors_header(tensors_file)
    names: dict[str, set[str]] = {}
    for key, (_, shape) in stored.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in params:
            raise InputError(f"tensor {key!r} is not the state of one of the optimizer's parameters",
                             file=str(tensors_file))
        if parts[1] not in meta["indices"]:
            raise InputError(f"tensor {key!r}: parameter {parts[1]} is not in optimizer.json's indices",
                             file=str(tensors_file))
        p = params[int(parts[1])]
        if math.prod(shape) > 1 and shape != tuple(p.shape):
            raise InputError(f"tensor {key!r} is {list(shape)}, its parameter {list(p.shape)}", file=str(tensors_file))
        names.setdefault(parts[1], set()).add(parts[2])
    every = set().union(*names.values()) if names else set()
    for i in meta["indices"]:
        lacking = every - names.get(i, set()) - set(meta["scalars"].get(i, {}))
        if lacking:
            raise InputError(f"parameter {i} lacks {', '.join(sorted(lacking))}", file=str(tensors_file))
    return unflatten_optimizer_state(load_file(str(tensors_file)), meta)


def _check_scheduler(scheduler, file: Path) -> dict:
    sched = _read_json(file)
    for key, value in scheduler.state_dict().items():
        if key == "lr_lambdas" or key not in sched:  # a key of another torch release; last_epoch is checked
            continue
        if _kind(sched[key]) != _kind(value):
            raise InputError(f"expected {_kind(value)}", file=str(file), field=key)
        if isinstance(value, list) and len(sched[key]) != len(value):
            raise InputError(f"expected {len(value)} values, got {len(sched[key])}", file=str(file), field=key)
    sched["lr_lambdas"] = [None] * len(sched.get("base_lrs", []))
    return sched


def _check_rng(file: Path) -> dict[str, torch.Tensor]:
    stored = safetensors_header(file)
    cpu = torch.get_rng_state()
    if stored.get("torch_cpu") != ("U8", tuple(cpu.shape)):
        raise InputError(f"expected torch_cpu, U8 {list(cpu.shape)} (torch's CPU generator state)", file=str(file))
    for key, (dtype, _) in stored.items():
        if key != "torch_cpu" and not (key.startswith("torch_cuda_") and key[11:].isdigit() and dtype == "U8"):
            raise InputError(f"tensor {key!r} is not an RNG state", file=str(file))
    return load_file(str(file))


def load_checkpoint(path: str | Path, *, policy: torch.nn.Module, optimizer, scheduler,
                    value: torch.nn.Module | None = None, online: bool = False, algo: str | None = None,
                    kl_keys: tuple[str, ...] = ()) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; returns ``state.json``.

    Every file is read and checked against the modules first (``check_checkpoint``, then
    each tensor's name, shape and dtype); only when all of it fits does anything change.
    Modules sharded with FSDP2 (every process loads: each keeps its shards of the whole
    weights and optimizer state the checkpoint holds) take them as plain ones do."""
    path = Path(path)
    state = check_checkpoint(path, value=value is not None, online=online, algo=algo, kl_keys=kl_keys)
    _check_module(policy, path / "policy.safetensors")
    if value is not None:
        _check_module(value, path / "value.safetensors")
    opt_state = _check_optimizer(optimizer, path / "optimizer.safetensors", path / "optimizer.json")
    sched = _check_scheduler(scheduler, path / "scheduler.json")
    rng = _check_rng(path / "rng.safetensors")
    # everything fits: now change the modules
    _load_weights(policy, path / "policy.safetensors")
    if value is not None:
        _load_weights(value, path / "value.safetensors")
    optimizer.load_state_dict(_shard_like(opt_state, optimizer))
    scheduler.load_state_dict(sched)
    set_rng_state(rng, state.pop("rng"))
    return state
