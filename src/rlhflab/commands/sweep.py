"""``rlhflab sweep``: one arm per beta, and the reward-KL frontier they trace.

On the world: ``rlhflab sweep --algo ppo|dpo|grpo|... --beta 0.01,0.05,0.1,0.5 --sft DIR --rm DIR
--out DIR`` trains one arm per beta from SFT, measures each against SFT (KL, gold, RM
score, gold win-rate) and writes ``frontier.json`` (one row per beta) and
``frontier.html`` (gold and proxy against KL).

On the bandit: ``rlhflab sweep --bandit --algo ppo,dpo --beta ... --out DIR`` trains the
tabular policy per beta and draws the measured (KL(pi || pi_ref), E[R]) points beside the
exact frontier of ``rlhflab.optimal`` (``bandit_frontier.json``, ``frontier.html``).
Beta is the only knob that moves along the frontier: rewards are defined up to a per-prompt
constant, so beta is calibrated by the KL it achieves, never by feel.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError


def add_arguments(p) -> None:
    add_config_arguments(p)
    from rlhflab.commands.arms import OFFLINE, ONLINE

    p.add_argument("--algo", required=True, help=f"arm(s), comma-separated, of {', '.join(ONLINE + OFFLINE)}; "
                                                 "with --bandit, of the bandit's algorithms")
    p.add_argument("--beta", required=True, help="comma-separated betas, e.g. 0.01,0.05,0.1,0.5")
    p.add_argument("--sft", help="SFT run directory (world sweeps)")
    p.add_argument("--rm", help="reward model directory (world sweeps)")
    p.add_argument("--bandit", action="store_true", help="sweep on the enumerable bandit instead of the world")
    p.add_argument("--seed", type=int, default=0)


def parse_betas(text: str) -> list[float]:
    betas = []
    for item in text.split(","):
        try:
            b = float(item)
        except ValueError:
            raise InputError(f"--beta: {item!r} is not a number") from None
        if not 0 < b < float("inf"):
            raise InputError(f"--beta: must be a finite number > 0, got {item}")
        betas.append(b)
    if not betas:
        raise InputError("--beta: give at least one value")
    return betas


def bandit_frontier(algos: list[str], betas: list[float], seed: int = 0) -> dict:
    """Exact frontier (a dense beta grid) and each algorithm's measured point per beta;
    KL(pi || pi_ref) and E[R] are averaged over the bandit's prompts."""
    from rlhflab.bandit import algorithms, default_bandit
    from rlhflab.optimal import kl_divergence

    problem = default_bandit()
    registry = algorithms()
    unknown = [a for a in algos if a not in registry]
    if unknown:
        raise InputError(f"--algo: unknown bandit algorithm(s) {', '.join(unknown)} "
                         f"(available: {', '.join(sorted(registry))})")

    def point(policy: np.ndarray, beta: float) -> dict:
        return {"beta": beta, "kl": float(np.mean(kl_divergence(policy, problem.pi_ref))),
                "reward": float(np.mean((policy * problem.rewards).sum(-1)))}

    grid = sorted(set(np.geomspace(min(betas) / 4, max(betas) * 8, 40).tolist() + betas))
    exact = [point(problem.optimum(b), b) for b in grid]
    measured = {a: [point(registry[a](problem, b, seed=seed).policy, b) for b in betas] for a in algos}
    return {"exact": exact, "measured": measured}


def frontier_page(title: str, series: dict, points: dict, xlabel: str, ylabel: str, rows: list[list],
                  header: list[str]) -> str:
    from rlhflab.report.html import page, table
    from rlhflab.report.svg import line_plot

    plot = line_plot(series, points=points, title=title, xlabel=xlabel, ylabel=ylabel, width=640, height=380)
    return page(title, [("Frontier", plot), ("Points", table(header, rows))])


