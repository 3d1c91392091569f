"""The one policy update every online algorithm (and the tabular bandit) calls.

``update_policy(batch, forward, ...)`` takes one ``UpdateBatch``: the rows' token ids
together with their old log-probs, advantages and masks, every field indexed by the same
row. Minibatches and micro-batches are ``batch.select(rows)``, and ``forward`` recomputes
log-probs from the token ids of the rows it is handed, so an algorithm that drops or
reorders rows (DAPO's dynamic sampling, say) selects them on the batch and cannot pair one
row's advantages with another row's tokens.

Normalisation across processes: every loss is a sum over the local rows divided by a
count of the *global* minibatch (tokens or sequences) over the number of processes W
(``losses.Counts``), because DDP averages gradients over W; statistics that span the
batch are reduced over processes (``distributed.BatchStats``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhflab.distributed import BatchStats, Sums
from rlhflab.losses import Counts, PolicyLossSettings, policy_gradient_loss

_TOKEN_FIELDS = ("old_logprobs", "advantages", "ref_logprobs", "returns", "old_values", "sampler_logprobs",
                 "is_weights")


@dataclass
class UpdateBatch:
    """What one rollout batch gives the optimizer: B rows, token tensors (B, T) aligned to
    the response tokens. A bandit's one-token responses are rows with P = T = 1."""

    prompt_ids: torch.Tensor               # (B, P) left-padded (the bandit: the prompt's index)
    prompt_mask: torch.Tensor              # (B, P)
    response_ids: torch.Tensor             # (B, T) the sampled tokens
    mask: torch.Tensor                     # (B, T) float, 1 on response tokens
    old_logprobs: torch.Tensor             # (B, T) log pi at sampling time
    advantages: torch.Tensor               # (B, T) detached; sequence advantages broadcast
    ref_logprobs: torch.Tensor | None = None  # (B, T) for a KL term in the loss
    returns: torch.Tensor | None = None    # (B, T) PPO value targets
    old_values: torch.Tensor | None = None  # (B, T) PPO values at sampling time
    sampler_logprobs: torch.Tensor | None = None  # (B, T) log pi_sampler; None: old_logprobs are the sampler's
    is_weights: torch.Tensor | None = None  # (B, T) truncated importance weights (TIS), or None

    def __post_init__(self) -> None:
        B, T = self.mask.shape
        shapes = {"prompt_ids": (B, self.prompt_ids.shape[-1]), "prompt_mask": tuple(self.prompt_ids.shape),
                  "response_ids": (B, T)}
        shapes.update({name: (B, T) for name in _TOKEN_FIELDS})
        for name, want in shapes.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != want:
                raise ValueError(f"UpdateBatch.{name} has shape {tuple(value.shape)}, expected {want} "
                                 f"(mask is {(B, T)}: every field holds the same rows)")

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @classmethod
    def from_rollout(cls, ro, *, advantages: torch.Tensor, ref_logprobs: torch.Tensor | None = None,
                     returns: torch.Tensor | None = None, old_values: torch.Tensor | None = None) -> UpdateBatch:
        """The rows of a ``rollout.Rollout`` with the algorithm's advantages (and, for a KL
        term in the loss, the reference log-probs; for PPO the value targets and values).
        The sampler's log-probs come along when they are not the old log-probs (a rollout
        rescored by the trainer)."""
        return cls(prompt_ids=ro.prompt_ids, prompt_mask=ro.prompt_mask, response_ids=ro.response_ids,
                   mask=ro.mask, old_logprobs=ro.logprobs, advantages=advantages, ref_logprobs=ref_logprobs,
                   returns=returns, old_values=old_values,
                   sampler_logprobs=None if ro.sampler_logprobs is ro.logprobs else ro.sampler_logprobs)

    def select(self, rows: torch.Tensor) -> UpdateBatch:
        """The batch of ``rows`` (indices or a bool mask over B): every field filtered together."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: None if v is None else v[rows] for k, v in fields.items()})


@dataclass
class UpdateSettings(PolicyLossSettings):
    """Hyper-parameters of ``update_policy``: the loss's (``losses.PolicyLossSettings``)
    and the loop's (from RLConfig, or the bandit's own)."""

    epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int | None = None
    max_len: int = 1  # L_max of the constant normalizer (max_new_tokens)
    target_kl: float | None = None


# forward(rows) -> (logprobs (b, T), entropy (b, T) | None, values (b, T) | None) of the
# rows' response tokens under the current weights, with gradients.
Forward = Callable[[UpdateBatch], tuple]


def update_policy(batch: UpdateBatch, forward: Forward, optimizer_step: Callable[[], float], hp: UpdateSettings,
                  stats: BatchStats, generator: torch.Generator, *, backward: Callable | None = None,
                  no_sync: Callable | None = None, first_perm: torch.Tensor | None = None,
                  mismatch_guard: Callable[[dict], None] | None = None) -> dict[str, float]:
    """Several epochs of shuffled minibatches over one rollout batch; one optimizer step
    per minibatch; optional early stop once the minibatch's approx-KL exceeds
    ``hp.target_kl``.

    Sampler/trainer mismatch: the first minibatch's forward passes run before any
    optimizer step, with the weights that sampled, so there the trainer's log-probs of the
    sampled tokens must equal the sampler's (``batch.sampler_logprobs``, or the old
    log-probs when those are the sampler's). Their distance is returned as
    ``rollout/logprob_diff_mean`` and ``rollout/logprob_diff_max`` (nats, over the first
    minibatch's tokens of all processes), with ``rollout/first_ratio_mean``, the mean of
    pi_theta / pi_old there (1 when the old log-probs are right), and handed to
    ``mismatch_guard`` before the first optimizer step.

    Args:
        batch: this process's rows: token ids, per-token log-probs, advantages and masks.
        forward: recomputes (logprobs, entropy, values) of the rows it is given
            (``batch.select(...)``) with gradients.
        optimizer_step: clips gradients, steps and zeroes the optimizer; returns the
            gradient norm (or nan).
        hp: loss and loop hyper-parameters.
        stats: reductions over processes (normalisers and metrics are global).
        generator: shuffles the rows of each epoch (seeded per rollout step, so a resumed
            run shuffles the same way).
        backward: ``accelerator.backward`` (default ``loss.backward()``).
        no_sync: context manager that skips the DDP all-reduce on all but the last
            micro-batch of a minibatch.
        first_perm: the first epoch's shuffle when the caller has drawn it already (as
            ``torch.randperm(B, generator=generator)``, the generator then past it).
        mismatch_guard: called with the mismatch readings before the first optimizer step
            (it may raise to stop the run).
    """
    B = batch.batch_size
    W = stats.world_size
    sums = Sums()
    grad_norms = []
    updates, stopped = 0, False
    mismatch: dict[str, float] = {}
    for epoch in range(hp.epochs):
        perm = first_perm if (epoch == 0 and first_perm is not None) else torch.randperm(B, generator=generator)
        perm = perm.to(batch.mask.device)
        for mb in perm.chunk(hp.num_minibatches):
            first = updates == 0
            diff_sums, diff_max = Sums(), torch.zeros((), dtype=torch.float64)
            totals = stats.sum(torch.stack([torch.tensor(float(len(mb)), dtype=torch.float64),
                                            batch.mask[mb].sum().double().cpu()]))
            counts = Counts(n_seqs=(totals[0] / W).item(), n_tokens=max(totals[1].item(), 1.0) / W,
                            max_len=hp.max_len)
            micro = hp.micro_batch_size or len(mb)
            mb_sums = Sums()
            for start in range(0, len(mb), micro):
                rows = batch.select(mb[start:start + micro])
                last = start + micro >= len(mb)
                ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
                with ctx:
                    logprobs, entropy, values = forward(rows)
                    loss, micro_sums = policy_gradient_loss(
                        logprobs, rows.old_logprobs, rows.advantages, rows.mask, counts, hp,
                        ref_logprobs=rows.ref_logprobs, entropy=entropy, values=values, old_values=rows.old_values,
                        returns=rows.returns, is_weights=rows.is_weights)
                    (backward or torch.Tensor.backward)(loss)
                sums.add(micro_sums)
                mb_sums.add({"policy/approxkl": micro_sums["policy/approxkl"]})
                if first:
                    sampler = rows.old_logprobs if rows.sampler_logprobs is None else rows.sampler_logprobs
                    d = (logprobs.detach().double() - sampler.double()).abs()[rows.mask.bool()]
                    diff_sums.add({"rollout/logprob_diff_mean": (d.sum(), d.numel()),
                                   "rollout/first_ratio_mean": micro_sums["policy/ratio_mean"]})
                    if d.numel():
                        diff_max = torch.maximum(diff_max, d.max().cpu())
            if first:
                mismatch = diff_sums.result(stats)
                mismatch["rollout/logprob_diff_max"] = stats.max(diff_max).item()
                if mismatch_guard is not None:
                    mismatch_guard(mismatch)
            grad_norms.append(float(optimizer_step()))
            updates += 1
            if hp.target_kl is not None and mb_sums.result(stats)["policy/approxkl"] > hp.target_kl:
                stopped = True
                break
        if stopped:
            break
    out = sums.result(stats)
    out.update(mismatch)
    finite = [g for g in grad_norms if math.isfinite(g)]
    out.update({"policy/updates": float(updates), "policy/early_stopped": float(stopped),
                "policy/grad_norm": sum(finite) / len(finite) if finite else float("nan")})
    return out
