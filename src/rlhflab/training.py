"""What every training loop shares: the learning-rate schedules, dropout off,
the gradient norm, and the stop on a non-finite loss or gradient.

The loops themselves (``rlhflab.algos``) stay readable top to bottom; what they would
otherwise each write again lives here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rlhflab.errors import NonFiniteError
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