def run(args) -> int:
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.report.html import write_page

    cfg = config_from_args(args)
    betas = parse_betas(args.beta)
    algos = [a.strip() for a in args.algo.split(",") if a.strip()]
    out = check_out_dir(Path(args.out), args.overwrite)
    if args.bandit:
        result = bandit_frontier(algos, betas, args.seed)
        with run_directory(out, args.overwrite) as work:
            write_json(work / "bandit_frontier.json", result)
            series = {"exact pi* frontier": ([r["kl"] for r in result["exact"]], [r["reward"] for r in result["exact"]])}
            points = {a: ([r["kl"] for r in rs], [r["reward"] for r in rs]) for a, rs in result["measured"].items()}
            rows = [[a, r["beta"], r["kl"], r["reward"]] for a, rs in result["measured"].items() for r in rs]
            write_page(work / "frontier.html", frontier_page("bandit: reward-KL frontier", series, points,
                                                            "KL(pi || pi_ref)", "expected reward", rows,
                                                            ["algo", "beta", "KL", "E[R]"]))
        for a, r in ((a, r) for a, rs in result["measured"].items() for r in rs):
            print(f"{a:12s} beta={r['beta']:<8g} KL={r['kl']:.4f}  E[R]={r['reward']:.4f}")
        return 0

    from rlhflab.commands.arms import (
        OFFLINE,
        ONLINE,
        check_arms,
        evaluate_arm,
        retarget_paths,
        train_arm,
    )

    check_arms(algos, cfg)
    if not args.sft or not args.rm:
        raise InputError("a world sweep needs --sft DIR and --rm DIR (or pass --bandit)")
    sft, rm = Path(args.sft), Path(args.rm)
    for path, flag in ((sft, "--sft"), (rm, "--rm")):
        if not path.is_dir():
            raise InputError(f"{flag}: directory not found", file=str(path))
    # The earlier sweep stays until this one is complete; a first one keeps its finished arms.
    with run_directory(out, args.overwrite, keep="frontier.json") as work:
        rows = []
        for algo in algos:
            for beta in betas:
                arm_cfg = copy.deepcopy(cfg)
                if algo in ONLINE:
                    arm_cfg.rl.beta = beta
                elif algo in OFFLINE:
                    arm_cfg.dpo.beta = beta
                name = f"{algo}_beta{beta:g}"
                arm_dir = work / name
                arm_dir.mkdir()
                train_arm(arm_cfg, algo, arm_dir, sft, rm)
                # train_arm writes into arm_dir / algo; evaluate it there.
                m = evaluate_arm(arm_cfg, algo, arm_dir, sft, rm)
                rows.append({"algo": algo, "beta": beta, "kl": m.get("kl/sequence_mean"), "gold": m.get("gold/mean"),
                             "proxy": m.get("rm/score_mean"), "win_rate": m.get("win_rate/gold"),
                             "length": m.get("length/mean"), "dir": str(arm_dir / algo)})
                write_json(work / "frontier.json", rows)
        series = {}
        points = {f"{a} gold": ([r["kl"] for r in rows if r["algo"] == a], [r["gold"] for r in rows if r["algo"] == a])
                  for a in algos}
        points.update({f"{a} proxy": ([r["kl"] for r in rows if r["algo"] == a],
                                      [r["proxy"] for r in rows if r["algo"] == a]) for a in algos})
        table_rows = [[r["algo"], r["beta"], r["kl"], r["gold"], r["proxy"], r["win_rate"], r["length"]] for r in rows]
        write_page(work / "frontier.html", frontier_page("world: gold and proxy against KL", series, points,
                                                        "KL from SFT (nats)", "score", table_rows,
                                                        ["algo", "beta", "KL", "gold", "RM score", "win-rate", "length"]))
        retarget_paths(work, out)  # the arms' recorded paths, as they will be after the rename
    for r in rows:
        print(f"{r['algo']:8s} beta={r['beta']:<8g} KL={r['kl']:.2f}  gold={r['gold']:.3f}  proxy={r['proxy']:.3f}")
    return 0
