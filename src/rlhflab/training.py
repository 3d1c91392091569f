"""What every training loop shares: the learning-rate schedules, the optimizer and its
step (clip, check, step, zero), how a global batch is split and drawn, dropout off, the
gradient norm, and the stop on a non-finite loss or gradient.

The loops themselves (``rlhflab.algos``) stay readable top to bottom; what they would
otherwise each write again lives here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

from rlhflab.errors import InputError, NonFiniteError
from rlhflab.registry import LR_SCHEDULES


def cosine_decay(progress: float) -> float:
    """0.5 (1 + cos(pi p)), p the fraction of training done after warm-up."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def linear_decay(progress: float) -> float:
    """1 - p."""
    return max(0.0, 1 - progress)


def constant_rate(progress: float) -> float:
    """1."""
    return 1.0


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at each step: linear warm-up, then the decay
    ``rlhflab.registry.LR_SCHEDULES[schedule]``."""
    decay = LR_SCHEDULES[schedule]

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay((step - warmup_steps) / max(1, total_steps - warmup_steps))

    return f


def make_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict], cfg, total_steps: int
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW at ``cfg.lr`` with ``cfg.weight_decay``, and its schedule over ``total_steps``
    optimizer steps: a linear warm-up over int(cfg.warmup_ratio * total_steps) steps, then
    the decay ``cfg.lr_schedule`` (``lr_lambda``). ``cfg`` is a ``config.TrainConfig`` (or has
    its optimizer fields). The schedule is stepped by hand once per optimizer step
    (``optimizer_step``), not handed to ``accelerator.prepare``, which would step it once per
    process.

    AdamW's fused kernel where the parameters live on a CPU or a GPU: one pass over each
    parameter instead of a dozen tensor ops per parameter and step (the same update up to
    float rounding; 7.7 of 100 profiled seconds in the demo's SFT before)."""
    params = list(params)  # parameters, or param groups (dicts with "params" and their own "lr")
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(p.device.type in ("cpu", "cuda") for p in tensors)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, warmup, total_steps))
    return optimizer, scheduler


def optimizer_step(accelerator, params: Iterable[torch.nn.Parameter], optimizer, scheduler, cfg, *,
                   stage: str, step: int, loss: float, lr_field: str | None = None) -> torch.Tensor:
    """The end of a global batch, after its backward passes: clip the gradients to
    ``cfg.max_grad_norm`` (0: no clipping), stop on a non-finite ``loss`` or gradient norm
    (``stop_if_non_finite``, naming ``stage``, ``step`` and ``lr_field``), step the optimizer
    and the schedule, zero the gradients.

    Returns the gradient norm before clipping (nan when clipping is off: ``train/grad_norm``).
    Under fp16 the loss scaler expects overflowing gradients (it skips those steps), so then
    only the loss is checked; otherwise the norm is, measured even when nothing clips.
    """
    params = list(params)
    clip = cfg.max_grad_norm > 0
    grad_norm = clip_gradients(accelerator, params, cfg.max_grad_norm) if clip else torch.tensor(float("nan"))
    if any(is_dtensor(p) for p in params):  # FSDP2: no loss scaler (fp16 is refused sharded)
        checked = float(grad_norm if clip else sharded_grad_norm(params))
    else:
        checked = None if accelerator.scaler is not None else float(grad_norm if clip else grad_norm_of(params))
    stop_if_non_finite(stage, step, loss=loss, grad_norm=checked, lr=cfg.lr, lr_field=lr_field)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def batch_plan(stage: str, cfg, processes: int, n_examples: int, unit: str = "training examples"
               ) -> tuple[int, int]:
    """(micro-batch size, optimizer steps) of an offline stage (``cfg`` a ``config.TrainConfig``).

    A global batch of B = ``cfg.batch_size`` examples is split into ``processes`` equal shards,
    each cut into micro-batches of ``cfg.micro_batch_size`` (empty: the whole shard); training
    lasts ``cfg.max_steps`` steps, else ``cfg.epochs`` passes of n_examples // B steps (at
    least one). An InputError naming ``<stage>.batch_size`` when B does not split so, or the
    data hold less than one batch (a stage checks this before it writes anything).
    """
    B = cfg.batch_size
    micro = cfg.micro_batch_size or B // processes
    if B % processes or (B // processes) % micro:
        raise InputError(f"{B} must split into {processes} processes x micro-batches of {micro}",
                         field=f"{stage}.batch_size")
    if n_examples < B:
        raise InputError(f"{n_examples} {unit} are fewer than one batch of {B}: lower {stage}.batch_size or "
                         "add data", field=f"{stage}.batch_size")
    return micro, cfg.max_steps or max(1, int(cfg.epochs * (n_examples // B)))


def global_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Indices of the successive global batches of ``n`` examples, without end: each epoch is
    a fresh permutation drawn from one generator seeded with ``seed`` (the same on every
    process), cut into batches; a tail shorter than a batch is left out."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off, in the modules and in the saved config (the RLHF convention: the
    first-update ratio of an online loop is then exactly 1, and DPO's reference and policy
    log-probs are deterministic)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    for key, value in list(config.to_dict().items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)


def is_dtensor(x) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients of ``params`` to a global L2 norm of at most ``max_norm``; returns
    the norm before clipping. FSDP2's sharded gradients (DTensors): the norm reduced over
    the processes (:func:`sharded_grad_norm`), then each process's shards scaled by it;
    otherwise ``accelerator.clip_grad_norm_`` (which unscales fp16 gradients first)."""
    if any(is_dtensor(p) for p in params):
        norm = sharded_grad_norm(params)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm
    return accelerator.clip_grad_norm_(params, max_norm)


def sharded_grad_norm(params) -> torch.Tensor:
    """The global L2 norm of DTensor gradients (FSDP2), a plain tensor on every process: each
    process's norm covers its own shards, so the total is reduced over the processes
    (``full_tensor``) before anything is clipped by it."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], norm_type=2.0)
    return total.full_tensor() if is_dtensor(total) else total


def grad_norm_of(params) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params`` (0 when none has one), unclipped."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def stop_if_non_finite(stage: str, step: int, *, loss: float | None = None, grad_norm: float | None = None,
                       lr: float | None = None, lr_field: str | None = None, kept: str | None = None) -> None:
    """Raise ``NonFiniteError`` (one line: the step, what went non-finite, the likely cause)
    if ``loss`` or ``grad_norm`` is nan or infinite. Called after the backward and before
    the optimizer step, on values every process shares, so all processes stop together."""
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if value is None or math.isfinite(value):
            continue
        cause = ("a non-finite input value (a margin, weight, reward or score of the data) or a learning "
                 f"rate too high ({lr_field or stage + '.lr'}={lr:g})" if lr is not None else
                 "a non-finite input value or a learning rate too high")
        saved = f"; the last good checkpoint is kept in {kept}" if kept else "; no model was saved"
        raise NonFiniteError(f"{stage} step {step}: the {what} is {value} (non-finite); training stopped "
                             f"before the optimizer step{saved}. Likely cause: {cause}")
