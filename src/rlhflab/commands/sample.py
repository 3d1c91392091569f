"""``rlhflab sample``: print sample generations of a policy, with gold utility on the world."""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args


def add_arguments(p) -> None:
    add_config_arguments(p, out=False)
    p.add_argument("--policy", required=True, help="policy directory (a run's model/ or the run dir)")
    p.add_argument("-n", type=int, default=8, help="prompts to sample")
    p.add_argument("--family", help="only prompts of this world family")
    p.add_argument("--seed", type=int, default=0)


def print_samples(completions, prompts=None, title: str = "samples") -> None:
    """A table of prompt, response, EOS and (on world prompts) gold utility."""
    from rich.console import Console
    from rich.table import Table

    from rlhflab.world.gold import gold_utility

    table = Table(title=title, show_lines=False)
    for col in ("prompt", "response", "eos", "gold"):
        table.add_column(col, overflow="fold")
    for i, c in enumerate(completions):
        gold = gold_utility(prompts[i], c.text, c.eos) if prompts is not None else None
        table.add_row(c.prompt, c.text, "yes" if c.eos else "no", "" if gold is None else f"{gold:+.2f}")
    Console(width=120).print(table)


def run(args) -> int:
    from rlhflab.errors import InputError
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.sampling import sample
    from rlhflab.world import FAMILIES, World

    cfg = config_from_args(args)
    path = Path(args.policy)
    if (path / "model" / "config.json").is_file():
        path = path / "model"
    if args.family and args.family not in FAMILIES:
        raise InputError(f"--family: expected one of {', '.join(FAMILIES)}")
    tok = load_tokenizer(path)
    model = load_causal_lm(path, tok)
    world = World(cfg.world)
    prompts = world.prompts(args.n, "sample", args.family)
    g = cfg.generation
    completions = sample(model, tok, [p.text for p in prompts], temperature=g.temperature, top_k=g.top_k,
                         top_p=g.top_p, max_new_tokens=g.max_new_tokens, seed=args.seed)
    print_samples(completions, prompts, title=f"samples of {path}")
    return 0
