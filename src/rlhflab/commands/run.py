"""``rlhflab run``: the main job, from nothing to RLHF-trained policies and a report.

    world -> SFT -> comparisons collected from SFT -> reward model (+ its instruments)
          -> arms trained from SFT side by side (default PPO, DPO, GRPO)
          -> every instrument on each arm against SFT -> diagnosis -> report.html

Each stage writes its own sub-directory of ``--out`` (``world/``, ``sft/``, ``rm/``,
``rm_eval/``, one per arm, ``eval/<arm>/``), so any stage can be re-run alone with its
own command. The DPO-family arms train on the same comparisons as the reward model
(``rm/data/train.jsonl``), so the offline and online arms see the same preferences.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError

ONLINE = {"ppo": "ppo", "grpo": "grpo", "dr-grpo": "dr-grpo", "rloo": "rloo", "reinforce": "reinforce",
          "reinforce++": "reinforce++"}
OFFLINE = ("dpo", "cdpo", "ipo", "hinge", "kto", "simpo", "orpo")
TABLE = (("gold/mean", "gold"), ("rm/score_mean", "RM"), ("kl/sequence_mean", "KL"),
         ("win_rate/gold", "win vs SFT"), ("refusal/harmful_rate", "harm ref."),
         ("refusal/benign_rate", "over-ref."), ("sycophancy/agree_rate", "syco."),
         ("capability/accuracy", "capab."), ("length/mean", "length"))


def add_arguments(p) -> None:
    add_config_arguments(p)


def check_arms(arms: list, cfg=None) -> None:
    """Known arms, each once; with ``cfg``, each online arm's resolved RL settings are
    checked too (``resolve_rl_config``, the one-process layout), before anything is written
    or trained."""
    for arm in arms:
        if arm not in ONLINE and arm not in OFFLINE:
            raise InputError(f"unknown arm {arm!r} (online: {', '.join(ONLINE)}; offline: {', '.join(OFFLINE)})",
                             field="run.arms")
    if len(set(arms)) != len(arms):
        raise InputError("each arm may appear once", field="run.arms")
    if cfg is not None:
        from rlhflab.algos.online import check_layout, resolve_rl_config

        for arm in arms:
            if arm in ONLINE:
                check_layout(resolve_rl_config(copy.deepcopy(cfg.rl), ONLINE[arm]), 1)


def train_arm(cfg, arm: str, out: Path, sft: Path, rm: Path) -> dict:
    """Train one arm from SFT into ``out/arm`` (a private copy of the config per arm)."""
    cfg = copy.deepcopy(cfg)
    if arm in ONLINE:
        from rlhflab.commands.rl import run_rl

        return run_rl(cfg, ONLINE[arm], out / arm, sft=str(sft), rm=str(rm))
    from rlhflab.commands.dpo import run_dpo

    cfg.dpo.loss = arm
    return run_dpo(cfg, out / arm, sft, data=str(rm / "data" / "train.jsonl"),
                   eval_data=str(rm / "data" / "eval.jsonl"), unpaired_from_pairs=arm == "kto")


def evaluate_arm(cfg, arm: str, out: Path, sft: Path, rm: Path) -> dict:
    """Instruments, curve readings and diagnosis of one arm into ``out/eval/<arm>/``."""
    import json

    from rlhflab.artifacts import prepare_out_dir, write_json
    from rlhflab.commands.eval import evaluate_policy
    from rlhflab.diagnose import diagnose
    from rlhflab.instruments.overoptimization import curve_readings

    metrics, samples = evaluate_policy(cfg, out / arm, sft, rm, seed=cfg.run.seed)
    curve = out / arm / "metrics.jsonl"
    rows = [json.loads(x) for x in curve.read_text().splitlines() if x.strip()] if curve.is_file() else []
    pts = [r for r in rows if "gold/mean" in r and "objective/kl" in r]
    if pts:
        metrics.update(curve_readings([r["objective/kl"] for r in pts], [r["gold/mean"] for r in pts],
                                      [r.get("objective/scores", float("nan")) for r in pts]))
    d = prepare_out_dir(out / "eval" / arm, overwrite=True)
    write_json(d / "eval.json", metrics)
    write_json(d / "samples.json", samples)
    write_json(d / "diagnosis.json", diagnose(metrics))
    return metrics


def print_final_table(evals: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="policies against SFT (world probes)")
    table.add_column("policy")
    for _, label in TABLE:
        table.add_column(label, justify="right")
    first = next(iter(evals.values()))
    base = ["SFT"] + [f"{first[f'base/{k}']:.2f}" if f"base/{k}" in first else "" for k, _ in TABLE]
    table.add_row(*base)
    for arm, m in evals.items():
        table.add_row(arm, *[f"{m[k]:.2f}" if k in m else "" for k, _ in TABLE])
    Console(width=130).print(table)


def retarget_paths(work: Path, final: Path) -> None:
    """Before a job written in ``work`` is renamed to ``final``: the paths its stages
    recorded under ``work`` (run.json's inputs, metrics, the report's title) are rewritten to
    ``final``, so resuming an arm or reading a record finds them."""
    if Path(work) == Path(final):
        return
    pairs = sorted({(str(Path(work).resolve()), str(Path(final).resolve())),
                    (str(Path(work).absolute()), str(Path(final).absolute())),
                    (str(work), str(final))}, key=lambda x: -len(x[0]))
    for path in Path(work).rglob("*"):
        if path.suffix not in (".json", ".html", ".yaml") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        new = text
        for a, b in pairs:
            new = new.replace(a, b)
        if new != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(path)


def run(args) -> int:
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.commands.rm import run_rm
    from rlhflab.commands.sft import run_sft
    from rlhflab.config import save_config
    from rlhflab.report.build import build_run_report
    from rlhflab.world.export import export_world

    cfg = config_from_args(args)
    check_arms(cfg.run.arms, cfg)
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
        for arm in cfg.run.arms:
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
    print_final_table(evals)
    print(f"[run] done in {sum(seconds.values()):.0f}s; report: {final / Path(path).name}")
    return 0


def _eval_rm(cfg, out: Path) -> dict:
    from rlhflab.artifacts import prepare_out_dir, write_json
    from rlhflab.data import load_jsonl
    from rlhflab.instruments.rm_eval import evaluate_reward_model
    from rlhflab.reward_model import RewardModel
    from rlhflab.world import World

    rows = load_jsonl(out / "rm" / "data" / "eval.jsonl", "preference")
    result = evaluate_reward_model(RewardModel.load(out / "rm"), rows, world=World(cfg.world))
    write_json(prepare_out_dir(out / "rm_eval", overwrite=True) / "rm_eval.json", result)
    return {k: v for k, v in result.items() if isinstance(v, float)}
