"""One TRL measurement, run in ``.venv-bench`` (or ``.venv-bench-ppo`` for PPO).

``python bench/children/trl_child.py SPEC.json``; prints ``RESULT {...}``. Uses TRL's own
trainers with the settings of the spec; what had to be set away from TRL's defaults to
match rlhflab (bf16 off, gradient checkpointing off, data-format details) is listed in
``docs/benchmarks.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from common import cpu_seconds, emit, read_jsonl, read_spec, rss_mb, setup, token_rates  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402


def space(text: str) -> str:
    """TRL joins prompt and completion as text (``prompt + completion``); the world's
    word-level tokenizer splits on white space, so a completion needs a leading space to
    tokenize exactly as rlhflab tokenizes the pair (prompt and completion separately)."""
    return " " + text


class StepTimer(TrainerCallback):
    """Wall time from the first optimizer step's start to the last step's end."""

    def __init__(self) -> None:
        self.t0 = self.t1 = self.c0 = self.c1 = None

    def on_step_begin(self, args, state, control, **kw):
        if self.t0 is None:
            self.t0, self.c0 = time.perf_counter(), cpu_seconds()

    def on_step_end(self, args, state, control, **kw):
        self.t1, self.c1 = time.perf_counter(), cpu_seconds()


def common_args(spec: dict) -> dict:
    """TrainingArguments shared by every TRL trainer here, matched to rlhflab's loops."""
    return dict(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        learning_rate=spec["lr"], lr_scheduler_type=spec.get("schedule", "cosine"),
        warmup_steps=spec.get("warmup_ratio", 0.05), weight_decay=0.0,
        max_grad_norm=spec.get("max_grad_norm", 1.0), seed=spec["seed"], use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False,  # TRL defaults bf16/checkpointing on
        logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0,
    )


def rlhflab_schedule(trainer, spec: dict) -> None:
    """Give ``trainer`` rlhflab's learning-rate schedule (``rlhflab.training.lr_lambda``):
    int(warmup_ratio x steps) warm-up steps at (step + 1) / warmup of the peak, then the decay.
    HF's schedulers warm up over ceil(warmup_ratio x steps) steps from 0 (step / warmup), one
    step behind and one step longer whenever the product is not whole (50 x 0.05)."""
    from rlhflab.training import lr_lambda

    def create_scheduler(num_training_steps: int, optimizer=None):
        if trainer.lr_scheduler is None:
            warmup = int(spec.get("warmup_ratio", 0.05) * num_training_steps)
            trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or trainer.optimizer, lr_lambda(spec.get("schedule", "cosine"), warmup, num_training_steps))
        return trainer.lr_scheduler

    trainer.create_scheduler = create_scheduler


def load(spec: dict):
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    return model, tok


def train(trainer, spec: dict) -> dict:
    timer = StepTimer()
    trainer.add_callback(timer)
    rss0 = rss_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    trainer.train()
    wall, cpu_wall = time.perf_counter() - t0, cpu_seconds() - c0
    seconds = timer.t1 - timer.t0 if timer.t0 is not None else wall
    cpu = timer.c1 - timer.c0 if timer.t0 is not None else cpu_wall
    samples = spec["steps"] * spec["batch_size"]
    trainer.save_model(str(Path(spec["out"]) / "model"))
    return {"samples": samples, "train_seconds": seconds, "train_call_seconds": wall, "cpu_seconds": cpu,
            "train_call_cpu_seconds": cpu_wall, "rss_before_train_mb": rss0, "samples_per_s": samples / seconds}


def run_sft(spec: dict) -> dict:
    from trl import SFTConfig, SFTTrainer

    model, tok = load(spec)
    rows = read_jsonl(spec["data"])[: spec["steps"] * spec["batch_size"]]
    ds = Dataset.from_list([{"prompt": r["prompt"], "completion": space(r["completion"])} for r in rows])
    trainer = SFTTrainer(model=model, args=SFTConfig(**sft_args(spec)), train_dataset=ds, processing_class=tok)
    rlhflab_schedule(trainer, spec)
    return train(trainer, spec)


def sft_args(spec: dict) -> dict:
    return dict(common_args(spec), max_length=spec["max_length"])


def preference_rows(spec: dict, n: int) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": space(r["chosen"]), "rejected": space(r["rejected"])}
            for r in read_jsonl(spec["data"])[:n]]


def run_rm(spec: dict) -> dict:
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_list(preference_rows(spec, spec["steps"] * spec["batch_size"]))
    trainer = RewardTrainer(model=model, args=RewardConfig(**rm_args(spec)), train_dataset=ds, processing_class=tok)
    rlhflab_schedule(trainer, spec)
    return train(trainer, spec)


def rm_args(spec: dict) -> dict:
    return dict(common_args(spec), max_length=spec["max_length"])


