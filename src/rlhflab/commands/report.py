"""``rlhflab report DIR [--out FILE] [--overwrite]``: a self-contained ``report.html`` (inline
CSS and SVG, no script, no network) of any rlhflab output directory: the main job's
(``rlhflab run``), a training run's (``sft``, ``rm``, ``dpo``, ``ppo``, ``grpo``, ``rloo``,
``reinforce``: its curves), an ``rlhflab eval`` directory (readings, diagnosis, samples), an
``eval-rm`` or ``bon`` directory, or a TRL trainer's output (``trainer_state.json``); the
kinds are in ``rlhflab.report.directories``.

The page goes to ``DIR/report.html`` unless ``--out`` names a file, and is written at once
(a temporary file, then a rename). A report rlhflab wrote is replaced; any other file in the
way is kept unless ``--overwrite`` is given. A directory of no known kind is a one-line
error (exit code 2)."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("dir", metavar="DIR", help="an rlhflab output directory (run, training run, eval, eval-rm, bon) "
                                              "or a TRL trainer's output directory")
    p.add_argument("--out", help="the HTML file to write (default: DIR/report.html)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out even if it is not a report rlhflab wrote (a report is always replaced)")


def run(args) -> int:
    from rlhflab.artifacts import check_out_file
    from rlhflab.errors import InputError
    from rlhflab.report.directories import build_report, directory_kind
    from rlhflab.report.html import is_report

    kind = directory_kind(args.dir)  # an unknown directory is refused before anything is written
    out = Path(args.out) if args.out else Path(args.dir) / "report.html"
    check_out_file(out)
    if out.exists() and not args.overwrite and not is_report(out):
        raise InputError("exists and is not a report rlhflab wrote; pass --overwrite to replace it", file=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    path = build_report(args.dir, out)
    print(f"report ({kind}): {path}")
    return 0
