"""``rlhflab bandit``: train an algorithm on the enumerable bandit (``rlhflab.bandit``) and
measure its distance to pi*, or print best-of-n's exact law. Every option and flag is
checked against the config field whose type and domain it shares."""

from __future__ import annotations

import json

import numpy as np
import torch

from rlhflab.bandit import (
    algorithms,
    best_of_n_row,
    default_bandit,
    distance_to_optimum,
    offline_algorithms,
)
from rlhflab.errors import InputError
from rlhflab.optimal import argmax_policy, beta_for_kl, kl_divergence


def add_arguments(p) -> None:
    p.add_argument("--algo", required=True, help="algorithm (see the README's bandit table), or bon: best-of-n")
    p.add_argument("--n", type=int, default=None, help="bon: draws from pi_ref per prompt (default 4)")
    p.add_argument("--beta", default="0.5", help="KL coefficient (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the algorithm's)")
    p.add_argument("--kl-estimator", default=None, help="k1, k2 or k3 where the algorithm allows a choice")
    p.add_argument("--kl-in", choices=("reward", "loss"), default=None, help="where the KL term goes")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs (offline algorithms)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="algorithm-specific option, e.g. --option scale_std=false (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# Each option (and flag) of the bandit -> the config field whose type and domain it shares:
# online algorithms read ``rl`` (and ``group_size`` is ``rl.samples_per_prompt``), offline ones
# ``dpo`` (``gamma`` is ``dpo.simpo_gamma``, ...). The rest have their own spec below.
_ONLINE_FIELDS = {"group_size": "rl.samples_per_prompt", "sampler_temperature": "generation.temperature",
                  "seed": "rl.seed"}
_OFFLINE_FIELDS = {"lr": "dpo.lr", "label_smoothing": "dpo.label_smoothing", "gamma": "dpo.simpo_gamma",
                   "desirable_weight": "dpo.kto_desirable_weight", "undesirable_weight": "dpo.kto_undesirable_weight",
                   "nll_coef": "dpo.simpo_nll_coef", "normalize": "dpo.ipo_normalize", "nll": "dpo.orpo_nll",
                   "seed": "rl.seed"}
_OWN = {"steps": "int >= 1", "pairs": "int >= 1", "samples": "int >= 1"}
_BOOLEANS = {"deterministic"}


def _config_field(key: str, offline: bool) -> str | None:
    """The config field (``section.field``) an option of an online (``rl``) or offline
    (``dpo``) bandit algorithm shares its type and domain with, or None."""
    import dataclasses

    from rlhflab.config import RLConfig

    if offline:
        return _OFFLINE_FIELDS.get(key)
    if key in _ONLINE_FIELDS:
        return _ONLINE_FIELDS[key]
    return f"rl.{key}" if key in {f.name for f in dataclasses.fields(RLConfig)} and key not in _OWN else None


def check_option(key: str, value, offline: bool, flag: str | None = None):
    """``value`` (parsed as ``config.parse_scalar`` parses it) checked against the option's
    type and domain (``_config_field``, ``_OWN``): the value to use, or None to leave the
    option at the algorithm's default (``null``). An InputError names ``flag`` (``--option
    KEY`` by default) and what the value must be. Unknown keys pass: the algorithm names
    them with its known options."""
    from rlhflab.config import Domain, load_config

    flag = flag or f"--option {key}"
    if value is None:
        return None
    field = _config_field(key, offline)
    if field is not None:
        text = value if isinstance(value, str) else json.dumps(value)
        try:
            cfg = load_config(None, [f"{field}={text}"])
        except InputError as err:
            raise InputError(err.reason, field=flag) from None
        section, name = field.split(".")
        return getattr(getattr(cfg, section), name)
    if key in _OWN:
        problem = Domain.parse(_OWN[key]).problem(value)
        if problem:
            raise InputError(problem, field=flag)
    if key in _BOOLEANS and not isinstance(value, bool):
        raise InputError(f"expected true or false, got {value!r}", field=flag)
    return value


