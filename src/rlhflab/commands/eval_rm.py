"""``rlhflab eval-rm --rm DIR --data FILE --out DIR``: the reward-model instruments.

Writes ``DIR/rm_eval.json`` (keys in ``rlhflab.instruments.rm_eval`` and
docs/reward-model.md) and prints a short table. The world's truth (gold utility, the
raters' noise-free utility, the sycophancy probe) is used for rows whose prompt is a world
prompt; the world's configuration is ``--config``, else the reward model run's own
``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import add_config_arguments, load_config


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--rm", required=True, help="reward model directory written by `rlhflab rm` (or its model/)")
    p.add_argument("--data", required=True, help="held-out preference rows (JSONL, JSON, Parquet, Arrow or a datasets directory; "
                   "e.g. DIR/data/eval.jsonl of the rm run)")
    p.add_argument("--votes", help="preference rows with votes for the rater agreement analysis (default: --data)")
    p.add_argument("--keywords", default="", help="comma-separated extra words for the keyword probe")
    p.add_argument("--no-world", action="store_true", help="skip the world's truth and probes")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.config import save_config
    from rlhflab.data import load_rows
    from rlhflab.instruments.rm_eval import DEFAULT_KEYWORDS, evaluate_reward_model
    from rlhflab.reward_model import RewardModel
    from rlhflab.world import World

    rm_dir = Path(args.rm)
    run_config = rm_dir / "config.yaml" if (rm_dir / "config.yaml").is_file() else rm_dir.parent / "config.yaml"
    config_path = args.config or (str(run_config) if run_config.is_file() else None)
    cfg = load_config(config_path, args.overrides)
    out = check_out_dir(Path(args.out), args.overwrite)  # before any data is loaded
    rows = load_rows(args.data, "preference")
    votes_rows = load_rows(args.votes, "preference") if args.votes else None
    keywords = tuple(dict.fromkeys([*DEFAULT_KEYWORDS, *(w.strip() for w in args.keywords.split(",") if w.strip())]))
    rm = RewardModel.load(rm_dir)
    world = None if args.no_world else World(cfg.world)
    result = evaluate_reward_model(rm, rows, world=world, keywords=keywords, votes_rows=votes_rows, seed=args.seed)
    result = {"rm": str(rm_dir), "data": str(args.data), **result}
    with run_directory(out, args.overwrite) as work:  # the earlier result stays until the new one is written
        save_config(cfg, work / "config.yaml")
        write_json(work / "rm_eval.json", result)
    print_table(result)
    return 0


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from rlhflab.instruments.rm_eval import HEADLINE

    table = Table(title=f"reward model on {result.get('pairs')} pairs", show_lines=False)
    table.add_column("instrument")
    table.add_column("value", justify="right")
    for key, label in HEADLINE:
        if isinstance(result.get(key), (int, float)):
            table.add_row(label, f"{result[key]:.3f}")
    Console(width=100).print(table)
