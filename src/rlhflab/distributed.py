"""The one place an ``Accelerator`` is made, so every stage scales the same way.

On a machine with no GPU, ``Accelerator(cpu=True)`` lets a multi-process launch (torchrun,
or ``accelerate launch --multi_gpu --num_processes N``) run data-parallel on CPU with the
gloo backend. (``accelerate launch --cpu`` starts more than one process only through MPI.)
"""

from __future__ import annotations

import torch
from accelerate import Accelerator


def has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    return Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator())
