"""TRL's side of the numerical parity check (run in ``.venv-bench``).

``parity_trl.py SPEC.json``: for one batch of preference rows, TRL's DPO loss
(``DPOTrainer.compute_loss``, sigmoid loss, a policy that differs from the reference) and
TRL's reward-model loss (``RewardTrainer.compute_loss``), each with the gradients of every
parameter, saved as safetensors files that ``bench/parity.py`` compares with rlhflab's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import read_jsonl, read_spec, setup  # noqa: E402

spec = read_spec()
setup(spec["threads"])

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402


def rows(n: int) -> list[dict]:
    # a leading space: TRL joins prompt and response as text (see trl_child.space)
    return [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
            for r in read_jsonl(spec["data"])[:n]]


def args(cls, **kw):
    return cls(output_dir=spec["out"], per_device_train_batch_size=spec["n"], use_cpu=True, bf16=False,
               gradient_checkpointing=False, report_to="none", disable_tqdm=True, max_length=spec["max_length"], **kw)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.grad is not None}


def dpo() -> dict:
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(spec["policy"])
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["reference"], dtype=torch.float32)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args(DPOConfig, beta=spec["beta"], loss_type=["sigmoid"]),
                         train_dataset=Dataset.from_list(rows(spec["n"])), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(spec["n"])])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    save_file(grads(trainer.model), str(Path(spec["out"]) / "trl_dpo_grads.safetensors"))
    return {"loss": loss.item()}


def rm() -> dict:
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(spec["rm_init"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["rm_init"], num_labels=1, dtype=torch.float32)
    trainer = RewardTrainer(model=model, args=args(RewardConfig), train_dataset=Dataset.from_list(rows(spec["n"])),
                            processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(spec["n"])])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    save_file(grads(trainer.model), str(Path(spec["out"]) / "trl_rm_grads.safetensors"))
    return {"loss": loss.item()}


if __name__ == "__main__":
    print("RESULT " + json.dumps({"dpo": dpo(), "rm": rm()}), flush=True)
