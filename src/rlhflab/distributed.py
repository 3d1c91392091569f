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

import torch

from rlhflab.advantages import masked_whiten


def has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def make_accelerator(mixed_precision: str = "no"):
    """An ``accelerate.Accelerator``, on the CPU when no accelerator is available."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, cpu=not has_accelerator())


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