def timed_precompute(trainer_cls, clock: dict):
    """Wrap ``_precompute_ref_logps`` (run inside the trainer's constructor) so its time is
    added to the training time, as rlhflab's precompute is."""
    original = trainer_cls._precompute_ref_logps

    def wrapped(self, *a, **kw):
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            return original(self, *a, **kw)
        finally:
            clock["precompute"] = clock.get("precompute", 0.0) + time.perf_counter() - t0
            clock["precompute_cpu"] = clock.get("precompute_cpu", 0.0) + cpu_seconds() - c0

    trainer_cls._precompute_ref_logps = wrapped


def run_dpo(spec: dict) -> dict:
    from trl import DPOConfig, DPOTrainer

    clock: dict = {}
    timed_precompute(DPOTrainer, clock)
    model, tok = load(spec)
    ds = Dataset.from_list(preference_rows(spec, spec["steps"] * spec["batch_size"]))
    trainer = DPOTrainer(model=model, args=DPOConfig(**dpo_args(spec)), train_dataset=ds, processing_class=tok)
    rlhflab_schedule(trainer, spec)
    out = train(trainer, spec)
    return with_precompute(out, clock)


def dpo_args(spec: dict) -> dict:
    return dict(common_args(spec), beta=spec["beta"], max_length=spec["max_length"], loss_type=["sigmoid"],
                precompute_ref_log_probs=spec.get("trl_precompute", False))


def with_precompute(out: dict, clock: dict) -> dict:
    if clock.get("precompute"):
        out["precompute_seconds"] = clock["precompute"]
        out["train_seconds"] += clock["precompute"]
        out["cpu_seconds"] += clock["precompute_cpu"]
        out["samples_per_s"] = out["samples"] / out["train_seconds"]
    return out


