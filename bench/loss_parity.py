"""The preference losses against TRL 1.16's own loss code, on identical inputs.

    .venv/bin/python bench/loss_parity.py            (writes bench/results/loss_parity.json)

One seeded batch: B pairs of token sequences (prompts of 1-4 tokens, responses of 1-7,
right-padded) with random logits as a leaf tensor, random cached reference log-probs, and
for KTO the same rows as unpaired examples with mismatched-pair log-probs. rlhflab's side
takes per-token log-probs with ``logprobs.token_logprobs``, sums them over the response
and calls the functions of ``losses.py``. TRL's side runs in ``.venv-bench``
(``bench/run.py``'s ``ensure_env``: torch 2.13.0, trl 1.16.0) as this same file with
``--trl``, importing nothing of rlhflab, and calls TRL's methods themselves on a stub
trainer: ``DPOTrainer._compute_loss`` (its model a stub whose ``fused_lm_head`` output is
the per-token log-probs of the labels, zero where masked, as TRL's fused head returns
them), ``KTOTrainer._compute_loss`` (likewise, KL log-probs from a second leaf),
``CPOTrainer.get_batch_loss_metrics`` and ``ORPOTrainer.get_batch_loss_metrics`` with
their own ``concatenated_forward`` on a stub model that returns the logits. Each case
records both losses, the largest |difference| of the gradients with respect to the
logits, and of every metric the two share (mapped by name where the names differ).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRL_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
RESULT = ROOT / "bench" / "results" / "loss_parity.json"
AGREE = 1e-5  # float32 on values of order 1: agreement to float precision

# Where each formula is in the trl 1.16.0 wheel (file:line), recorded with the results.
TRL_CODE = {
    "dpo": "trl/trainer/dpo_trainer.py: _compute_loss 1285; summed log-probs 1304; sigmoid 1387-1388 (no "
           "label_smoothing); hinge 1390-1391; ipo 1393-1404 (log-ratios / completion tokens); robust 1428-1431; "
           "mean over pairs 1528; rewards beta * summed log-ratio 1582; logps/* summed 1600-1601",
    "kto": "trl/trainer/kto_trainer.py: _compute_loss 1370; summed log-probs 1401; z0 = mean(KL_logps - "
           "ref_KL_logps).detach(), gathered, clamp(min=0) 1442-1446; losses 1451-1475; weights 1479-1482; "
           "logps/* summed 1531-1541; loss = nanmean over all examples 1548",
    "cpo": "trl/experimental/cpo/cpo_trainer.py: cpo_loss 678; simpo 715-721 (logits - simpo_gamma / beta, times "
           "beta: the absolute margin); nll = cross-entropy over all chosen response tokens 842-845; per-token "
           "average log-probs for ipo/simpo 847-852; loss = mean + cpo_alpha * nll 890; logps/* averages 900-905; "
           "cpo_config.py: cpo_alpha default 1.0 (132-135), simpo_gamma 0.5 (136-139)",
    "orpo": "trl/experimental/orpo/orpo_trainer.py: odds_ratio_loss 670-702; nll = cross-entropy over the chosen "
            "rows' prompt AND response tokens 793-800; per-token average log-probs 802-807; loss = nll - "
            "mean(beta * log sigmoid(log odds)) 848; logps/* averages 859-860",
}

# TRL metric name -> rlhflab metric name where they differ (the others are shared).
RENAMED = {"nll_loss": None, "log_odds_ratio": "orpo/log_odds_ratio", "log_odds_chosen": "orpo/log_odds_chosen"}


# ------------------------------------------------------------------------ the inputs


def make_inputs(seed: int, n_pairs: int = 6, vocab: int = 13, prompt_tokens: tuple[int, int] = (1, 4)) -> dict:
    """Token rows [chosen 0..B-1, rejected 0..B-1], each prompt + response, right-padded."""
    gen = torch.Generator().manual_seed(seed)

    def randint(lo, hi, n):
        return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()

    prompts = randint(*prompt_tokens, n_pairs)
    lengths = randint(1, 7, 2 * n_pairs)
    width = max(p + n for p, n in zip(prompts * 2, lengths))
    input_ids = torch.zeros(2 * n_pairs, width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    prompt_ids = [torch.randint(1, vocab, (p,), generator=gen) for p in prompts]
    for row, n in enumerate(lengths):
        p = prompts[row % n_pairs]
        input_ids[row, :p] = prompt_ids[row % n_pairs]
        input_ids[row, p:p + n] = torch.randint(1, vocab, (n,), generator=gen)
        attention[row, :p + n] = 1
        completion[row, p:p + n] = 1
    return {
        "input_ids": input_ids, "attention_mask": attention, "completion_mask": completion,
        "prompt_lengths": torch.tensor(prompts),
        "logits": 2.0 * torch.randn(2 * n_pairs, width, vocab, generator=gen),
        # mismatched (prompt, other response) rows for KTO's reference point: more logits
        "kl_logits": 2.0 * torch.randn(2 * n_pairs, width, vocab, generator=gen),
        "ref_offset": torch.randn(2 * n_pairs, generator=gen),
        "kl_ref_offset": torch.randn(2 * n_pairs, generator=gen),
        "label": torch.rand(2 * n_pairs, generator=gen) < 0.5,
    }


def summed_logps(logits: torch.Tensor, inputs: dict, token_logprobs) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) summed response log-probs and (2B,) response lengths."""
    mask = inputs["completion_mask"].float()
    return (token_logprobs(logits, inputs["input_ids"]) * mask).sum(-1), mask.sum(-1)


