"""``rlhflab run``: the main job on the built-in world.

Stages so far: world export -> SFT -> sample table and summary. Each stage writes its own
sub-directory of ``--out`` (``world/``, ``sft/``), so any stage can be re-run on its own
with the stage's command and the same config.
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args


def add_arguments(p) -> None:
    add_config_arguments(p)


def run(args) -> int:
    from rlhflab.artifacts import prepare_out_dir, write_json
    from rlhflab.commands.sft import run_sft
    from rlhflab.config import save_config
    from rlhflab.world.export import export_world

    cfg = config_from_args(args)
    out = prepare_out_dir(Path(args.out), args.overwrite)
    save_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}

    t = time.perf_counter()
    counts = export_world(cfg, out / "world")
    timings["world"] = time.perf_counter() - t
    print(f"[world] wrote {sum(counts.values())} rows to {out / 'world'}")

    t = time.perf_counter()
    sft = run_sft(cfg, out / "sft")
    timings["sft"] = time.perf_counter() - t

    summary = {"stages": list(timings), "seconds": timings, "sft": sft}
    write_json(out / "summary.json", summary)
    print(f"[run] done in {sum(timings.values()):.0f}s: {out / 'summary.json'}")
    return 0
