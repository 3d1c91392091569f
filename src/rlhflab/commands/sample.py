"""``rlhflab sample``: print sample generations of a policy, with gold utility on the world's
prompts, or on the user's (``--prompts F``, through the chat template as in training)."""

from __future__ import annotations

from rlhflab.config import add_config_arguments, config_from_args


def add_arguments(p) -> None:
    add_config_arguments(p, out=False)
    p.add_argument("--policy", required=True, help="policy directory (a run's model/ or the run dir)")
    p.add_argument("-n", type=int, default=8, help="prompts to sample")
    p.add_argument("--family", help="only prompts of this world family")
    p.add_argument("--prompts", help="prompt file (any format rlhflab reads) instead of the world's: its first -n")
    p.add_argument("--seed", type=int, default=0)


def print_samples(completions, prompts=None, title: str = "samples") -> None:
    """A table of prompt, response, EOS and (on world prompts) gold utility."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from rlhflab.world.gold import gold_utility

    table = Table(title=title, show_lines=False)
    for col in ("prompt", "response", "eos", "gold"):
        table.add_column(col, overflow="fold")
    for i, c in enumerate(completions):
        gold = gold_utility(prompts[i], c.text, c.eos) if prompts is not None else None
        # Text cells: a prompt or response is untrusted text, never rich markup ("[/INST]" of
        # Llama 2's template, or a model's "[bold]", is printed as written).
        table.add_row(Text(c.prompt), Text(c.text), "yes" if c.eos else "no", "" if gold is None else f"{gold:+.2f}")
    Console(width=120).print(table)


def run(args) -> int:
    from rlhflab.errors import InputError
    from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir
    from rlhflab.progress import labelled
    from rlhflab.sampling import check_sample_budget, sample
    from rlhflab.world import FAMILIES, World

    cfg = config_from_args(args)
    if args.family and args.family not in FAMILIES:
        raise InputError(f"--family: expected one of {', '.join(FAMILIES)}")
    if args.family and args.prompts:
        raise InputError("--family picks world prompts; --prompts gives your own: one of them", field="--family")
    if args.n < 1:
        raise InputError(f"must be >= 1, got {args.n}", field="-n")
    check_sample_budget(args.n, 1, cfg.generation.max_new_tokens, what=f"{args.n} prompts x 1 response",
                        field="-n", hint="lower -n")
    rows = None
    if args.prompts:
        from rlhflab.data import load_rows

        rows = load_rows(args.prompts, "prompt")[: args.n]
    path = resolve_model_dir(args.policy, "--policy")
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    model = load_causal_lm(path, tok, cfg.model.trust_remote_code)
    g = cfg.generation
    kw = dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
              batch_size=g.batch_size, seed=args.seed)
    if rows is not None:
        with labelled("sample"):
            done = sample(model, tok, [r["prompt"] for r in rows], **kw)
        print_samples(done, None, title=f"samples of {path}")
        return 0
    prompts = World(cfg.world).prompts(args.n, "sample", args.family)
    with labelled("sample"):
        done = sample(model, tok, [p.text for p in prompts], **kw)
    print_samples(done, prompts, title=f"samples of {path}")
    return 0
