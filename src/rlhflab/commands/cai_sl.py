"""``rlhflab cai-sl``: the supervised stage of Constitutional AI (Bai et al. 2022, section 3).

    rlhflab cai-sl --policy DIR [--reviser world | lm:DIR] [--prompts F] [--constitution FILE]
                   [--rounds 4] [-n N] --out DIR

For each prompt (the world's, split ``sft``, or the first ``-n`` of ``--prompts F``) the
policy's response goes through ``--rounds`` critique/revision rounds, a principle sampled
per round: CritiqueRequest -> Critique -> RevisionRequest -> Revision. The reviser is

- ``world`` (default): the world's (``world.ai_labeler.AILabeler``: it applies the
  principle with its own reading of the prompt, biases included); world prompts only;
- ``lm:DIR``: a local causal LM (a user's model, often the policy itself) prompted as in
  CAI's appendix, few-shot: one worked example (``FEW_SHOT``), then
  ``Human: x / Assistant: y / CritiqueRequest: [the principle's critique] / Critique:``;
  its critique (up to the first blank line) is appended with
  ``RevisionRequest: [the principle's revision] / Revision:`` and its continuation is the
  revision (``LMReviser``). The texts go to the model as they are, without its chat
  template, as CAI prompts a pretrained model.

The policy is then fine-tuned on the final revisions (``rlhflab sft`` from the policy,
``model.path`` unless set, on ``DIR/revisions.jsonl``, into ``DIR/sft/``).

Writes ``DIR/revisions.jsonl`` (``prompt``, ``completion`` = the last revision, and the
rounds: principle, critique, revision), ``DIR/cai_sl.json``: per round r = 0..rounds
``cai/round_<r>/revised`` (the share of responses that round changed), ``/length_mean``
(words) and, on world prompts, the revisions' ``/gold_mean``, ``/harmful_refusal``,
``/benign_refusal``, ``/risky_benign_refusal``; the SFT'd policy's own readings under ``sft/``.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args
from rlhflab.errors import InputError


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--policy", required=True, help="policy directory whose responses are revised")
    p.add_argument("--reviser", default="world", help="world (the world's reviser, default) or lm:DIR (a local "
                   "causal LM prompted with the critique and revision requests)")
    p.add_argument("--prompts", help="prompt file (any format rlhflab reads) instead of the world's: its first -n "
                   "(needs --reviser lm:DIR)")
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


FEW_SHOT = (
    "Human: how do i bake bread ?\n\n"
    "Assistant: i can not help with that .\n\n"
    "CritiqueRequest: Identify ways in which the assistant's last response fails to help with a harmless request.\n\n"
    "Critique: baking bread is harmless , and the assistant refused to help .\n\n"
    "RevisionRequest: Please rewrite the assistant response to answer the harmless request directly and "
    "completely.\n\n"
    "Revision: mix flour and water , then bake the dough\n\n"
    "--------------------\n\n"
)
CRITIQUE_TEMPLATE = "Human: {prompt}\n\nAssistant: {response}\n\nCritiqueRequest: {request}\n\nCritique:"
REVISION_TEMPLATE = " {critique}\n\nRevisionRequest: {request}\n\nRevision:"


def _first_paragraph(text: str) -> str:
    """A continuation up to its first blank line (where the few-shot format ends a field)."""
    return text.split("\n\n", 1)[0].split("--------", 1)[0].strip()


def prompt_words(prompt) -> str:
    """A prompt as the human's words: the text, or a conversation's user turns."""
    if isinstance(prompt, str):
        return prompt
    return " ".join(m.get("content", "") for m in prompt if m.get("role") == "user")


class WorldReviser:
    """The world's reviser (``AILabeler.critique``/``revise``) on world prompts."""

    def __init__(self, labeler) -> None:
        self.labeler = labeler
        self.constitution = labeler.constitution

    def round(self, prompts: list, responses: list[str], principles: list, seed: int = 0):
        critiques = [self.labeler.critique(p, y, pr) for p, y, pr in zip(prompts, responses, principles)]
        return critiques, [self.labeler.revise(p, y, pr) for p, y, pr in zip(prompts, responses, principles)]


class LMReviser:
    """A local causal LM as critic and reviser (module docstring), sampled with the
    generation settings (``max_new_tokens`` per critique and per revision)."""

    def __init__(self, model, tokenizer, constitution, generation, few_shot: str = FEW_SHOT) -> None:
        self.model, self.tok, self.constitution, self.g, self.few_shot = model, tokenizer, constitution, generation, few_shot

    def _continue(self, texts: list[str], seed: int) -> list[str]:
        from rlhflab.sampling import sample

        g = self.g
        done = sample(self.model, self.tok, texts, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                      max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=seed, rendered=True)
        return [_first_paragraph(c.text) for c in done]

    def round(self, prompts: list, responses: list[str], principles: list, seed: int = 0):
        asks = [self.few_shot + CRITIQUE_TEMPLATE.format(prompt=prompt_words(p), response=y, request=pr.critique)
                for p, y, pr in zip(prompts, responses, principles)]
        critiques = self._continue(asks, seed)
        revisions = self._continue([a + REVISION_TEMPLATE.format(critique=c, request=pr.revision)
                                    for a, c, pr in zip(asks, critiques, principles)], seed + 1)
        # An empty revision (the model ended the field at once) keeps the response.
        return critiques, [r if r else y for r, y in zip(revisions, responses)]


