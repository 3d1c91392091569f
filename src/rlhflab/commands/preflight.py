"""What a command is given, checked before it imports torch and transformers (about 7 s on a
small CPU machine): the output place first, then every input file and model directory named
on the command line, each a one-line ``InputError``. The command checks the rest (every
row, every weight) as it reads them; this only makes the commonest mistakes, a mistyped or
missing path, cost a second instead of the libraries' import time."""

from __future__ import annotations

from pathlib import Path

from rlhflab.errors import InputError

# argparse dests of inputs that must exist: data files (or datasets directories)
INPUT_FILES = ("data", "eval_data", "prompts", "eval_prompts", "harmful", "benign", "mc", "votes", "pairs",
               "constitution")
# and model directories: a model's own, or a stage's output holding model/
MODEL_DIRS = {"sft": "--sft", "policy": "--policy", "base": "--base", "rm": "--rm", "model": "--model",
              "backbone": "--backbone"}
# commands whose --out is a directory they create (checked as they check it), or a file
OUT_DIRS = ("sft", "rm", "dpo", "ppo", "reinforce", "rloo", "grpo", "eval", "eval-rm", "bon", "rlaif", "cai-sl")
OUT_FILES = ("collect",)


def preflight(command: str, args) -> None:
    """The torch-free checks of ``args`` (the parsed command line of ``command``): the config
    (preset and ``--set`` items) first, as the command will read it, then the paths."""
    from rlhflab.artifacts import check_out_dir, check_out_file, resolve_model_dir

    if hasattr(args, "overrides") and hasattr(args, "config"):
        from rlhflab.config import config_from_args

        cfg = config_from_args(args)  # a bad preset or --set item is named before any path
        from rlhflab.registry import online_commands

        variants = online_commands().get(command)
        if variants and not getattr(args, "resume", None):  # and an online run's settings and layout
            import os

            from rlhflab.algos.rl_config import check_layout, resolve_rl_config

            algo = variants[getattr(args, "variant", None) or next(iter(variants))]
            check_layout(resolve_rl_config(cfg.rl, algo), int(os.environ.get("WORLD_SIZE", "1")))

    out = getattr(args, "out", None)
    if out and not getattr(args, "resume", None):
        if command in OUT_DIRS:
            check_out_dir(out, bool(getattr(args, "overwrite", False)))
        elif command in OUT_FILES:
            check_out_file(out)
    for dest in INPUT_FILES:
        value = getattr(args, dest, None)
        if isinstance(value, str) and value and not Path(value).exists():
            raise InputError("cannot open: No such file or directory", file=value)
    for dest, flag in MODEL_DIRS.items():
        value = getattr(args, dest, None)
        if not (isinstance(value, str) and value):
            continue
        if dest == "rm" and any((Path(value) / sub / "reward_model.json").is_file() for sub in (".", "model")):
            continue  # an rlhflab reward model (an ensemble has no config.json at its top)
        resolve_model_dir(value, flag)
