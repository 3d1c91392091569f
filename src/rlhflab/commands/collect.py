"""``rlhflab collect``: comparisons the InstructGPT way.

K responses per prompt are sampled from a policy (the SFT policy by default), the world's
rater panel ranks them (one ranking per vote, each a Plackett-Luce draw of the raters'
utility), and every pair of distinct responses becomes a preference row:

| field                 | what                                                             |
|-----------------------|------------------------------------------------------------------|
| prompt, chosen, rejected | the pair, chosen = the side most raters ranked higher         |
| votes                 | one 0/1 per rater: 1 = that rater ranked ``chosen`` above ``rejected`` |
| chosen_eos, rejected_eos | false when that response was cut at max_new_tokens without EOS (the raters and the reward model both see it as truncated) |
| group                 | index of the prompt's group (rows of a group share one prompt)   |
| responses, responses_eos | the group's distinct responses                                |
| rankings              | each rater's ranking, indices into ``responses``, best first (for Plackett-Luce) |
| ranking               | the consensus (Borda count; ties broken by index), best first    |
| family                | the world family of the prompt                                   |

Duplicates, empty responses and ties: identical responses (same text and EOS flag) are
merged before the raters see them; empty responses (an immediate EOS) are left out, since
the preference format has no empty fields; a prompt left with fewer than two distinct
responses gives no rows.
With an even number of votes a pair can split evenly; such a pair gives no row (it stays
in ``rankings``). Pairwise majorities and the Borda ranking can disagree (a Condorcet
cycle); rows follow the pairwise majority.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args


def add_arguments(p) -> None:
    add_config_arguments(p, out=False)
    p.add_argument("--policy", required=True, help="policy directory (a run's model/ or the run dir)")
    p.add_argument("--k", type=int, help="responses per prompt (default: rm.k)")
    p.add_argument("-n", "--n-prompts", type=int, help="prompts (default: rm.n_prompts)")
    p.add_argument("--split", default="pref", help="world prompt split to draw from (default: pref)")
    p.add_argument("--seed", type=int, default=0, help="sampling and rater seed")
    p.add_argument("--out", required=True, help="preference JSONL to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


@dataclass
class SampledGroup:
    """K sampled responses to one world prompt."""

    prompt: object  # world Prompt
    responses: list[str]
    eos: list[bool]


def sample_groups(policy, tokenizer, prompts: list, k: int, gen, seed: int = 0) -> list[SampledGroup]:
    """K samples per prompt (world ``Prompt`` objects) at the generation settings ``gen``."""
    from rlhflab.sampling import sample

    texts = [p.text for p in prompts for _ in range(k)]
    done = sample(policy, tokenizer, texts, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                  max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, seed=seed)
    return [SampledGroup(p, [c.text for c in done[i * k:(i + 1) * k]], [c.eos for c in done[i * k:(i + 1) * k]])
            for i, p in enumerate(prompts)]


def borda(rankings: list[list[int]], n: int) -> list[int]:
    """Consensus ranking by Borda count (n - 1 - position summed over rankings), best first;
    ties go to the lower index."""
    points = [0] * n
    for r in rankings:
        for pos, i in enumerate(r):
            points[i] += n - 1 - pos
    return sorted(range(n), key=lambda i: (-points[i], i))


def rate_groups(groups: list[SampledGroup], panel) -> tuple[list[dict], dict]:
    """Rank each group with the panel; all pairs of distinct responses as rows (module doc)."""
    rows: list[dict] = []
    counts = {"collect/prompts": len(groups), "collect/responses": 0, "collect/duplicates": 0,
              "collect/empty": 0, "collect/groups_dropped": 0, "collect/ties": 0, "collect/no_eos": 0}
    for g_index, g in enumerate(groups):
        seen: dict[tuple[str, bool], int] = {}
        for text, eos in zip(g.responses, g.eos):
            if text.strip():
                seen.setdefault((text, bool(eos)), len(seen))
        n_empty = sum(not t.strip() for t in g.responses)
        counts["collect/responses"] += len(g.responses)
        counts["collect/empty"] += n_empty
        counts["collect/duplicates"] += len(g.responses) - n_empty - len(seen)
        if len(seen) < 2:
            counts["collect/groups_dropped"] += 1
            continue
        responses = [t for t, _ in seen]
        eos = [e for _, e in seen]
        counts["collect/no_eos"] += sum(not e for e in eos)
        rankings = panel.rank(g.prompt, responses, eos)
        position = [{i: pos for pos, i in enumerate(r)} for r in rankings]
        shared = {"group": g_index, "family": g.prompt.family, "responses": responses, "responses_eos": eos,
                  "rankings": rankings, "ranking": borda(rankings, len(responses))}
        for i, j in combinations(range(len(responses)), 2):
            votes = [int(pos[i] < pos[j]) for pos in position]  # 1 = i above j
            if 2 * sum(votes) == len(votes):
                counts["collect/ties"] += 1
                continue
            if 2 * sum(votes) < len(votes):
                i, j, votes = j, i, [1 - v for v in votes]
            rows.append({"prompt": g.prompt.text, "chosen": responses[i], "rejected": responses[j],
                         "votes": votes, "chosen_eos": eos[i], "rejected_eos": eos[j], **shared})
    counts["collect/pairs"] = len(rows)
    return rows, counts


def collect(policy, tokenizer, world, prompts: list, k: int, gen, panel, seed: int = 0) -> tuple[list[dict], dict]:
    """Sample K responses per prompt and have the panel rank them: (rows, counts)."""
    return rate_groups(sample_groups(policy, tokenizer, prompts, k, gen, seed), panel)


def rater_panel(world, split: str, seed: int = 0):
    """The world's raters for a split (a seeded stream of their own)."""
    from rlhflab.world.labeler import RaterPanel

    return RaterPanel(world.cfg.rater, seed=world.rng(f"raters/collect/{split}/{seed}").getrandbits(64))