def reference_logps(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached reference log-probs near the policy's (the policy's at the start, moved):
    the same numbers on both sides, computed from the inputs in float32."""
    from_logits = torch.log_softmax(inputs["logits"], -1)[:, :-1].gather(
        -1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    mask = inputs["completion_mask"][:, 1:].float()
    kl = torch.log_softmax(inputs["kl_logits"], -1)[:, :-1].gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    return ((from_logits * mask).sum(-1) + inputs["ref_offset"],
            (kl * mask).sum(-1) + inputs["kl_ref_offset"])


# The cases: (name, TRL trainer and settings, rlhflab loss and keywords, input set, KL shift)
CASES = [
    ("dpo sigmoid", ("dpo", {"loss_type": "sigmoid", "beta": 0.1}), ("dpo", {"beta": 0.1}), "main"),
    ("dpo sigmoid, TRL label_smoothing=0.1 (ignored by TRL)", ("dpo", {"loss_type": "sigmoid", "beta": 0.1,
     "label_smoothing": 0.1}), ("dpo", {"beta": 0.1}), "main"),
    ("cdpo eps 0.1 vs TRL robust eps 0.1 (different losses)", ("dpo", {"loss_type": "robust", "beta": 0.1,
     "label_smoothing": 0.1}), ("cdpo", {"beta": 0.1, "label_smoothing": 0.1}), "main"),
    ("cdpo eps 0.1 vs TRL sigmoid label_smoothing=0.1 (TRL has no cDPO)", ("dpo", {"loss_type": "sigmoid",
     "beta": 0.1, "label_smoothing": 0.1}), ("cdpo", {"beta": 0.1, "label_smoothing": 0.1}), "main"),
    ("hinge", ("dpo", {"loss_type": "hinge", "beta": 0.5}), ("hinge", {"beta": 0.5}), "main"),
    ("ipo, normalize=true (TRL's convention)", ("dpo", {"loss_type": "ipo", "beta": 0.5}),
     ("ipo", {"tau": 0.5, "normalize": True}), "main"),
    ("ipo, summed (rlhflab's default, the paper's)", ("dpo", {"loss_type": "ipo", "beta": 0.5}),
     ("ipo", {"tau": 0.5}), "main"),
    ("kto, z0 > 0", ("kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0, "kl_shift": -3.0}),
     ("kto", {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}), "main"),
    ("kto, z0 clamped at 0, weights 1.33 / 0.8", ("kto", {"beta": 0.1, "desirable_weight": 1.33,
     "undesirable_weight": 0.8, "kl_shift": 3.0}),
     ("kto", {"beta": 0.1, "desirable_weight": 1.33, "undesirable_weight": 0.8}), "main"),
    ("simpo, cpo_alpha=0 vs nll_coef=0", ("cpo", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.5,
     "cpo_alpha": 0.0}), ("simpo", {"beta": 2.0, "gamma": 0.5}), "main"),
    ("simpo, TRL's default cpo_alpha=1 vs nll_coef=1", ("cpo", {"loss_type": "simpo", "beta": 2.0,
     "simpo_gamma": 0.5, "cpo_alpha": 1.0}), ("simpo", {"beta": 2.0, "gamma": 0.5, "nll_coef": 1.0}), "main"),
    ("simpo, TRL's default cpo_alpha=1 vs rlhflab's default nll_coef=0", ("cpo", {"loss_type": "simpo",
     "beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 1.0}), ("simpo", {"beta": 2.0, "gamma": 0.5}), "main"),
    ("orpo, nll=token, 1-token prompts (TRL's NLL then covers exactly the response tokens)",
     ("orpo", {"beta": 0.1}), ("orpo", {"lam": 0.1, "nll": "token"}), "one_token_prompts"),
    ("orpo, nll=sequence (rlhflab's default), 1-token prompts", ("orpo", {"beta": 0.1}),
     ("orpo", {"lam": 0.1}), "one_token_prompts"),
    ("orpo, nll=token, 1-4-token prompts (TRL's NLL also covers the prompt tokens)", ("orpo", {"beta": 0.1}),
     ("orpo", {"lam": 0.1, "nll": "token"}), "main"),
]


# ------------------------------------------------------------------------ rlhflab's side


def rlhflab_case(inputs: dict, loss: str, hp: dict, kl_shift: float) -> dict:
    from rlhflab.logprobs import token_logprobs
    from rlhflab.losses import kto_reference_point
    from rlhflab.registry import PREFERENCE_LOSSES

    logits = inputs["logits"].clone().requires_grad_(True)
    kl_logits = inputs["kl_logits"].clone().requires_grad_(True)
    logps, lengths = summed_logps(logits, inputs, token_logprobs)
    ref, ref_kl = reference_logps(inputs)
    n = logps.shape[0] // 2
    fn = PREFERENCE_LOSSES[loss]
    if loss == "kto":
        kl_logps, _ = summed_logps(kl_logits, inputs, token_logprobs)
        z0 = kto_reference_point(kl_logps, ref_kl + kl_shift)
        value, metrics = fn(logps, ref, inputs["label"], z0, **hp)
    elif PREFERENCE_LOSSES.entry(loss).options["reference_free"]:
        value, metrics = fn(logps[:n], logps[n:], lengths[:n], lengths[n:], **hp)
    else:
        extra = {"chosen_lengths": lengths[:n], "rejected_lengths": lengths[n:]} if hp.get("normalize") else {}
        value, metrics = fn(logps[:n], logps[n:], ref[:n], ref[n:], **hp, **extra)
    value.backward()
    return {"loss": value.item(), "grad": logits.grad, "kl_grad": kl_logits.grad, "metrics": metrics}


# ------------------------------------------------------------------------ TRL's side


def trl_side(inputs_path: str, out_path: str) -> None:
    """Run in .venv-bench: TRL's loss code on every case; saves losses, gradients, metrics."""
    from collections import defaultdict
    from types import MethodType, SimpleNamespace

    import trl
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    data = torch.load(inputs_path)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)

    def fused_outputs(logits, labels):
        """What ``model(..., labels=labels, fused_lm_head=True)`` returns: per-token
        log-probs of the next-token labels, 0 where the label is -100 (trainer/utils.py)."""
        shifted = labels[:, 1:]
        mask = shifted != -100
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
        zeros = torch.zeros_like(lp).detach()
        return SimpleNamespace(log_probs=lp.masked_fill(~mask, 0), entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(mask), aux_loss=None)

    def stub(**fields):
        return SimpleNamespace(accelerator=accelerator, aux_loss_enabled=False, model=SimpleNamespace(training=True),
                               _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                               _total_train_tokens=0, _tp_size=1, **fields)

    def pair_batch(inputs):
        """CPO/ORPO's tokenized batch: chosen_* and rejected_* with prompt labels -100."""
        n = inputs["input_ids"].shape[0] // 2
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        return {f"{side}_{key}": value[rows] for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, None)))
                for key, value in (("input_ids", inputs["input_ids"]), ("attention_mask", inputs["attention_mask"]),
                                   ("labels", labels))}

    def run_case(trainer: str, settings: dict, inputs: dict, ref: torch.Tensor, ref_kl: torch.Tensor) -> dict:
        logits = inputs["logits"].clone().requires_grad_(True)
        kl_logits = inputs["kl_logits"].clone().requires_grad_(True)
        n = logits.shape[0] // 2
        settings = dict(settings)
        if trainer == "dpo":
            self = stub(loss_types=[settings["loss_type"]], loss_weights=[1.0], beta=settings["beta"],
                        label_smoothing=settings.get("label_smoothing", 0.0), f_divergence_type="reverse_kl",
                        f_alpha_divergence_coef=0.5, ld_alpha=None, precompute_ref_logps=True, use_weighting=False)
            batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
            batch.update(ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:])
            value = DPOTrainer._compute_loss(self, lambda labels, **kw: fused_outputs(logits, labels), batch, False)
            metrics = {k: v[-1] for k, v in self._metrics["train"].items()}
        elif trainer == "kto":
            kl_shift = settings.pop("kl_shift")
            completion_labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            self = stub(loss_type="kto", calculate_KL=True, precompute_ref_logps=True, **settings)
            self._compute_kl_logps = lambda model, batch: fused_outputs(kl_logits, completion_labels).log_probs.sum(-1)
            batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "completion_mask")}
            batch.update(label=inputs["label"], ref_logps=ref, ref_KL_logps=ref_kl + kl_shift)
            value = KTOTrainer._compute_loss(self, lambda labels, **kw: fused_outputs(logits, labels), batch, False)
            metrics = {k: v[-1] for k, v in self._metrics["train"].items()}
        else:
            cls = CPOTrainer if trainer == "cpo" else ORPOTrainer
            self = stub(is_encoder_decoder=False, padding_value=0, pad_token_id=0, label_smoothing=0.0, alpha=0.0,
                        concatenated_inputs=cls.concatenated_inputs, get_batch_logps=cls.get_batch_logps, **settings)
            for method in ("concatenated_forward", "cpo_loss" if trainer == "cpo" else "odds_ratio_loss"):
                setattr(self, method, MethodType(getattr(cls, method), self))
            model = lambda input_ids, **kw: SimpleNamespace(logits=logits, aux_loss=None)  # noqa: E731
            value, metrics = cls.get_batch_loss_metrics(self, model, pair_batch(inputs), "train")
        value.backward()
        return {"loss": value.item(), "grad": logits.grad, "kl_grad": kl_logits.grad,
                "metrics": {k: float(v) for k, v in metrics.items()}}

    out = [{"name": name, **run_case(trainer, settings, data["inputs"][input_set], *data["reference"][input_set])}
           for name, (trainer, settings), _, input_set in data["cases"]]
    import transformers
    torch.save({"cases": out, "versions": {"trl": trl.__version__, "torch": str(torch.__version__),
                                           "transformers": transformers.__version__}}, out_path)


