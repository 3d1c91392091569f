"""What each benchmarked stage runs: the settings both libraries get, from the preset.

Every figure that both libraries must share (batch size, sequence length, generation
length, number of updates, learning rate, beta, seed) is put into the spec here, once;
``children/rlhflab_child.py`` and ``children/trl_child.py`` read it from there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _needs(*modules: str):
    """An availability check: None when every module exists, else the reason to skip."""

    def check() -> str | None:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        return f"not in rlhflab yet ({', '.join(missing)})" if missing else None

    return check


# name -> which TRL environment runs the peer (None: no TRL counterpart), what rlhflab needs
STAGES: dict[str, dict] = {
    "sft": {"trl_env": "trl", "available": _needs("rlhflab.algos.sft")},
    "rm": {"trl_env": "trl", "available": _needs("rlhflab.algos.reward_model", "rlhflab.reward_model")},
    "dpo": {"trl_env": "trl", "available": _needs("rlhflab.algos.dpo")},
    "dpo-precompute": {"trl_env": "trl", "available": _needs("rlhflab.algos.dpo")},
    "kto": {"trl_env": "trl", "available": _needs("rlhflab.algos.dpo")},
    "grpo": {"trl_env": "trl", "available": _needs("rlhflab.algos.grpo", "rlhflab.rollout")},
    "rloo": {"trl_env": "trl", "available": _needs("rlhflab.algos.reinforce", "rlhflab.rollout")},
    "ppo": {"trl_env": "trl-ppo", "available": _needs("rlhflab.algos.ppo", "rlhflab.rollout")},
}
# stages whose trained policy is sampled and scored on the world
QUALITY_STAGES = {"dpo", "dpo-precompute", "kto", "grpo", "rloo", "ppo"}


def data_tokens(rows: list[dict], tokenizer, max_length: int, fields: tuple[str, ...]) -> int:
    """Real (non-pad) tokens of prompt + each response field over ``rows``, EOS included:
    a property of the data, the same figure for both libraries."""
    from rlhflab.data import render, tokenize_pair

    total = 0
    for r in rows:
        for f in fields:
            total += len(tokenize_pair(*render(r["prompt"], r[f], tokenizer), tokenizer, max_length).input_ids)
    return total


def build_spec(stage: str, paths: dict, args, count_tokens: bool = True) -> dict:
    """The settings of one stage; both children get exactly this dict (plus impl and out).
    ``count_tokens=False`` leaves out ``data_tokens`` and reads no file but the preset (the
    settings alone: ``bench/matched_settings.py``)."""
    from rlhflab.config import load_config
    from rlhflab.data import load_rows
    from rlhflab.models import load_tokenizer

    cfg = load_config(args.config)
    world: Path = paths["world"]

    def tokens(rows_of, n: int, fields: tuple[str, ...]) -> dict:
        if not count_tokens:
            return {}
        rows = load_rows(rows_of[0], rows_of[1])[:n]
        return {"data_tokens": data_tokens(rows, load_tokenizer(paths["init"]), spec["max_length"], fields)}
    common = {"stage": stage, "threads": args.threads, "seed": 0}
    if stage == "sft":
        s = cfg.sft
        spec = dict(common, model=str(paths["init"]), data=str(world / "sft.jsonl"), steps=round(100 * args.scale),
                    batch_size=s.batch_size, max_length=s.max_length, lr=s.lr, warmup_ratio=s.warmup_ratio,
                    schedule=s.lr_schedule, max_grad_norm=s.max_grad_norm)
        spec.update(tokens((spec["data"], "sft"), spec["steps"] * spec["batch_size"], ("completion",)))
        return spec
    if stage == "rm":
        s = cfg.rm
        spec = dict(common, model=str(paths["sft"]), data=str(world / "preferences.jsonl"),
                    steps=round(50 * args.scale), batch_size=s.batch_size, max_length=s.max_length, lr=s.lr,
                    warmup_ratio=s.warmup_ratio, schedule=s.lr_schedule, max_grad_norm=s.max_grad_norm)
        spec.update(tokens((spec["data"], "preference"), spec["steps"] * spec["batch_size"], ("chosen", "rejected")))
        return spec
    if stage in ("dpo", "dpo-precompute", "kto"):
        s = cfg.dpo
        spec = dict(common, model=str(paths["sft"]), data=str(world / "preferences.jsonl"),
                    steps=round(50 * args.scale), batch_size=s.batch_size, max_length=s.max_length, lr=s.lr,
                    beta=s.beta, warmup_ratio=s.warmup_ratio, schedule=s.lr_schedule,
                    max_grad_norm=s.max_grad_norm, trl_precompute=stage == "dpo-precompute")
        n_rows = spec["steps"] * spec["batch_size"] // (2 if stage == "kto" else 1)
        spec.update(tokens((spec["data"], "preference"), n_rows, ("chosen", "rejected")))
        return spec
    if stage in ONLINE:
        group, minibatches, epochs = ONLINE[stage]
        r = cfg.rl
        spec = dict(common, model=str(paths["sft"]), prompts=str(world / "prompts.jsonl"),
                    steps=round(20 * args.scale), batch_size=64, group_size=group, num_minibatches=minibatches,
                    epochs=epochs, max_new_tokens=cfg.generation.max_new_tokens, lr=r.lr, beta=r.beta,
                    max_grad_norm=r.max_grad_norm)
        if stage == "ppo":
            spec["reward_model"] = str(paths["rm"])
        return spec
    raise KeyError(stage)


# online algorithm -> (samples per prompt, minibatches per rollout, epochs per rollout): the
# defaults of rlhflab.registry.ONLINE_ALGORITHMS, given to TRL explicitly
ONLINE = {"grpo": (8, 2, 1), "rloo": (4, 1, 1), "ppo": (1, 4, 4)}