def run_kto(spec: dict) -> dict:
    from trl import KTOConfig, KTOTrainer

    clock: dict = {}
    timed_precompute(KTOTrainer, clock)
    model, tok = load(spec)
    rows = []
    for r in read_jsonl(spec["data"])[: spec["steps"] * spec["batch_size"] // 2]:
        rows.append({"prompt": r["prompt"], "completion": space(r["chosen"]), "label": True})
        rows.append({"prompt": r["prompt"], "completion": space(r["rejected"]), "label": False})
    trainer = KTOTrainer(model=model, args=KTOConfig(**kto_args(spec)), train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    rlhflab_schedule(trainer, spec)
    out = train(trainer, spec)
    return with_precompute(out, clock)


def kto_args(spec: dict) -> dict:
    return dict(common_args(spec), beta=spec["beta"], max_length=spec["max_length"],
                precompute_ref_log_probs=spec.get("trl_precompute", False))


def gold_reward_fn(eos_id: int):
    """The world's gold utility as a TRL reward function (the same function rlhflab's
    ``gold`` reward calls; ``rlhflab.world`` is pure Python, put on the path by the parent)."""
    from rlhflab.world.gold import gold_utility

    def gold(prompts, completions, completion_ids, **kw):
        return [gold_utility(p, c, eos_id in ids) for p, c, ids in zip(prompts, completions, completion_ids)]

    return gold


def online_result(trainer, spec: dict, inst) -> dict:
    out = train(trainer, spec)
    out["train_seconds"] = out["train_call_seconds"]  # TRL generates inside its steps
    out["cpu_seconds"] = out["train_call_cpu_seconds"]
    out["samples"] = spec["steps"] * spec["batch_size"]
    out["samples_per_s"] = out["samples"] / out["train_seconds"]
    inst.close()
    out.update(inst.report(out["train_seconds"]))
    return token_rates(out)


def online_args(spec: dict) -> dict:
    args = common_args(spec)
    args.update(lr_scheduler_type="constant", warmup_steps=0, logging_steps=10)
    return args


def grpo_args(spec: dict) -> dict:
    """GRPOConfig's arguments: one generation of ``batch_size`` completions split into
    ``num_minibatches`` optimizer steps of ``batch_size / num_minibatches`` each."""
    from trl import GRPOConfig

    mb = spec["batch_size"] // spec["num_minibatches"]
    args = online_args(dict(spec, batch_size=mb, steps=spec["steps"] * spec["num_minibatches"]))
    args.update(steps_per_generation=spec["num_minibatches"], num_generations=spec["group_size"],
                max_completion_length=spec["max_new_tokens"], temperature=1.0, top_k=0, top_p=1.0,
                beta=spec["beta"], loss_type="grpo", num_iterations=spec["epochs"], epsilon=0.2,
                scale_rewards="group", log_completions=False)
    # The KL gradient matched to rlhflab's grpo (k3 in the loss, Shao et al. 2024): TRL >= 1.16
    # multiplies k3 by the importance ratio by default (its gradient is then k2's).
    if "use_bias_correction_kl" in GRPOConfig.__dataclass_fields__:
        args["use_bias_correction_kl"] = False
    return args


def run_group_trainer(spec: dict, trainer_cls, config_cls, args: dict) -> dict:
    """GRPO or RLOO: TRL's group trainer on the world's prompts with gold as the reward, timed as
    the online stages are (``online_result``, one optimizer step per minibatch)."""
    from common import Instrument

    model, tok = load(spec)
    ds = Dataset.from_list([{"prompt": r["prompt"]} for r in read_jsonl(spec["prompts"])])
    trainer = trainer_cls(model=model, reward_funcs=gold_reward_fn(tok.eos_token_id), args=config_cls(**args),
                          train_dataset=ds, processing_class=tok)
    inst = Instrument([trainer.model, trainer.ref_model], tok.eos_token_id)
    mb = spec["batch_size"] // spec["num_minibatches"]
    return online_result(trainer, dict(spec, steps=spec["steps"] * spec["num_minibatches"], batch_size=mb), inst)


def run_grpo(spec: dict) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    return run_group_trainer(spec, GRPOTrainer, GRPOConfig, grpo_args(spec))


def rloo_args(spec: dict) -> dict:
    mb = spec["batch_size"] // spec["num_minibatches"]
    args = online_args(dict(spec, batch_size=mb, steps=spec["steps"] * spec["num_minibatches"]))
    args.update(steps_per_generation=spec["num_minibatches"], num_generations=spec["group_size"],
                max_completion_length=spec["max_new_tokens"], temperature=1.0, top_k=0, top_p=1.0,
                beta=spec["beta"], num_iterations=spec["epochs"], log_completions=False)
    return args


def run_rloo(spec: dict) -> dict:
    from trl import RLOOConfig, RLOOTrainer

    return run_group_trainer(spec, RLOOTrainer, RLOOConfig, rloo_args(spec))


def ppo_args(spec: dict) -> dict:
    """PPOConfig's arguments. TRL's PPO rollout is ``per_device_train_batch_size x
    gradient_accumulation_steps`` samples, cut into ``num_mini_batches`` minibatches with one
    optimizer step each; with gradient accumulation at 1 the rollout is the per-device batch,
    so that is ``batch_size`` (64 samples per rollout, 4 minibatches of 16, as rlhflab)."""
    args = online_args(spec)
    args.pop("max_steps")
    args.update(num_mini_batches=spec["num_minibatches"], num_ppo_epochs=spec["epochs"],
                gradient_accumulation_steps=1,
                total_episodes=spec["steps"] * spec["batch_size"], local_rollout_forward_batch_size=spec["batch_size"],
                response_length=spec["max_new_tokens"], stop_token="eos", temperature=1.0, kl_coef=spec["beta"],
                kl_estimator="k1", cliprange=0.2, vf_coef=0.1, cliprange_value=0.2, gamma=1.0, lam=0.95,
                whiten_rewards=False, missing_eos_penalty=None, num_sample_generations=0)
    return args


def clip_gradients(optimizer, max_norm: float) -> None:
    """TRL's PPO steps its optimizer without clipping (``ppo_trainer.py``: ``accelerator.backward``
    then ``optimizer.step()``; ``max_grad_norm`` is never read); rlhflab clips the policy's and
    the critic's gradients together at ``rl.max_grad_norm`` before each step. This clips the
    same way, every parameter of the optimizer (policy and critic) at ``max_norm``."""
    step = optimizer.step

    def clipped_step(*a, **kw):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return step(*a, **kw)

    optimizer.step = clipped_step


def run_ppo(spec: dict) -> dict:
    """TRL 1.12's ``trl.experimental.ppo`` with rlhflab's reward model: its head is given the
    normalization gain and bias from ``reward_model.json`` so both score the same."""
    import json

    from common import Instrument
    from transformers import AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    policy, tok = load(spec)
    tok.padding_side = "left"
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    rm = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1)
    meta = json.loads((Path(spec["reward_model"]) / "reward_model.json").read_text())
    gain, bias = meta["members"][0]["gain"], meta["members"][0]["bias"]
    old = rm.score
    rm.score = torch.nn.Linear(old.in_features, 1, bias=True)
    with torch.no_grad():
        rm.score.weight.copy_(old.weight * gain)
        rm.score.bias.fill_(bias + (gain * old.bias.item() if old.bias is not None else 0.0))
    value = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1)
    with torch.no_grad():  # a zero-initialised critic head, as rlhflab's (rl.value_init=zero)
        value.score.weight.zero_()
    for m in (rm, value):
        m.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_list([{"input_ids": tok(r["prompt"]).input_ids} for r in read_jsonl(spec["prompts"])])
    trainer = PPOTrainer(args=PPOConfig(**ppo_args(spec)), processing_class=tok, model=policy, ref_model=ref,
                         reward_model=rm, train_dataset=ds, value_model=value)
    if spec.get("max_grad_norm", 1.0) > 0:
        clip_gradients(trainer.optimizer, spec.get("max_grad_norm", 1.0))
    inst = Instrument([trainer.model, policy, ref, rm, value], tok.eos_token_id)
    return online_result(trainer, spec, inst)


STAGES = {"sft": run_sft, "rm": run_rm, "dpo": run_dpo, "dpo-precompute": run_dpo, "kto": run_kto, "grpo": run_grpo, "rloo": run_rloo, "ppo": run_ppo}

if __name__ == "__main__":
    spec = read_spec()
    setup(spec["threads"])
    emit(STAGES[spec["stage"]](spec), spec)
