"""``rlhflab world --out DIR``: the world as TRL-format JSONL plus its tokenizer.

Files written (formats in ``rlhflab.data``):

| file                    | format     | what                                                  |
|-------------------------|------------|-------------------------------------------------------|
| sft.jsonl               | sft        | demonstrations (``n_sft``)                            |
| sft_eval.jsonl          | sft        | held-out demonstrations (``n_sft_eval``)              |
| preferences.jsonl       | preference | demonstrator pairs rated by the panel, with ``votes`` |
| preferences_eval.jsonl  | preference | held-out pairs                                        |
| prompts.jsonl           | prompt     | prompts for online RL, with ``family``                |
| probes.jsonl            | prompt     | held-out probes, ``n_eval`` per family, with the answer, the user's claim, the topic and the ideal response |
| tokenizer/              |            | the world's tokenizer (``AutoTokenizer.from_pretrained``) |
| config.yaml             |            | the resolved configuration                            |
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args


def add_arguments(p) -> None:
    add_config_arguments(p)


def export_world(cfg, out: Path, overwrite: bool = False) -> dict[str, int]:
    from rlhflab.artifacts import check_out_dir, run_directory
    from rlhflab.config import save_config
    from rlhflab.data import write_jsonl
    from rlhflab.world import FAMILIES, World

    check_out_dir(out, overwrite)
    world = World(cfg.world)
    w = cfg.world
    files = {
        "sft.jsonl": world.sft_examples(w.n_sft, "sft"),
        "sft_eval.jsonl": world.sft_examples(w.n_sft_eval, "sft_eval"),
        "preferences.jsonl": world.preference_pairs(w.n_preferences, "pref"),
        "preferences_eval.jsonl": world.preference_pairs(max(1, w.n_preferences // 5), "pref_eval"),
        "prompts.jsonl": [{"prompt": p.text, "family": p.family} for p in world.prompts(w.n_prompts, "rl")],
        "probes.jsonl": [p.to_json() for f in FAMILIES for p in world.prompts(w.n_eval, "eval", f)],
    }
    # An earlier export stays until this one is complete, then is replaced in one rename.
    with run_directory(out, overwrite) as work:
        for name, rows in files.items():
            write_jsonl(work / name, rows)
        world.tokenizer().save_pretrained(str(work / "tokenizer"))
        save_config(cfg, work / "config.yaml")
    return {name: len(rows) for name, rows in files.items()}


def run(args) -> int:
    counts = export_world(config_from_args(args), Path(args.out), args.overwrite)
    for name, n in counts.items():
        print(f"{n:6d}  {Path(args.out) / name}")
    return 0
