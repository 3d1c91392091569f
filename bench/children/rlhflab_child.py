"""One rlhflab measurement, run in the project's ``.venv``.

``python bench/children/rlhflab_child.py SPEC.json``; prints ``RESULT {...}``. Calls the
project's training loops (the functions its commands call) with the settings of the spec,
timing the training loop only: loading, tokenization and saving are outside the clock, as
they are for TRL (``trainer.train()`` after the trainer has tokenized its dataset).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_seconds, emit, read_jsonl, read_spec, rss_mb, setup  # noqa: E402

from rlhflab.config import Config  # noqa: E402
from rlhflab.models import load_causal_lm, load_tokenizer, save_pretrained_atomic  # noqa: E402


def load(spec: dict):
    tok = load_tokenizer(spec["model"])
    return load_causal_lm(spec["model"], tok), tok


# The configs each stage runs with, built from the spec (bench/matched_settings.py reads them too)


def _train_fields(cfg, spec: dict, warmup: float):
    cfg.lr, cfg.batch_size, cfg.max_steps = spec["lr"], spec["batch_size"], spec["steps"]
    cfg.max_length, cfg.seed, cfg.lr_schedule = spec["max_length"], spec["seed"], spec.get("schedule", "cosine")
    cfg.warmup_ratio, cfg.max_grad_norm = spec.get("warmup_ratio", warmup), spec.get("max_grad_norm", 1.0)
    return cfg


def sft_config(spec: dict):
    cfg = _train_fields(Config().sft, spec, 0.05)
    cfg.eval_every = cfg.log_every = 10
    cfg.packing = spec.get("packing", True)  # bench/sft_grouping.py compares padded passes too
    return cfg


def rm_config(spec: dict):
    cfg = _train_fields(Config().rm, spec, 0.05)
    cfg.log_every = 10
    return cfg


def preference_config(spec: dict):
    cfg = Config().dpo
    cfg.loss = "kto" if spec["stage"] == "kto" else "dpo"
    cfg.beta = spec["beta"]
    _train_fields(cfg, spec, 0.1)
    cfg.eval_every, cfg.log_every, cfg.world_eval_every = 10**9, 10, -1
    return cfg


def run_sft(spec: dict) -> dict:
    import rlhflab.algos.sft as sft_module
    from rlhflab.algos.sft import tokenize_rows, train_sft

    if "pass_cost" in spec:  # bench/sft_grouping.py: 1e12 = one pass per batch (no length grouping)
        sft_module.PASS_COST_TOKENS = spec["pass_cost"]

    cfg = sft_config(spec)
    model, tok = load(spec)
    rows = read_jsonl(spec["data"])[: spec["steps"] * spec["batch_size"]]
    train, _ = tokenize_rows(rows, tok, cfg.max_length)
    rss0 = rss_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    train_sft(cfg, model, tok, train, [], None)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    save_pretrained_atomic(model, tok, Path(spec["out"]) / "model")
    samples = spec["steps"] * spec["batch_size"]
    return {"samples": samples, "train_seconds": seconds, "rss_before_train_mb": rss0,
            "samples_per_s": samples / seconds, "cpu_seconds": cpu}


def run_rm(spec: dict) -> dict:
    from rlhflab.algos.reward_model import rows_to_groups, tokenize_groups, train_reward_model
    from rlhflab.reward_model import create_reward_model

    cfg = rm_config(spec)
    model, tok = create_reward_model(spec["model"], seed=spec["seed"])
    groups, _ = rows_to_groups(read_jsonl(spec["data"])[: spec["steps"] * spec["batch_size"]])
    tokenize_groups(groups, tok, cfg.max_length)
    rss0 = rss_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    train_reward_model(cfg, model, tok, groups, [], None)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    samples = spec["steps"] * spec["batch_size"]
    return {"samples": samples, "train_seconds": seconds, "rss_before_train_mb": rss0,
            "samples_per_s": samples / seconds, "cpu_seconds": cpu}


def run_preference(spec: dict) -> dict:
    """DPO or KTO as ``rlhflab dpo`` runs them: reference log-probs computed once (timed:
    it is part of the training cost), then the loop without a reference model."""
    import copy

    from rlhflab.algos.dpo import (
        attach_reference_logps,
        tokenize_pairs,
        tokenize_unpaired,
        train_dpo,
    )
    from rlhflab.data import pairs_to_unpaired

    cfg = preference_config(spec)
    model, tok = load(spec)
    n_pairs = spec["steps"] * spec["batch_size"] // (2 if cfg.loss == "kto" else 1)
    rows = read_jsonl(spec["data"])[:n_pairs]
    if cfg.loss == "kto":
        examples, _ = tokenize_unpaired(pairs_to_unpaired(rows), tok, cfg.max_length, cfg.seed)
    else:
        examples, _ = tokenize_pairs(rows, tok, cfg.max_length)
    rss0 = rss_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    reference = copy.deepcopy(model)
    attach_reference_logps(reference, examples, tok.pad_token_id, "cpu")
    del reference
    t_pre = time.perf_counter() - t0
    train_dpo(cfg, model, None, tok, examples, [], None)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    save_pretrained_atomic(model, tok, Path(spec["out"]) / "model")
    samples = spec["steps"] * spec["batch_size"]
    return {"samples": samples, "train_seconds": seconds, "precompute_seconds": t_pre, "rss_before_train_mb": rss0,
            "samples_per_s": samples / seconds, "cpu_seconds": cpu}


def run_online(spec: dict) -> dict:
    """GRPO, RLOO or PPO through ``OnlineRun`` as ``rlhflab grpo/rloo/ppo`` builds it, with
    the world's gold utility as the reward (PPO: the reward model of the spec).

    Where the loop's time goes: the ``Instrument`` (the same as TRL's) with rlhflab's decoding
    engine counted as generation (``rlhflab.rollout.generate``, the entry point the rollout
    calls, in place of HF ``generate``), and the run's own timers (``time/rollout``,
    ``time/update``) cut the loop into generation, scoring, update and the rest
    (``common.loop_parts``)."""
    from common import Instrument, loop_parts, token_rates

    import rlhflab.rollout
    from rlhflab.registry import ONLINE_ALGORITHMS

    algo = spec["stage"]
    cfg = online_config(spec)
    run = build_online_run(spec, cfg)
    policy, tok = run.policy_module, run.tokenizer
    scorers = [m for _, src in run.reward.terms for m in getattr(getattr(src, "model", None), "members", [])]
    inst = Instrument([policy, run.reference, run.value_module, *scorers], tok.eos_token_id)
    inst.wrap_decoder(rlhflab.rollout, "generate", lambda gen: gen.response_mask.sum())
    rss0 = rss_mb()
    t0, c0 = time.perf_counter(), cpu_seconds()
    ONLINE_ALGORITHMS[algo](run)  # the algorithm's training loop
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    inst.close()
    save_pretrained_atomic(run.policy_module, tok, Path(spec["out"]) / "model")
    samples = spec["steps"] * spec["batch_size"]
    out = {"samples": samples, "train_seconds": seconds, "rss_before_train_mb": rss0,
           "samples_per_s": samples / seconds, "cpu_seconds": cpu, **inst.report(seconds)}
    if not out["generated_tokens"]:
        raise RuntimeError("no tokens were counted inside rlhflab.rollout.generate: the rollout no longer "
                           "decodes through it, and the figures would read 0")
    out["time/rollout"] = run.state["time_rollout"]
    out.update(loop_parts(seconds, run.state["time_rollout"], run.state["time_update"], out["time/generate"]))
    return token_rates(out)


def online_config(spec: dict):
    """The resolved ``Config`` of an online stage, as the child runs it (``rl`` filled from
    the algorithm's defaults and checked: ``resolve_rl_config``)."""
    from rlhflab.algos.rl_config import resolve_rl_config

    cfg = Config()
    g = cfg.generation
    g.max_new_tokens, g.temperature, g.top_k, g.top_p = spec["max_new_tokens"], 1.0, 0, 1.0
    g.batch_size = spec["batch_size"]  # one generate call per rollout, as TRL does
    rl = cfg.rl
    rl.steps, rl.batch_size, rl.samples_per_prompt = spec["steps"], spec["batch_size"], spec["group_size"]
    rl.lr, rl.beta, rl.seed, rl.eval_every, rl.log_every = spec["lr"], spec["beta"], spec["seed"], 0, 10
    rl.epochs, rl.num_minibatches, rl.max_grad_norm = spec["epochs"], spec["num_minibatches"], spec["max_grad_norm"]
    rl.lr_schedule, rl.warmup_ratio = "constant", 0.0
    cfg.rl = resolve_rl_config(rl, spec["stage"])
    return cfg


def build_online_run(spec: dict, cfg):
    from rlhflab.algos.online import OnlineRun
    from rlhflab.algos.ppo import ValueModel
    from rlhflab.distributed import make_accelerator
    from rlhflab.registry import ONLINE_ALGORITHMS
    from rlhflab.rewards import build_reward

    algo = spec["stage"]
    policy, tok = load(spec)
    reference = load_causal_lm(spec["model"], tok)
    value = ValueModel.from_causal_lm(policy) if ONLINE_ALGORITHMS.entry(algo).options["critic"] else None
    rm = spec.get("reward_model")
    reward = build_reward(rm, [] if rm else ["gold"])  # as `rlhflab ppo --rm` / `--reward-fn gold`
    prompts = [r["prompt"] for r in read_jsonl(spec["prompts"])]
    return OnlineRun(cfg, algo, make_accelerator(), policy, reference, tok, reward, prompts, value_model=value)


STAGES = {"sft": run_sft, "rm": run_rm, "dpo": run_preference, "dpo-precompute": run_preference,
          "kto": run_preference, "grpo": run_online, "rloo": run_online, "ppo": run_online}

if __name__ == "__main__":
    spec = read_spec()
    setup(spec["threads"])
    emit(STAGES[spec["stage"]](spec), spec)