def _parse_options(items: list[str], offline: bool) -> dict:
    """``--option KEY=VALUE`` items: numbers as numbers (``lr=1e-3`` is 0.001, as in a preset or
    ``--set``), each value checked (``check_option``)."""
    from rlhflab.config import parse_scalar

    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--option: expected KEY=VALUE, got {item!r}")
        key = key.strip().replace("-", "_")
        value = check_option(key, parse_scalar(raw), offline)
        if value is not None:
            out[key] = value
    return out


def run(args) -> int:
    if args.algo == "bon":
        n = 4 if args.n is None else args.n
        if n < 1:
            raise InputError(f"--n: must be an integer >= 1, got {n}")
        row = best_of_n_row(default_bandit(), n)
        _print_row(args.json, row, f"best-of-{n}: KL(pi_bon||pi_ref) = {row['kl']:.4f} nats (analytic log n - "
                   f"(n-1)/n = {row['kl_analytic']:.4f}), E[R] = {row['expected_reward']:.4f} (pi_ref "
                   f"{row['ref_expected_reward']:.4f})", ("pi_bon", "policy"), ("pi_ref", "pi_ref"))
        return 0
    if args.n is not None:
        raise InputError("--n: only --algo bon draws n responses")
    algos = algorithms()
    if args.algo not in algos:
        raise InputError(f"--algo: unknown {args.algo!r} (available: {', '.join(sorted(algos)) or 'none'})")
    try:
        beta = float(args.beta)
    except ValueError:
        raise InputError(f"--beta: {args.beta!r} is not a number") from None
    if not beta > 0 or beta == float("inf"):
        raise InputError(f"--beta: must be a finite number > 0, got {args.beta}")
    offline = args.algo in offline_algorithms()
    options = _parse_options(args.option, offline)
    for key in ("steps", "kl_estimator", "kl_in", "pairs"):
        if getattr(args, key) is not None:
            options[key] = check_option(key, getattr(args, key), offline, flag=f"--{key.replace('_', '-')}")
    check_option("seed", args.seed, offline, flag="--seed")
    problem = default_bandit()
    torch.manual_seed(args.seed)
    try:
        result = algos[args.algo](problem, beta, seed=args.seed, **options)
    except TypeError as err:
        raise InputError(f"--algo {args.algo}: {err}") from None
    row = {"algo": args.algo, "beta": beta}
    if result.extra.get("kl_controller") == "lagrangian":  # the target is pi* where the budget binds
        beta = row["beta_star"] = beta_for_kl(problem.pi_ref, problem.rewards, result.extra["kl_epsilon"])
        row["kl_policy"] = float(np.mean(kl_divergence(result.policy, problem.pi_ref)))
    target = problem.optimum(beta) if beta > 0 else np.stack(
        [argmax_policy(p, r) for p, r in zip(problem.pi_ref, problem.rewards)])
    row = {**row, **distance_to_optimum(result.policy, target),
           "steps": result.steps, **result.extra}
    row["policy"] = np.round(result.policy, 4).tolist()
    row["optimum"] = np.round(target, 4).tolist()
    _print_row(args.json, row, f"{args.algo} beta={row['beta']:g}: KL(pi||pi*) = {row['kl_to_optimum']:.4f} nats, "
               f"TV = {row['tv_to_optimum']:.4f}, {row['steps']} steps", ("pi_theta", "policy"), ("pi*", "optimum"))
    return 0


def _print_row(as_json: bool, row: dict, headline: str, left: tuple[str, str], right: tuple[str, str]) -> None:
    """``row`` as one JSON line, or the headline and two distributions per prompt."""
    if as_json:
        print(json.dumps(row))
        return
    print(headline)
    for i, (p, q) in enumerate(zip(row[left[1]], row[right[1]])):
        print(f"  prompt {i}: {left[0]} {p}  {right[0]} {q}")
