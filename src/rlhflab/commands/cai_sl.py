"""``rlhflab cai-sl``: the supervised stage of Constitutional AI (Bai et al. 2022, section 3).

    rlhflab cai-sl --policy DIR [--constitution FILE] [--rounds 4] [-n N] --out DIR

For each world prompt (split ``sft``) the policy's response goes through ``--rounds``
critique/revision rounds, a principle sampled per round: CritiqueRequest -> Critique ->
RevisionRequest -> Revision. The reviser is the world's (``world.ai_labeler.AILabeler``:
it applies the principle with its own reading of the prompt, biases included). The policy
is then fine-tuned on the final revisions (``rlhflab sft`` on ``DIR/revisions.jsonl``,
into ``DIR/sft/``).

Writes ``DIR/revisions.jsonl`` (``prompt``, ``completion`` = the last revision, and the
rounds: principle, critique, revision), ``DIR/cai_sl.json``: per round r = 0..rounds the
revisions' ``cai/round_<r>/gold_mean``, ``/harmful_refusal``, ``/benign_refusal``,
``/risky_benign_refusal``, and the SFT'd policy's own readings under ``sft/``.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--policy", required=True, help="policy directory whose responses are revised")
    p.add_argument("--constitution", help="constitution YAML (default: configs/constitution.yaml)")
    p.add_argument("--rounds", type=int, default=4, help="critique/revision rounds per response (default 4)")
    p.add_argument("-n", "--n-prompts", type=int, help="world prompts (default: world.n_sft)")
    p.add_argument("--seed", type=int, default=0, help="principle and sampling seed")
    p.add_argument("--no-train", action="store_true", help="revise and measure only; no SFT")


def round_readings(prompts: list, responses: list[str], eos: list[bool]) -> dict[str, float]:
    """Gold mean and refusal rates of responses to world prompts."""
    from rlhflab.world.gold import gold_utility, refuses
    from rlhflab.world.tasks import RISKY_SOUNDING

    def rate(idx):
        return sum(refuses(responses[i]) for i in idx) / len(idx) if idx else float("nan")

    fam = [p.family for p in prompts]
    return {"gold_mean": sum(gold_utility(p, r, e) for p, r, e in zip(prompts, responses, eos)) / len(prompts),
            "harmful_refusal": rate([i for i, f in enumerate(fam) if f == "harmful"]),
            "benign_refusal": rate([i for i, f in enumerate(fam) if f == "benign"]),
            "risky_benign_refusal": rate([i for i, p in enumerate(prompts)
                                          if p.family == "benign" and p.topic in RISKY_SOUNDING])}


def revise_all(labeler, prompts: list, responses: list[str], eos: list[bool], rounds: int,
               seed: int = 0) -> tuple[list[dict], dict]:
    """Every response through ``rounds`` critique/revision rounds: (rows, readings per round)."""
    rng = random.Random(seed)
    current = list(responses)
    ends = list(eos)
    history: list[list[dict]] = [[] for _ in prompts]
    readings = {f"cai/round_0/{k}": v for k, v in round_readings(prompts, current, ends).items()}
    for r in range(1, rounds + 1):
        for i, p in enumerate(prompts):
            principle = labeler.constitution.sample(rng)
            critique = labeler.critique(p, current[i], principle)
            revised = labeler.revise(p, current[i], principle)
            if revised != current[i]:
                current[i], ends[i] = revised, True  # a revision is a finished answer
            history[i].append({"principle": principle.id, "critique": critique, "revision": current[i]})
        readings.update({f"cai/round_{r}/{k}": v for k, v in round_readings(prompts, current, ends).items()})
    rows = [{"prompt": p.text, "completion": c, "family": p.family, "rounds": h}
            for p, c, h in zip(prompts, current, history) if c.strip()]
    return rows, readings


def run_cai_sl(cfg, out: Path, *, policy: str, constitution: str | None = None, rounds: int = 4,
               n_prompts: int | None = None, seed: int = 0, train: bool = True, overwrite: bool = False) -> dict:
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.commands.collect import policy_dir
    from rlhflab.constitution import load_constitution
    from rlhflab.data import write_jsonl
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.sampling import sample
    from rlhflab.world import World
    from rlhflab.world.ai_labeler import AILabeler

    if rounds < 0:
        raise InputError("expected 0 or more rounds", field="--rounds")
    check_out_dir(out, overwrite)
    labeler = AILabeler(load_constitution(constitution))
    world = World(cfg.world)
    prompts = world.prompts(n_prompts or cfg.world.n_sft, "sft")
    path = policy_dir(policy)
    tok = load_tokenizer(path)
    g = cfg.generation
    done = sample(load_causal_lm(path, tok), tok, [p.text for p in prompts], temperature=g.temperature,
                  top_k=g.top_k, top_p=g.top_p, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=seed)
    rows, readings = revise_all(labeler, prompts, [c.text for c in done], [c.eos for c in done], rounds, seed)
    readings["cai/rounds"] = rounds
    readings["cai/constitution"] = labeler.constitution.source
    with run_directory(out, overwrite) as work:
        write_jsonl(work / "revisions.jsonl", rows)
        if train:
            import copy

            from rlhflab.commands.sft import run_sft

            s = run_sft(copy.deepcopy(cfg), work / "sft", data=str(work / "revisions.jsonl"))
            readings.update({f"sft/{k}": v for k, v in s.items() if isinstance(v, float)})
        write_json(work / "cai_sl.json", readings)
    return readings


def run(args) -> int:
    cfg = config_from_args(args)
    r = run_cai_sl(cfg, Path(args.out), policy=args.policy, constitution=args.constitution, rounds=args.rounds,
                   n_prompts=args.n_prompts, seed=args.seed, train=not args.no_train, overwrite=args.overwrite)
    for k in range(args.rounds + 1):
        print(f"round {k}: " + "  ".join(f"{name}={r[f'cai/round_{k}/{name}']:.3f}" for name in
                                          ("gold_mean", "harmful_refusal", "benign_refusal", "risky_benign_refusal")))
    return 0
