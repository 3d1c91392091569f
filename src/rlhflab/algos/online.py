"""What the online RL loops share: the policy-gradient loss, the one update function that
every algorithm (and the tabular bandit) calls, batch statistics over all processes, and
the run context (models, optimizer, KL controller, monitoring, checkpoints).

The algorithms themselves (``ppo.py``, ``reinforce.py``, ``grpo.py``) are short loops:

    for step in run.steps():
        ro = run.rollout(step)                       # rlhflab.rollout.Rollout
        advantages = <the algorithm's estimator>(ro)  # pure functions, advantages.py
        metrics = run.update(ro, UpdateBatch(...))   # update_policy below
        run.end_step(step, ro, metrics)              # KL control, logs, eval, checkpoint

``update_policy`` consumes per-token log-probs and advantages only, so the bandit
(``bandit_online.py``) feeds it one-token responses and checks the very same code
against the closed-form optimum.

Normalisation across processes: every loss is a sum over the local rows divided by a
count of the *global* minibatch (tokens or sequences) times the number of processes W,
because DDP averages gradients over W. So W processes compute exactly the gradient of
one process holding the whole batch (up to float summation order), and statistics that
span the batch (whitening, the batch-mean baseline, metrics) are reduced over processes
(``BatchStats``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhflab.errors import InputError, RunError
from rlhflab.kl import KL_ESTIMATORS, KL_STATUS, kl_k1, kl_status, make_kl_controller, sequence_kl
from rlhflab.seeds import derive_seed

# ---------------------------------------------------------------------------------------
# Algorithm defaults (fields of RLConfig left empty)
# ---------------------------------------------------------------------------------------

ALGO_DEFAULTS: dict[str, dict] = {
    "ppo": dict(samples_per_prompt=1, epochs=4, num_minibatches=4, kl_in="reward", kl_estimator="k1",
                whiten_advantages=True, loss_agg="token_mean"),
    "reinforce": dict(samples_per_prompt=1, epochs=1, num_minibatches=1, kl_in="reward", kl_estimator="k1",
                      whiten_advantages=False, loss_agg="seq_sum", baseline="batch"),
    "rloo": dict(samples_per_prompt=4, epochs=1, num_minibatches=1, kl_in="reward", kl_estimator="k1",
                 whiten_advantages=False, loss_agg="seq_sum"),
    "reinforce++": dict(samples_per_prompt=1, epochs=1, num_minibatches=2, kl_in="reward", kl_estimator="k1",
                        whiten_advantages=True, loss_agg="token_mean"),
    "grpo": dict(samples_per_prompt=8, epochs=1, num_minibatches=2, kl_in="loss", kl_estimator="k3",
                 whiten_advantages=False, loss_agg="seq_mean", scale_std=True),
    "dr-grpo": dict(samples_per_prompt=8, epochs=1, num_minibatches=2, kl_in="loss", kl_estimator="k3",
                    whiten_advantages=False, loss_agg="constant", scale_std=False),
}
"""Per-algorithm values of the RLConfig fields a user may leave empty."""

def _rl_choices() -> dict[str, tuple[str, ...]]:
    from rlhflab.config import RLConfig, field_domain

    return {f.name: field_domain(f).choices for f in dataclasses.fields(RLConfig)
            if field_domain(f) is not None and field_domain(f).choices}


CHOICES = _rl_choices()
"""The RLConfig fields that take one of a few words, and those words (declared once, as the
fields' domains in ``rlhflab.config``)."""


def resolve_rl_config(rl, algo: str):
    """A copy of ``rl`` (an RLConfig) with empty fields filled from ``ALGO_DEFAULTS[algo]``,
    validated: every field in its domain (``rlhflab.config``), then the checks that depend on
    the algorithm; errors name the field."""
    from rlhflab.config import check_section

    rl = dataclasses.replace(rl)
    defaults = dict(ALGO_DEFAULTS[algo])
    if algo == "reinforce" and (rl.baseline or defaults["baseline"]) == "group":
        defaults["samples_per_prompt"] = 4
    for key, value in defaults.items():
        if getattr(rl, key) is None:
            setattr(rl, key, value)
    check_section(rl, "rl")  # before beta_end is derived from beta
    if rl.beta_end is None:
        rl.beta_end = rl.beta / 10
    if rl.loss_agg not in LOSS_AGGREGATIONS:
        raise InputError(f"expected one of {', '.join(LOSS_AGGREGATIONS)}", field="rl.loss_agg")
    if rl.batch_size % rl.samples_per_prompt:
        raise InputError(f"batch_size {rl.batch_size} is not a multiple of samples_per_prompt "
                         f"{rl.samples_per_prompt}", field="rl.batch_size")
    if algo in ("rloo", "grpo", "dr-grpo") and rl.samples_per_prompt < 2:
        raise InputError(f"{algo} needs at least 2 samples per prompt", field="rl.samples_per_prompt")
    return rl


# ---------------------------------------------------------------------------------------
# Pure losses
# ---------------------------------------------------------------------------------------


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                      clip_eps: float = 0.2, clip_eps_high: float | None = None):
    """PPO's clipped surrogate per token (Schulman et al. 2017), as a loss to minimise:

        rho_t = exp(log pi_theta(y_t) - log pi_old(y_t))
        l_t   = max(-A_t * rho_t,  -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high))

    eps_high = eps_low = clip_eps unless ``clip_eps_high`` is given (asymmetric clipping,
    "clip-higher" of DAPO, Yu et al. 2025). With one update per rollout rho = 1 and the
    gradient is the plain policy gradient -A_t * grad log pi(y_t).

    Args:
        logprobs: log pi_theta of the sampled tokens.     # (B, T)
        old_logprobs: log pi_old at sampling time.        # (B, T)
        advantages: A_t, detached.                        # (B, T)

    Returns:
        (l_t, rho_t, clipped_t): per-token loss, ratio and a 0/1 float telling where the
        clipped branch is the larger one (and so the gradient is 0).  # (B, T) each
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped).float()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *,
                       clip_eps: float = 0.2):
    """PPO's clipped value loss per token (Huang et al. 2022, "The 37 implementation details
    of PPO"):

        V_clip = V_old + clip(V - V_old, -eps, eps)
        l_t    = 0.5 * max((V - R)^2, (V_clip - R)^2)

    Returns:
        (l_t, clipped_t) per token.                       # (B, T) each
    """
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped = (values - returns).square()
    clipped = (v_clipped - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@dataclass
class Counts:
    """Normalisers of one minibatch: global counts divided by the number of processes."""

    n_seqs: float
    n_tokens: float
    max_len: int


def _token_mean(x, mask, c: Counts):
    """sum_{i,t} m_it x_it / N_tokens  (PPO, REINFORCE++, DAPO's token-level loss)"""
    return (x * mask).sum() / c.n_tokens


def _seq_sum(x, mask, c: Counts):
    """(1/N_seqs) sum_i sum_t m_it x_it  (REINFORCE: the score function of a whole sequence)"""
    return (x * mask).sum() / c.n_seqs


def _seq_mean(x, mask, c: Counts):
    """(1/N_seqs) sum_i (1/|y_i|) sum_t m_it x_it  (GRPO, Shao et al. 2024)"""
    per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq.sum() / c.n_seqs


def _constant(x, mask, c: Counts):
    """(1/(N_seqs * L_max)) sum_{i,t} m_it x_it  (Dr. GRPO, Liu et al. 2025: no length bias)"""
    return (x * mask).sum() / (c.n_seqs * c.max_len)


LOSS_AGGREGATIONS: dict[str, Callable] = {
    "token_mean": _token_mean,
    "seq_sum": _seq_sum,
    "seq_mean": _seq_mean,
    "constant": _constant,
}
"""How per-token losses become one number (``rl.loss_agg``)."""


@dataclass
class UpdateSettings:
    """Hyper-parameters of ``update_policy`` (from RLConfig, or the bandit's own)."""

    epochs: int = 1
    num_minibatches: int = 1
    micro_batch_size: int | None = None
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    loss_agg: str = "token_mean"
    max_len: int = 1
    kl_coef: float = 0.0  # beta when the KL is in the loss, else 0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    vf_coef: float = 0.1
    value_clip_eps: float = 0.2
    target_kl: float | None = None


def policy_gradient_loss(logprobs, old_logprobs, advantages, mask, counts: Counts, hp: UpdateSettings, *,
                         ref_logprobs=None, entropy=None, values=None, old_values=None, returns=None,
                         is_weights=None):
    """The loss of one micro-batch: clipped surrogate + KL + value - entropy bonus.

        L = agg(w * l^clip) + kl_coef * agg(w * k(log pi_theta, log pi_ref))
            + vf_coef * token_mean(l^V) - entropy_coef * agg(H)

    ``w`` is 1, or the detached truncated importance weights of a sampler that differs from
    the trainer (``is_weights``, ``losses.truncated_importance_weights``). Both the
    surrogate and the KL term are expectations under pi_theta estimated on the sampler's
    tokens, so both are weighted (as TRL weights its whole per-token loss): weighting the
    surrogate alone leaves the KL term's gradient off-policy and, with the KL in the loss,
    moves the fixed point away from pi*.

    ``agg`` is ``LOSS_AGGREGATIONS[hp.loss_agg]``; the KL term uses the estimator
    ``hp.kl_estimator`` on the current log-probs (k3: GRPO; k2: the reverse-KL gradient),
    the value term is there only when ``values`` is given (PPO).

    Returns:
        (loss, sums): the scalar loss and, for metrics, name -> (sum over tokens,
        token count) of this micro-batch, to be reduced over micro-batches and processes.
    """
    agg = LOSS_AGGREGATIONS[hp.loss_agg]
    pg_t, ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages,
                                             clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high)
    if is_weights is not None:
        pg_t = is_weights * pg_t
    loss = agg(pg_t, mask, counts)
    n = mask.sum()
    log_ratio = (logprobs - old_logprobs).detach()

    def s(x):
        return ((x.detach() * mask).sum(), n)

    sums = {"loss/policy": s(pg_t), "policy/clipfrac": s(clipped), "policy/approxkl": s(0.5 * log_ratio.square()),
            "policy/ratio_mean": s(ratio)}
    if hp.kl_coef and ref_logprobs is not None:
        kl_t = KL_ESTIMATORS[hp.kl_estimator](logprobs, ref_logprobs)
        loss = loss + hp.kl_coef * agg(kl_t if is_weights is None else is_weights * kl_t, mask, counts)
        sums["loss/kl"] = s(kl_t)
    if entropy is not None:
        if hp.entropy_coef:
            loss = loss - hp.entropy_coef * agg(entropy, mask, counts)
        sums["policy/entropy"] = s(entropy)
    if values is not None:
        v_t, v_clipped = clipped_value_loss(values, old_values, returns, clip_eps=hp.value_clip_eps)
        loss = loss + hp.vf_coef * _token_mean(v_t, mask, counts)
        sums.update({"loss/value": s(v_t), "val/clipfrac": s(v_clipped), "val/vpred": s(values)})
    return loss, sums


