"""``rlhflab attack-rm --rm DIR [--policy DIR] [--prompts F] --out DIR [--budget N] [--json]``:
search for what a reward model pays for (``rlhflab.instruments.rm_attack``).

Starts: the policy's samples (``--policy``), else the prompt file's references (its
``completion`` or ``chosen`` column), else, on the world, the demonstrator's answers. Without
``--prompts`` the prompts are the world's (a split of their own, "attack"); the first
``--starts`` are searched, the next ``--held-out`` are the responses every pattern is
inserted into. On world prompts the gold utility and the raters' utility (the world of
``--config``, else the reward model run's ``config.yaml``) say whether a pattern makes
sense; on a user's prompts ``--judge rm:DIR | lm:DIR | py:FN`` does. The reward attacked is
the one RL is served: an ensemble's members combined by ``rl.rm_reduce`` (``--set
rl.rm_reduce=min``), the mean by default.

Writes ``DIR/attack.json`` (top exploits per prompt, patterns ranked by context-independent
reward gain with their intervals, the known probes, the truth's readings, the settings and
the cost, and the ``rm_attack/...`` readings ``rlhflab diagnose DIR`` reads),
``DIR/adversarial.jsonl`` (the exploits paired against clean responses to the same prompts,
in TRL's pair format with the marker column ``adversarial``: ``rlhflab rm --adversarial DIR``
has the world's raters label them and retrains; people label them elsewhere) and
``DIR/config.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhflab.config import add_config_arguments, load_config
from rlhflab.errors import InputError

# flag -> AttackSettings field
SIZES = {"budget": "steps", "starts": "starts", "top_k": "top_k", "candidates": "candidates", "suffix": "suffix",
         "held_out": "held_out", "patterns": "patterns"}


def add_arguments(p) -> None:
    from rlhflab.instruments.rm_attack import AttackSettings

    d = AttackSettings()
    add_config_arguments(p)
    p.add_argument("--rm", required=True, help="reward model directory written by `rlhflab rm` (or its model/), "
                   "or any HF sequence-classification checkpoint with one label")
    p.add_argument("--policy", help="policy directory: start from its samples (default: the prompts' references)")
    p.add_argument("--prompts", help="a prompt file (JSONL, JSON, Parquet, Arrow or a datasets directory; a "
                   "`completion` or `chosen` column gives the references); default: the world's prompts")
    p.add_argument("--judge", help="rm:DIR, lm:DIR or py:module:function: the second opinion on a user's prompts")
    p.add_argument("--budget", type=int, default=d.steps, help=f"GCG steps per search (default {d.steps})")
    p.add_argument("--starts", type=int, default=d.starts, help=f"responses searched (default {d.starts})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"substitutes per position (default {d.top_k})")
    p.add_argument("--candidates", type=int, default=d.candidates,
                   help=f"single swaps scored per step (default {d.candidates})")
    p.add_argument("--suffix", type=int, default=d.suffix, help=f"free tokens appended; 0 = none (default {d.suffix})")
    p.add_argument("--held-out", type=int, default=d.held_out,
                   help=f"held-out responses each pattern is inserted into (default {d.held_out})")
    p.add_argument("--patterns", type=int, default=d.patterns, help=f"candidate patterns measured (default {d.patterns})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print attack.json")


def settings_from(args):
    """``AttackSettings`` of the flags; a size out of its domain is one line naming its flag."""
    from rlhflab.instruments.rm_attack import AttackSettings

    s = AttackSettings(**{name: getattr(args, flag) for flag, name in SIZES.items()}, seed=args.seed)
    for name, problem in s.check():
        flag = next(f for f, n in SIZES.items() if n == name) if name in SIZES.values() else name
        raise InputError(problem, field=f"--{flag.replace('_', '-')}")
    return s


def _config(args):
    rm_dir = Path(args.rm)
    run_config = next((d / "config.yaml" for d in (rm_dir, rm_dir.parent) if (d / "config.yaml").is_file()), None)
    return load_config(args.config or (str(run_config) if run_config else None), args.overrides)


def _reference(row: dict):
    """A prompt row's reference response as text, or None."""
    for key in ("completion", "chosen"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            return str(value[-1].get("content", ""))
    return None


def responses(cfg, s, *, policy=None, prompts_file=None, world=None, seed: int = 0) -> tuple[list, list, str]:
    """(starts, held-out, where they came from): Responses to the prompts (module docstring)."""
    from rlhflab.instruments.rm_attack import Response

    want = s.starts + s.held_out
    if prompts_file is not None:
        from rlhflab.data import load_rows

        rows = load_rows(prompts_file, "prompt")[:want]
        if len(rows) < 2:
            raise InputError(f"{len(rows)} prompt: the search needs at least 2 (starts, and held-out responses "
                             "to measure the patterns on)", file=str(prompts_file))
        prompts = [r["prompt"] for r in rows]
        refs = [_reference(r) for r in rows]
    else:
        examples = world.sft_examples(want, "attack")
        prompts = [e["prompt"] for e in examples]
        refs = [e["completion"] for e in examples]
    if policy is not None:
        from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir
        from rlhflab.progress import labelled
        from rlhflab.sampling import sample

        path = resolve_model_dir(policy, "--policy")
        tok = load_tokenizer(path, cfg.model.trust_remote_code)
        model = load_causal_lm(path, tok, cfg.model.trust_remote_code)
        g = cfg.generation
        with labelled("attack-rm: sampling"):
            done = sample(model, tok, prompts, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                          max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=seed)
        found = [Response(p, c.text, c.eos) for p, c in zip(prompts, done)]
        source = f"samples of {path}"
    else:
        if any(r is None for r in refs):
            line = next(i for i, r in enumerate(refs) if r is None) + 1
            raise InputError("no response to start from: give --policy DIR, or prompts with a `completion` (or "
                             f"`chosen`) column (row {line} has none)", file=str(prompts_file))
        found = [Response(p, r, True) for p, r in zip(prompts, refs)]
        source = "the prompt file's references" if prompts_file is not None else "the world's demonstrations"
    n_starts = min(s.starts, len(found) // 2) if len(found) < want else s.starts
    return found[:n_starts], found[n_starts:n_starts + s.held_out], source


def run(args) -> int:
    from rlhflab.artifacts import check_out_dir

    s = settings_from(args)
    if args.judge:
        from rlhflab.instruments.judges import parse_judge

        parse_judge(args.judge)
    cfg = _config(args)
    out = check_out_dir(Path(args.out), args.overwrite)  # before any model is loaded
    if args.prompts and not Path(args.prompts).exists():
        raise InputError("cannot open: No such file or directory", file=args.prompts)
    record = run_attack(cfg, args.rm, s, policy=args.policy, prompts_file=args.prompts, judge_spec=args.judge,
                        out=out, overwrite=args.overwrite)
    if args.json:  # as written: non-finite numbers are strings there (artifacts.write_json)
        print(json.dumps(json.loads((out / "attack.json").read_text())))
    else:
        print_summary(record)
    return 0


def run_attack(cfg, rm_dir, s, *, policy=None, prompts_file=None, judge_spec=None, out: Path, overwrite=False) -> dict:
    """The whole command: load, sample or read the starts, search, write ``out``."""
    from rlhflab.artifacts import run_directory, write_json
    from rlhflab.config import save_config
    from rlhflab.data import write_jsonl
    from rlhflab.instruments.rm_attack import adversarial_pairs, attack_reward_model
    from rlhflab.progress import progress_bar
    from rlhflab.reward_model import RewardModel
    from rlhflab.world import World

    rm = RewardModel.load(rm_dir, trust_remote_code=cfg.model.trust_remote_code)
    reduce, k = cfg.rl.rm_reduce, 1.0 if cfg.rl.rm_reduce_k is None else cfg.rl.rm_reduce_k
    if reduce != "mean" and rm.n_members < 2:
        raise InputError(f"rl.rm_reduce={reduce} combines the members of an ensemble; this reward model has one",
                         field="rl.rm_reduce")
    world = World(cfg.world)
    starts, held_out, source = responses(cfg, s, policy=policy, prompts_file=prompts_file, world=world, seed=s.seed)
    judge = None
    if judge_spec:
        from rlhflab.instruments.judges import load_judge

        judge = load_judge(judge_spec, trust_remote_code=cfg.model.trust_remote_code)
    with progress_bar(len(starts), "attack-rm", unit="start") as bar:
        record = attack_reward_model(rm, starts, held_out, s, world=world, judge=judge, reduce=reduce, k=k,
                                     progress=lambda **figures: bar.update(**figures))
    record = {"rm": str(rm_dir), "policy": str(policy) if policy else None,
              "prompts": str(prompts_file) if prompts_file else "world", "starts_from": source,
              "judge": judge_spec, **record}
    pairs = adversarial_pairs(record, rm.tokenizer)
    record["adversarial_pairs"] = len(pairs)
    with run_directory(out, overwrite) as work:  # the earlier result stays until the new one is written
        save_config(cfg, work / "config.yaml")
        write_json(work / "attack.json", record)
        write_jsonl(work / "adversarial.jsonl", pairs)
    return record


def _num(v, fmt: str = "+.2f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def print_summary(record: dict, rows: int = 8) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=120)
    truth = "gold" if any("gold_gain" in p for p in record["patterns"]) else (
        "judge" if record.get("judge") else None)
    t = Table(title=f"patterns the reward model pays for, inserted into {len(record['held_out'])} held-out responses")
    for c in ("pattern", "reward gain (95% CI)", "wins", *([f"{truth} gain" if truth == "gold" else "judge win-rate"]
                                                          if truth else []), "exploit"):
        t.add_column(c)
    items = [(p["text"], p) for p in record["patterns"][:rows]] + [(f"probe: {k}", v) for k, v in record["probes"].items()]
    for name, p in items:
        verdict = {True: "yes", False: "no", None: "unverified"}[p.get("exploit")]
        extra = [_num(p.get("gold_gain")) if truth == "gold" else _num(p.get("judge_win_rate"), ".2f")] if truth else []
        t.add_row(escape(name), f"{p['gain']:+.2f} ({p['ci_low']:+.2f} to {p['ci_high']:+.2f})", f"{p['win_rate']:.2f}",
                  *extra, verdict)
    console.print(t)
    for e in record["exploits"][:3]:
        gold = f", gold {e['gold_start']:+.2f} -> {e['gold_found']:+.2f}" if "gold_found" in e else ""
        console.print(f"[{e['mode']}] {e['prompt']!s:.60}\n  {e['start']!s:.100}\n  -> {e['found']!s:.100}\n"
                      f"  reward {e['reward_start']:+.2f} -> {e['reward_found']:+.2f}{gold}", markup=False)
    c = record["cost"]
    print(f"{c['starts_searched']} starts ({record['starts_from']}), {c['sequences_scored']} sequences scored, "
          f"{c['gradient_passes']} gradient passes, {c['seconds']:.0f} s; {record['adversarial_pairs']} adversarial "
          "pairs in adversarial.jsonl")
