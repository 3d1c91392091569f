"""Processes: the one place an ``Accelerator`` is made, and statistics over the global batch.

On a machine with no GPU, ``Accelerator(cpu=True)`` lets a multi-process launch (torchrun,
or ``accelerate launch --multi_gpu --num_processes N``) run data-parallel on CPU with the
gloo backend. (``accelerate launch --cpu`` starts more than one process only through MPI.)

Online RL normalises every loss by a count of the *global* minibatch and whitens
advantages over the global batch, so W processes compute the gradient of one process
holding the whole batch (up to float summation order): ``BatchStats`` holds those
reductions, ``Sums`` the metrics summed over micro-batches and then over processes. With
one process (``accelerator=None``) both are the plain local formulas.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from rlhflab.advantages import masked_whiten


def has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


# The sampler/trainer gap the online mismatch guard allows under bf16 autocast, where the
# sampler decodes in float32 and the trainer's forward runs in bf16: 0.5 nats, about 10x
# the largest gap measured on the demo model (0.057 nats over 4 PPO steps; 0.008 on the
# tiny one; docs/scaling.md), still far below what a wrong mask or position gives (nats).
MIXED_PRECISION_MISMATCH_NATS = 0.5


def mismatch_tolerance(tolerance: float, mixed_precision: str) -> float:
    """The guard's threshold: ``rl.mismatch_tolerance`` in float32, at least
    ``MIXED_PRECISION_MISMATCH_NATS`` under bf16 or fp16."""
    return tolerance if mixed_precision == "no" else max(tolerance, MIXED_PRECISION_MISMATCH_NATS)


def sharding_requested() -> str | None:
    """What the launch's accelerate config asks for beyond data parallelism, from the
    environment ``accelerate launch`` sets: ``"FSDP"``, ``"DeepSpeed ZeRO-<stage>"`` or None."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return f"DeepSpeed ZeRO-{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    return None


def check_sharding(section: str | None = None) -> None:
    """Refuses, in one line naming the accelerate config's ``distributed_type``, the sharded
    launches rlhflab would run wrong. accelerate sets FSDP and DeepSpeed up only on GPUs: on
    a CPU it keeps plain DDP (MULTI_CPU) and ignores the FSDP section, so the run would not
    be what was asked. FSDP and ZeRO-3 keep each model's weights sharded, and every stage
    decodes with the whole model (SFT's samples, the reward model's comparisons, DPO's world
    evaluation, online RL's rollouts, token by token with rows leaving the batch as they
    end, so the processes would not call the model in step) and saves it whole: refused in
    every stage, with DDP and ZeRO-2 (weights replicated) as the sharded options that work."""
    sharding = sharding_requested()
    if sharding is None:
        return
    from rlhflab.errors import InputError

    where = f" ({section})" if section else ""
    if not has_accelerator():
        raise InputError(f"{sharding}{where} needs GPUs: on a CPU accelerate runs plain DDP in its place; launch "
                         "with configs/accelerate/ddp.yaml", field="distributed_type")
    if sharding == "FSDP" or sharding.endswith("ZeRO-3"):
        raise InputError(f"{sharding}{where} is not supported: rlhflab decodes and saves with the whole model, "
                         "which it keeps sharded; use configs/accelerate/ddp.yaml (sft, rm and dpo shard "
                         "themselves with <stage>.sharding=fsdp2) or zero2.yaml, with LoRA (lora.r) to shrink "
                         "what each process trains", field="distributed_type")


def make_accelerator(mixed_precision: str = "no", report_to: Sequence[str] = (), section: str | None = None):
    """An ``accelerate.Accelerator``, on the CPU when no accelerator is available.

    ``mixed_precision`` (no, bf16, fp16) sets what ``accelerator.autocast()`` casts to and,
    for fp16, the loss scaler. accelerate keeps one precision per process in a shared
    state; when an earlier stage of this process (``rlhflab run``, a test session) chose
    another one and there is one process, that state is rebuilt (``_reset_state``, the
    one call outside accelerate's public API here: there is no public way to change it).
    With several processes the stages must agree: else a RunError.

    fp16 needs a GPU: on a CPU accelerate neither autocasts to float16 nor scales the loss,
    so the run would be float32 under an fp16 label; refused (InputError naming
    ``<section>.mixed_precision``). bf16 autocasts on a CPU too.

    ``report_to`` names accelerate trackers (tensorboard, wandb, mlflow), started by
    :func:`trackers` once the run's directory exists.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_sharding(section)
    check_trackers(report_to, section)
    if mixed_precision == "fp16" and not has_accelerator():
        from rlhflab.errors import InputError

        raise InputError("fp16 needs a GPU (accelerate autocasts to float16 and scales the loss only there); "
                         "use bf16 on a CPU", field=f"{section}.mixed_precision" if section else "mixed_precision")

    # The logging directory is the run's (staging) directory, set when the trackers start;
    # accelerate only checks here that one will be given.
    kwargs = dict(mixed_precision=mixed_precision, cpu=not has_accelerator(),
                  log_with=list(report_to) or None, project_dir="." if report_to else None)
    try:
        return Accelerator(**kwargs)
    except ValueError as err:  # "AcceleratorState has already been initialized and cannot be changed"
        state = AcceleratorState()
        if "already been initialized" not in str(err) or str(state.mixed_precision) == mixed_precision:
            raise
        if state.num_processes > 1:
            from rlhflab.errors import RunError

            raise RunError(f"this process already runs in mixed_precision={state.mixed_precision}; with several "
                           f"processes every stage of one launch needs the same precision (got {mixed_precision})"
                           ) from None
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(**kwargs)


# tracker name -> (accelerate's availability check, the package to install)
TRACKER_PACKAGES = {"tensorboard": ("is_tensorboard_available", "tensorboard"),
                    "wandb": ("is_wandb_available", "wandb"), "mlflow": ("is_mlflow_available", "mlflow")}


def check_trackers(report_to: Sequence[str], section: str | None = None) -> None:
    """Every tracker of ``report_to`` can be imported: accelerate would drop a missing one with
    a warning and the run would track nothing. An InputError naming ``<section>.report_to``
    and what to install, before any model is loaded."""
    import accelerate.utils

    from rlhflab.errors import InputError

    for name in report_to:
        check, package = TRACKER_PACKAGES.get(str(name), (None, str(name)))
        if check is not None and not getattr(accelerate.utils, check)():
            raise InputError(f"the {name} tracker needs the {package} package, which is not installed "
                             f"(pip install {package}), or leave {name} out of --report-to",
                             field=f"{section}.report_to" if section else "report_to")


def _drop_trackers(accelerator) -> None:
    """Finish what a failed ``init_trackers`` left half-started (each quietly: a tracker that
    never started has nothing to finish) and forget them all."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            with contextlib.suppress(Exception):
                tracker.finish()
    accelerator.trackers.clear()


@contextlib.contextmanager
def trackers(accelerator, logging_dir: str | Path, project: str, config: dict | None = None) -> Iterator[None]:
    """The accelerator's trackers (``make_accelerator(report_to=...)``) running for one
    stage: ``init_trackers`` with ``logging_dir`` (the run directory: TensorBoard events
    under ``logging_dir/<project>/``, the wandb run under ``logging_dir/wandb/``; mlflow
    writes where ``MLFLOW_TRACKING_URI`` says, as mlflow always does) and the resolved
    config, then each tracker finished.
    ``accelerator.end_training`` is not called: it would also end the process group, which
    a later stage of the same launch still needs. Without trackers: nothing happens."""
    if not accelerator.log_with:
        yield
        return
    logging_dir = Path(logging_dir).resolve()
    accelerator.project_configuration.project_dir = str(logging_dir)
    accelerator.project_configuration.logging_dir = str(logging_dir)
    kwargs = {"wandb": {"dir": str(logging_dir)}}
    try:
        accelerator.init_trackers(project, config=_flat_config(config or {}), init_kwargs=kwargs)
    except Exception as err:  # noqa: BLE001 - a tracker's own error (no login, a bad MLFLOW_TRACKING_URI)
        from rlhflab.errors import InputError
        from rlhflab.models import first_line

        _drop_trackers(accelerator)
        raise InputError(f"cannot start the trackers {', '.join(map(str, accelerator.log_with))} (report_to), so "
                         f"nothing was trained: {type(err).__name__}: {first_line(err)[:300]}") from None
    try:
        yield
    finally:
        if accelerator.is_main_process:
            for tracker in accelerator.trackers:
                tracker.finish()
        accelerator.trackers.clear()


def _flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as flat ``section.field`` keys of plain values (what TensorBoard's
    hparams and mlflow's params accept: lists and None as text)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_config(value, name + "."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class BatchStats:
    """Sums, means and whitening over the global batch (all processes).

    With one process (or ``accelerator=None``) every method is the plain local formula;
    ``whiten`` then equals ``advantages.masked_whiten`` (its statistics are summed in
    float64 here).
    """

    def __init__(self, accelerator=None) -> None:
        self.accelerator = accelerator
        self.world_size = accelerator.num_processes if accelerator is not None else 1

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of ``x`` over processes (x itself with one process)."""
        if self.world_size == 1:
            return x
        return self.accelerator.reduce(x.clone().to(self.accelerator.device), reduction="sum").to(x.device)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of ``x`` over processes."""
        if self.world_size == 1:
            return x
        gathered = self.accelerator.gather(x.reshape(1, *x.shape).to(self.accelerator.device))
        return gathered.max(0).values.to(x.device)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of all entries of x over the global batch."""
        total = self.sum(torch.stack([x.sum().double(), torch.tensor(float(x.numel()), dtype=torch.float64)]))
        return (total[0] / total[1]).to(x.dtype)

    def masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sum(mask * x) / sum(mask) over the global batch (as ``advantages.masked_mean``)."""
        valid = mask.bool()
        local = torch.stack([torch.where(valid, x, torch.zeros_like(x)).sum().double(), valid.sum().double()])
        total = self.sum(local)
        return (total[0] / total[1].clamp(min=1)).to(x.dtype)

    def masked_var(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unbiased variance over valid entries of the global batch (as ``advantages.masked_var``)."""
        valid = mask.bool()
        mean = self.masked_mean(x, mask)
        sq = torch.where(valid, (x - mean).square(), torch.zeros_like(x)).sum().double()
        total = self.sum(torch.stack([sq, valid.sum().double()]))
        return (total[0] / (total[1] - 1).clamp(min=1)).to(x.dtype)

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8):
        """``advantages.masked_whiten`` with the mean and variance of the global batch:
        (x - mean) / sqrt(var + eps) [+ mean if not shift_mean], 0 on padding."""
        return masked_whiten(x, mask, shift_mean, eps, mean=self.masked_mean(x, mask), var=self.masked_var(x, mask))


class Sums:
    """Metrics as name -> [sum, count], added up over micro-batches and reduced over
    processes at the end: the result is sum / count over the global batch."""

    def __init__(self) -> None:
        self.data: dict[str, list] = {}

    def add(self, sums: dict[str, tuple]) -> None:
        for k, (total, n) in sums.items():
            entry = self.data.setdefault(k, [0.0, 0.0])
            entry[0] = entry[0] + total.double()
            entry[1] = entry[1] + torch.as_tensor(n).double()

    def result(self, stats: BatchStats) -> dict[str, float]:
        if not self.data:
            return {}
        keys = sorted(self.data)
        flat = torch.stack([torch.stack([torch.as_tensor(self.data[k][0]), torch.as_tensor(self.data[k][1])])
                            for k in keys]).double()
        flat = stats.sum(flat)
        return {k: (flat[i, 0] / flat[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}


# ---------------------------------------------------------------------------------------
# Sharded weights: torch's FSDP2 (``fully_shard``), the ``<stage>.sharding`` setting

SHARDED_STAGES = ("sft", "rm", "dpo", "rl")
"""The stages that train sharded under ``fsdp2`` (``rl``: online RL, ``algos.online``);
rejection sampling (``rs``, SFT's section) is refused."""

# model -> its twin with the same modules, parameters on the meta device (no memory) and
# buffers copied, into which the gathered full weights are loaded for saving and decoding.
_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_strategy(section_cfg, section: str, accelerator, lora_r: int = 0, command: str | None = None) -> None:
    """Refuses, in one line naming ``<section>.sharding`` or ``<section>.cpu_offload``, a
    strategy this launch would not run as asked: fsdp2 with one process (nothing to shard),
    in rejection sampling (``command``: its rollouts do not gather sharded weights yet), and
    where it was not verified: with LoRA adapters, the reward model's gradient penalty (a
    double backward) or fp16 (accelerate's loss scaler); in online RL with an external
    sampler (``rl.sampler``: it is handed whole weights by name); CPU offload
    without fsdp2 or without a GPU (on a CPU the shards are in CPU memory already: the
    setting would change nothing)."""
    from rlhflab.errors import InputError

    strategy = getattr(section_cfg, "sharding", "ddp")
    offload = getattr(section_cfg, "cpu_offload", False)
    supported = f"sharding=fsdp2 trains {', '.join(SHARDED_STAGES)} sharded; {section}.sharding=ddp otherwise"
    if offload and strategy != "fsdp2":
        raise InputError(f"cpu_offload moves fsdp2's shards to CPU memory; set {section}.sharding=fsdp2 or "
                         "leave cpu_offload off", field=f"{section}.cpu_offload")
    if offload and not has_accelerator():
        raise InputError("cpu_offload keeps GPU shards in CPU memory; on a CPU run they are there already, so "
                         "it would change nothing: leave it off", field=f"{section}.cpu_offload")
    if strategy != "fsdp2":
        return
    if (command or section) not in SHARDED_STAGES:
        raise InputError(f"fsdp2 is not supported in {command or section} yet: its rollouts do not gather the "
                         f"sharded weights; {supported}", field=f"{section}.sharding")
    if getattr(section_cfg, "sampler", "engine") != "engine":
        raise InputError(f"fsdp2 with an external sampler ({section}.sampler={section_cfg.sampler}) is not "
                         "supported: the sampler is handed the whole weights by name, which stay sharded; set "
                         f"{section}.sampler=engine or {section}.sharding=ddp", field=f"{section}.sampler")
    if accelerator.num_processes < 2:
        raise InputError("fsdp2 shards the weights over several processes and this launch has one: launch with "
                         "torchrun --nproc_per_node N or accelerate launch --num_processes N, or set "
                         f"{section}.sharding=ddp", field=f"{section}.sharding")
    if lora_r:
        raise InputError(f"fsdp2 with LoRA adapters (lora.r={lora_r}) is not supported: LoRA already keeps the "
                         f"trained weights small; set {section}.sharding=ddp or lora.r=0", field=f"{section}.sharding")
    if getattr(section_cfg, "grad_penalty", 0):
        raise InputError("fsdp2 with the input-gradient penalty (rm.grad_penalty) is not supported: its double "
                         "backward through FSDP2's hooks was not verified; set rm.sharding=ddp or "
                         "rm.grad_penalty=0",
                         field=f"{section}.sharding")
    if getattr(section_cfg, "mixed_precision", "no") == "fp16":
        raise InputError("fsdp2 with fp16 is not supported (accelerate's loss scaler on sharded gradients was "
                         "not verified); "
                         f"use {section}.mixed_precision=bf16", field=f"{section}.sharding")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the modules of the classes its ``_no_split_modules``
    names (transformers' own list of what must stay whole on one device: LlamaDecoderLayer,
    GPT2Block, ...), outermost first."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    return [b for b in blocks if not any(b is not o and any(x is b for x in o.modules()) for o in blocks)]


def shard_weights(model: torch.nn.Module, section_cfg, accelerator, section: str, *,
                  gather_in_precision: bool = True) -> torch.nn.Module:
    """``model`` itself, sharded, under ``<section>.sharding=fsdp2``, else unchanged (DDP is
    accelerate's ``prepare``). Call before the optimizer is made: ``fully_shard`` replaces
    the parameters by DTensors (each process holding one shard, dim 0 split).

    ``fully_shard`` on every transformer block (:func:`transformer_blocks`), then the root,
    which takes what is left: the embeddings, the final norm, the head. Tied embeddings (one
    Parameter in the embedding and the head) are therefore in one group and stay tied; they
    are not wrapped apart. The device mesh is explicit, ``init_device_mesh(<the
    accelerator's device type>, (W,))`` over accelerate's process group (gloo on CPU, NCCL
    on GPUs): without it, a gloo run on a machine with GPUs has moved the model to CUDA.
    Under bf16 the ``MixedPrecisionPolicy`` gathers bf16 weights and reduces gradients in
    float32 (``gather_in_precision=False``: the weights are gathered as they are held, and
    the caller autocasts its training passes, as online RL does: its decoding, from the
    gathered weights, stays in float32); ``<section>.cpu_offload`` keeps shards, gradients
    and optimizer state in CPU memory (``CPUOffloadPolicy``). Non-persistent buffers (rotary frequencies) are not
    sharded: each process computes its own, identically.

    The twin (:func:`gathered`) is made first: the same modules with meta parameters and
    copied buffers, which the full weights fill on rank 0 when the model is saved."""
    if getattr(section_cfg, "sharding", "ddp") != "fsdp2":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    from rlhflab.errors import InputError

    blocks = transformer_blocks(model)
    if not blocks:
        raise InputError(f"fsdp2 shards per transformer block and {type(model).__name__} names none "
                         "(_no_split_modules); set sharding=ddp", field=f"{section}.sharding")
    if accelerator.is_main_process:
        _TWINS[model] = _meta_twin(model)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    precision = getattr(section_cfg, "mixed_precision", "no")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" and gather_in_precision else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if getattr(section_cfg, "cpu_offload", False) else OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return model


def _meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters are on the meta device (tied ones still one
    Parameter: the copy's memo maps each original to one meta Parameter) and whose buffers
    are real copies (non-persistent ones, rotary frequencies, are in no state dict)."""
    import copy

    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def prepare(accelerator, model, optimizer):
    """(model, optimizer) ready to train: accelerate's ``prepare`` (DDP across processes)
    for a model :func:`shard_weights` left alone; a sharded model is already distributed and its
    optimizer steps its own shards, so both are returned as they are."""
    if is_sharded(model):
        return model, optimizer
    return accelerator.prepare(model, optimizer)


def gathered(accelerator, model: torch.nn.Module) -> torch.nn.Module | None:
    """The whole trained model on the main process (None on the others; every process must
    call it): for a sharded model, the full state dict (``get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``: gathered shard by shard into rank 0's CPU
    memory) loaded into its twin, whose tied parameters are tied again; otherwise
    ``accelerator.unwrap_model``. The result is a plain module: ``save_pretrained`` writes
    a checkpoint plain transformers loads, and decoding needs no other process."""
    if not is_sharded(model):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    for name, t in full.items():  # a weight gathered from uneven shards views a padded buffer: its own copy,
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():  # which safetensors' save_model needs
            full[name] = t.clone()
    twin = _TWINS[model]
    tied: dict[int, list[str]] = {}
    for name, p in twin.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    twin.load_state_dict(full, strict=True, assign=True)
    for names in tied.values():  # assign gave each name its own tensor: one Parameter again
        first = twin.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(twin.get_submodule(owner), attr, first)
    return twin


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The whole weights on every process for the length of the block, gathered once: for
    decoding, where processes call the model a different number of times (rows leave the
    batch as they end) and so cannot all-gather in step. Every FSDP2 group is unsharded
    (``unshard()``, one all-gather each, in the same order on every process) and the blocks
    kept so after their forward (``set_reshard_after_forward(False)``; the root never reshards
    after its forward), so no pass inside needs another process; resharded after. Every
    process must enter it. Nothing for an unsharded model. Inside, no backward."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    blocks = [m for m in groups if m is not model]
    for m in groups:
        m.unshard()
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)
        for m in groups:
            m.reshard()


@contextlib.contextmanager
def all_whole_weights(*models: torch.nn.Module | None) -> Iterator[None]:
    """:func:`whole_weights` of each model given (None skipped), in the order given: every
    process must enter it with the same models."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(whole_weights(model))
        yield


def load_whole_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full tensors (a ``save_pretrained`` checkpoint's, read on every process) into ``model``,
    strict but for the names a save leaves out (tied weights): a sharded model keeps each
    process's shard of them (``set_model_state_dict`` with ``full_state_dict``, every
    process must call it), a plain one takes them whole."""
    if not is_sharded(model):
        missing, unexpected = model.load_state_dict(state, strict=False)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing, unexpected = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                                         strict=False))
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        from rlhflab.errors import RunError

        raise RunError(f"the saved weights do not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]}")


def missing_passes(accelerator, model: torch.nn.Module, passes: int) -> int:
    """How many empty passes this process owes (every process must call it, before its
    passes): under FSDP2 each forward all-gathers every block's weights from all processes,
    so all run as many passes; a process whose share of an evaluation takes ``passes`` owes
    the most any takes minus its own (:func:`empty_passes`, after its own). 0 unsharded."""
    if not is_sharded(model):
        return 0
    import torch.distributed as dist

    most = torch.tensor([passes], device=accelerator.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item()) - passes


@torch.no_grad()
def empty_passes(accelerator, model: torch.nn.Module, n: int) -> None:
    """``n`` forward passes of one token, their output dropped (see :func:`missing_passes`),
    then the weights resharded (:func:`reshard`): called at the end of an evaluation."""
    for _ in range(n):
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=accelerator.device))
    reshard(model)


def reshard(model: torch.nn.Module) -> None:
    """Free the whole weights a sharded model still holds after no-grad passes: FSDP2 keeps
    the root's (embeddings, final norm, head) gathered after its forward, expecting the
    backward to need them, and an evaluation runs none. Nothing for an unsharded model."""
    if is_sharded(model):
        model.reshard()