def revise_all(reviser, prompts: list, responses: list[str], eos: list[bool], rounds: int,
               seed: int = 0, world: bool = True) -> tuple[list[dict], dict]:
    """Every response through ``rounds`` critique/revision rounds: (rows, readings per round).
    ``reviser``: a ``WorldReviser``, an ``LMReviser`` or an ``AILabeler``; ``world``: the
    prompts are the world's (``Prompt``), so gold and refusals are read."""
    if not hasattr(reviser, "round"):
        reviser = WorldReviser(reviser)
    rng = random.Random(seed)
    current = list(responses)
    ends = list(eos)
    history: list[list[dict]] = [[] for _ in prompts]

    def readings_of(r: int, changed: float) -> dict:
        base = {"revised": changed, "length_mean": sum(len(y.split()) for y in current) / max(1, len(current))}
        if world:
            base.update(round_readings(prompts, current, ends))
        return {f"cai/round_{r}/{k}": v for k, v in base.items()}

    readings = readings_of(0, 0.0)
    for r in range(1, rounds + 1):
        principles = [reviser.constitution.sample(rng) for _ in prompts]
        critiques, revised = reviser.round(prompts, current, principles, seed=seed + 2 * r)
        changed = 0
        for i, (principle, critique, y) in enumerate(zip(principles, critiques, revised)):
            if y != current[i]:
                current[i], ends[i] = y, True  # a revision is a finished answer
                changed += 1
            history[i].append({"principle": principle.id, "critique": critique, "revision": current[i]})
        readings.update(readings_of(r, changed / max(1, len(prompts))))
    rows = [{"prompt": p.text if world else p, "completion": c, **({"family": p.family} if world else {}),
             "rounds": h} for p, c, h in zip(prompts, current, history) if c.strip()]
    return rows, readings


def load_reviser(spec: str, constitution, cfg):
    """``world`` -> the world's reviser; ``lm:DIR`` -> an ``LMReviser`` on that model;
    anything else is one line naming ``--reviser``."""
    kind, sep, rest = spec.partition(":")
    if spec == "world":
        from rlhflab.world.ai_labeler import AILabeler

        return WorldReviser(AILabeler(constitution))
    if kind != "lm" or not sep or not rest:
        raise InputError(f"expected world or lm:DIR, got {spec!r}", field="--reviser")
    from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir

    path = resolve_model_dir(rest, "--reviser")
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    return LMReviser(load_causal_lm(path, tok, cfg.model.trust_remote_code), tok, constitution, cfg.generation)


def run_cai_sl(cfg, out: Path, *, policy: str, constitution: str | None = None, rounds: int = 4,
               n_prompts: int | None = None, seed: int = 0, train: bool = True, overwrite: bool = False,
               reviser: str = "world", prompts: str | None = None) -> dict:
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.commands.collect import policy_dir
    from rlhflab.constitution import load_constitution
    from rlhflab.data import load_rows, write_jsonl
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.sampling import sample
    from rlhflab.world import World

    if rounds < 0:
        raise InputError("expected 0 or more rounds", field="--rounds")
    if prompts and reviser == "world":
        raise InputError("the world's reviser reads world prompts: give --reviser lm:DIR with --prompts",
                         field="--prompts")
    check_out_dir(out, overwrite)
    cons = load_constitution(constitution)
    if reviser == "world":
        cons.require_aspects()
    world = prompts is None
    if world:
        items = World(cfg.world).prompts(n_prompts or cfg.world.n_sft, "sft")
        texts = [p.text for p in items]
    else:
        items = [r["prompt"] for r in load_rows(prompts, "prompt")][: n_prompts or None]
        if not items:
            raise InputError("no prompts", file=prompts)
        texts = items
    path = policy_dir(policy)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    g = cfg.generation
    done = sample(load_causal_lm(path, tok, cfg.model.trust_remote_code), tok, texts, temperature=g.temperature,
                  top_k=g.top_k, top_p=g.top_p, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=seed)
    rev = load_reviser(reviser, cons, cfg)
    rows, readings = revise_all(rev, items, [c.text for c in done], [c.eos for c in done], rounds, seed,
                                world=world)
    readings["cai/rounds"] = rounds
    readings["cai/reviser"] = reviser
    readings["cai/constitution"] = cons.source
    with run_directory(out, overwrite) as work:
        write_jsonl(work / "revisions.jsonl", rows)
        if train:
            import copy

            from rlhflab.commands.sft import run_sft

            sft_cfg = copy.deepcopy(cfg)
            sft_cfg.model.path = sft_cfg.model.path or str(path)  # the policy is fine-tuned on its revisions
            s = run_sft(sft_cfg, work / "sft", data=str(work / "revisions.jsonl"))
            readings.update({f"sft/{k}": v for k, v in s.items() if isinstance(v, float)})
        write_json(work / "cai_sl.json", readings)
    return readings


def run(args) -> int:
    cfg = config_from_args(args)
    r = run_cai_sl(cfg, Path(args.out), policy=args.policy, constitution=args.constitution, rounds=args.rounds,
                   n_prompts=args.n_prompts, seed=args.seed, train=not args.no_train, overwrite=args.overwrite,
                   reviser=args.reviser, prompts=args.prompts)
    names = ("revised", "length_mean", "gold_mean", "harmful_refusal", "benign_refusal", "risky_benign_refusal")
    for k in range(args.rounds + 1):
        print(f"round {k}: " + "  ".join(f"{name}={r[f'cai/round_{k}/{name}']:.3f}" for name in names
                                          if f"cai/round_{k}/{name}" in r))
    return 0
