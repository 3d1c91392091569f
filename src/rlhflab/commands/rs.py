"""``rlhflab rs --sft DIR --rm DIR --rounds K --n N --out DIR``: rejection-sampling fine-tuning.

K rounds of ``rlhflab.algos.rejection_sampling``: the current policy samples N responses
per world RL prompt, the reward model keeps the best of each (at or above ``--threshold``
when given), the policy is fine-tuned on them with the ``sft`` section's settings. Round 0
is the SFT policy itself. Per round ``rs.json`` records the kept data's counts and, on the
world's held-out prompts, gold utility (``gold/mean``), the proxy (``proxy/mean``), the
sampled KL from the SFT policy (``kl/sequence_mean``) and the reward model's shift reading
(``shift/...``); ``round_K/model`` holds each round's policy, ``model/`` the last.
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--sft", required=True, help="SFT run directory (or its model/): the first policy and the KL anchor")
    p.add_argument("--rm", required=True, help="reward-model directory: the proxy that picks the best")
    p.add_argument("--rounds", type=int, default=3, help="rounds of sample -> keep the best -> fine-tune (default 3)")
    p.add_argument("--n", type=int, default=8, help="candidates per prompt (default 8)")
    p.add_argument("--threshold", type=float, default=None,
                   help="keep a prompt's best only if the reward model scores it at least this (normalized units)")
    p.add_argument("--n-prompts", type=int, default=None, help="world RL prompts per round (default: world.n_prompts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print rs.json")


def check_counts(**values) -> None:
    for name, v in values.items():
        if v is not None and v < 1:
            raise InputError(f"must be >= 1, got {v}", field=f"--{name.replace('_', '-')}")


def run_rs(cfg, sft, rm_dir, out: Path, *, rounds: int, n: int, threshold: float | None = None,
           n_prompts: int | None = None, seed: int = 0, overwrite: bool = False) -> dict:
    """The ``rs.json`` record; every round's policy saved under ``out``."""
    import shutil

    from accelerate.utils import set_seed

    from rlhflab.algos.rejection_sampling import grow, improve, measure_round
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.config import save_config
    from rlhflab.distributed import check_strategy, make_accelerator
    from rlhflab.models import (
        load_causal_lm,
        load_tokenizer,
        resolve_model_dir,
        save_pretrained_atomic,
    )
    from rlhflab.reward_model import RewardModel
    from rlhflab.seeds import derive_seed
    from rlhflab.world import World

    accelerator = make_accelerator(cfg.sft.mixed_precision)
    check_strategy(cfg.sft, "sft", accelerator, cfg.lora.r, command="rs")
    check_out_dir(out, overwrite)
    sft_dir = resolve_model_dir(sft, "--sft")
    rm = RewardModel.load(rm_dir)
    tok = load_tokenizer(sft_dir, cfg.model.trust_remote_code)
    reference = load_causal_lm(sft_dir, tok, cfg.model.trust_remote_code)
    policy = load_causal_lm(sft_dir, tok, cfg.model.trust_remote_code)
    world = World(cfg.world)
    prompts = [p.text for p in world.prompts(n_prompts or cfg.world.n_prompts, "rl")]
    held_out = world.prompts(cfg.rl.n_eval, "eval")
    record: dict = {"sft": str(sft_dir), "rm": str(rm_dir), "rounds": rounds, "n": n, "threshold": threshold,
                    "n_prompts": len(prompts), "n_eval": len(held_out), "seed": seed, "per_round": []}
    with run_directory(out, overwrite, accelerator) as work:
        if accelerator.is_main_process:
            save_config(cfg, work / "config.yaml")
        row = {"round": 0, **measure_round(policy, reference, tok, rm, held_out, cfg.generation, seed=seed)}
        record["per_round"].append(row)
        _print_round(row)
        for r in range(1, rounds + 1):
            set_seed(derive_seed(seed, "rs", r, bits=31))
            rows, counts = grow(policy, tok, rm, prompts, n, cfg.generation, seed=derive_seed(seed, "rs/sample", r, bits=31),
                                threshold=threshold)
            if not rows:
                raise InputError(f"round {r}: no candidate kept (none ended, or none reached the threshold)",
                                 field="--threshold" if threshold is not None else "--n")
            if len(rows) < cfg.sft.batch_size:
                raise InputError(f"round {r}: {len(rows)} responses kept, fewer than one batch "
                                 f"(sft.batch_size={cfg.sft.batch_size}): give more --n-prompts", field="--n-prompts")
            round_dir = work / f"round_{r}"
            round_dir.mkdir(exist_ok=True)
            counts.update(improve(cfg.sft, policy, tok, rows, round_dir, accelerator))
            policy = accelerator.unwrap_model(policy)
            if accelerator.is_main_process:
                save_pretrained_atomic(policy, tok, round_dir / "model")
            row = {"round": r, **counts,
                   **measure_round(policy, reference, tok, rm, held_out, cfg.generation, seed=seed)}
            record["per_round"].append(row)
            _print_round(row)
        if accelerator.is_main_process:
            shutil.copytree(work / f"round_{rounds}" / "model", work / "model")
            write_json(work / "rs.json", record)
    accelerator.wait_for_everyone()
    return record


def _print_round(row: dict) -> None:
    kept = f"  kept {row['rs/kept']}/{row['rs/prompts']}" if "rs/kept" in row else ""
    print(f"[rs] round {row['round']}: gold {row['gold/mean']:+.3f}  proxy {row['proxy/mean']:+.3f}  "
          f"KL {row['kl/sequence_mean']:.3f}{kept}")


def run(args) -> int:
    import json

    check_counts(rounds=args.rounds, n=args.n, n_prompts=args.n_prompts)
    cfg = config_from_args(args)
    run_rs(cfg, args.sft, args.rm, Path(args.out), rounds=args.rounds, n=args.n, threshold=args.threshold,
           n_prompts=args.n_prompts, seed=args.seed, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(json.loads((Path(args.out) / "rs.json").read_text())))
    return 0
