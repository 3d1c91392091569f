"""Numerical parity with TRL on one batch: DPO loss and gradients, reward-model loss and
gradients, the same weights and the same rows.

    .venv/bin/python bench/parity.py [--n 16]      (also run by bench/run.py)

TRL's side runs in ``.venv-bench`` (``children/parity_trl.py``) and saves its loss and
every parameter's gradient; this script computes rlhflab's with the functions its loops
use (``algos.dpo._paired_terms`` + ``registry.PREFERENCE_LOSSES["dpo"]``;
``algos.reward_model._group_rewards`` + ``bt_objective``) and compares.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """Max |difference| over all gradient entries, and ||g_ours - g_trl|| / ||g_trl||."""
    common = sorted(set(ours) & set(theirs))
    diff = torch.cat([(ours[n] - theirs[n]).flatten() for n in common])
    ref = torch.cat([theirs[n].flatten() for n in common])
    return {"parameters_compared": len(common), "only_rlhflab": sorted(set(ours) - set(theirs)),
            "only_trl": sorted(set(theirs) - set(ours)), "grad_max_abs_diff": diff.abs().max().item(),
            "grad_rel_diff": (diff.norm() / ref.norm()).item(), "grad_norm_trl": ref.norm().item()}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rlhflab_dpo(policy_dir: Path, sft: Path, rows: list[dict], beta: float, max_length: int
                ) -> tuple[float, dict]:
    from rlhflab.algos.dpo import _paired_terms, freeze, tokenize_pairs
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.packing import use_packing
    from rlhflab.registry import PREFERENCE_LOSSES
    from rlhflab.training import disable_dropout

    tok = load_tokenizer(sft)
    policy = load_causal_lm(policy_dir, tok)
    disable_dropout(policy)
    reference = freeze(load_causal_lm(sft, tok))
    examples, _ = tokenize_pairs(rows, tok, max_length)
    policy.train()
    # The passes training takes: packed rows when the model supports them (it does).
    packed = use_packing(policy, True, tok.pad_token_id) and use_packing(reference, True, tok.pad_token_id)
    terms = _paired_terms("dpo", policy, reference, examples, tok.pad_token_id, "cpu", packed=packed)
    loss, _ = PREFERENCE_LOSSES["dpo"](*terms, beta=beta)
    loss.backward()
    return loss.item(), grads(policy)


def rlhflab_rm(rm_init: Path, rows: list[dict], max_length: int) -> tuple[float, dict]:
    from transformers import AutoModelForSequenceClassification

    from rlhflab.algos.reward_model import (
        _group_rewards,
        bt_objective,
        rows_to_groups,
        tokenize_groups,
    )
    from rlhflab.config import Config
    from rlhflab.packing import use_packing
    from rlhflab.reward_model import load_rm_tokenizer, reward_head
    from rlhflab.training import disable_dropout

    tok = load_rm_tokenizer(rm_init)
    model = AutoModelForSequenceClassification.from_pretrained(str(rm_init), num_labels=1)
    disable_dropout(model)
    groups, _ = rows_to_groups(rows)
    tokenize_groups(groups, tok, max_length)
    model.train()
    packed = use_packing(model, True, tok.pad_token_id, head=reward_head(model))  # as training does
    loss, _, _ = bt_objective(groups, _group_rewards(model, groups, tok.pad_token_id, "cpu", packed=packed),
                              Config().rm)
    loss.backward()
    return loss.item(), grads(model)


def run_parity(work: Path, trl_python: Path, sft: Path, data: Path, *, n: int, beta: float, max_length: int,
               threads: int, env: dict) -> dict:
    import subprocess

    from common import read_jsonl
    from safetensors.torch import load_file

    from rlhflab.models import load_causal_lm, load_tokenizer, save_pretrained_atomic
    from rlhflab.reward_model import create_reward_model

    work.mkdir(parents=True, exist_ok=True)
    # A policy that differs from the reference (at the start of DPO they are equal, the loss
    # is log 2 and the check would be weak): the SFT weights plus seeded noise.
    tok = load_tokenizer(sft)
    policy = load_causal_lm(sft, tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    policy_dir = save_pretrained_atomic(policy, tok, work / "policy")
    rm_init = work / "rm_init"  # one head initialisation, loaded by both
    model, tok = create_reward_model(sft, seed=0)
    model.save_pretrained(str(rm_init), safe_serialization=True)
    tok.save_pretrained(str(rm_init))
    spec = {"policy": str(policy_dir), "reference": str(sft), "rm_init": str(rm_init), "data": str(data), "n": n, "beta": beta,
            "max_length": max_length, "threads": threads, "out": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([str(trl_python), str(ROOT / "bench" / "children" / "parity_trl.py"),
                           str(work / "spec.json")], capture_output=True, text=True, env=env)
    (work / "trl.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"TRL parity child failed; see {work / 'trl.log'}")
    trl = json.loads(next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT "))[7:])
    rows = read_jsonl(data)[:n]
    torch.manual_seed(0)
    dpo_loss, dpo_grads = rlhflab_dpo(policy_dir, sft, rows, beta, max_length)
    rm_loss, rm_grads = rlhflab_rm(rm_init, rows, max_length)
    out = {"n_pairs": n, "beta": beta}
    out["dpo"] = {"loss_rlhflab": dpo_loss, "loss_trl": trl["dpo"]["loss"],
                  "loss_abs_diff": abs(dpo_loss - trl["dpo"]["loss"]),
                  **compare(dpo_grads, load_file(str(work / "trl_dpo_grads.safetensors")))}
    out["rm"] = {"loss_rlhflab": rm_loss, "loss_trl": trl["rm"]["loss"],
                 "loss_abs_diff": abs(rm_loss - trl["rm"]["loss"]),
                 **compare(rm_grads, load_file(str(work / "trl_rm_grads.safetensors")))}
    return out


def main() -> int:
    import run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16, help="preference pairs in the batch")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from rlhflab.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    py = run.ensure_env("trl", print)
    paths = run.prepare(argparse.Namespace(config=str(ROOT / "configs" / "demo.yaml"), threads=args.threads,
                                           stages=""), print)
    env = run.child_env(args.threads)
    out = run_parity(run.WORK / "parity", py, paths["sft"], paths["world"] / "preferences.jsonl", n=args.n,
                     beta=cfg.dpo.beta, max_length=cfg.dpo.max_length, threads=args.threads, env=env)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
