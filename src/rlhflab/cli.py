"""Command line: one subcommand per stage or tool. Parsing only; work lives elsewhere.

Each subcommand is a module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their command runs, so ``rlhflab optimal`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from rlhflab.errors import InputError, RunError
from rlhflab.registry import ONLINE_ALGORITHMS, online_commands
from rlhflab.threads import choose_when_torch_loads


def _online_help(variants: dict[str, str]) -> str:
    """An online command's help: its default algorithm's line, and its other variants."""
    default, *others = variants
    return ONLINE_ALGORITHMS.entry(variants[default]).doc + (f"; --variant {', '.join(others)}" if others else "")

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("rlhflab.commands.world", "write the simulated-human world as TRL-format JSONL"),
    "sft": ("rlhflab.commands.sft", "supervised fine-tuning on (prompt, completion) data"),
    "collect": ("rlhflab.commands.collect", "sample K responses per prompt and have raters rank them"),
    "rm": ("rlhflab.commands.rm", "train a Bradley-Terry reward model (or an ensemble)"),
    "eval-rm": ("rlhflab.commands.eval_rm", "reward-model instruments: accuracy, calibration, bias probes"),
    "attack-rm": ("rlhflab.commands.attack_rm", "search for what a reward model pays for: gradient attack, patterns, truth"),
    # the online RL commands, one per ``registry.online_commands()``: ppo, reinforce, rloo, grpo
    **{command: ("rlhflab.commands.rl", _online_help(variants)) for command, variants in online_commands().items()},
    "dpo": ("rlhflab.commands.dpo", "direct preference optimization and its family"),
    "bandit": ("rlhflab.commands.bandit", "train on an enumerable bandit and measure the distance to pi*"),
    "eval": ("rlhflab.commands.eval", "every instrument on a policy against its base"),
    "diagnose": ("rlhflab.diagnose", "turn instrument readings into findings: symptom, cause, fix"),
    "sweep": ("rlhflab.commands.sweep", "one arm per beta; the reward-KL frontier"),
    "optimal": ("rlhflab.optimal", "closed-form optimum of the KL-regularized objective"),
    "sample": ("rlhflab.commands.sample", "print sample generations of a policy with gold utility"),
    "bon": ("rlhflab.commands.bon", "best-of-n: the reward model keeps the best of n samples; gold, proxy, KL per n"),
    "rs": ("rlhflab.commands.rs", "rejection-sampling fine-tuning: k rounds of keep the RM's best of n, fine-tune"),
    "iterate": ("rlhflab.commands.iterate", "iterative RLHF: rounds of sample, rate, retrain the RM, continue RL"),
    "rlaif": ("rlhflab.commands.rlaif", "AI preference labels from a constitution, with soft labels and their instruments"),
    "cai-sl": ("rlhflab.commands.cai_sl", "critique and revise responses by a constitution, then SFT on the revisions"),
    "run": ("rlhflab.commands.run", "the main job: the whole pipeline on the world, then a report"),
    "report": ("rlhflab.commands.report", "a self-contained HTML report of any run, training run or eval directory"),
    "label": ("rlhflab.commands.label", "a web app where people compare responses: tasks, votes, agreement, TRL pairs"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(load: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhflab", description="rlhflab: SFT -> reward model -> RL with a KL penalty, "
                     "its variants, and the instruments that tell a working run from reward hacking.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is None:  # a stage not built yet
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load is None or name in load:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _version() -> str:
    from rlhflab import __version__

    return f"rlhflab {__version__}"


def _quiet_libraries() -> None:
    """Our own progress bars speak; the libraries' save/load bars would only add noise."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Read when transformers loads (only a command that needs it loads it: importing it here
    # cost every command 2-4 s); a process that has it loaded already is told directly.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    # A process started for the command (the console script, python -m) chooses its threads
    # from the machine's state as torch loads (rlhflab.threads); a caller's process is left alone.
    try:
        threads = choose_when_torch_loads() if argv is None else None
    except InputError as err:
        print(f"rlhflab: error: {err}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the chosen subcommand's module is imported (and so torch only when needed).
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(load=(chosen,) if chosen else ())
    args = parser.parse_args(argv)
    if threads is not None:
        threads.speak()  # the one line, once torch loads (never for --help or a usage error)
    try:
        from rlhflab.commands.preflight import preflight

        preflight(args.command, args)  # paths checked before the libraries are imported
        _quiet_libraries()
        rc = int(importlib.import_module(args._module).run(args) or 0)
        sys.stdout.flush()  # a reader gone early (`| head`) is met here, not in the interpreter's last flush
        return rc
    except BrokenPipeError:
        # The Python docs' recipe for SIGPIPE: stdout to devnull, so that the final flush at
        # exit has nowhere to fail; the exit status of a process that SIGPIPE ended, 128 + 13.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except InputError as err:
        print(f"rlhflab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunError as err:
        print(f"rlhflab {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rlhflab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