# ------------------------------------------------------------------------ comparison


def max_abs(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None and b is None:
        return None
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    return (a - b).abs().max().item()


def compare(ours: dict, theirs: dict, rlhflab_loss: str) -> dict:
    shared = {}
    for key, value in theirs["metrics"].items():
        mine = RENAMED.get(key, key)
        if key == "nll_loss":
            mine = {"simpo": "simpo/nll_loss", "orpo": "orpo/nll_loss"}.get(rlhflab_loss)
        if mine in ours["metrics"]:
            shared[key if mine == key else f"{key} ~ {mine}"] = abs(ours["metrics"][mine] - value)
    return {
        "loss_rlhflab": ours["loss"], "loss_trl": theirs["loss"], "loss_abs_diff": abs(ours["loss"] - theirs["loss"]),
        "grad_max_abs_diff": max_abs(ours["grad"], theirs["grad"]),
        **({"z0": ours["metrics"]["kl"], "z0_trl": theirs["metrics"]["kl"],
            "mismatched_logits_grad": "none on either side: z0 is detached"
            if ours["kl_grad"] is None and theirs["kl_grad"] is None
            else {"rlhflab": max_abs(ours["kl_grad"], None), "trl": max_abs(None, theirs["kl_grad"])}}
           if rlhflab_loss == "kto" else {}),
        "metrics_abs_diff": shared,
        "only_trl_metrics": sorted(k for k in theirs["metrics"] if not any(k == s.split(" ~ ")[0] for s in shared)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl", nargs=2, metavar=("INPUTS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.trl:
        trl_side(*args.trl)
        return
    sys.path.insert(0, str(ROOT / "src"))
    if not TRL_PYTHON.exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from run import ensure_env

        ensure_env("trl", print)
    inputs = {"main": make_inputs(args.seed), "one_token_prompts": make_inputs(args.seed, prompt_tokens=(1, 1))}
    reference = {k: reference_logps(v) for k, v in inputs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"inputs": inputs, "reference": reference, "cases": CASES}, f"{tmp}/inputs.pt")
        subprocess.run([str(TRL_PYTHON), __file__, "--trl", f"{tmp}/inputs.pt", f"{tmp}/trl.pt"], check=True)
        trl = torch.load(f"{tmp}/trl.pt")
    results = []
    for (name, (trainer, settings), (loss, hp), input_set), theirs in zip(CASES, trl["cases"]):
        kl_shift = settings.get("kl_shift", 0.0)
        ours = rlhflab_case(inputs[input_set], loss, hp, kl_shift)
        row = {"case": name, "trl": {"trainer": trainer, **settings}, "rlhflab": {"loss": loss, **hp},
               "inputs": input_set, **compare(ours, theirs, loss)}
        worst = max([row["loss_abs_diff"], row["grad_max_abs_diff"], *row["metrics_abs_diff"].values()])
        row["agree_to_float_precision"] = worst < AGREE
        results.append(row)
        print(f"{'agree' if row['agree_to_float_precision'] else 'DIFFER':6s} loss {row['loss_abs_diff']:.2e} "
              f"grad {row['grad_max_abs_diff']:.2e}  {name}")
    import rlhflab

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    out = {
        "command": ".venv/bin/python bench/loss_parity.py" + (f" --seed {args.seed}" if args.seed else ""),
        "versions": {"trl_side": trl["versions"], "rlhflab_side": {"torch": str(torch.__version__),
                                                                   "rlhflab": getattr(rlhflab, "__version__", "?"),
                                                                   "commit": commit}},
        "inputs": f"seed {args.seed}: {inputs['main']['label'].numel() // 2} pairs, vocab 13, responses of 1-7 "
                  "tokens, prompts of 1-4 tokens (main) or 1 token (one_token_prompts), random float32 logits "
                  "(scale 2) as the differentiated leaf, cached reference log-probs; KTO: the same 2B rows unpaired "
                  "(random labels), mismatched-pair log-probs from a second logits leaf, z0 shifted above or below 0",
        "trl_code": TRL_CODE,
        "tolerance": AGREE,
        "cases": results,
    }
    RESULT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
