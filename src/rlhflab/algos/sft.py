"""Supervised fine-tuning (InstructGPT stage 1): NLL on response tokens only.

    L_SFT = -(1/N) sum_t log pi(y_t | x, y_<t),   N = response tokens in the global batch

Where this departs from the usual trainer: the loss of every micro-batch is divided by the
token count of the whole global batch (all micro-batches on all processes), so gradient
accumulation and data parallelism give exactly the gradient of one large batch, instead
of a mean of per-micro-batch means. The data order is one seeded permutation shared by
every process; each process takes its slice of every global batch.

Because the loss is a sum normalized by a global count, how a process lays its slice out in
forward passes does not change the gradient. Padding a batch of the world's rows to its
longest row wastes more than half of the compute. So each micro-batch is one pass of packed
rows (``rlhflab.packing``: sequences end to end, block-diagonal attention, no padding) when
the model supports it (``sft.packing``, checked once per model); otherwise the slice is split
by length (``length_groups``): rows are sorted by length and cut into micro-batches that
minimize the padded tokens plus a fixed cost per pass.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhflab.data import Tokenized, render, tokenize_pair
from rlhflab.distributed import make_accelerator
from rlhflab.errors import InputError
from rlhflab.logprobs import kept_token_logprobs
from rlhflab.losses import sft_loss
from rlhflab.packing import response_logp_sums, use_packing
from rlhflab.progress import progress_bar
from rlhflab.tracking import MetricsLog


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak LR at each step: linear warm-up, then cosine/linear/constant."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return {
            "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, progress))),
            "linear": max(0.0, 1 - progress),
            "constant": 1.0,
        }[schedule]

    return f


class NonFiniteError(InputError):
    """Training met a non-finite loss or gradient and stopped before the optimizer step
    (so the weights are those of the last good step; nothing is saved). Exit code 2."""


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


def tokenize_rows(rows: list[dict], tokenizer, max_length: int) -> tuple[list[Tokenized], int]:
    """Tokenize prompt/completion rows; returns the examples and how many were truncated."""
    out = [tokenize_pair(*render(r["prompt"], r["completion"], tokenizer), tokenizer, max_length) for r in rows]
    return out, sum(x.truncated for x in out)


# The fixed cost of one more forward + backward pass, in padded tokens: on a 2-core CPU a
# pass of the demo model costs about as much as 64 extra tokens (bench/results/sft_grouping.json).
PASS_COST_TOKENS = 64


def length_groups(lengths: list[int], max_rows: int | None = None, pass_cost: float | None = None
                  ) -> list[list[int]]:
    """Indices of ``lengths`` cut into micro-batches of similar length.

    Sorted by length, the rows are cut into contiguous runs minimizing
    sum over runs of (rows x longest row) + pass_cost per run (dynamic programming,
    O(n * max_rows)); ``max_rows`` caps a run (the memory knob). ``pass_cost`` defaults to
    ``PASS_COST_TOKENS``; ``math.inf`` keeps the rows in as few passes as ``max_rows`` allows.
    """
    pass_cost = min(PASS_COST_TOKENS if pass_cost is None else pass_cost, 1e12)  # finite: sums compare
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    L = [lengths[i] for i in order]
    n, cap = len(L), max_rows or len(L)
    best = [0.0] + [math.inf] * n  # best[j]: cost of the j shortest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - cap), j):
            cost = best[i] + (j - i) * L[j - 1] + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


def forward_options(model) -> dict[str, bool]:
    """Which of the keywords that spare work this model's forward takes: ``use_cache``
    (False: no KV cache is built in a training pass) and ``logits_to_keep`` (the lm head
    only at the last positions). A DDP wrapper's ``module`` is asked: the wrapper passes
    its keywords on."""
    params = inspect.signature(getattr(model, "module", model).forward).parameters
    return {"use_cache": "use_cache" in params, "logits_to_keep": "logits_to_keep" in params}


class FusedGELUTanh(torch.nn.Module):
    """GELU with the tanh approximation in torch's one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace, in place, every ``NewGELUActivation`` (GPT-2's ``gelu_new``, written as eight
    elementwise tensor ops whose intermediates are all kept for the backward) by
    ``FusedGELUTanh`` (torch's fused ``gelu(x, approximate="tanh")``): the same
    function, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), in one kernel forward and
    one backward, equal up to float rounding (transformers documents the two as equivalent).
    Activations hold no weights: the state dict and the saved config are unchanged, and a
    saved model reloads with its own activation. The training loops (SFT, reward model, DPO
    family) and ``dpo.attach_reference_logps`` call it on the models they are given.
    Returns how many modules were replaced.
    """
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # a release without it has no gelu_new modules to replace
        return 0
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is NewGELUActivation]
    for parent, name in targets:
        setattr(parent, name, FusedGELUTanh())
    return len(targets)


def response_logprobs(model, batch: dict, n_prompt_min: int, device, options: dict | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs of a collated batch from its first response position on, with the
    matching slice of its response mask: two (B, K - 1) tensors, K = T - n_prompt_min + 1.

    The model is asked for logits at the last K positions only (``logits_to_keep``) and no
    KV cache, when its forward takes them (``forward_options``); otherwise K = T. Masked
    sums equal those of ``token_logprobs`` over the whole row (the prompt positions cut
    off hold no response token).
    """
    options = forward_options(model) if options is None else options
    ids = batch["input_ids"].to(device)
    kwargs = {"use_cache": False} if options["use_cache"] else {}
    if options["logits_to_keep"]:
        kwargs["logits_to_keep"] = ids.shape[1] - n_prompt_min + 1
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), **kwargs).logits
    lp = kept_token_logprobs(logits, ids)
    return lp, batch["response_mask"].to(device)[:, ids.shape[1] - lp.shape[1]:]


