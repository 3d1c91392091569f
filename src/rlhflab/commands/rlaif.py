"""``rlhflab rlaif``: preference labels from an AI labeller that follows a constitution
(Bai et al. 2022, "Constitutional AI", section 4).

    rlhflab rlaif --constitution FILE --judge JUDGE (--pairs F.jsonl | --policy DIR) --out DIR

For each pair a principle is sampled (``Constitution.sample``) and the judge is asked its
comparison question in both orders (``instruments.judges``): ``world:ai`` (the world's AI
labeller, ``world.ai_labeler``), ``lm:DIR`` (a local causal LM, CAI's multiple-choice
prompt), ``rm:DIR`` or ``py:module:function``. With ``--policy`` the pairs are two samples
of the policy per world prompt (``--split``, ``-n``); with ``--pairs`` the file's own.

Writes ``DIR/pairs.jsonl``: preference rows (``prompt``, ``chosen``, ``rejected``, the EOS
flags) with ``label_prob`` = P(chosen better) >= 1/2 (the soft label ``rlhflab rm`` trains
on), ``principle``, ``source: "ai"``, and the prompt's ``family`` on the world (and the
row's ``group``, so that the pairs of one prompt's K samples stay one group). A pair
whose answer could not be read is left out and counted (``rlaif/unreadable``), never kept
as a tie. ``DIR/rlaif.json`` holds the instruments:

| key | what |
|---|---|
| ``rlaif/pairs``, ``rlaif/unreadable`` | rows written; pairs whose answer could not be read |
| ``judge/position_bias``, ``judge/order_agreement`` | the judge's preference for the first position (0 unbiased) |
| ``rlaif/agree_gold`` (``/<family>``, ``/risky_benign``, ``/principle/<id>``) | share of labels that pick the side of higher gold utility (world prompts, pairs of unequal gold) |
| ``rlaif/agree_human`` (same splits) | mean probability that a world rater votes for the AI's pick (``world.labeler.preference_probability``) |
| ``rlaif/ece``, ``rlaif/brier`` | calibration of ``label_prob`` against the gold outcome: expected calibration error over 10 bins, Brier score |

Mixing human and AI comparisons (CAI: human helpfulness, AI harmlessness) is concatenating
files; ``rlhflab rm`` counts each ``source`` (``data/source/<s>``).
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhflab import progress
from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--constitution", help="constitution YAML (default: configs/constitution.yaml)")
    p.add_argument("--judge", default="world:ai", help="world:ai (default), lm:DIR, rm:DIR or py:module:function")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="preference JSONL whose pairs the judge labels")
    src.add_argument("--policy", help="policy directory: two samples per world prompt are labelled")
    p.add_argument("-n", "--n-prompts", type=int, help="world prompts with --policy (default: rm.n_prompts)")
    p.add_argument("--split", default="pref", help="world prompt split with --policy (default: pref)")
    p.add_argument("--seed", type=int, default=0, help="principle sampling and policy sampling seed")


def _calibration(probs: list[float], outcomes: list[int], bins: int = 10) -> dict[str, float]:
    """Expected calibration error (|mean p - mean outcome| per bin, weighted by the bin's
    share) and the Brier score of P(chosen better) against the outcome (1 = chosen better)."""
    n = len(probs)
    ece = 0.0
    for b in range(bins):
        idx = [i for i, p in enumerate(probs) if b / bins <= p < (b + 1) / bins or (b == bins - 1 and p == 1.0)]
        if idx:
            ece += len(idx) / n * abs(sum(probs[i] for i in idx) / len(idx) - sum(outcomes[i] for i in idx) / len(idx))
    return {"rlaif/ece": ece, "rlaif/brier": sum((p - o) ** 2 for p, o in zip(probs, outcomes)) / n}


def world_instruments(rows: list[dict], rater_cfg) -> dict[str, float]:
    """Agreement with gold and with the world's raters, per family and per principle, and the
    calibration of the soft labels (module docstring); world prompts only."""
    from rlhflab.world.gold import gold_utility
    from rlhflab.world.labeler import preference_probability
    from rlhflab.world.tasks import RISKY_SOUNDING, parse_prompt

    gold_hits: dict[str, list[float]] = {}
    human: dict[str, list[float]] = {}
    probs, outcomes = [], []
    for r in rows:
        prompt = parse_prompt(r["prompt"]) if isinstance(r["prompt"], str) else None
        if prompt is None:
            continue
        ce, re_ = bool(r.get("chosen_eos", True)), bool(r.get("rejected_eos", True))
        dg = gold_utility(prompt, r["chosen"], ce) - gold_utility(prompt, r["rejected"], re_)
        keys = ("", f"/{prompt.family}", f"/principle/{r.get('principle', 'none')}")
        if prompt.family == "benign" and prompt.topic in RISKY_SOUNDING:
            keys += ("/risky_benign",)
        h = preference_probability(prompt, r["chosen"], r["rejected"], rater_cfg, ce, re_)
        for k in keys:
            human.setdefault(k, []).append(h)
        if dg != 0:
            for k in keys:
                gold_hits.setdefault(k, []).append(float(dg > 0))
            probs.append(r["label_prob"])
            outcomes.append(int(dg > 0))
    out = {f"rlaif/agree_gold{k}": sum(v) / len(v) for k, v in sorted(gold_hits.items())}
    out.update({f"rlaif/agree_human{k}": sum(v) / len(v) for k, v in sorted(human.items())})
    out.update({f"rlaif/n_gold{k}": float(len(v)) for k, v in sorted(gold_hits.items())})
    if probs:
        out.update(_calibration(probs, outcomes))
    return out


def label_pairs(pairs: list[dict], judge, constitution, seed: int = 0) -> tuple[list[dict], dict]:
    """AI labels for preference rows (their chosen/rejected order is ignored): (rows, readings)."""
    rng = random.Random(seed)
    principles = [constitution.sample(rng) for _ in pairs]
    verdict = judge.compare([r["prompt"] for r in pairs], [r["chosen"] for r in pairs],
                            [r["rejected"] for r in pairs], principles=principles,
                            eos_a=[bool(r.get("chosen_eos", True)) for r in pairs],
                            eos_b=[bool(r.get("rejected_eos", True)) for r in pairs])
    out = []
    for r, p, pr in zip(pairs, verdict.prob_a, principles):
        if p != p:  # NaN: the answer could not be read; counted in the readings
            continue
        a, b, ea, eb = r["chosen"], r["rejected"], r.get("chosen_eos", True), r.get("rejected_eos", True)
        if p < 0.5:
            a, b, ea, eb, p = b, a, eb, ea, 1.0 - p
        row = {"prompt": r["prompt"], "chosen": a, "rejected": b, "chosen_eos": bool(ea), "rejected_eos": bool(eb),
               "label_prob": float(p), "principle": pr.id, "source": "ai"}
        for key in ("family", "group"):  # a group's pairs stay one group for the reward model
            if key in r:
                row[key] = r[key]
        out.append(row)
    readings = {"rlaif/pairs": float(len(out)), "rlaif/unreadable": float(len(pairs) - len(out)),
                **{k: v for k, v in verdict.readings.items() if k != "judge/unreadable"}}
    return out, readings


def policy_pairs(cfg, policy: str, n: int, split: str, seed: int) -> list[dict]:
    """Two samples of the policy per world prompt, as unlabelled pairs (distinct, non-empty)."""
    from rlhflab.commands.collect import policy_dir, sample_groups
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.world import World

    path = policy_dir(policy)
    tok = load_tokenizer(path)
    groups = sample_groups(load_causal_lm(path, tok), tok, World(cfg.world).prompts(n, split), 2,
                           cfg.generation, seed=seed)
    return [{"prompt": g.prompt.text, "chosen": g.responses[0], "rejected": g.responses[1],
             "chosen_eos": g.eos[0], "rejected_eos": g.eos[1], "family": g.prompt.family}
            for g in groups if all(t.strip() for t in g.responses)
            and (g.responses[0], g.eos[0]) != (g.responses[1], g.eos[1])]


def run_rlaif(cfg, out: Path, *, judge: str = "world:ai", constitution: str | None = None,
              pairs: str | None = None, policy: str | None = None, n_prompts: int | None = None,
              split: str = "pref", seed: int = 0, overwrite: bool = False) -> dict:
    """Label, write ``pairs.jsonl`` and ``rlaif.json``; returns the readings."""
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.constitution import load_constitution
    from rlhflab.data import load_rows, write_jsonl
    from rlhflab.instruments.judges import load_judge, parse_judge
    from rlhflab.sampling import check_sample_budget

    check_out_dir(out, overwrite)
    cons = load_constitution(constitution)
    parse_judge(judge)
    n = n_prompts or cfg.rm.n_prompts
    if pairs is None:
        if n < 1:
            raise InputError(f"must be >= 1, got {n}", field="-n")
        check_sample_budget(2 * n, 1, cfg.generation.max_new_tokens, what=f"{n} prompts x 2 responses",
                            field="-n", hint="lower -n")
    with progress.labelled("rlaif"):
        rows = load_rows(pairs, "preference") if pairs else policy_pairs(cfg, policy, n, split, seed)
        if not rows:
            raise InputError("no pairs to label", file=pairs)
        j = load_judge(judge, trust_remote_code=cfg.model.trust_remote_code, constitution=cons, seed=seed)
        labelled, readings = label_pairs(rows, j, cons, seed)
    readings.update(world_instruments(labelled, cfg.world.rater))
    readings.update({"rlaif/judge": judge, "rlaif/constitution": cons.source,
                     "rlaif/principles": cons.ids})
    with run_directory(out, overwrite) as work:
        write_jsonl(work / "pairs.jsonl", labelled)
        write_json(work / "rlaif.json", readings)
    return readings


def run(args) -> int:
    cfg = config_from_args(args)
    r = run_rlaif(cfg, Path(args.out), judge=args.judge, constitution=args.constitution, pairs=args.pairs,
                  policy=args.policy, n_prompts=args.n_prompts, split=args.split, seed=args.seed,
                  overwrite=args.overwrite)
    keys = ("rlaif/pairs", "rlaif/unreadable", "judge/position_bias", "rlaif/agree_gold", "rlaif/agree_human",
            "rlaif/ece")
    print("  ".join(f"{k}={r[k]:.3f}" for k in keys if isinstance(r.get(k), float)))
    return 0
