"""Direct preference optimization and its family on a causal LM: one loop for all seven.

Paired losses (DPO, cDPO, IPO, hinge; reference-free SimPO, ORPO) train on (x, y_w, y_l);
KTO trains on unpaired (x, y, desirable) examples. Every loss is a pure function of
``rlhflab.losses`` taking per-sequence SUMMED response log-probs; the loop below only
computes those log-probs and normalizes.

Where this departs from the papers and from TRL:

- Global normalization: the losses return a mean over the pairs they are given; the loss
  of every micro-batch is rescaled by (its pairs) / (pairs of the whole global batch) and
  multiplied by the number of processes (DDP averages gradients), so gradient accumulation
  and data parallelism compute exactly the gradient of one batch of ``batch_size`` pairs.
  The metrics of a step are computed by calling the same loss function once on the
  detached log-probs of the whole global batch, gathered from every process.
- KTO's reference point z0 (the KL estimate from mismatched pairs) is computed over the
  whole global batch in a no-grad pass before the gradient pass, so it too is the same
  whatever the micro-batching and the number of processes. Each example's mismatched
  partner (its prompt with another example's response) is fixed once per dataset by a
  seeded permutation, so the reference's log-prob of it can be cached like the others.
- The chosen and rejected sequences of a micro-batch go through the model in passes of
  similar length (``sequence_logps``: sorted, cut by ``forward.length_groups``, each pass
  right-padded to its own longest row, logits only from the first response position), and
  the loss of the micro-batch is one function of all their log-probs with one backward:
  the same gradient as one padded pass, with about half the tokens on the world's data.
  ``micro_batch_size`` is the memory knob.
- Reference log-probs are computed once before training (``precompute_ref_logps``,
  default) and the reference model is then released, or computed every step by the frozen
  reference. Either way the reference is a deep copy of the starting policy, never
  optimized (``requires_grad`` off, eval mode). Held-out and reference log-prob passes are
  replicated on every process (each needs them all; they are small).
- Dropout of the policy is switched off: with it the same sequence would get a different
  log-prob at every pass, and the log-ratio to the reference would be noise at step 0.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhflab.data import Tokenized, collate_sft, render, tokenize_pair, tokenize_preference
from rlhflab.distributed import gathered as whole_model
from rlhflab.distributed import is_sharded, make_accelerator, prepare, reshard, shard_weights
from rlhflab.forward import forward_options, fuse_activations, length_groups, response_logprobs
from rlhflab.losses import kto_reference_point
from rlhflab.packing import bins_first_fit, pack, packed_response_logps, use_packing
from rlhflab.progress import progress_bar
from rlhflab.registry import PREFERENCE_LOSSES, loss_hparams
from rlhflab.tracking import MetricsLog
from rlhflab.training import (
    batch_plan,
    disable_dropout,
    global_batches,
    make_optimizer,
    optimizer_step,
)

# The losses and their hyper-parameters are registered in ``rlhflab.registry.PREFERENCE_LOSSES``.
# A paired loss is called fn(policy_chosen_logps, policy_rejected_logps, a, b, **hparams) with
# (a, b) the reference's log-probs, or for a reference-free loss the response lengths; an
# unpaired one (KTO) fn(policy_logps, ref_logps, is_desirable, kl_ref_point, **hparams). A loss
# with the option ``length_inputs`` also gets those keywords from the response lengths
# (``_length_inputs``).
REFERENCE_FREE: tuple[str, ...] = PREFERENCE_LOSSES.where(reference_free=True)
UNPAIRED: tuple[str, ...] = PREFERENCE_LOSSES.where(unpaired=True)


def needs_reference(loss: str) -> bool:
    return loss not in REFERENCE_FREE


# --------------------------------------------------------------------------- data


@dataclass
class PairExample:
    """A comparison: chosen and rejected share their prompt ids. ref_* are cached
    reference log-probs (summed over response tokens), nan until computed; target the row's
    soft label ``label_prob`` (P(chosen better)), None for a hard label."""

    chosen: Tokenized
    rejected: Tokenized
    ref_chosen: float = math.nan
    ref_rejected: float = math.nan
    target: float | None = None


@dataclass
class UnpairedExample:
    """A KTO example, with its mismatched partner (this prompt, another example's response)."""

    example: Tokenized
    mismatched: Tokenized
    desirable: bool
    ref: float = math.nan
    ref_mismatched: float = math.nan


def _response(x: Tokenized) -> list[int]:
    return x.input_ids[x.n_prompt:]


def tokenize_pairs(rows: list[dict], tokenizer, max_length: int) -> tuple[list[PairExample], dict]:
    """Preference rows -> PairExamples, with the truncation counts.

    Truncation (``data.tokenize_responses``): the prompt loses its start, the same for
    both answers; then an answer too long loses its end. A pair whose two answers are
    identical after truncation (they differed only past ``max_length``) carries no
    preference and is dropped. Stats: ``data/pairs``, ``data/truncated`` (pairs cut),
    ``data/dropped`` (pairs dropped).
    """
    out, truncated, dropped = [], 0, 0
    for row in rows:
        chosen, rejected = tokenize_preference(row, tokenizer, max_length)
        truncated += chosen.truncated or rejected.truncated
        if _response(chosen) == _response(rejected):
            dropped += 1
            continue
        label_prob = row.get("label_prob")
        out.append(PairExample(chosen, rejected, target=None if label_prob is None else float(label_prob)))
    return out, {"data/pairs": len(rows), "data/truncated": truncated, "data/dropped": dropped}


def tokenize_unpaired(rows: list[dict], tokenizer, max_length: int, seed: int = 0
                      ) -> tuple[list[UnpairedExample], dict]:
    """Unpaired rows (``label`` true = desirable) -> UnpairedExamples, with truncation counts.
    EOS is appended unless the row has ``completion_eos`` false.

    The mismatched partner of example i is example perm[k+1]'s response, where perm[k] = i
    (a seeded permutation, shifted by one), rendered and truncated like the example.
    """
    if len(rows) < 2:
        raise ValueError("KTO needs at least 2 examples (one to mismatch with another)")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = {perm[k]: perm[(k + 1) % len(perm)] for k in range(len(perm))}
    out, truncated = [], 0
    for i, row in enumerate(rows):
        eos = row.get("completion_eos", True) is not False  # false: cut at the token limit
        x = tokenize_pair(*render(row["prompt"], row["completion"], tokenizer), tokenizer, max_length, eos)
        other = rows[partner[i]]
        m = tokenize_pair(*render(row["prompt"], other["completion"], tokenizer), tokenizer, max_length,
                          other.get("completion_eos", True) is not False)
        truncated += x.truncated
        out.append(UnpairedExample(x, m, bool(row["label"])))
    n_good = sum(e.desirable for e in out)
    return out, {"data/examples": len(rows), "data/truncated": truncated, "data/dropped": 0,
                 "data/desirable": n_good, "data/undesirable": len(out) - n_good}


# ------------------------------------------------------------------ log-probs


def sequence_logps(model, seqs: list[Tokenized], pad_id: int, device, max_rows: int | None = None,
                   pass_cost: float | None = None, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token log-probs and response lengths of ``seqs``.

    Returns two (N,) tensors in the order of ``seqs``: sum_t log pi(y_t | x, y_<t) over
    response tokens (EOS included), and the number of response tokens.

    The sequences go through the model in passes of similar length (``forward.length_groups``:
    sorted by length, cut to minimize padded tokens + ``pass_cost`` per pass, at most
    ``max_rows`` rows each), each right-padded to its own longest row, and the lm head and
    log-softmax are computed from the first response position on only. With right padding
    and causal attention a row's log-prob does not depend on the rows it is batched with, so
    this equals one padded pass up to float rounding (~1e-6 relative), with gradients; the
    caller's loss and its single backward see one (N,) tensor either way.

    ``packed`` (the model passed ``packing.can_pack``): the sequences are laid end to end in
    rows of the longest one instead (``packing.pack``, block-diagonal attention, no padding),
    at most ``max_rows`` rows a pass; the same values up to float rounding.
    """
    lengths = torch.tensor([len(s.input_ids) - s.n_prompt for s in seqs], device=device)
    if is_sharded(model):  # every process as many passes (each all-gathers): the length order cut by max_rows
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
        cuts = [order[i:i + (max_rows or len(seqs))] for i in range(0, len(seqs), max_rows or len(seqs))]
        parts = []
        for idx in cuts:
            rows = [seqs[i] for i in idx]
            if packed:
                p = pack([x.input_ids for x in rows], pad_id).to(device)
                parts.append(packed_response_logps(model, p, [x.n_prompt for x in rows]))
            else:
                lp, mask = response_logprobs(model, collate_sft(rows, pad_id), min(x.n_prompt for x in rows),
                                             device, forward_options(model))
                parts.append((lp * mask).sum(-1))
        return torch.cat(parts)[torch.argsort(torch.tensor([i for c in cuts for i in c], device=device))], lengths
    if packed:
        bins = bins_first_fit([len(s.input_ids) for s in seqs], max(len(s.input_ids) for s in seqs))
        cap = max_rows or len(bins)
        parts, order_ = [], []
        for b in range(0, len(bins), cap):
            chunk = bins[b:b + cap]
            idx = [i for row in chunk for i in row]  # this pass's sequences, row by row
            local = iter(range(len(idx)))
            p = pack([seqs[i].input_ids for i in idx], pad_id, rows=[[next(local) for _ in row] for row in chunk])
            parts.append(packed_response_logps(model, p.to(device), [seqs[i].n_prompt for i in idx]))
            order_ += idx
        return torch.cat(parts)[torch.argsort(torch.tensor(order_, device=device))], lengths
    options = forward_options(model)
    groups = length_groups([len(s.input_ids) for s in seqs], max_rows=max_rows, pass_cost=pass_cost)
    parts = []
    for idx in groups:
        rows = [seqs[i] for i in idx]
        lp, mask = response_logprobs(model, collate_sft(rows, pad_id), min(x.n_prompt for x in rows), device,
                                     options)
        parts.append((lp * mask).sum(-1))
    order = torch.tensor([i for idx in groups for i in idx], device=device)
    return torch.cat(parts)[torch.argsort(order)], lengths


def attach_reference_logps(reference, examples: list, pad_id: int, device, batch_size: int = 64,
                           packing: bool = True) -> None:
    """Cache the reference's log-probs on every example (both of its sequences).

    All sequences in one ``sequence_logps`` call (passes of similar length, at most
    ``2 * batch_size`` rows each: the order of a cache is free, its padding is not), made
    exactly as ``evaluate`` makes it, so that at step 0 the held-out log-ratios are exactly
    0, not float noise.
    """
    if not examples:
        return
    was = reference.training
    reference.eval()
    fuse_activations(reference)
    rows = 2 * batch_size
    packed = use_packing(reference, packing, pad_id)
    with torch.inference_mode():  # the values become Python floats: no autograd state at all
        if isinstance(examples[0], PairExample):
            n = len(examples)
            lp = sequence_logps(reference, [e.chosen for e in examples] + [e.rejected for e in examples],
                                pad_id, device, max_rows=rows, packed=packed)[0].float().tolist()
            for e, c, r in zip(examples, lp[:n], lp[n:]):
                e.ref_chosen, e.ref_rejected = c, r
        else:
            own = sequence_logps(reference, [e.example for e in examples], pad_id, device, max_rows=rows,
                                 packed=packed)[0]
            mism = sequence_logps(reference, [e.mismatched for e in examples], pad_id, device, max_rows=rows,
                                  packed=packed)[0]
            for e, x, m in zip(examples, own.float().tolist(), mism.float().tolist()):
                e.ref, e.ref_mismatched = x, m
    reference.train(was)


def freeze(model) -> torch.nn.Module:
    """The reference: eval mode, no gradients, never handed to an optimizer."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------ loss on a batch


def _has_reference(e) -> bool:
    return not math.isnan(e.ref_chosen if isinstance(e, PairExample) else e.ref)


def _ref_tensor(values: list[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _paired_terms(loss_name, model, reference, micro: list[PairExample], pad_id, device,
                  max_rows: int | None = None, packed: bool = False):
    """Policy log-probs of chosen and rejected (passes grouped by length, with gradients) and
    the loss's third and fourth arguments: reference log-probs, or lengths if reference-free."""
    n = len(micro)
    seqs = [e.chosen for e in micro] + [e.rejected for e in micro]
    logps, lengths = sequence_logps(model, seqs, pad_id, device, max_rows, packed=packed)
    if loss_name in REFERENCE_FREE:
        third, fourth = lengths[:n], lengths[n:]
    elif reference is not None:
        with torch.no_grad():
            ref, _ = sequence_logps(reference, seqs, pad_id, device, max_rows, packed=packed)
        third, fourth = ref[:n].float(), ref[n:].float()
    else:
        third = _ref_tensor([e.ref_chosen for e in micro], device)
        fourth = _ref_tensor([e.ref_rejected for e in micro], device)
    return logps[:n].float(), logps[n:].float(), third, fourth


def _unpaired_terms(model, reference, micro: list[UnpairedExample], pad_id, device, mismatched: bool,
                    max_rows: int | None = None, packed: bool = False):
    """Policy and reference log-probs of the examples (or of their mismatched partners)."""
    seqs = [e.mismatched if mismatched else e.example for e in micro]
    logps, _ = sequence_logps(model, seqs, pad_id, device, max_rows, packed=packed)
    if reference is not None:
        with torch.no_grad():
            ref = sequence_logps(reference, seqs, pad_id, device, max_rows, packed=packed)[0].float()
    else:
        ref = _ref_tensor([e.ref_mismatched if mismatched else e.ref for e in micro], device)
    return logps.float(), ref


def _pair_lengths(examples: list[PairExample], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-token counts of the chosen and of the rejected responses, (N,) float each
    (the lengths ``sequence_logps`` returns, known before any forward pass)."""
    def count(seqs):
        return torch.tensor([len(s.input_ids) - s.n_prompt for s in seqs], dtype=torch.float32, device=device)
    return count([e.chosen for e in examples]), count([e.rejected for e in examples])


def _length_inputs(loss_name: str, chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
                   chosen_length_mean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The keywords of registry option ``length_inputs`` for a batch of pairs: their lengths
    (IPO per token) and the mean chosen length, of this batch or of the global batch it is
    part of (an NLL pooled over the global batch's chosen tokens)."""
    values = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths,
              "chosen_length_mean": chosen_lengths.mean() if chosen_length_mean is None else chosen_length_mean}
    return {k: values[k] for k in PREFERENCE_LOSSES.entry(loss_name).options.get("length_inputs", ())}


def soft_labels(loss_name: str, examples: list) -> bool:
    """Whether ``loss_name`` trains on the examples' soft labels: it takes them (registry
    option ``soft_labels``) and some pair has one. Otherwise every call is the hard loss, with
    the same numbers as on rows without ``label_prob``."""
    return bool(PREFERENCE_LOSSES.entry(loss_name).options.get("soft_labels")) and any(
        isinstance(e, PairExample) and e.target is not None for e in examples)


def _targets(examples: list[PairExample], device) -> torch.Tensor:
    """Per-pair soft labels, 1 for a hard label."""
    return torch.tensor([1.0 if e.target is None else e.target for e in examples], dtype=torch.float32,
                        device=device)


@torch.no_grad()
def evaluate(loss_name: str, hp: dict, model, reference, examples: list, pad_id: int, device,
             batch_size: int = 64, packed: bool = False) -> dict[str, float]:
    """Loss and metrics of ``loss_name`` on held-out examples, keys prefixed ``eval/``.
    Passes of at most ``2 * batch_size`` rows, cut as ``attach_reference_logps`` cuts them."""
    was = model.training
    model.eval()
    rows = 2 * batch_size
    if loss_name in UNPAIRED:
        pol, ref = _unpaired_terms(model, reference, examples, pad_id, device, False, rows, packed)
        pol_m, ref_m = _unpaired_terms(model, reference, examples, pad_id, device, True, rows, packed)
        desirable = torch.tensor([e.desirable for e in examples], device=pol.device)
        z0 = kto_reference_point(pol_m, ref_m)
        loss, metrics = PREFERENCE_LOSSES[loss_name](pol, ref, desirable, z0, **hp)
    else:
        args = _paired_terms(loss_name, model, reference, examples, pad_id, device, rows, packed)
        extra = _length_inputs(loss_name, *_pair_lengths(examples, device))
        if soft_labels(loss_name, examples):
            extra["targets"] = _targets(examples, args[0].device)
        loss, metrics = PREFERENCE_LOSSES[loss_name](*args, **hp, **extra)
    model.train(was)
    reshard(model)  # sharded: the root's weights, gathered by the last pass, freed
    return {"eval/loss": loss.item(), **{f"eval/{k}": v for k, v in metrics.items()}}


# --------------------------------------------------------------------------- training


def train_dpo(cfg, model, reference, tokenizer, train: list, held_out: list,
              out_dir: Path | None = None, accelerator: Accelerator | None = None,
              monitor: Callable[[int, torch.nn.Module], dict] | None = None) -> dict:
    """Train ``model`` in place with ``cfg.loss``; returns the summary metrics.

    ``cfg`` is a DPOConfig. ``reference`` is the frozen reference model, or None when the
    examples carry cached reference log-probs (``attach_reference_logps``) or the loss is
    reference-free. ``monitor(step, policy)``, called on the main process at step 0, every
    ``world_eval_every`` steps and at the end, returns extra metrics to log (the world's
    gold utility and sampled KL).
    """
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    W, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    name, hp = cfg.loss, loss_hparams(cfg.loss, cfg)
    unpaired = name in UNPAIRED
    B = cfg.batch_size
    micro, total_steps = batch_plan("dpo", cfg, W, len(train))
    cached = reference is None
    if needs_reference(name) and cached and not all(_has_reference(e) for e in train + held_out):
        raise ValueError(f"{name} needs a reference model or cached reference log-probs")
    if reference is not None:
        reference = freeze(reference).to(device)
        fuse_activations(reference)
    pad_id = tokenizer.pad_token_id

    disable_dropout(model)
    fuse_activations(model)
    model = shard_weights(model, cfg, accelerator, "dpo")  # dpo.sharding=fsdp2, before the optimizer is made
    optimizer, scheduler = make_optimizer(model.parameters(), cfg, total_steps)
    model, optimizer = prepare(accelerator, model, optimizer)  # the scheduler is stepped by hand
    policy = accelerator.unwrap_model(model)  # same parameters, for no-grad passes
    # Packed passes for the policy and the reference alike, when both support them.
    packed = use_packing(model, cfg.packing, pad_id) and (reference is None or use_packing(reference, True, pad_id))
    log = MetricsLog(out_dir / "metrics.jsonl" if out_dir else None, enabled=accelerator.is_main_process,
                     accelerator=accelerator)
    loss_fn = PREFERENCE_LOSSES[name]
    soft = soft_labels(name, train)
    if not unpaired and not soft and any(e.target is not None for e in train) and accelerator.is_main_process:
        takes = ", ".join(PREFERENCE_LOSSES.where(soft_labels=True))
        print(f"[dpo] {name} reads hard labels: the rows' label_prob is not used (soft labels: {takes})",
              file=sys.stderr)

    def run_monitor(step: int) -> dict:
        if monitor is not None and is_sharded(model):  # decodes on the main process: the weights gathered there
            whole = whole_model(accelerator, model)
            extra = monitor(step, whole) if accelerator.is_main_process else {}
            accelerator.wait_for_everyone()
            return extra
        extra = monitor(step, policy) if monitor is not None and accelerator.is_main_process else {}
        accelerator.wait_for_everyone()
        return extra

    batches = global_batches(len(train), B, cfg.seed)
    start = time.perf_counter()
    model.train()
    eval_metrics = evaluate(name, hp, policy, reference, held_out, pad_id, device, packed=packed) if held_out else {}
    initial_eval = dict(eval_metrics)
    log.log({**eval_metrics, **run_monitor(0)}, step=0)
    metrics: dict = {}
    with progress_bar(total_steps, name, enabled=accelerator.is_main_process) as bar:
        for step in range(1, total_steps + 1):
            shard = [train[i] for i in next(batches)[rank * (B // W):(rank + 1) * (B // W)]]
            z0 = None
            if unpaired:  # KTO's reference point over the whole global batch, no gradient
                with torch.no_grad():
                    pol_m, ref_m = _unpaired_terms(policy, reference, shard, pad_id, device, True, micro, packed)
                z0 = kto_reference_point(accelerator.gather(pol_m), accelerator.gather(ref_m))
            else:  # response lengths of this shard, and the global batch's (length_inputs)
                shard_lengths = _pair_lengths(shard, device)
                global_lengths = [accelerator.gather(t) for t in shard_lengths]
                chosen_length_mean = global_lengths[0].mean()
                shard_targets = _targets(shard, device) if soft else None
                global_soft = {"targets": accelerator.gather(shard_targets)} if soft else {}
            kept: list[list[torch.Tensor]] = []
            for m in range(0, len(shard), micro):
                chunk = shard[m:m + micro]
                last = m + micro >= len(shard)
                with accelerator.no_sync(model) if not last else contextlib.nullcontext():
                    with accelerator.autocast():
                        if unpaired:
                            pol, ref = _unpaired_terms(model, reference, chunk, pad_id, device, False,
                                                       packed=packed)
                            desirable = torch.tensor([e.desirable for e in chunk], device=device)
                            args = [pol, ref, desirable]
                            loss, _ = loss_fn(pol, ref, desirable, z0, **hp)
                        else:
                            args = list(_paired_terms(name, model, reference, chunk, pad_id, device,
                                                      packed=packed))
                            extra = _length_inputs(name, *(t[m:m + micro] for t in shard_lengths),
                                                   chosen_length_mean)
                            if soft:
                                extra["targets"] = shard_targets[m:m + micro]
                            loss, _ = loss_fn(*args, **hp, **extra)
                    # The loss is a mean over this chunk: weight it by the chunk's share of
                    # the global batch; DDP then averages over W processes, hence * W.
                    accelerator.backward(loss * (len(chunk) * W / B))
                kept.append([a.detach().float() for a in args])  # gather() wants no bools
            # Metrics of the whole global batch: the same loss function on gathered values.
            gathered = [accelerator.gather(torch.cat([k[i] for k in kept])) for i in range(len(kept[0]))]
            if unpaired:
                gathered[2] = gathered[2] > 0.5  # is_desirable back to bool
            with torch.no_grad():
                step_loss, step_metrics = (loss_fn(*gathered, z0, **hp) if unpaired else
                                           loss_fn(*gathered, **hp, **_length_inputs(name, *global_lengths), **global_soft))
            grad_norm = optimizer_step(accelerator, model.parameters(), optimizer, scheduler, cfg,
                                       stage=name if name == "dpo" else f"dpo ({name})", step=step,
                                       loss=step_loss.item(), lr_field="dpo.lr")
            metrics = {"train/loss": step_loss.item(), **step_metrics,
                       "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)}
            if step % cfg.eval_every == 0 or step == total_steps:
                eval_metrics = evaluate(name, hp, policy, reference, held_out, pad_id, device, packed=packed) if held_out else {}
                metrics.update(eval_metrics)
            world_every = cfg.world_eval_every
            measured = step == total_steps or (world_every > 0 and step % world_every == 0)
            if measured:
                metrics.update(run_monitor(step))
            if step % cfg.log_every == 0 or measured or "eval/loss" in metrics:
                log.log(metrics, step=step)
            bar.update(loss=metrics["train/loss"], acc=metrics.get("rewards/accuracies", float("nan")),
                       margin=metrics.get("rewards/margins", float("nan")),
                       eval_acc=eval_metrics.get("eval/rewards/accuracies", float("nan")))
    log.close()
    summary = {k: v for k, v in metrics.items()}
    summary.update({f"{k}_initial": v for k, v in initial_eval.items() if k in ("eval/loss", "eval/rewards/accuracies")})
    summary.update({"train/steps": total_steps, "train/examples": len(train),
                    "train/seconds": time.perf_counter() - start, "train/processes": W,
                    "dpo/loss": name, "dpo/soft_labels": soft, "dpo/reference": "none" if not needs_reference(name)
                    else ("cached" if cached else "on_the_fly")})
    return summary