def _nll_sum(model, rows: list[Tokenized], pad_id: int, device, packed: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    lp = response_logp_sums(model, rows, pad_id, device, packed=packed)
    return -lp.sum(), torch.tensor(sum(len(x.input_ids) - x.n_prompt for x in rows), device=lp.device)


@torch.no_grad()
def evaluate_loss(model, examples: list[Tokenized], pad_id: int, accelerator: Accelerator,
                  batch_size: int = 64, packing: bool = True) -> float:
    """Token-mean NLL of response tokens; each process takes a shard, sums are reduced."""
    packed = use_packing(model, packing, pad_id)
    model.eval()
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    mine = sorted(mine, key=lambda x: len(x.input_ids))  # a sum: order is free, padding is not
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), batch_size):
        nll, n = _nll_sum(model, mine[i : i + batch_size], pad_id, accelerator.device, packed)
        total += torch.stack([nll.double(), n.double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train_sft(cfg, model, tokenizer, train: list[Tokenized], held_out: list[Tokenized],
              out_dir: Path | None = None, accelerator: Accelerator | None = None) -> dict:
    """Train ``model`` in place; returns the summary metrics. ``cfg`` is an SFTConfig."""
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    W, rank = accelerator.num_processes, accelerator.process_index
    B = cfg.batch_size
    micro = cfg.micro_batch_size or B // W
    if B % W or (B // W) % micro:
        raise ValueError(f"sft.batch_size {B} must split into {W} processes x micro-batches of {micro}")
    if len(train) < B:
        raise ValueError(f"{len(train)} training examples are fewer than one batch of {B}")
    steps_per_epoch = len(train) // B
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    pad_id = tokenizer.pad_token_id

    fuse_activations(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, warmup, total_steps))
    # The scheduler is stepped by hand once per optimizer step (not prepared: accelerate
    # would step it once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    packed = use_packing(model, cfg.packing, pad_id)
    log = MetricsLog(out_dir / "metrics.jsonl" if out_dir else None, enabled=accelerator.is_main_process)

    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    history: list[dict] = []
    start = time.perf_counter()
    model.train()
    eval_loss = evaluate_loss(model, held_out, pad_id, accelerator, packing=cfg.packing) if held_out else float("nan")
    log.log({"eval/loss": eval_loss}, step=0)
    with progress_bar(total_steps, "sft", enabled=accelerator.is_main_process) as bar:
        for step in range(1, total_steps + 1):
            if len(order) < B:  # a new epoch: a fresh permutation, the same on every process
                order = torch.randperm(len(train), generator=gen).tolist()
            batch_idx, order = order[:B], order[B:]
            global_batch = [train[i] for i in batch_idx]
            n_tokens = sum(len(x.input_ids) - x.n_prompt for x in global_batch)
            shard = global_batch[rank * (B // W) : (rank + 1) * (B // W)]
            nll_total = torch.zeros((), device=accelerator.device)
            if packed:  # micro-batches in data order, each one pass of packed rows
                groups = [list(range(i, min(i + micro, len(shard)))) for i in range(0, len(shard), micro)]
            else:
                groups = length_groups([len(x.input_ids) for x in shard], max_rows=micro)
            for g, idx in enumerate(groups):
                rows = [shard[i] for i in idx]
                last = g == len(groups) - 1
                with accelerator.no_sync(model) if not last else contextlib.nullcontext():
                    with accelerator.autocast():  # one pass: packed rows, or the group padded together
                        lp = response_logp_sums(model, rows, pad_id, accelerator.device, packed=packed)
                    # Per-sequence sums, all counted; DDP averages gradients over W processes, hence N / W.
                    loss, _ = sft_loss(lp, torch.ones_like(lp), n_tokens=n_tokens / W)
                    accelerator.backward(loss)
                nll_total += loss.detach() * (n_tokens / W)
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if cfg.max_grad_norm > 0 else torch.tensor(float("nan"))
            )
            train_loss = accelerator.reduce(nll_total, reduction="sum").item() / n_tokens
            # fp16's loss scaler expects (and skips) overflowing gradients: check the loss only.
            checked_norm = None if accelerator.scaler is not None else float(
                grad_norm if cfg.max_grad_norm > 0 else grad_norm_of(model.parameters()))
            stop_if_non_finite("sft", step, loss=train_loss, grad_norm=checked_norm, lr=cfg.lr)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = {"train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm), "train/tokens": n_tokens}
            if step % cfg.eval_every == 0 or step == total_steps:
                eval_loss = evaluate_loss(model, held_out, pad_id, accelerator, packing=cfg.packing) if held_out else float("nan")
                metrics["eval/loss"] = eval_loss
            if step % cfg.log_every == 0 or "eval/loss" in metrics:
                log.log(metrics, step=step)
            history.append(metrics)
            bar.update(loss=train_loss, eval_loss=eval_loss)
    log.close()
    elapsed = time.perf_counter() - start
    return {
        "train/loss": history[-1]["train/loss"],
        "eval/loss": eval_loss,
        "eval/perplexity": math.exp(eval_loss) if math.isfinite(eval_loss) else float("nan"),
        "eval/loss_initial": log.rows[0]["eval/loss"] if log.rows else float("nan"),
        "train/steps": total_steps,
        "train/examples": len(train),
        "train/seconds": elapsed,
        "train/processes": W,
    }

