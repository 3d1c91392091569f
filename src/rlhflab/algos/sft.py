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
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhflab.data import Tokenized, render, tokenize_pair
from rlhflab.distributed import (
    empty_passes,
    make_accelerator,
    missing_passes,
    prepare,
    shard_weights,
)
from rlhflab.forward import fuse_activations, length_groups
from rlhflab.losses import sft_loss
from rlhflab.packing import response_logp_sums, use_packing
from rlhflab.progress import progress_bar
from rlhflab.tracking import MetricsLog
from rlhflab.training import batch_plan, global_batches, make_optimizer, optimizer_step


def tokenize_rows(rows: list[dict], tokenizer, max_length: int) -> tuple[list[Tokenized], int]:
    """Tokenize prompt/completion rows; returns the examples and how many were truncated."""
    out = [tokenize_pair(*render(r["prompt"], r["completion"], tokenizer), tokenizer, max_length) for r in rows]
    return out, sum(x.truncated for x in out)


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
    owed = missing_passes(accelerator, model, math.ceil(len(mine) / batch_size))  # sharded: passes in step
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), batch_size):
        nll, n = _nll_sum(model, mine[i : i + batch_size], pad_id, accelerator.device, packed)
        total += torch.stack([nll.double(), n.double()])
    empty_passes(accelerator, model, owed)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train_sft(cfg, model, tokenizer, train: list[Tokenized], held_out: list[Tokenized],
              out_dir: Path | None = None, accelerator: Accelerator | None = None) -> dict:
    """Train ``model`` in place; returns the summary metrics. ``cfg`` is an SFTConfig."""
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    W, rank = accelerator.num_processes, accelerator.process_index
    B = cfg.batch_size
    micro, total_steps = batch_plan("sft", cfg, W, len(train))
    pad_id = tokenizer.pad_token_id

    fuse_activations(model)
    model = shard_weights(model, cfg, accelerator, "sft")  # sft.sharding=fsdp2, before the optimizer is made
    optimizer, scheduler = make_optimizer(model.parameters(), cfg, total_steps)
    model, optimizer = prepare(accelerator, model, optimizer)  # the scheduler is stepped by hand
    packed = use_packing(model, cfg.packing, pad_id)
    log = MetricsLog(out_dir / "metrics.jsonl" if out_dir else None, enabled=accelerator.is_main_process,
                     accelerator=accelerator)

    batches = global_batches(len(train), B, cfg.seed)
    history: list[dict] = []
    start = time.perf_counter()
    model.train()
    eval_loss = evaluate_loss(model, held_out, pad_id, accelerator, packing=cfg.packing) if held_out else float("nan")
    log.log({"eval/loss": eval_loss}, step=0)
    with progress_bar(total_steps, "sft", enabled=accelerator.is_main_process) as bar:
        for step in range(1, total_steps + 1):
            global_batch = [train[i] for i in next(batches)]
            n_tokens = sum(len(x.input_ids) - x.n_prompt for x in global_batch)
            shard = global_batch[rank * (B // W) : (rank + 1) * (B // W)]
            nll_total = torch.zeros((), device=accelerator.device)
            if packed:  # micro-batches in data order, each one pass of packed rows
                groups = [list(range(i, min(i + micro, len(shard)))) for i in range(0, len(shard), micro)]
            elif cfg.sharding == "fsdp2":  # every process as many passes (each all-gathers): sorted, cut by micro
                order = sorted(range(len(shard)), key=lambda i: len(shard[i].input_ids))
                groups = [order[i:i + micro] for i in range(0, len(order), micro)]
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
            train_loss = accelerator.reduce(nll_total, reduction="sum").item() / n_tokens
            grad_norm = optimizer_step(accelerator, model.parameters(), optimizer, scheduler, cfg,
                                       stage="sft", step=step, loss=train_loss)
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