# ---------------------------------------------------------------------------------------
# Batch statistics over all processes
# ---------------------------------------------------------------------------------------


class BatchStats:
    """Sums, means and whitening over the global batch (all processes).

    With one process (or ``accelerator=None``) every method is the plain local formula;
    ``whiten`` then equals ``advantages.masked_whiten`` exactly.
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
        valid = mask.bool()
        local = torch.stack([torch.where(valid, x, torch.zeros_like(x)).sum().double(), valid.sum().double()])
        total = self.sum(local)
        return (total[0] / total[1].clamp(min=1)).to(x.dtype)

    def masked_var(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Unbiased variance over valid entries (as ``advantages.masked_var``)."""
        valid = mask.bool()
        mean = self.masked_mean(x, mask)
        sq = torch.where(valid, (x - mean).square(), torch.zeros_like(x)).sum().double()
        total = self.sum(torch.stack([sq, valid.sum().double()]))
        return (total[0] / (total[1] - 1).clamp(min=1)).to(x.dtype)

    def whiten(self, x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8):
        """(x - mean) / sqrt(var + eps) [+ mean if not shift_mean], 0 on padding."""
        valid = mask.bool()
        mean = self.masked_mean(x, mask)
        var = self.masked_var(x, mask)
        out = (x - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            out = out + mean
        return torch.where(valid, out, torch.zeros_like(out))


class _Sums:
    """name -> [sum, count], reduced over processes at the end."""

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
# The shared update
# ---------------------------------------------------------------------------------------


@dataclass
class UpdateBatch:
    """What one rollout batch gives the optimizer. Token tensors are (B, T)."""

    old_logprobs: torch.Tensor             # (B, T) log pi at sampling time
    advantages: torch.Tensor               # (B, T) detached; sequence advantages broadcast
    mask: torch.Tensor                     # (B, T) float, 1 on response tokens
    ref_logprobs: torch.Tensor | None = None  # (B, T) for a KL term in the loss
    returns: torch.Tensor | None = None    # (B, T) PPO value targets
    old_values: torch.Tensor | None = None  # (B, T) PPO values at sampling time
    sampler_logprobs: torch.Tensor | None = None  # (B, T) log pi_sampler; None: old_logprobs are the sampler's
    is_weights: torch.Tensor | None = None  # (B, T) truncated importance weights (TIS), or None


# forward(idx) -> (logprobs (b, T), entropy (b, T) | None, values (b, T) | None)
Forward = Callable[[torch.Tensor], tuple]


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
        batch: per-token log-probs, advantages and masks of this process's rows.
        forward: recomputes (logprobs, entropy, values) for row indices with gradients.
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
    B = batch.mask.shape[0]
    W = stats.world_size
    sums = _Sums()
    grad_norms = []
    updates, stopped = 0, False
    mismatch: dict[str, float] = {}
    for epoch in range(hp.epochs):
        perm = first_perm if (epoch == 0 and first_perm is not None) else torch.randperm(B, generator=generator)
        perm = perm.to(batch.mask.device)
        for mb in perm.chunk(hp.num_minibatches):
            first = updates == 0
            diff_sums, diff_max = _Sums(), torch.zeros((), dtype=torch.float64)
            totals = stats.sum(torch.stack([torch.tensor(float(len(mb)), dtype=torch.float64),
                                            batch.mask[mb].sum().double().cpu()]))
            counts = Counts(n_seqs=(totals[0] / W).item(), n_tokens=max(totals[1].item(), 1.0) / W,
                            max_len=hp.max_len)
            micro = hp.micro_batch_size or len(mb)
            mb_sums = _Sums()
            for start in range(0, len(mb), micro):
                idx = mb[start:start + micro]
                last = start + micro >= len(mb)
                ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
                with ctx:
                    logprobs, entropy, values = forward(idx)
                    loss, micro_sums = policy_gradient_loss(
                        logprobs, batch.old_logprobs[idx], batch.advantages[idx], batch.mask[idx], counts, hp,
                        ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[idx],
                        entropy=entropy, values=values,
                        old_values=None if batch.old_values is None else batch.old_values[idx],
                        returns=None if batch.returns is None else batch.returns[idx],
                        is_weights=None if batch.is_weights is None else batch.is_weights[idx])
                    (backward or torch.Tensor.backward)(loss)
                sums.add(micro_sums)
                mb_sums.add({"policy/approxkl": micro_sums["policy/approxkl"]})
                if first:
                    sampler = batch.old_logprobs if batch.sampler_logprobs is None else batch.sampler_logprobs
                    m = batch.mask[idx].bool()
                    d = (logprobs.detach().double() - sampler[idx].double()).abs()[m]
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


# ---------------------------------------------------------------------------------------
# The run context
# ---------------------------------------------------------------------------------------


def check_layout(rl, num_processes: int) -> None:
    """The global batch must split into whole prompt groups per process, minibatches and
    micro-batches; errors name the field."""
    n_prompts = rl.batch_size // rl.samples_per_prompt
    if n_prompts % num_processes:
        raise InputError(f"{n_prompts} prompts per step do not split over {num_processes} processes",
                         field="rl.batch_size")
    local_rows = rl.batch_size // num_processes
    if local_rows % rl.num_minibatches:
        raise InputError(f"{local_rows} rows per process do not split into {rl.num_minibatches} minibatches",
                         field="rl.num_minibatches")
    mb = local_rows // rl.num_minibatches
    if rl.micro_batch_size and mb % rl.micro_batch_size:
        raise InputError(f"minibatches of {mb} rows do not split into micro-batches of {rl.micro_batch_size}",
                         field="rl.micro_batch_size")


class OnlineRun:
    """Everything an online loop needs besides its own advantage estimator.

    Built by ``rlhflab.commands.rl``; the algorithm calls ``steps``, ``rollout``,
    ``update``, ``end_step`` and ``finish``.
    """

    def __init__(self, cfg, algo: str, accelerator, policy, reference, tokenizer, reward, prompt_pool: list[str], *,
                 value_model=None, out_dir: Path | None = None, world=None, eval_prompts=None) -> None:
        from rlhflab.tracking import MetricsLog
        from rlhflab.training import lr_lambda

        self.cfg, self.rl, self.algo = cfg, cfg.rl, algo
        self.accelerator = accelerator
        self.tokenizer, self.reward = tokenizer, reward
        self.prompt_pool = prompt_pool
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.world, self.eval_prompts = world, eval_prompts
        self.stats = BatchStats(accelerator)
        rl = self.rl
        check_layout(rl, accelerator.num_processes)
        self.group_size = rl.samples_per_prompt

        # Reference: frozen, never prepared (no DDP, no optimizer), dropout off.
        reference.requires_grad_(False)
        reference.eval()
        self.reference = reference.to(accelerator.device)
        # Dropout off in the policy and critic too, so the first-epoch ratio is exactly 1.
        policy.eval()
        groups = [{"params": list(policy.parameters()), "lr": rl.lr}]
        if value_model is not None:
            value_model.eval()
            groups.append({"params": list(value_model.parameters()), "lr": rl.value_lr or rl.lr})
        # the fused kernel: one pass over each parameter, the same update up to float rounding
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        self.optimizer_raw = torch.optim.AdamW(groups, lr=rl.lr, weight_decay=rl.weight_decay, fused=fused or None)
        warmup = int(rl.warmup_ratio * rl.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer_raw, lr_lambda(rl.lr_schedule, warmup, rl.steps))
        if value_model is not None:
            self.policy, self.value, self.optimizer = accelerator.prepare(policy, value_model, self.optimizer_raw)
        else:
            self.policy, self.optimizer = accelerator.prepare(policy, self.optimizer_raw)
            self.value = None
        self.kl_ctl = make_kl_controller(rl.kl_controller, **{
            "fixed": dict(beta=rl.beta),
            # Controllers advance by the samples of each batch (Ziegler et al.'s horizon unit).
            "linear": dict(beta_start=rl.beta, beta_end=rl.beta_end, total_steps=rl.steps * rl.batch_size),
            "adaptive": dict(init_beta=rl.beta, target=rl.kl_target, horizon=rl.kl_horizon),
        }[rl.kl_controller])
        self.state = {"step": 0, "best_gold": None, "best_step": None, "bad_evals": 0, "stopped_early": False,
                      "kl_status_steps": {s: 0 for s in KL_STATUS}, "time_rollout": 0.0, "time_update": 0.0,
                      "last_status": "ok", "evals": []}
        self.is_main = accelerator.is_main_process
        self.log = MetricsLog(self.out_dir / "metrics.jsonl" if self.out_dir else None, enabled=self.is_main)
        self.last_metrics: dict = {}
        self._bar = None
        self._perm_cache: tuple[int, list[int]] | None = None
        self._t_rollout = 0.0
        self._update_step = 0

    # -- modules -----------------------------------------------------------------------

    @property
    def policy_module(self):
        return self.accelerator.unwrap_model(self.policy)

    @property
    def value_module(self):
        return None if self.value is None else self.accelerator.unwrap_model(self.value)

    # -- prompts and rollout -----------------------------------------------------------

    def _prompt_at(self, j: int) -> str:
        """The j-th prompt of an endless stream of seeded permutations of the pool."""
        N = len(self.prompt_pool)
        epoch = j // N
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.rl.seed, "prompts", epoch))
            self._perm_cache = (epoch, torch.randperm(N, generator=gen).tolist())
        return self.prompt_pool[self._perm_cache[1][j % N]]

    def local_rows_of(self, step: int) -> tuple[list[str], list[int]]:
        """This process's prompts (each repeated G times) and per-row seeds for ``step``."""
        from rlhflab.generation import row_seed

        G, W, r = self.group_size, self.accelerator.num_processes, self.accelerator.process_index
        n_prompts = self.rl.batch_size // G
        per = n_prompts // W
        prompts, seeds = [], []
        for i in range(r * per, (r + 1) * per):
            text = self._prompt_at((step - 1) * n_prompts + i)
            for g in range(G):
                prompts.append(text)
                seeds.append(row_seed(self.rl.seed, step, i * G + g))
        return prompts, seeds

    def _minibatch_shuffle(self, step: int, n_rows: int) -> tuple[torch.Generator, torch.Tensor]:
        """The generator of this step's minibatch shuffles and the first epoch's permutation."""
        gen = torch.Generator().manual_seed(derive_seed(self.rl.seed, "minibatches", step,
                                                      self.accelerator.process_index))
        return gen, torch.randperm(n_rows, generator=gen)

    def rollout(self, step: int):
        from rlhflab.rollout import collect_rollout

        t = time.perf_counter()
        prompts, seeds = self.local_rows_of(step)
        ro = collect_rollout(self.policy_module, self.reference, self.tokenizer, prompts, seeds, self.reward,
                             generation=self.cfg.generation, group_size=self.group_size,
                             value_model=self.value_module, no_eos_penalty=self.rl.no_eos_penalty,
                             forward_batch_size=self.rl.micro_batch_size, rescore=self.rl.tis_cap is not None)
        ro = ro.to(self.accelerator.device)
        self._t_rollout = time.perf_counter() - t
        return ro

    # -- update ------------------------------------------------------------------------

    def settings(self) -> UpdateSettings:
        rl = self.rl
        return UpdateSettings(
            epochs=rl.epochs, num_minibatches=rl.num_minibatches, micro_batch_size=rl.micro_batch_size,
            clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high, loss_agg=rl.loss_agg,
            max_len=self.cfg.generation.max_new_tokens,
            kl_coef=self.kl_ctl.value if rl.kl_in == "loss" else 0.0, kl_estimator=rl.kl_estimator,
            entropy_coef=rl.entropy_coef, vf_coef=rl.vf_coef, value_clip_eps=rl.value_clip_eps,
            target_kl=rl.target_kl)

    def _forward(self, ro, with_values: bool):
        from rlhflab.rollout import forward_response

        T = self.cfg.generation.temperature
        with_entropy = self.rl.entropy_coef > 0

        def forward(idx):
            args = (ro.prompt_ids[idx], ro.prompt_mask[idx], ro.response_ids[idx], ro.mask[idx])
            lp, ent = forward_response(self.policy, *args, temperature=T, with_entropy=with_entropy)
            v = forward_response(self.value, *args, values=True) if with_values else None
            return lp, ent, v

        return forward

    def _optimizer_step(self) -> float:
        from rlhflab.artifacts import is_staging
        from rlhflab.training import grad_norm_of, stop_if_non_finite

        params = [p for g in self.optimizer_raw.param_groups for p in g["params"]]
        norm = float("nan")
        if self.rl.max_grad_norm > 0:
            norm = float(self.accelerator.clip_grad_norm_(params, self.rl.max_grad_norm))
        if self.accelerator.scaler is None:  # fp16's loss scaler expects (and skips) overflows
            # A non-finite loss, advantage or reward shows here: stop before the weights take it.
            ckpt = self.out_dir / "checkpoint" if self.out_dir is not None else None
            stop_if_non_finite(self.algo, self._update_step, lr=self.rl.lr, lr_field="rl.lr",
                               grad_norm=norm if self.rl.max_grad_norm > 0 else float(grad_norm_of(params)),
                               kept=str(ckpt) if ckpt is not None and ckpt.is_dir() and not is_staging(ckpt.parent)
                               else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def _no_sync(self):
        with contextlib.ExitStack() as stack:
            for m in (self.policy, self.value):
                if m is not None:
                    stack.enter_context(self.accelerator.no_sync(m))
            yield

    def _mismatch_guard(self, step: int):
        """Stops the run when the trainer's log-probs of the sampled tokens are not the
        sampler's (``update_policy``'s first-minibatch readings). Without TIS both come from
        the same weights in this process and agree to float precision (at most 4.3e-6 nats in
        float32 on the demo model), so a larger gap means the two compute different models."""
        rl = self.rl

        def guard(readings: dict) -> None:
            gap = readings.get("rollout/logprob_diff_max", 0.0)
            if rl.tis_cap is not None or not gap > rl.mismatch_tolerance:
                return
            raise RunError(
                f"step {step}: the sampler's log-probs are not the trainer's: max |log pi_train - log pi_sampler| = "
                f"{gap:.3g} nats (mean {readings.get('rollout/logprob_diff_mean', float('nan')):.3g}, first-update "
                f"ratio {readings.get('rollout/first_ratio_mean', float('nan')):.4g}) above rl.mismatch_tolerance = "
                f"{rl.mismatch_tolerance:g}; the decoding loop and the training forward disagree (a KV cache, mask "
                f"or position ids the installed transformers handles differently, or a sampler in another "
                f"precision: then set rl.tis_cap)")

        return guard

    def update(self, step: int, batch: UpdateBatch, ro) -> dict[str, float]:
        from rlhflab.losses import truncated_importance_weights

        t = time.perf_counter()
        extra: dict[str, float] = {}
        if batch.sampler_logprobs is None and ro.sampler_logprobs is not ro.logprobs:
            batch = dataclasses.replace(batch, sampler_logprobs=ro.sampler_logprobs)
        if self.rl.tis_cap is not None and batch.sampler_logprobs is not None:
            w = truncated_importance_weights(batch.old_logprobs, batch.sampler_logprobs, cap=self.rl.tis_cap)
            batch = dataclasses.replace(batch, is_weights=w)
            m = batch.mask.bool()
            extra = {"rollout/tis_weight_mean": self.stats.masked_mean(w, batch.mask).item(),
                     "rollout/tis_clipfrac": self.stats.masked_mean((w >= self.rl.tis_cap).float() * m,
                                                                    batch.mask).item()}
        gen, perm = self._minibatch_shuffle(step, batch.mask.shape[0])
        self._update_step = step
        metrics = update_policy(batch, self._forward(ro, with_values=batch.returns is not None),
                                self._optimizer_step, self.settings(), self.stats, gen,
                                backward=self.accelerator.backward, no_sync=self._no_sync, first_perm=perm,
                                mismatch_guard=self._mismatch_guard(step))
        metrics.update(extra)
        self.state["time_update"] += time.perf_counter() - t
        return metrics

    # -- the step loop ---------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        from rlhflab.progress import progress_bar

        start = self.state["step"] + 1
        with progress_bar(self.rl.steps, self.algo, enabled=self.is_main) as bar:
            self._bar = bar
            if start > 1:
                bar.update(advance=start - 1)
            if start == 1 and self.rl.eval_every:
                self._gold_eval(0)
            for step in range(start, self.rl.steps + 1):
                if self.state["stopped_early"]:
                    break
                yield step
        self._bar = None

    def rollout_metrics(self, ro, beta: float) -> dict[str, float]:
        """objective/*, rollout/* over the global batch."""
        k1 = sequence_kl(kl_k1(ro.logprobs, ro.ref_logprobs), ro.mask)        # (B,)
        ent = (ro.entropy * ro.mask).sum(-1)                                   # (B,)
        local = torch.stack([torch.tensor(float(ro.batch_size)), ro.scores.sum().cpu(), k1.sum().cpu(),
                             ent.sum().cpu(), ro.lengths.sum().cpu(), ro.eos.float().sum().cpu(),
                             (ro.scores.cpu() - beta * k1.cpu()).sum()]).double()
        n, score, kl, ent_s, length, eos, rlhf = self.stats.sum(local).tolist()
        return {"objective/kl": kl / n, "objective/scores": score / n, "objective/rlhf_reward": rlhf / n,
                "objective/non_score_reward": -beta * kl / n, "objective/entropy": ent_s / n,
                "rollout/length_mean": length / n, "rollout/eos_rate": eos / n, "kl/beta": beta}

    def end_step(self, step: int, ro, update_metrics: dict[str, float], extra: dict | None = None) -> None:
        rl = self.rl
        beta = self.kl_ctl.value
        metrics = self.rollout_metrics(ro, beta)
        metrics.update(update_metrics)
        metrics.update(extra or {})
        self.kl_ctl.update(metrics["objective/kl"], rl.batch_size)
        self.scheduler.step()
        status = kl_status(metrics["objective/kl"], rl.kl_caution, rl.kl_warning)
        self.state["kl_status_steps"][status] += 1
        if status != self.state["last_status"] and self.is_main:
            print(f"[{self.algo}] step {step}: KL {metrics['objective/kl']:.2f} nats -> {status} "
                  f"(caution > {rl.kl_caution:g}, warning > {rl.kl_warning:g})", file=sys.stderr)
        self.state["last_status"] = status
        self.state["time_rollout"] += self._t_rollout
        metrics.update({"kl/status": float(KL_STATUS.index(status)), "lr": self.scheduler.get_last_lr()[0],
                        "time/rollout": self._t_rollout})
        self.state["step"] = step
        if rl.eval_every and (step % rl.eval_every == 0 or step == rl.steps):
            metrics.update(self._gold_eval(step))
        if step % rl.log_every == 0 or step == rl.steps or any(k.startswith("gold/") for k in metrics):
            self.log.log(metrics, step=step)
        self.last_metrics = metrics
        if self._bar is not None:
            self._bar.update(reward=metrics["objective/scores"], kl=metrics["objective/kl"], beta=beta,
                             kl_status=status, **({"gold": metrics["gold/mean"]} if "gold/mean" in metrics else {}))
        if rl.save_every and step % rl.save_every == 0 and step < rl.steps and not self.state["stopped_early"]:
            self.save_checkpoint()

    # -- gold evaluation and early stopping --------------------------------------------

    def _gold_eval(self, step: int) -> dict[str, float]:
        """Gold utility of fresh samples on held-out world prompts, and the proxy's score of
        the same samples (proxy-vs-gold). Early stopping on the gold judge."""
        if self.world is None or not self.eval_prompts:
            return {}
        from accelerate.utils import broadcast

        from rlhflab.instruments.policy_eval import measure_policy_on_world

        out: dict[str, float] = {}
        flag = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)
        if self.is_main:
            measured, completions = measure_policy_on_world(
                self.policy_module, self.tokenizer, self.world, self.eval_prompts, self.cfg.generation,
                seed=derive_seed(self.rl.seed, "eval"))
            from rlhflab.rewards import score_responses

            proxy = score_responses(self.reward, [p.text for p in self.eval_prompts],
                                    [c.text for c in completions], [c.eos for c in completions])
            out = {k: v for k, v in measured.items() if k.startswith(("gold/mean", "samples/"))}
            out["eval/proxy_mean"] = float(proxy.float().mean())
            out["eval/proxy_minus_gold"] = out["eval/proxy_mean"] - out["gold/mean"]
            self.state["evals"].append({"step": step, "gold/mean": out["gold/mean"],
                                        "eval/proxy_mean": out["eval/proxy_mean"]})
            improved = self.state["best_gold"] is None or out["gold/mean"] > self.state["best_gold"]
            if improved:
                self.state.update(best_gold=out["gold/mean"], best_step=step, bad_evals=0)
                if self.rl.early_stop_patience and self.out_dir is not None:
                    from rlhflab.models import save_pretrained_atomic

                    save_pretrained_atomic(self.policy_module, self.tokenizer, self.out_dir / "best")
            else:
                self.state["bad_evals"] += 1
            stop = bool(self.rl.early_stop_patience) and self.state["bad_evals"] >= self.rl.early_stop_patience
            flag[0], flag[1] = float(stop), 1.0
            if step == 0:
                self.log.log(out, step=0)
        if self.accelerator.num_processes > 1:
            flag = broadcast(flag)
        if flag[0].item() > 0:
            self.state["stopped_early"] = True
            if self.is_main:
                print(f"[{self.algo}] step {step}: gold has not improved for {self.rl.early_stop_patience} "
                      f"evaluations; stopping (best at step {self.state['best_step']})", file=sys.stderr)
        return out

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {**self.state, "kl_controller": self.kl_ctl.state_dict(), "algo": self.algo}

    def save_checkpoint(self) -> None:
        from rlhflab.checkpoint import save_checkpoint

        self.accelerator.wait_for_everyone()
        if self.is_main and self.out_dir is not None:
            save_checkpoint(self.out_dir / "checkpoint", policy=self.policy_module, value=self.value_module,
                            optimizer=self.optimizer_raw, scheduler=self.scheduler, state=self.checkpoint_state())
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        from rlhflab.checkpoint import load_checkpoint

        state = load_checkpoint(path, policy=self.policy_module, value=self.value_module,
                                optimizer=self.optimizer_raw, scheduler=self.scheduler)
        self.kl_ctl.load_state_dict(state.pop("kl_controller"))
        state.pop("algo", None)
        self.state.update(state)

    # -- the end -----------------------------------------------------------------------

    def finish(self, extra: dict | None = None) -> dict:
        """Restore the best policy (early stopping), save model/ (and value/), summarise."""
        from rlhflab.artifacts import write_json
        from rlhflab.models import save_pretrained_atomic

        self.log.close()
        restored = False
        best = self.out_dir / "best" if self.out_dir is not None else None
        if self.state["stopped_early"] and best is not None:  # the same decision on every process
            self.accelerator.wait_for_everyone()
            if (best / "model.safetensors").is_file():
                from safetensors.torch import load_model

                load_model(self.policy_module, str(best / "model.safetensors"), strict=False)
                restored = True
        st = self.state
        total = st["time_rollout"] + st["time_update"]
        summary = {
            "algo": self.algo, "steps": st["step"], "processes": self.accelerator.num_processes,
            **{k: v for k, v in self.last_metrics.items() if k.startswith(("objective/", "rollout/", "kl/"))},
            "gold/initial": st["evals"][0]["gold/mean"] if st["evals"] else None,
            "gold/final": st["evals"][-1]["gold/mean"] if st["evals"] else None,
            "gold/best": st["best_gold"], "gold/best_step": st["best_step"],
            "eval/proxy_initial": st["evals"][0]["eval/proxy_mean"] if st["evals"] else None,
            "eval/proxy_final": st["evals"][-1]["eval/proxy_mean"] if st["evals"] else None,
            "early_stop/stopped": st["stopped_early"], "early_stop/restored_best": restored,
            "kl/status_steps": st["kl_status_steps"], "evals": st["evals"],
            "time/rollout": st["time_rollout"], "time/update": st["time_update"],
            "time/rollout_share": st["time_rollout"] / total if total else None,
            **(extra or {}),
        }
        if self.is_main and self.out_dir is not None:
            save_pretrained_atomic(self.policy_module, self.tokenizer, self.out_dir / "model")
            if self.value_module is not None:
                from safetensors.torch import save_model

                from rlhflab.artifacts import check_finite_weights

                check_finite_weights(self.value_module, "the value model", self.out_dir / "value.safetensors")
                save_model(self.value_module, str(self.out_dir / "value.safetensors"))
            write_json(self.out_dir / "metrics.json", summary)
        self.accelerator.wait_for_everyone()
        return summary
