"""``rlhflab bon --policy DIR --rm DIR --n 1,2,4,8,16,32 --out DIR [--json]``: best-of-n.

Per held-out world prompt (the world's ``eval`` split) the policy is sampled max(n) times
and the reward model keeps its best of the first n (``rlhflab.algos.best_of_n``); per n
``bon.json`` records the gold utility, the proxy, the win-rate of the best of n against
the policy's single samples, and the KL from the policy: the analytic log n - (n-1)/n and
the plug-in estimate on the sampled candidates. Gao et al.'s best-of-n law
R(d) = d (alpha - beta d), d = sqrt(KL), is fitted to the gold gained over the single
samples (``overoptimization.fit_bon``).

On a user's prompts (``--prompts F``) there is no gold: the win-rate is a judge's
(``--judge rm:DIR | lm:DIR | py:FN``, default the selecting reward model, which then
measures the proxy, not the human), and no law is fitted.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError
from rlhflab.progress import labelled

DEFAULT_NS = "1,2,4,8,16,32"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--policy", required=True, help="policy directory (a stage's out dir or its model/)")
    p.add_argument("--rm", required=True, help="reward-model directory: the proxy that picks the best")
    p.add_argument("--n", default=DEFAULT_NS, help=f"candidates per prompt, comma-separated (default {DEFAULT_NS})")
    p.add_argument("--n-prompts", type=int, default=None, help="held-out world prompts (default: world.n_eval)")
    p.add_argument("--prompts", help="a user's prompt file instead of the world's (no gold: judge win-rate only)")
    p.add_argument("--judge", help="with --prompts: rm:DIR, lm:DIR or py:module:function (default rm:<--rm>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print bon.json")


def parse_ns(text: str) -> list[int]:
    """``"1,2,4"`` -> [1, 2, 4]: integers >= 1, each once, in increasing order."""
    ns = []
    for item in text.split(","):
        try:
            n = int(item)
        except ValueError:
            raise InputError(f"{item.strip()!r} is not an integer", field="--n") from None
        if n < 1:
            raise InputError(f"each n must be >= 1, got {n}", field="--n")
        ns.append(n)
    if ns != sorted(set(ns)):
        raise InputError(f"expected increasing distinct integers, got {text!r}", field="--n")
    return ns


def run_bon(cfg, policy_dir, rm_dir, ns: list[int], *, n_prompts: int | None = None, prompts_file=None,
            judge_spec: str | None = None, seed: int = 0) -> dict:
    """The ``bon.json`` record (see the module docstring)."""
    from rlhflab.algos.best_of_n import best_of_n
    from rlhflab.instruments.overoptimization import fit_bon
    from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir
    from rlhflab.reward_model import RewardModel

    policy_dir = resolve_model_dir(policy_dir, "--policy")
    if prompts_file is None:  # the bound before the world's prompts are even built
        _check_budget(n_prompts or cfg.world.n_eval, ns, 1, cfg.generation.max_new_tokens)
    tok = load_tokenizer(policy_dir, cfg.model.trust_remote_code)
    model = load_causal_lm(policy_dir, tok, cfg.model.trust_remote_code)
    rm = RewardModel.load(rm_dir)
    record = {"policy": str(policy_dir), "rm": str(rm_dir), "n": ns, "seed": seed,
              "kl_estimate": "plug-in: exact best-of-n KL over the empirical law of the sampled candidates"}
    if prompts_file is None:
        from rlhflab.world import World
        from rlhflab.world.gold import gold_utility

        world_prompts = World(cfg.world).prompts(n_prompts or cfg.world.n_eval, "eval")
        raw = [p.text for p in world_prompts]
        _check_budget(len(raw), ns, _mean_tokens(raw, tok), cfg.generation.max_new_tokens)
        with labelled("bon"):
            result = best_of_n(model, tok, rm, raw, raw, ns, cfg.generation, seed=seed,
                               gold=lambda i, c: gold_utility(world_prompts[i], c.text, c.eos))
        record.update(source="world", gold=True, judge="gold")
        base = result["gold/single_mean"]
        if len(ns) >= 3:
            import math

            fit = fit_bon([math.sqrt(max(0.0, r["bon/kl_plugin"])) for r in result["rows"]],
                          [r["bon/gold_mean"] - base for r in result["rows"]])
            record["fit"] = {f"bon/fit_{k}": v for k, v in fit.items()}
    else:
        from rlhflab.data import load_rows, prompt_text
        from rlhflab.instruments.judges import load_judge

        raw = [r["prompt"] for r in load_rows(prompts_file, "prompt")]
        if not raw:
            raise InputError("no prompts", file=str(prompts_file))
        judge_spec = judge_spec or f"rm:{rm_dir}"
        judge = load_judge(judge_spec, trust_remote_code=cfg.model.trust_remote_code)
        texts = [prompt_text(p, tok) for p in raw]
        _check_budget(len(texts), ns, _mean_tokens(texts, tok), cfg.generation.max_new_tokens)
        with labelled("bon"):
            result = best_of_n(model, tok, rm, raw, texts, ns, cfg.generation, seed=seed, judge=judge)
        record.update(source=str(prompts_file), gold=False, judge=judge_spec,
                      note="no gold utility on these prompts: the win-rate is the judge's"
                           + (", and the judge is the selecting reward model: it measures the proxy"
                              if judge_spec == f"rm:{rm_dir}" else ""))
    record.update(result)
    return record


def _check_budget(n_prompts: int, ns: list[int], prompt_tokens: float, new_tokens: int) -> None:
    """max(n) candidates and one single sample per prompt, all held at once: refused before
    sampling when they cannot fit in memory (``sampling.check_sample_budget``)."""
    from rlhflab.sampling import check_sample_budget

    check_sample_budget(n_prompts * (ns[-1] + 1), prompt_tokens, new_tokens,
                        field="--n" if ns[-1] >= n_prompts else "--n-prompts",
                        what=f"{n_prompts} prompts x ({ns[-1]} candidates + 1 single sample)",
                        hint="lower --n or --n-prompts")


def _mean_tokens(texts: list[str], tokenizer) -> float:
    from rlhflab.data import prompt_ids

    return sum(len(prompt_ids(t, tokenizer)) for t in texts) / max(1, len(texts))


def print_rows(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    gold = record["gold"]
    table = Table(title=f"best-of-n on {record['source']} ({record['n_prompts']} prompts)")
    cols = ["n", "proxy", *(["gold"] if gold else []), "win-rate", "KL analytic", "KL plug-in"]
    for c in cols:
        table.add_column(c)
    for r in record["rows"]:
        win = r["bon/win_rate"] if gold else r["bon/win_rate_judge"]
        table.add_row(str(r["n"]), f"{r['bon/proxy_mean']:+.3f}", *([f"{r['bon/gold_mean']:+.3f}"] if gold else []),
                      f"{win:.3f}", f"{r['bon/kl_analytic']:.3f}", f"{r['bon/kl_plugin']:.3f}")
    Console(width=100).print(table)
    if not gold:
        print(record["note"])


def run(args) -> int:
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.config import save_config

    ns = parse_ns(args.n)
    if args.judge and not args.prompts:
        raise InputError("--judge judges answers to --prompts: give a prompt file", field="--judge")
    if args.judge:
        from rlhflab.instruments.judges import parse_judge

        parse_judge(args.judge)
    if args.n_prompts is not None and args.n_prompts < 1:
        raise InputError(f"must be >= 1, got {args.n_prompts}", field="--n-prompts")
    if args.prompts and not Path(args.prompts).exists():
        raise InputError("no such file", file=args.prompts)
    cfg = config_from_args(args)
    out = check_out_dir(Path(args.out), args.overwrite)
    record = run_bon(cfg, args.policy, args.rm, ns, n_prompts=args.n_prompts, prompts_file=args.prompts,
                     judge_spec=args.judge, seed=args.seed)
    with run_directory(out, args.overwrite) as work:
        save_config(cfg, work / "config.yaml")
        write_json(work / "bon.json", record)
    if args.json:  # as written: non-finite numbers are strings there (artifacts.write_json)
        print(json.dumps(json.loads((out / "bon.json").read_text())))
    else:
        print_rows(record)
    return 0
