"""``rlhflab run``: the main job, from nothing to RLHF-trained policies and a report.

    world -> SFT -> comparisons collected from SFT -> reward model (+ its instruments)
          -> arms trained from SFT side by side (default PPO, DPO, GRPO; best-of-n on request)
          -> every instrument on each arm against SFT -> diagnosis -> report.html

Each stage writes its own sub-directory of ``--out`` (``world/``, ``sft/``, ``rm/``,
``rm_eval/``, one per arm, ``eval/<arm>/``), so any stage can be re-run alone with its
own command. The DPO-family arms train on the same comparisons as the reward model
(``rm/data/train.jsonl``), so the offline and online arms see the same preferences. The
best-of-n arm (``bon`` in ``run.arms``) trains nothing: it samples SFT on the online arms'
held-out prompts, and the report sets its gold against theirs at the same KL
(``bon/bon.json``, ``rlhflab bon`` alone).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from rlhflab.commands.arms import SAMPLING, check_arms, evaluate_arm, retarget_paths, train_arm
from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError

TABLE = (("gold/mean", "gold"), ("rm/score_mean", "RM"), ("kl/sequence_mean", "KL"),
         ("win_rate/gold", "win vs SFT"), ("refusal/harmful_rate", "harm ref."),
         ("refusal/benign_rate", "over-ref."), ("sycophancy/agree_rate", "syco."),
         ("capability/accuracy", "capab."), ("length/mean", "length"))


def add_arguments(p) -> None:
    add_config_arguments(p)


def print_final_table(evals: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    first = next(iter(evals.values()))
    n = first.get("win_rate/gold_n")
    # The same probes for every row; SFT's gold elsewhere (its own samples, an RL arm's step 0)
    # comes from other prompt sets, which the report's gold table names.
    table = Table(title="policies against SFT on the same " + (f"{int(n)} " if n else "")
                  + "held-out eval probes (world.n_eval per family)")
    table.add_column("policy")
    for _, label in TABLE:
        table.add_column(label, justify="right")
    base = ["SFT"] + [f"{first[f'base/{k}']:.2f}" if f"base/{k}" in first else "" for k, _ in TABLE]
    table.add_row(*base)
    for arm, m in evals.items():
        table.add_row(arm, *[f"{m[k]:.2f}" if k in m else "" for k, _ in TABLE])
    Console(width=130).print(table)


def run(args) -> int:
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.commands.rm import run_rm
    from rlhflab.commands.sft import run_sft
    from rlhflab.commands.world import export_world
    from rlhflab.config import save_config
    from rlhflab.report.build import build_run_report

    cfg = config_from_args(args)
    check_arms(cfg.run.arms, cfg, sampling=True)
    if cfg.run.bandit_algos:
        from rlhflab.bandit import algorithms

        unknown = set(cfg.run.bandit_algos) - set(algorithms())
        if unknown:
            raise InputError(f"unknown bandit algorithm(s): {', '.join(sorted(unknown))}", field="run.bandit_algos")
    final = Path(args.out)
    check_out_dir(final, args.overwrite)
    # A first run writes in place (its finished stages stay if a later one fails); with
    # --overwrite the whole job is written beside the earlier run, which stays until the end.
    with run_directory(final, args.overwrite, keep="summary.json") as out:
        save_config(cfg, out / "config.yaml")
        seconds: dict[str, float] = {}
        summary: dict = {"seconds": seconds}

        def stage(name: str, fn):
            t = time.perf_counter()
            print(f"[run] {name} ...", flush=True)
            result = fn()
            seconds[name] = time.perf_counter() - t
            summary[name] = result
            write_json(out / "summary.json", summary)  # progress survives an interruption
            return result

        stage("world", lambda: export_world(cfg, out / "world"))
        stage("sft", lambda: run_sft(copy.deepcopy(cfg), out / "sft"))
        stage("rm", lambda: run_rm(copy.deepcopy(cfg), out / "rm", sft=str(out / "sft")))
        stage("rm_eval", lambda: _eval_rm(cfg, out))
        for arm in cfg.run.arms:
            stage(arm, lambda arm=arm: train_arm(cfg, arm, out, out / "sft", out / "rm"))
        evals = {}
        for arm in (a for a in cfg.run.arms if a not in SAMPLING):  # a sampling arm has no policy to measure
            evals[arm] = stage(f"eval_{arm}", lambda arm=arm: evaluate_arm(cfg, arm, out, out / "sft", out / "rm"))
        if cfg.run.bandit_algos:
            from rlhflab.commands.sweep import bandit_frontier

            def frontier() -> dict:
                result = bandit_frontier(list(cfg.run.bandit_algos), [float(b) for b in cfg.run.bandit_betas])
                write_json(out / "bandit_frontier.json", result)
                return result["measured"]

            stage("bandit_frontier", frontier)
        path = stage("report", lambda: str(build_run_report(out, list(cfg.run.arms))))
        retarget_paths(out, final)
    if evals:
        print_final_table(evals)
    for arm in (a for a in cfg.run.arms if a in SAMPLING):
        from rlhflab.commands.bon import print_rows

        print_rows(json.loads((final / arm / "bon.json").read_text()))
    print(f"[run] done in {sum(seconds.values()):.0f}s; report: {final / Path(path).name}")
    return 0


def _eval_rm(cfg, out: Path) -> dict:
    from rlhflab.artifacts import prepare_out_dir, write_json
    from rlhflab.data import load_rows
    from rlhflab.instruments.rm_eval import evaluate_reward_model
    from rlhflab.reward_model import RewardModel
    from rlhflab.world import World

    rows = load_rows(out / "rm" / "data" / "eval.jsonl", "preference")
    result = evaluate_reward_model(RewardModel.load(out / "rm"), rows, world=World(cfg.world))
    write_json(prepare_out_dir(out / "rm_eval", overwrite=True) / "rm_eval.json", result)
    return {k: v for k, v in result.items() if isinstance(v, float)}
