"""``rlhflab iterate --sft DIR --rounds R --out DIR``: iterative RLHF on the world.

The answer of the InstructGPT and Llama 2 papers to distribution shift: the reward model is
trained on samples of the policy it is meant to judge, and the policy moves away from
them, so the comparisons are renewed as it moves. Round r = 1..R:

1. the current policy (the SFT policy in round 1) samples ``rm.k`` responses on its share
   of the comparison prompts and the world's rater panel ranks them (``rlhflab collect``);
2. before retraining, the last round's reward model is scored on these fresh comparisons:
   its accuracy on the current policy's samples (``iterate/rm_accuracy_on_policy``; it
   falls as the policy moves away from the data it was trained on);
3. the reward model is trained on all comparisons so far, old and new (``rlhflab rm``,
   normalized on the SFT policy's samples so that every round's proxy is in the same
   units): by default from the SFT backbone, so each round's reward model is a function of
   its data alone (no old comparison is seen for more epochs than a new one, and no round
   inherits an earlier round's over-fit); with ``--rm-continue`` from the previous round's
   reward model (its backbone; ``rlhflab rm`` gives every backbone a fresh scalar head),
   the form of Llama 2's iterations, which keeps what the earlier rounds learned;
4. RL continues from the current policy on the new reward model for its share of
   ``rl.steps`` (``rlhflab ppo / reinforce / rloo / grpo``), its KL penalty to the SFT
   policy in every round (``run_rl(reference=...)``), so the R rounds together are one
   KL-regularized objective, as in one round, and not a trust region per round.

``--labels URL`` puts people in place of the world's raters in step 1: the samples become
tasks in that labeling database (``rlhflab label serve --db URL`` serves them), the round
waits until every task has ``--labels-overlap`` answers (or ``--labels-need`` tasks have,
or ``--labels-timeout`` seconds passed) and goes on with the people's votes as TRL pairs
(``rlhflab.labeling.rounds``; docs/labeling.md).

``--method online-dpo`` replaces steps 2-4 (Guo et al. 2024, "Direct language model
alignment from online AI feedback", one batch per round): DPO on the new pairs sampled from
the current policy and judged by the raters, the current policy as the reference.

The comparison budget is fixed: ``rm.n_prompts`` prompts in all, split over the rounds, so
one round and three rounds see the same number of comparisons (and of RL steps). Each
round's policy is measured on the world's held-out prompts: gold (``gold/mean``), the
proxy of that round's reward model (``proxy/mean``), the sampled KL from the SFT policy
(``kl/sequence_mean``), the shift reading (``shift/...``, ``instruments.distribution_shift``)
and the over-optimization reading ``overopt/proxy_overstatement``: the proxy's gain over the
SFT policy minus the gold's, the gold gain in units of the SFT samples' gold std (the proxy
is in those units by its normalization), so 0 means the proxy tells the truth. The record
also gives where the gold peaked over every RL evaluation of every round (``gold/peak``,
``gold/peak_step``). ``iterate.json``, ``round_r/{comparisons.jsonl, rm, rl | dpo}``,
``model/`` the final policy.
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError
from rlhflab.registry import online_commands

METHODS = ("rl", "online-dpo")


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--sft", required=True, help="SFT run directory (or its model/): round 1's policy and the KL anchor")
    p.add_argument("--rounds", type=int, default=3, help="rounds of sample -> rate -> retrain the RM -> RL (default 3)")
    p.add_argument("--method", choices=METHODS, default="rl", help="rl (default) or online-dpo")
    p.add_argument("--algo", choices=sorted(online_commands()), default="rloo",
                   help="the RL algorithm of each round (default rloo)")
    p.add_argument("--rm-continue", action="store_true",
                   help="train each round's reward model from the previous round's (default: from the SFT "
                        "backbone on all comparisons so far)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print iterate.json")
    p.add_argument("--labels", metavar="URL",
                   help="people compare each round's samples: the labeling database (rlhflab label serve --db URL) "
                        "the round posts its tasks to and waits on, in place of the world's raters")
    p.add_argument("--labels-overlap", type=int, default=3, help="labelers per task with --labels (default 3)")
    p.add_argument("--labels-need", type=int, metavar="N",
                   help="go on once N tasks have their overlap of answers (default: every task of the round)")
    p.add_argument("--labels-timeout", type=float, default=86400.0, metavar="SECONDS",
                   help="go on after this long with the pairs that have a majority by then (default one day)")


def split_budget(total: int, rounds: int, what: str) -> list[int]:
    """``total`` split over ``rounds`` as evenly as integers allow, the remainder first."""
    if total < rounds:
        raise InputError(f"{total} {what} cannot be split over {rounds} rounds", field="--rounds")
    return [total // rounds + (i < total % rounds) for i in range(rounds)]


def rl_algorithm(command: str) -> str:
    """The algorithm an online command runs by default (``registry.online_commands``)."""
    variants = online_commands()[command]
    return variants[next(iter(variants))]


def _gold_std(prompts, completions) -> float:
    from statistics import pstdev

    from rlhflab.world.gold import gold_utility

    return pstdev(gold_utility(p, c.text, c.eos) for p, c in zip(prompts, completions))


def run_iterate(cfg, sft, out: Path, *, rounds: int, method: str = "rl", algo: str = "rloo", seed: int = 0,
                overwrite: bool = False, rm_continue: bool = False, labels: dict | None = None) -> dict:
    """The ``iterate.json`` record (module docstring); every round's artifacts under ``out``.
    ``labels``: people's votes in place of the raters, ``{"store": Store, "overlap": 3,
    "need": None, "timeout": s, "poll": s}`` (``rlhflab.labeling.rounds.people_round``)."""
    import copy
    import shutil

    from rlhflab.algos.rejection_sampling import measure_round
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.commands.collect import collect, rater_panel
    from rlhflab.commands.dpo import run_dpo
    from rlhflab.commands.rl import run_rl
    from rlhflab.commands.rm import run_rm
    from rlhflab.config import save_config
    from rlhflab.data import write_jsonl
    from rlhflab.instruments.rm_eval import pairwise_accuracy
    from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir
    from rlhflab.reward_model import RewardModel
    from rlhflab.sampling import sample
    from rlhflab.seeds import derive_seed
    from rlhflab.world import World

    check_out_dir(out, overwrite)
    sft_dir = resolve_model_dir(sft, "--sft")
    if rm_continue and cfg.rm.ensemble > 1:
        raise InputError("--rm-continue continues one reward model: set rm.ensemble=1", field="rm.ensemble")
    prompt_shares = split_budget(cfg.rm.n_prompts, rounds, "comparison prompts (rm.n_prompts)")
    step_shares = split_budget(cfg.rl.steps, rounds, "RL steps (rl.steps)") if method == "rl" else [0] * rounds
    world = World(cfg.world)
    pool = world.prompts(cfg.rm.n_prompts, "pref")
    held_out = world.prompts(cfg.rl.n_eval, "eval")
    gen = cfg.generation
    tok = load_tokenizer(sft_dir, cfg.model.trust_remote_code)
    reference = load_causal_lm(sft_dir, tok, cfg.model.trust_remote_code)
    sft_samples = sample(reference, tok, [p.text for p in held_out], temperature=gen.temperature, top_k=gen.top_k,
                         top_p=gen.top_p, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, seed=seed)
    gold_scale = _gold_std(held_out, sft_samples) or 1.0
    record: dict = {"sft": str(sft_dir), "rounds": rounds, "method": method, "algo": algo if method == "rl" else None,
                    "labels": labels["store"].url if labels else None,
                    "seed": seed, "rm_continue": rm_continue, "comparison_prompts": prompt_shares, "rl_steps": step_shares,
                    "gold/sft_std": gold_scale, "per_round": []}
    with run_directory(out, overwrite) as work:
        save_config(cfg, work / "config.yaml")
        base = measure_round(reference, reference, tok, None, held_out, gen, seed=seed)
        record["per_round"].append({"round": 0, **base})
        policy_dir, rm_prev, all_rows, start, curve = sft_dir, None, [], 0, []
        for r in range(1, rounds + 1):
            rd = work / f"round_{r}"
            rd.mkdir()
            policy = load_causal_lm(policy_dir, tok, cfg.model.trust_remote_code)
            prompts = pool[start:start + prompt_shares[r - 1]]
            start += prompt_shares[r - 1]
            if labels is None:
                rows, counts = collect(policy, tok, world, prompts, cfg.rm.k, gen,
                                       rater_panel(world, "pref", seed=r), seed=derive_seed(seed, "iterate", r, bits=31))
            else:
                from rlhflab.commands.collect import sample_groups
                from rlhflab.labeling.rounds import people_round

                groups = sample_groups(policy, tok, prompts, cfg.rm.k, gen, seed=derive_seed(seed, "iterate", r, bits=31))
                rows, counts = people_round(labels["store"], groups, overlap=labels["overlap"], need=labels["need"],
                                            timeout=labels["timeout"], poll=labels.get("poll", 5.0),
                                            tag=f"iterate {out.name} round {r}")
            if not rows:
                raise InputError(f"round {r}: no comparisons (every prompt's samples were identical)", field="rm.k")
            row: dict = {"round": r, "iterate/comparisons_new": len(rows), **counts}
            if rm_prev is not None:
                row["iterate/rm_accuracy_on_policy"] = pairwise_accuracy(rm_prev, rows)
            all_rows += rows
            write_jsonl(rd / "comparisons.jsonl", all_rows if method == "rl" else rows)
            row["iterate/comparisons_total"] = len(all_rows)
            rm = None
            if method == "rl":
                c = copy.deepcopy(cfg)
                c.rm.backbone = str(rd.parent / f"round_{r - 1}" / "rm") if rm_continue and r > 1 else str(sft_dir)
                run_rm(c, rd / "rm", sft=str(sft_dir), data=str(rd / "comparisons.jsonl"))
                rm = rm_prev = RewardModel.load(rd / "rm")
                row["rm/eval_accuracy"] = _rm_eval_accuracy(rd / "rm")
                c = copy.deepcopy(cfg)
                c.rl.steps = step_shares[r - 1]
                c.rl.seed = derive_seed(cfg.rl.seed, "iterate", r, bits=31)
                summary = run_rl(c, rl_algorithm(algo), rd / "rl", sft=str(policy_dir), rm=str(rd / "rm"),
                                 reference=str(sft_dir))
                offset = sum(step_shares[:r - 1])  # the RL steps of the rounds before
                curve += [{"step": offset + e["step"], "gold/mean": e["gold/mean"], "round": r}
                          for e in summary.get("evals", [])]
                policy_dir = rd / "rl" / "model"
            else:
                summary = run_dpo(cfg, rd / "dpo", sft=str(policy_dir), data=str(rd / "comparisons.jsonl"))
                policy_dir = rd / "dpo" / "model"
            policy = load_causal_lm(policy_dir, tok, cfg.model.trust_remote_code)
            row.update(measure_round(policy, reference, tok, rm, held_out, gen, seed=seed))
            if rm is not None:
                proxy_base = float(rm.score([p.text for p in held_out], [c.text for c in sft_samples],
                                            eos=[c.eos for c in sft_samples]).mean())
                gold_gain = (row["gold/mean"] - base["gold/mean"]) / gold_scale
                row["overopt/proxy_gain"] = row["proxy/mean"] - proxy_base
                row["overopt/gold_gain_std"] = gold_gain
                row["overopt/proxy_overstatement"] = row["overopt/proxy_gain"] - gold_gain
            record["per_round"].append(row)
            _print_round(row)
        if curve:
            best = max(curve, key=lambda e: e["gold/mean"])
            record.update({"gold/peak": best["gold/mean"], "gold/peak_step": best["step"],
                           "gold/peak_round": best["round"], "gold/curve": curve})
        final = record["per_round"][-1]
        record.update({"gold/final": final["gold/mean"], "kl/final": final["kl/sequence_mean"],
                       **({"overopt/proxy_overstatement_final": final["overopt/proxy_overstatement"]}
                          if "overopt/proxy_overstatement" in final else {})})
        shutil.copytree(policy_dir, work / "model")
        write_json(work / "iterate.json", record)
    return record


def _rm_eval_accuracy(rm_dir: Path):
    """The held-out accuracy ``rlhflab rm`` measured (its own split of the comparisons)."""
    import json

    return json.loads((rm_dir / "metrics.json").read_text()).get("eval/accuracy")


def _print_round(row: dict) -> None:
    acc = row.get("iterate/rm_accuracy_on_policy")
    over = row.get("overopt/proxy_overstatement")
    print(f"[iterate] round {row['round']}: gold {row['gold/mean']:+.3f}  KL {row['kl/sequence_mean']:.3f}"
          + (f"  proxy {row['proxy/mean']:+.3f}" if "proxy/mean" in row else "")
          + (f"  RM acc on policy {acc:.3f}" if acc is not None else "")
          + (f"  over-statement {over:+.3f}" if over is not None else ""))


def run(args) -> int:
    import json

    if args.rounds < 1:
        raise InputError(f"must be >= 1, got {args.rounds}", field="--rounds")
    cfg = config_from_args(args)
    if args.rm_continue and args.method != "rl":
        raise InputError("online DPO trains no reward model", field="--rm-continue")
    if args.method != "rl" and cfg.rl.sampler != "engine":
        raise InputError("online DPO samples its pairs with the engine: rl.sampler is read by the online RL rounds "
                         "only (--method rl)", field="rl.sampler")
    labels = None
    if args.labels is None and (args.labels_need is not None or args.labels_overlap != 3
                                or args.labels_timeout != 86400.0):
        raise InputError("--labels-overlap, --labels-need and --labels-timeout go with --labels URL")
    if args.labels is not None:
        from rlhflab.commands.label import database_url
        from rlhflab.labeling.store import Store

        if args.labels_overlap < 1:
            raise InputError(f"expected an integer >= 1, got {args.labels_overlap}", field="--labels-overlap")
        if args.labels_need is not None and args.labels_need < 1:
            raise InputError(f"expected an integer >= 1, got {args.labels_need}", field="--labels-need")
        if not args.labels_timeout > 0:
            raise InputError(f"expected seconds > 0, got {args.labels_timeout}", field="--labels-timeout")
        labels = {"store": Store(database_url(args.labels)), "overlap": args.labels_overlap,
                  "need": args.labels_need, "timeout": args.labels_timeout}
    run_iterate(cfg, args.sft, Path(args.out), rounds=args.rounds, method=args.method, algo=args.algo,
                seed=args.seed, overwrite=args.overwrite, rm_continue=args.rm_continue, labels=labels)
    if args.json:
        print(json.dumps(json.loads((Path(args.out) / "iterate.json").read_text())))
    return 0
