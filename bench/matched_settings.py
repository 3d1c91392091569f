"""What each library trains with in every benchmarked stage, setting by setting.

    .venv-bench/bin/python bench/matched_settings.py [--out bench/results/matched_settings.json]

Run in ``.venv-bench`` (TRL's environment; rlhflab's configuration code is pure Python and
is put on the path from ``src/``). For every stage of ``bench/stages.py`` it builds the spec
both children get (from ``configs/demo.yaml``, no data read), TRL's config exactly as
``bench/children/trl_child.py`` builds it (its ``*_args`` builders into TRL's own config
classes, TRL's defaults filled in) and rlhflab's resolved config as
``bench/children/rlhflab_child.py`` builds it, and writes, per stage and setting, TRL's value,
rlhflab's and a verdict (matched / not matched / not applicable) with a one-line reason.

Settings that live in a trainer's code rather than its config (where the KL enters, how a
loss is aggregated, the epsilon of a normalization) are stated from the source, with the
file, and derived from the config fields that select them where there are such fields, so
that a change in a child's arguments changes the verdict. TRL 1.12's PPO
(``trl.experimental.ppo``) lives in ``.venv-bench/ppo``; where that environment is absent its
config is the arguments ``trl_child.ppo_args`` passes, and its defaults and code are those
of ``trl/experimental/ppo/ppo_trainer.py`` and ``ppo_config.py`` (said in the output).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "src")]

from stages import ONLINE, STAGES, build_spec  # noqa: E402

MATCHED, NOT_MATCHED, NA = "matched", "not matched", "not applicable"


def child(name: str):
    path = ROOT / "bench" / "children" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(setting: str, trl, ours, reason: str, verdict: str | None = None) -> dict:
    """One setting; without ``verdict``, matched when the two values are equal (floats to 1e-12)."""
    if verdict is None:
        same = (math.isclose(trl, ours, rel_tol=1e-12, abs_tol=1e-12)
                if isinstance(trl, (int, float)) and isinstance(ours, (int, float)) else trl == ours)
        verdict = MATCHED if same else NOT_MATCHED
    return {"setting": setting, "trl": trl, "rlhflab": ours, "verdict": verdict, "reason": reason}


# ---------------------------------------------------------------------------- shared rows


def optimizer_rows(a, cfg, steps: int, *, scheduled_by_rlhflab: bool) -> list[dict]:
    """Optimizer, schedule and clipping of an HF TrainingArguments ``a`` against an rlhflab
    training config ``cfg`` (TrainConfig or RLConfig)."""
    from rlhflab.training import lr_lambda

    warmup_ours = int(cfg.warmup_ratio * steps)
    warmup_hf = a.get_warmup_steps(steps)
    schedule = lr_lambda(cfg.lr_schedule, warmup_ours, steps)
    rows = [
        row("learning rate", a.learning_rate, cfg.lr, "peak learning rate of AdamW"),
        row("AdamW betas, eps", [a.adam_beta1, a.adam_beta2, a.adam_epsilon], [0.9, 0.999, 1e-8],
            "rlhflab builds torch.optim.AdamW with torch's defaults"),
        row("weight decay", a.weight_decay, cfg.weight_decay, "AdamW weight decay"),
        row("max grad norm", a.max_grad_norm, cfg.max_grad_norm,
            "clip of the global gradient norm before each optimizer step"),
        row("precision", "bf16" if a.bf16 else "fp16" if a.fp16 else "fp32", "fp32" if cfg.mixed_precision == "no"
            else cfg.mixed_precision, "trl_child turns TRL's bf16 default off"),
    ]
    if scheduled_by_rlhflab:
        rows.append(row("learning-rate schedule", f"{cfg.lr_schedule}, {warmup_ours} warm-up steps at (step+1)/w "
                        "(trl_child.rlhflab_schedule)",
                        f"{cfg.lr_schedule}, {warmup_ours} warm-up steps at (step+1)/w", (
                            f"fixed here: TRL's own scheduler warms up over ceil({cfg.warmup_ratio} x {steps}) = "
                            f"{warmup_hf} steps from 0 (step/w), so the first update had lr 0 against rlhflab's "
                            f"lr x {schedule(0):.2g}; trl_child now installs rlhflab's lr_lambda"),
                        MATCHED))
    else:
        kind = getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)
        rows.append(row("learning-rate schedule", f"{kind}, {warmup_hf} warm-up steps",
                        f"{cfg.lr_schedule}, {warmup_ours} warm-up steps",
                        "constant, no warm-up: HF's and rlhflab's multipliers are 1 at every step",
                        MATCHED if kind == cfg.lr_schedule == "constant" and warmup_hf == warmup_ours == 0
                        else NOT_MATCHED))
    return rows


def dropout_row(model_dropout: float, trl_disables: bool | None) -> dict:
    return row("dropout", f"disable_dropout={trl_disables}", f"model dropout {model_dropout}, policy in eval mode",
               f"the benchmark's GPT-2 is created with dropout {model_dropout} (configs/demo.yaml model.dropout): "
               "no dropout to disable on either side", NA if model_dropout == 0 else NOT_MATCHED)


def over_length(env, spec, kind: str, fields: tuple[str, ...], n_rows: int) -> str:
    """How many of the stage's rows are longer than its max_length (prompt + response + EOS,
    rlhflab's tokenization, which TRL's equals on the world: docs/benchmarks.md), read from the
    world export ``env["world"]``; "not counted" without one."""
    world = env["world"]
    if world is None:
        return "not counted (no world export; --world)"
    from transformers import AutoTokenizer

    from rlhflab.data import load_rows, render, tokenize_pair

    tok = AutoTokenizer.from_pretrained(str(world / "tokenizer"))  # the world's tokenizer
    rows = load_rows(world / Path(spec["data"]).name, kind)[:n_rows]
    longer = sum(max(len(tokenize_pair(*render(r["prompt"], r[f], tok), tok, 10**6).input_ids) for f in fields)
                 > spec["max_length"] for r in rows)
    return f"{longer} of {len(rows)} rows longer than {spec['max_length']} tokens ({world})"


def truncation_row(trl_rule: str, env, spec, kind: str, fields: tuple[str, ...], n_rows: int) -> dict:
    counted = over_length(env, spec, kind, fields, n_rows)
    none = counted.startswith("0 of")
    return row("rows over max length", trl_rule, "truncated: the prompt loses its start first, then the response "
               "its end (data.tokenize_pair)", counted + ("" if none else ": the two rules differ on these"),
               NA if none else NOT_MATCHED)


# ------------------------------------------------------------------------------ stages


def audit_sft(spec, trl, ours, env) -> list[dict]:
    from trl import SFTConfig

    a, cfg = SFTConfig(**trl.sft_args(spec)), ours.sft_config(spec)
    return [
        row("batch (rows per optimizer step)", a.per_device_train_batch_size * a.gradient_accumulation_steps,
            cfg.batch_size, "one optimizer step per batch"),
        row("optimizer steps", a.max_steps, cfg.max_steps, "updates"),
        row("max length", a.max_length, cfg.max_length, "prompt + completion tokens"),
        row("tokens in the loss", "completion" if a.completion_only_loss in (None, True) else "all",
            "completion", "TRL: completion_only_loss (None = on for prompt-completion rows); rlhflab: "
            "algos/sft.py, response tokens only"),
        row("loss", a.loss_type, "nll", "token NLL (TRL loss_type='nll'; rlhflab losses.sft_loss)"),
        row("loss aggregation", "sum / completion tokens of the batch", "sum / completion tokens of the batch",
            "TRL: HF Trainer passes num_items_in_batch; rlhflab: every micro-batch divided by the global "
            "batch's token count (algos/sft.py)", MATCHED),
        row("label smoothing", a.label_smoothing_factor, 0.0, "HF label_smoothing_factor; rlhflab has none"),
        row("packing", f"packing={a.packing}, padding_free={a.padding_free}", f"packing={cfg.packing}",
            "a layout of the same tokens: each packed sequence attends only to itself, the loss is normalized "
            "by the same count (tests/component/test_packing.py)", NA),
        truncation_row(f"truncated, truncation_mode={a.truncation_mode} (the first max_length tokens)", env, spec,
                       "sft", ("completion",), spec["steps"] * spec["batch_size"]),
        dropout_row(env["dropout"], None),
        *optimizer_rows(a, cfg, spec["steps"], scheduled_by_rlhflab=True),
    ]


def audit_rm(spec, trl, ours, env) -> list[dict]:
    from trl import RewardConfig

    a, cfg = RewardConfig(**trl.rm_args(spec)), ours.rm_config(spec)
    return [
        row("batch (pairs per optimizer step)", a.per_device_train_batch_size * a.gradient_accumulation_steps,
            cfg.batch_size, "one optimizer step per batch"),
        row("optimizer steps", a.max_steps, cfg.max_steps, "updates"),
        row("max length", a.max_length, cfg.max_length, "prompt + response tokens"),
        row("loss", "-log sigmoid(r_c - r_r), mean over pairs", f"{cfg.loss}, mean over pairs",
            "TRL reward_trainer.py; rlhflab losses.bt_objective", MATCHED if cfg.loss == "bradley_terry"
            else NOT_MATCHED),
        row("label smoothing", 0.0, cfg.label_smoothing, "TRL's RewardTrainer has none; rlhflab rm.label_smoothing"),
        row("reward centering", a.center_rewards_coefficient or 0.0, cfg.center_coef,
            "TRL center_rewards_coefficient (None = off); rlhflab rm.center_coef"),
        row("margin", "the rows' margin column", f"margin_scale {cfg.margin_scale} x the rows' margin",
            "the world's preference rows have no margin field: neither subtracts one", NA),
        row("pair weights / agreement filter", "none", f"weights={cfg.weights}, min_agreement={cfg.min_agreement}",
            "rlhflab reads the rows' votes only with rm.weights=agreement or rm.min_agreement > 0",
            MATCHED if cfg.weights == "none" and cfg.min_agreement == 0 else NOT_MATCHED),
        row("input-gradient penalty", 0.0, cfg.grad_penalty, "TRL has none"),
        row("head initialisation", "HF's random score head (torch's default generator at load)",
            f"rlhflab create_reward_model's head, seed {cfg.seed}", "a different random starting head, as the data "
            "order differs: not the objective (bench/parity.py gives both one head to compare loss and gradient)",
            NOT_MATCHED),
        truncation_row("dropped (reward_trainer.py filters pairs with a side over max_length)", env, spec,
                       "preference", ("chosen", "rejected"), spec["steps"] * spec["batch_size"]),
        dropout_row(env["dropout"], a.disable_dropout),
        *optimizer_rows(a, cfg, spec["steps"], scheduled_by_rlhflab=True),
    ]


def audit_dpo(spec, trl, ours, env) -> list[dict]:
    from trl import DPOConfig

    from rlhflab.registry import loss_hparams

    a, cfg = DPOConfig(**trl.dpo_args(spec)), ours.preference_config(spec)
    read = loss_hparams(cfg.loss, cfg)
    return [
        row("batch (pairs per optimizer step)", a.per_device_train_batch_size * a.gradient_accumulation_steps,
            cfg.batch_size, "one optimizer step per batch"),
        row("optimizer steps", a.max_steps, cfg.max_steps, "updates"),
        row("max length", a.max_length, cfg.max_length, "prompt + response tokens"),
        row("loss", list(a.loss_type), [{"dpo": "sigmoid"}.get(cfg.loss, cfg.loss)],
            "the sigmoid loss of Rafailov et al. 2023 (rlhflab dpo.loss=dpo)"),
        row("beta", a.beta, read["beta"], "DPO's beta"),
        row("label smoothing", a.label_smoothing, read.get("label_smoothing", 0.0),
            "rlhflab's dpo loss reads none (dpo.label_smoothing is cdpo's)"),
        row("sequence log-prob", "sum over response tokens" if a.ld_alpha is None else f"LD-DPO {a.ld_alpha}",
            "sum over response tokens", "no length normalization on either side"),
        row("pair weighting", f"use_weighting={a.use_weighting}, loss_weights={a.loss_weights}",
            "none (hard labels: the world's rows carry no label_prob)",
            "unweighted mean over pairs on both sides",
            MATCHED if not a.use_weighting and a.loss_weights in (None, [1.0]) else NOT_MATCHED),
        row("divergence", a.f_divergence_type, "reverse_kl", "the standard DPO log-ratio"),
        row("reference log-probs", "precomputed" if a.precompute_ref_log_probs else "every step",
            "precomputed" if cfg.precompute_ref_logps else "every step",
            "the same frozen reference, computed once or per step: the same numbers (the two dpo rows compare both)",
            NA),
        truncation_row(f"truncated, truncation_mode={a.truncation_mode}", env, spec, "preference",
                       ("chosen", "rejected"), spec["steps"] * spec["batch_size"]),
        dropout_row(env["dropout"], a.disable_dropout),
        *optimizer_rows(a, cfg, spec["steps"], scheduled_by_rlhflab=True),
    ]


def audit_kto(spec, trl, ours, env) -> list[dict]:
    from trl import KTOConfig

    a, cfg = KTOConfig(**trl.kto_args(spec)), ours.preference_config(spec)
    return [
        row("batch (rows per optimizer step)", a.per_device_train_batch_size * a.gradient_accumulation_steps,
            cfg.batch_size, "one optimizer step per batch"),
        row("optimizer steps", a.max_steps, cfg.max_steps, "updates"),
        row("loss", a.loss_type, cfg.loss, "KTO, eq. 7 of Ethayarajh et al. 2024"),
        row("beta", a.beta, cfg.beta, "KTO's beta"),
        row("desirable / undesirable weights", [a.desirable_weight, a.undesirable_weight],
            [cfg.kto_desirable_weight, cfg.kto_undesirable_weight], "per-kind loss weights"),
        row("KL reference point", "mean over the batch's mismatched pairs, clamped at 0, detached",
            "mean over the batch's mismatched pairs, clamped at 0, detached",
            "TRL kto_trainer.py _compute_loss; rlhflab losses.kto_reference_point", MATCHED),
        row("loss aggregation", "mean over rows", "mean over rows", "TRL: losses of both kinds concatenated, "
            "mean; rlhflab losses.kto_loss", MATCHED),
        row("data order", a.train_sampling_strategy, "shuffled (seeded)",
            "TRL's KTO requires sequential sampling (the KL completions are precomputed per row); rlhflab shuffles",
            NOT_MATCHED),
        truncation_row("truncated from the right", env, spec, "preference", ("chosen", "rejected"),
                       spec["steps"] * spec["batch_size"] // 2),
        dropout_row(env["dropout"], a.disable_dropout),
        *optimizer_rows(a, cfg, spec["steps"], scheduled_by_rlhflab=True),
    ]


def online_common(a, rl, spec) -> list[dict]:
    return [
        row("KL coefficient beta", a.beta, rl.beta, "fixed beta (rlhflab rl.kl_controller=fixed)")
        if rl.kl_controller == "fixed" else row("KL controller", "fixed", rl.kl_controller, "TRL's beta is fixed"),
        row("sampling", [a.temperature, a.top_k, a.top_p], [1.0, 0, 1.0],
            "temperature, top-k, top-p (rlhflab_child sets generation to 1.0, 0, 1.0)"),
        row("max new tokens", a.max_completion_length, spec["max_new_tokens"], "response length cap"),
        row("entropy bonus", a.entropy_coef if hasattr(a, "entropy_coef") else 0.0, rl.entropy_coef,
            "coefficient of an entropy term in the loss"),
        row("no-EOS penalty", 0.0, rl.no_eos_penalty,
            "neither changes the score of a response without EOS (TRL's mask_truncated_completions="
            f"{a.mask_truncated_completions} would drop it)",
            MATCHED if rl.no_eos_penalty == 0 and not a.mask_truncated_completions else NOT_MATCHED),
        row("KL clip", None, rl.kl_clip, "no cap on a token's KL estimate"),
        row("importance-sampling correction", "off (no vLLM)", "off" if rl.tis_cap is None else f"TIS {rl.tis_cap}",
            "one sampler that is the trainer on both sides", MATCHED if rl.tis_cap is None else NOT_MATCHED),
    ]


def audit_grpo(spec, trl, ours, env) -> list[dict]:
    from trl import GRPOConfig

    a = GRPOConfig(**trl.grpo_args(spec))
    rl = ours.online_config(spec).rl
    per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps
    trl_kl = ("k3 x ratio in the loss (k2's gradient)" if a.use_bias_correction_kl else "k3 in the loss")
    return [
        row("completions per rollout", per_step * a.steps_per_generation, rl.batch_size, "one generation per rollout"),
        row("group size G", a.num_generations, rl.samples_per_prompt, "samples per prompt"),
        row("optimizer steps per rollout (minibatches x epochs)", a.steps_per_generation * a.num_iterations,
            rl.num_minibatches * rl.epochs, "TRL steps_per_generation x num_iterations"),
        row("rollouts", a.max_steps // a.steps_per_generation // a.num_iterations, rl.steps, "rollout steps"),
        row("KL estimator and where it enters", trl_kl, f"{rl.kl_estimator} in the {rl.kl_in}",
            "the fix of the earlier audit: TRL 1.16's use_bias_correction_kl=True multiplies k3 by pi/pi_old, "
            "whose gradient is k2's; trl_child sets it False"),
        row("loss aggregation", {"grpo": "seq_mean"}.get(a.loss_type, a.loss_type), rl.loss_agg,
            "per-sequence mean over its tokens, then mean over sequences (TRL loss_type='grpo'; rlhflab seq_mean), "
            "the KL term aggregated with the surrogate on both"),
        row("advantage", f"(R - mean_g) / (std_g + 1e-4), scale_rewards={a.scale_rewards}",
            f"(R - mean_g) / (std_g + 1e-6), scale_std={rl.scale_std}",
            "both group-normalized with the unbiased std; the epsilons are hard-coded (TRL grpo_trainer.py "
            "1e-4, rlhflab advantages.grpo_advantages 1e-6): they differ by at most 1e-4 / std_g relative, "
            "and a group of equal rewards gets 0 on both", NOT_MATCHED),
        row("advantage whitening over the batch", False, rl.whiten_advantages, "no batch whitening on top"),
        row("policy clip range", [a.epsilon, a.epsilon_high or a.epsilon],
            [rl.clip_eps, rl.clip_eps_high or rl.clip_eps], "[1 - low, 1 + high] on the token ratio"),
        row("importance sampling level", a.importance_sampling_level, "token", "per-token ratio on both"),
        row("dual clip / delta", a.delta, rl.dual_clip, "off on both"),
        *online_common(a, rl, spec),
        dropout_row(env["dropout"], a.disable_dropout),
        *optimizer_rows(a, rl, a.max_steps, scheduled_by_rlhflab=False),
    ]


def audit_rloo(spec, trl, ours, env) -> list[dict]:
    from trl import RLOOConfig

    a = RLOOConfig(**trl.rloo_args(spec))
    rl = ours.online_config(spec).rl
    per_step = a.per_device_train_batch_size * a.gradient_accumulation_steps
    return [
        row("completions per rollout", per_step * a.steps_per_generation, rl.batch_size, "one generation per rollout"),
        row("group size k", a.num_generations, rl.samples_per_prompt, "samples per prompt"),
        row("optimizer steps per rollout (minibatches x epochs)", a.steps_per_generation * a.num_iterations,
            rl.num_minibatches * rl.epochs, "one: the ratio is 1, the clip never binds"),
        row("rollouts", a.max_steps // a.steps_per_generation // a.num_iterations, rl.steps, "rollout steps"),
        row("KL estimator and where it enters", "k1 summed over tokens, in the reward",
            f"{rl.kl_estimator} summed over tokens, in the {rl.kl_in}",
            "TRL rloo_trainer.py: rewards - beta * sum_t (log pi_old - log pi_ref); rlhflab "
            "reinforce.sequence_returns"),
        row("baseline", "leave-one-out mean of the group", "leave-one-out mean of the group (rloo)",
            "Ahmadian et al. 2024", MATCHED),
        row("advantage normalization", a.normalize_advantages, rl.whiten_advantages,
            "TRL normalize_advantages; rlhflab rl.whiten_advantages (both off)"),
        row("loss aggregation", "-(ratio of sequence probabilities) x A, mean over sequences",
            f"{rl.loss_agg}: sum over tokens of -ratio_t x A, mean over sequences",
            "at ratio 1 (one step per rollout) both gradients are -A grad log pi(y), averaged over sequences; "
            "TRL's sequence-level ratio and rlhflab's token ratios differ only once the ratio leaves 1",
            MATCHED if rl.loss_agg == "seq_sum" and rl.num_minibatches * rl.epochs == 1 else NOT_MATCHED),
        row("policy clip range", [a.epsilon, a.epsilon_high or a.epsilon],
            [rl.clip_eps, rl.clip_eps_high or rl.clip_eps], "never binds at one step per rollout"),
        *online_common(a, rl, spec),
        dropout_row(env["dropout"], a.disable_dropout),
        *optimizer_rows(a, rl, a.max_steps, scheduled_by_rlhflab=False),
    ]


# TRL 1.12 PPOConfig defaults and trainer code (trl/experimental/ppo), for fields trl_child does not set
PPO_DEFAULTS = {"gradient_accumulation_steps": 1, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8}


def audit_ppo(spec, trl, ours, env) -> list[dict]:
    args = trl.ppo_args(spec)
    try:
        from trl.experimental.ppo import PPOConfig

        a, source = PPOConfig(**args), "PPOConfig"
    except ImportError:  # TRL 1.16 has no PPO: the arguments trl_child passes, TRL 1.12's defaults
        a, source = SimpleNamespace(**{**PPO_DEFAULTS, **args}), "trl_child.ppo_args (TRL 1.12 not installed here)"
    rl = ours.online_config(spec).rl
    local_batch = a.per_device_train_batch_size * a.gradient_accumulation_steps
    rows = [
        row("samples per rollout", local_batch, rl.batch_size,
            "TRL PPO: per_device_train_batch_size x gradient_accumulation_steps. Fixed here: trl_child passed "
            "the minibatch (16) as per_device_train_batch_size, so TRL rolled out 16 samples in 80 rollouts of "
            "4 minibatches of 4, four times rlhflab's optimizer steps"),
        row("minibatches x epochs per rollout", [a.num_mini_batches, a.num_ppo_epochs],
            [rl.num_minibatches, rl.epochs], "one optimizer step per minibatch"),
        row("rollouts", math.ceil(a.total_episodes / local_batch), rl.steps, "total_episodes / rollout batch"),
        row("KL estimator and where it enters", f"{a.kl_estimator} per token, in the reward",
            f"{rl.kl_estimator} per token, in the {rl.kl_in}", "InstructGPT's per-token penalty"),
        row("KL coefficient beta", a.kl_coef, rl.beta, "fixed beta"),
        row("where the score enters", "the position after the last response token (if within the response)",
            "the last response token (EOS included)",
            "TRL ppo_trainer.py adds the score at sequence_lengths + 1 and trains the critic there too, so with "
            "lambda 0.95 the last token's advantage gets 0.95 x the score; code, not a setting", NOT_MATCHED),
        row("reward whitening", a.whiten_rewards, rl.whiten_rewards, "off on both"),
        row("GAE gamma, lambda", [a.gamma, a.lam], [rl.gamma, rl.gae_lambda], "GAE"),
        row("advantage whitening", "always, over response tokens, unbiased var, eps 1e-8",
            f"{'on' if rl.whiten_advantages else 'off'}, over response tokens, unbiased var, eps 1e-8",
            "TRL masked_whiten is unconditional; rlhflab BatchStats.whiten", MATCHED if rl.whiten_advantages
            else NOT_MATCHED),
        row("policy clip range", a.cliprange, rl.clip_eps, "clipped surrogate"),
        row("value clip range", a.cliprange_value, rl.value_clip_eps, "clipped value loss"),
        row("value loss", f"{a.vf_coef} x 0.5 x token mean of max(clipped, unclipped)",
            f"{rl.vf_coef} x 0.5 x token mean of max(clipped, unclipped)",
            "TRL over the response tokens and one more position; rlhflab losses.clipped_value_loss",
            MATCHED if a.vf_coef == rl.vf_coef else NOT_MATCHED),
        row("policy loss aggregation", "token mean over the minibatch", rl.loss_agg.replace("token_mean",
            "token mean over the minibatch"), "mean over response tokens"),
        row("critic", "SFT backbone, zeroed score head", f"SFT backbone, {rl.value_init} head",
            "trl_child zeroes TRL's critic head", MATCHED if rl.value_init == "zero" else NOT_MATCHED),
        row("entropy bonus", 0.0, rl.entropy_coef, "TRL's PPO loss has none"),
        row("no-EOS penalty", a.missing_eos_penalty or 0.0, rl.no_eos_penalty, "off on both"),
        row("stop token", a.stop_token, "eos", "responses end at the first EOS"),
        row("max grad norm", f"{a.max_grad_norm} (clipped by trl_child.clip_gradients)", rl.max_grad_norm,
            "fixed here: TRL's PPO never clips (ppo_trainer.py steps the optimizer right after backward; "
            "max_grad_norm is not read); trl_child now clips policy and critic gradients together, as rlhflab",
            MATCHED if a.max_grad_norm == rl.max_grad_norm else NOT_MATCHED),
        row("learning rate", a.learning_rate, rl.lr, "constant, no warm-up"),
        row("AdamW betas, eps", [a.adam_beta1, a.adam_beta2, a.adam_epsilon], [0.9, 0.999, 1e-8], "defaults"),
        row("precision", "bf16" if a.bf16 else "fp32", "fp32" if rl.mixed_precision == "no" else rl.mixed_precision,
            "fp32 on both"),
        row("dropout", "disable_dropout_in_model on every model", f"model dropout {env['dropout']}",
            "no dropout in the benchmark's GPT-2", NA if env["dropout"] == 0 else NOT_MATCHED),
    ]
    for r in rows:
        r["trl_source"] = source
    return rows


AUDITS = {"sft": audit_sft, "rm": audit_rm, "dpo": audit_dpo, "dpo-precompute": audit_dpo, "kto": audit_kto,
          "grpo": audit_grpo, "rloo": audit_rloo, "ppo": audit_ppo}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="preset the settings come from")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "matched_settings.json"))
    p.add_argument("--world", default=str(ROOT / "runs" / "bench" / "world"),
                   help="the world export make bench reads (rows over max_length are counted from it)")
    args = p.parse_args(argv)

    import trl

    from rlhflab.config import load_config

    trl_child, rlhflab_child = child("trl_child"), child("rlhflab_child")
    world = Path(args.world)
    env = {"dropout": load_config(args.config).model.dropout,
           "world": world if (world / "preferences.jsonl").is_file() else None}
    work = Path(tempfile.mkdtemp(prefix="matched_settings-"))
    paths = {"world": work / "world", "init": work / "init", "sft": work / "sft", "rm": work / "rm"}
    ns = SimpleNamespace(config=args.config, threads=2, scale=1.0)
    stages = {}
    for stage in STAGES:
        spec = dict(build_spec(stage, paths, ns, count_tokens=False), out=str(work / stage))
        rows = AUDITS[stage](spec, trl_child, rlhflab_child, env)
        stages[stage] = {"rows": rows, "counts": {v: sum(r["verdict"] == v for r in rows)
                                                  for v in (MATCHED, NOT_MATCHED, NA)}}
    out = {"command": shlex.join([".venv-bench/bin/python", "bench/matched_settings.py", *(argv or sys.argv[1:])]),
           "config": str(Path(args.config).name), "world": str(env["world"]),
           "trl": trl.__version__, "online_layout": {k: dict(zip(("group", "minibatches", "epochs"), v))
                                                     for k, v in ONLINE.items()},
           "stages": stages}
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    for stage, s in stages.items():
        print(f"{stage}: " + ", ".join(f"{n} {v}" for v, n in s["counts"].items()))
        for r in s["rows"]:
            if r["verdict"] == NOT_MATCHED:
                print(f"  not matched: {r['setting']}: TRL {r['trl']} / rlhflab {r['rlhflab']} ({r['reason']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
