"""Reward-model training (InstructGPT stage 2): Bradley-Terry on comparisons, or
Plackett-Luce on the raters' K-way rankings.

    L_BT = sum_i w_i [q_i softplus(-(r_w,i - r_l,i - m_i)) + (1 - q_i) softplus(r_w,i - r_l,i - m_i)]
           / sum_i w_i  +  center_coef * sum_i w_i (r_w,i + r_l,i)^2 / sum_i w_i
    L_PL = -(1/N) sum_n sum_k [r_n,k - logsumexp(r_n,k..K-1)]      (rankings, best first)

with q_i = (1 - eps) p_i + eps (1 - p_i), p_i a row's soft label ``label_prob`` (1 without
one: the hard loss). (``losses.bradley_terry_loss``, ``losses.plackett_luce_loss``.)

The unit of data is a comparison GROUP: one prompt, its distinct responses, the pairs
among them, and optionally the raters' rankings. As in InstructGPT, all C(K, 2) pairs of a
prompt sit in the same batch and each response goes through the model once, instead of
once per pair: K forward passes instead of K(K - 1), and no response is seen K - 1 times
per epoch in different batches (which InstructGPT found makes the RM over-fit). A user's
file whose rows share no ``group`` gives groups of one pair.

Where this departs from the usual trainer, as in SFT: the loss of every micro-batch is
divided by the total pair weight (BT) or ranking count (PL) of the whole GLOBAL batch
(divided by the number of processes, since DDP averages gradients), so gradient
accumulation and data parallelism compute exactly the gradient of one large batch. The
data order is one seeded permutation of groups shared by every process.

With ``rm.grad_penalty`` = lambda > 0 the loss gains lambda times the mean, over the
responses of the global batch, of sum_t ||dR/de_t||^2 over the response tokens' input
embeddings e_t (``losses.input_gradient_penalty``), normalized by the global batch's
response count the same way. The embeddings are caught by a forward hook on the model's
input embedding layer, so packed and padded passes, LoRA and a frozen backbone all work
unchanged; those passes run on torch's math attention kernel (``sdpa_kernel``), the one
whose backward can itself be differentiated.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhflab.data import render, tokenize_pair
from rlhflab.distributed import (
    empty_passes,
    is_sharded,
    make_accelerator,
    missing_passes,
    prepare,
    shard_weights,
)
from rlhflab.forward import forward_options, fuse_activations, length_groups
from rlhflab.losses import bradley_terry_loss, input_gradient_penalty, plackett_luce_loss
from rlhflab.packing import pack, packed_scores, use_packing
from rlhflab.progress import progress_bar
from rlhflab.reward_model import collate, reward_head
from rlhflab.tracking import MetricsLog
from rlhflab.training import batch_plan, global_batches, make_optimizer, optimizer_step


@dataclass
class Group:
    """One prompt with its distinct responses, the pairs among them and any rankings."""

    prompt: object  # str, or a list of messages (conversational)
    responses: list  # str or list of messages, distinct
    eos: list[bool]  # False: the response was truncated without EOS
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (chosen, rejected) indices
    margins: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)  # P(chosen better): a row's label_prob, else 1
    rankings: list[list[int]] = field(default_factory=list)  # one per rater, best first
    ids: list[list[int]] = field(default_factory=list)  # filled by tokenize_groups
    n_prompt: list[int] = field(default_factory=list)  # prompt tokens leading each of ids


# ----------------------------------------------------------------------------- data


def agreement(votes: list[int] | None) -> float:
    """Fraction of the votes that agree with the majority (1.0 when there are none)."""
    if not votes:
        return 1.0
    k = sum(votes)
    return max(k, len(votes) - k) / len(votes)


# How much a pair counts in the loss, from its row. Chosen with ``rm.weights``.
PAIR_WEIGHTS: dict[str, Callable[[dict], float]] = {
    "none": lambda row: 1.0,
    "agreement": lambda row: agreement(row.get("votes")),
}


def _key(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def rows_to_groups(rows: list[dict], *, weights: str = "none", margin_scale: float = 1.0,
                   min_agreement: float = 0.0) -> tuple[list[Group], dict]:
    """Preference rows -> groups. Rows with the same ``group`` (and prompt) merge; rows
    without one are groups of their own. ``rankings``/``responses`` fields (written by
    ``rlhflab collect``) become Plackett-Luce rankings. Returns (groups, counts)."""
    weight_fn = PAIR_WEIGHTS[weights]
    groups: dict[tuple, Group] = {}
    counts = {"data/pairs_in": len(rows), "data/dropped_agreement": 0}
    for n, row in enumerate(rows):
        if agreement(row.get("votes")) < min_agreement:
            counts["data/dropped_agreement"] += 1
            continue
        key = (_key(row["prompt"]), row["group"] if "group" in row else f"row{n}")
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(row["prompt"], [], [])
            if "responses" in row and "rankings" in row:
                g.responses = list(row["responses"])
                g.eos = [bool(e) for e in row.get("responses_eos", [True] * len(g.responses))]
                g.rankings = [list(r) for r in row["rankings"]]
        index = {(_key(r), e): i for i, (r, e) in enumerate(zip(g.responses, g.eos))}
        ends = []
        for side in ("chosen", "rejected"):
            k = (_key(row[side]), bool(row.get(f"{side}_eos", True)))
            if k not in index:
                index[k] = len(g.responses)
                g.responses.append(row[side])
                g.eos.append(k[1])
            ends.append(index[k])
        g.pairs.append((ends[0], ends[1]))
        g.margins.append(float(row.get("margin", 0.0)) * margin_scale)
        g.weights.append(weight_fn(row))
        g.targets.append(float(row.get("label_prob", 1.0)))
        if "source" in row:  # human and AI comparisons mixed in one file: how many of each
            key_source = f"data/source/{row['source']}"
            counts[key_source] = counts.get(key_source, 0) + 1
    out = list(groups.values())
    counts["data/pairs"] = sum(len(g.pairs) for g in out)
    counts["data/groups"] = len(out)
    counts["data/rankings"] = sum(len(g.rankings) for g in out)
    return out, counts


def tokenize_groups(groups: list[Group], tokenizer, max_length: int) -> int:
    """Fill ``Group.ids`` (end token appended where the response ended); returns how many
    sequences were truncated to ``max_length``."""
    truncated = 0
    for g in groups:
        g.ids, g.n_prompt = [], []
        for resp, eos in zip(g.responses, g.eos):
            p_text, c_text = render(g.prompt, resp, tokenizer)
            x = tokenize_pair(p_text, c_text, tokenizer, max_length, add_eos=eos)
            truncated += x.truncated
            g.ids.append(x.input_ids)
            g.n_prompt.append(x.n_prompt)
    return truncated


# ---------------------------------------------------------------------------- losses


def _group_rewards(model, groups: list[Group], pad_id: int, device, max_rows: int | None = None,
                   packed: bool = False, inputs: list | None = None) -> list[torch.Tensor]:
    """Rewards of every response of ``groups``, split per group.

    ``packed`` (the model passed ``packing.can_pack``): one pass, the responses laid end to
    end in rows of the longest one with block-diagonal attention, each scored at its own
    last token (``packing.packed_scores``). Otherwise the responses go through the model in
    passes of similar length (``forward.length_groups``: sorted, cut to minimize padded tokens
    + a cost per pass, at most ``max_rows`` rows each), each right-padded to its own longest
    row. Either way a score reads its own sequence only, so this equals one padded pass up
    to float rounding, with gradients: the loss of the micro-batch and its single backward
    see the same rewards.

    ``inputs``, a list: each pass appends (its input embeddings (R, T, d), on the graph of the
    rewards, and a (R, T) mask of the response tokens, the end token included), what
    ``losses.input_gradient_penalty`` reads.
    """
    seqs = [ids for g in groups for ids in g.ids]
    with _catch_embeddings(model, inputs) as caught:
        if packed:
            layout = pack(seqs, pad_id).to(device)
            r = packed_scores(model, layout, reward_head(model))
            if inputs is not None:
                rows, cols, _ = layout.positions([n for g in groups for n in g.n_prompt])
                mask = torch.zeros(layout.input_ids.shape, device=device)
                mask[rows, cols] = 1.0
                inputs.append((caught[-1], mask))
            return list(torch.split(r, [len(g.ids) for g in groups]))
        kwargs = {"use_cache": False} if forward_options(model)["use_cache"] else {}
        if is_sharded(model):  # one padded pass: every process must run as many passes (each all-gathers)
            passes = [sorted(range(len(seqs)), key=lambda i: len(seqs[i]))]
        else:
            passes = length_groups([len(s) for s in seqs], max_rows=max_rows)
        parts = []
        n_prompt = [n for g in groups for n in g.n_prompt] if inputs is not None else []
        for idx in passes:
            ids, attn = collate([seqs[i] for i in idx], pad_id)
            parts.append(model(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs).logits[:, 0].float())
            if inputs is not None:
                mask = torch.zeros(ids.shape, device=device)
                for row, i in enumerate(idx):
                    mask[row, n_prompt[i]:len(seqs[i])] = 1.0
                inputs.append((caught[-1], mask))
    order = torch.tensor([i for idx in passes for i in idx], device=device)
    r = torch.cat(parts)[torch.argsort(order)]
    return list(torch.split(r, [len(g.ids) for g in groups]))


@contextlib.contextmanager
def _catch_embeddings(model, inputs: list | None):
    """Yields a list that collects the output of ``model``'s input embedding layer at every
    forward pass while ``inputs`` is a list (else nothing is hooked). An output that does not
    require grad (frozen embeddings: LoRA, a linear probe) is made a leaf that does, so the
    reward can be differentiated with respect to it all the same."""
    caught: list[torch.Tensor] = []
    if inputs is None:
        yield caught
        return

    def hook(_module, _args, out):
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)
        caught.append(out)
        return out

    layer = getattr(model, "module", model).get_input_embeddings()
    handle = layer.register_forward_hook(hook)
    try:
        yield caught
    finally:
        handle.remove()


def _attention(penalized: bool):
    """torch's math attention kernel while the input-gradient penalty is on: the fused
    kernels' backward (flash, memory-efficient, and the CPU's flash kernel) cannot itself be
    differentiated, which double backprop needs. A no-op otherwise."""
    if not penalized:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _pairs(groups: list[Group], rewards: list[torch.Tensor]):
    """Concatenated (chosen, rejected, margin, weight) over the pairs of the groups."""
    c = torch.cat([r[[i for i, _ in g.pairs]] for g, r in zip(groups, rewards)])
    rj = torch.cat([r[[j for _, j in g.pairs]] for g, r in zip(groups, rewards)])
    m = torch.tensor([x for g in groups for x in g.margins], dtype=c.dtype, device=c.device)
    w = torch.tensor([x for g in groups for x in g.weights], dtype=c.dtype, device=c.device)
    return c, rj, m, w


def bt_objective(groups, rewards, cfg) -> tuple[torch.Tensor, float, dict]:
    """(weighted-mean BT loss of these groups, their pair weight, metrics)."""
    c, rj, m, w = _pairs(groups, rewards)
    p = [x for g in groups for x in g.targets]
    # Soft labels (an AI labeller's P(chosen better)) as per-pair targets; hard rows keep
    # the hard loss exactly.
    targets = None if all(x == 1.0 for x in p) else torch.tensor(p, dtype=c.dtype, device=c.device)
    loss, metrics = bradley_terry_loss(c, rj, margin=m, weights=w, label_smoothing=cfg.label_smoothing,
                                       center_coef=cfg.center_coef, targets=targets)
    return loss, w.sum().item(), metrics


def pl_objective(groups, rewards, cfg) -> tuple[torch.Tensor, float, dict]:
    """(mean PL loss over the raters' rankings of these groups, their count, metrics)."""
    rows = [(r, rank) for g, r in zip(groups, rewards) for rank in g.rankings]
    if not rows:
        raise ValueError("rm.loss=plackett_luce needs rankings (data from `rlhflab collect`)")
    K = max(len(rank) for _, rank in rows)
    R = torch.zeros((len(rows), K), device=rewards[0].device)
    mask = torch.zeros((len(rows), K), dtype=torch.bool, device=rewards[0].device)
    for n, (r, rank) in enumerate(rows):
        R[n, : len(rank)] = r[rank]
        mask[n, : len(rank)] = True
    loss, metrics = plackett_luce_loss(R, mask=mask)
    c, rj, _, _ = _pairs(groups, rewards)
    metrics["rm/accuracy"] = (c > rj).float().mean().item()  # pairwise, comparable with BT
    return loss, float(len(rows)), metrics


# Chosen with ``rm.loss``; each returns (loss as a mean over its units, units, metrics).
OBJECTIVES = {"bradley_terry": bt_objective, "plackett_luce": pl_objective}


def _units(groups: list[Group], loss: str) -> float:
    if loss == "plackett_luce":
        return float(sum(len(g.rankings) for g in groups))
    return float(sum(sum(g.weights) for g in groups))


@torch.no_grad()
def evaluate_pairs(model, groups: list[Group], pad_id: int, accelerator: Accelerator,
                   batch_size: int = 32, packed: bool = False) -> dict[str, float]:
    """Unweighted BT loss and accuracy over every pair; each process takes a shard."""
    was = model.training
    model.eval()
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    owed = missing_passes(accelerator, model, math.ceil(len(mine) / batch_size))  # sharded: passes in step
    total = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        c, rj, _, _ = _pairs(chunk, _group_rewards(model, chunk, pad_id, accelerator.device, packed=packed))
        d = (c - rj).double()
        total += torch.stack([torch.nn.functional.softplus(-d).sum(), (d > 0).double().sum(),
                              torch.tensor(float(len(d)), dtype=torch.float64, device=d.device)])
    empty_passes(accelerator, model, owed)
    total = accelerator.reduce(total, reduction="sum")
    model.train(was)
    n = total[2].clamp(min=1)
    return {"eval/loss": (total[0] / n).item(), "eval/accuracy": (total[1] / n).item()}


# -------------------------------------------------------------------------- the loop


def train_reward_model(cfg, model, tokenizer, train: list[Group], held_out: list[Group],
                       out_dir: Path | None = None, accelerator: Accelerator | None = None,
                       seed: int | None = None, member: int = 0) -> dict:
    """Train ``model`` (a one-label sequence-classification model) in place on tokenized
    groups; returns the summary metrics. ``cfg`` is an RMConfig."""
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    W, rank = accelerator.num_processes, accelerator.process_index
    B = cfg.batch_size
    micro, total_steps = batch_plan("rm", cfg, W, len(train), "comparison groups")
    objective = OBJECTIVES[cfg.loss]
    seed = cfg.seed if seed is None else seed
    pad_id = tokenizer.pad_token_id

    if not cfg.train_backbone:  # a linear probe on frozen features
        for p in model.parameters():
            p.requires_grad_(False)
        reward_head(model).requires_grad_(True)
    fuse_activations(model)
    model = shard_weights(model, cfg, accelerator, "rm")  # rm.sharding=fsdp2, before the optimizer is made
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    model, optimizer = prepare(accelerator, model, optimizer)  # the scheduler is stepped by hand
    packed = use_packing(model, cfg.packing, pad_id, head=reward_head(model))
    log = MetricsLog(out_dir / "metrics.jsonl" if out_dir else None, enabled=accelerator.is_main_process,
                     accelerator=accelerator)

    batches = global_batches(len(train), B, seed)
    penalized = cfg.grad_penalty > 0
    start = time.perf_counter()
    model.train()
    ev = evaluate_pairs(model, held_out, pad_id, accelerator, packed=packed) if held_out else {}
    log.log({"rm/member": member, **ev}, step=0)
    first_eval = dict(ev)
    last: dict = {}
    first_loss = float("nan")
    with progress_bar(total_steps, f"rm {member}" if member else "rm", enabled=accelerator.is_main_process) as bar:
        for step in range(1, total_steps + 1):
            global_batch = [train[i] for i in next(batches)]
            n_units = _units(global_batch, cfg.loss)  # pair weight (BT) or rankings (PL)
            n_resp = sum(len(g.ids) for g in global_batch)  # responses: the penalty's mean is over these
            shard = global_batch[rank * (B // W):(rank + 1) * (B // W)]
            # loss, correct, pairs, penalty (each a sum over the global batch once reduced)
            sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
            for m in range(0, len(shard), micro):
                chunk = shard[m:m + micro]
                last_micro = m + micro >= len(shard)
                inputs = [] if penalized else None
                with accelerator.no_sync(model) if not last_micro else contextlib.nullcontext():
                    with accelerator.autocast(), _attention(penalized):
                        rewards = _group_rewards(model, chunk, pad_id, accelerator.device, packed=packed,
                                                 inputs=inputs)
                    loss, units, metrics = objective(chunk, rewards, cfg)
                    # A mean over this micro-batch's units, rescaled to a share of the
                    # global mean; DDP averages over W processes, hence n_units / W.
                    scaled = loss * (units / (n_units / W))
                    penalty = torch.zeros((), device=scaled.device)
                    if penalized:  # its mean over this micro-batch's responses, rescaled the same way
                        pen, _ = input_gradient_penalty(torch.cat(rewards), [e for e, _ in inputs],
                                                        [k for _, k in inputs], coef=cfg.grad_penalty)
                        penalty = pen * (sum(len(g.ids) for g in chunk) / (n_resp / W))
                    accelerator.backward(scaled + penalty)
                n_pairs = sum(len(g.pairs) for g in chunk)
                sums += torch.tensor([scaled.item() * (n_units / W), metrics["rm/accuracy"] * n_pairs,
                                      n_pairs, penalty.item() * (n_resp / W)],
                                     dtype=torch.float64, device=accelerator.device)
            sums = accelerator.reduce(sums, reduction="sum")
            grad_norm = optimizer_step(accelerator, params, optimizer, scheduler, cfg, stage="rm", step=step,
                                       loss=sums[0].item() / n_units + sums[3].item() / n_resp)
            metrics = {"rm/member": member, "train/loss": sums[0].item() / n_units,
                       "train/accuracy": sums[1].item() / max(1.0, sums[2].item()),
                       "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                       "train/pairs": int(sums[2].item())}
            if penalized:  # the term added to the loss; train/loss is the preference loss alone
                metrics["rm/grad_penalty"] = sums[3].item() / n_resp
            if held_out and (step % cfg.eval_every == 0 or step == total_steps):
                ev = evaluate_pairs(model, held_out, pad_id, accelerator, packed=packed)
                metrics.update(ev)
            if step % cfg.log_every == 0 or "eval/loss" in metrics:
                log.log(metrics, step=step)
            last = metrics
            if step == 1:
                first_loss = metrics["train/loss"]
            bar.update(loss=metrics["train/loss"], acc=metrics["train/accuracy"],
                       **({"eval_acc": ev["eval/accuracy"]} if ev else {}))
    log.close()
    summary = {
        "train/loss": last["train/loss"],
        "train/loss_first_step": first_loss,
        "train/accuracy": last["train/accuracy"],
        "train/steps": total_steps,
        "train/groups": len(train),
        "train/seconds": time.perf_counter() - start,
        "train/processes": W,
    }
    if penalized:
        summary["rm/grad_penalty"] = last["rm/grad_penalty"]
    if held_out:
        summary.update({"eval/loss": ev["eval/loss"], "eval/accuracy": ev["eval/accuracy"],
                        "eval/loss_initial": first_eval["eval/loss"],
                        "eval/accuracy_initial": first_eval["eval/accuracy"]})
    return summary