def policy_dir(path: str | Path) -> Path:
    path = Path(path)
    return path / "model" if (path / "model" / "config.json").is_file() else path


def run(args) -> int:
    from rlhflab.artifacts import check_out_file, writer_lock
    from rlhflab.errors import InputError

    cfg = config_from_args(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError("exists; pass --overwrite to replace it", file=str(out))
    check_out_file(out)  # under a regular file, or not writable: before the policy is loaded
    with writer_lock(out):  # one writer at a time (artifacts: .<name>.lock beside the file)
        return _collect(args, cfg, out)


def _collect(args, cfg, out: Path) -> int:
    from rlhflab.data import write_jsonl
    from rlhflab.errors import InputError, disk_full_error, is_disk_full
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.progress import labelled
    from rlhflab.sampling import check_sample_budget
    from rlhflab.world import World

    k = args.k or cfg.rm.k
    n = args.n_prompts or cfg.rm.n_prompts
    if k < 2 or n < 1:
        raise InputError("--k must be at least 2 and -n at least 1")
    check_sample_budget(n * k, 1, cfg.generation.max_new_tokens, what=f"{n} prompts x {k} responses",
                        field="-n" if n >= k else "--k", hint="lower -n or --k")
    path = policy_dir(args.policy)
    tok = load_tokenizer(path)
    policy = load_causal_lm(path, tok)
    world = World(cfg.world)
    prompts = world.prompts(n, args.split)
    with labelled("collect"):
        rows, counts = collect(policy, tok, world, prompts, k, cfg.generation,
                               rater_panel(world, args.split, args.seed), seed=args.seed)
    if not rows:
        raise InputError("no comparisons: every prompt's samples were identical", file=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_jsonl(out, rows)
    except Exception as err:
        if is_disk_full(err):
            raise disk_full_error(err, out, earlier=out.exists()) from None
        raise
    print("  ".join(f"{key.split('/')[1]}={v}" for key, v in counts.items()) + f"  -> {out}")
    return 0
