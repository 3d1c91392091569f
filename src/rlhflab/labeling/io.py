"""Tasks in, preference pairs out, and the admin's readings.

Tasks come from any preference file the project reads (``rlhflab.data.load_rows``: JSONL,
JSON, Parquet, Arrow, a ``datasets`` directory, TRL's row shapes): a row's ``responses``
(2..10, as ``rlhflab collect`` writes them) or else its ``chosen`` and ``rejected``. A gold
file's rows are tasks with a known answer: ``chosen`` better than ``rejected``, or a
``responses`` row's first ranking.

The export (``export_rows``) writes every pair (i, j) of every answered task that is not gold,
in TRL's preference format: ``prompt``, ``chosen``, ``rejected``, ``votes`` (one 0/1 per
labeler who preferred one of the two: 1 for ``chosen``), ``source: human``, ``group`` (the
task: a ranking's pairs stay together for a Plackett-Luce reward model), ``ties`` and
``both_bad`` (how many labelers answered so). A tie or "both bad" is no preference between
the two and casts no vote; a pair whose votes split evenly (none at all included) has no
chosen side and is left out, counted in ``pairs_without_majority``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from statistics import fmean
from typing import Any

from rlhflab.errors import InputError
from rlhflab.labeling.agreement import (
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha_nominal,
    majority_agreement,
    mean_interval,
    pairwise_agreement,
    rank_position_bias,
)

MAX_RESPONSES = 10


def read_json_list(path: str | Path, what: str) -> list:
    """The list a JSON export file holds (Argilla's records, Label Studio's tasks), or an
    InputError naming the file: ``what`` says what it should be."""
    import json

    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"cannot read {what}: {err}", file=str(path)) from None
    if not isinstance(rows, list):
        raise InputError(f"expected {what}: a list", file=str(path))
    return rows


def load_tasks(path: str | Path, *, overlap: int, gold: bool = False) -> list[dict]:
    """Tasks (prompt, responses, overlap, meta, gold) from a preference file."""
    from rlhflab.data import load_rows

    if overlap < 1:
        raise InputError(f"--overlap: expected an integer >= 1, got {overlap}")
    tasks = []
    for n, row in enumerate(load_rows(path, "preference"), start=1):
        if "responses" in row:
            responses = list(row["responses"])
            answer = {"ranking": list(row["rankings"][0])} if len(row["rankings"][0]) == len(responses) else None
        else:
            responses, answer = [row["chosen"], row["rejected"]], {"ranking": [0, 1]}
        if len(responses) > MAX_RESPONSES:
            raise InputError(f"expected at most {MAX_RESPONSES} responses, got {len(responses)}",
                             file=str(path), line=n, field="responses")
        if gold and answer is None:
            raise InputError("a gold task needs a full ranking of its responses", file=str(path), line=n,
                             field="rankings")
        meta = {k: v for k, v in row.items() if k in ("family", "group", "source", "id") and isinstance(v, (str, int))}
        tasks.append({"prompt": row["prompt"], "responses": responses, "overlap": overlap,
                      "meta": {**meta, "file": str(path), "line": n}, "gold": answer if gold else None})
    return tasks


def sample_tasks(policy: str | Path, prompts_path: str | Path, *, k: int, overlap: int, gen, seed: int = 0,
                 policy_b: str | Path | None = None) -> tuple[list[dict], int]:
    """Tasks of ``k`` responses sampled from the policy at ``policy`` (a model directory or a
    run's) for every prompt of ``prompts_path`` (prompt format), at the generation settings
    ``gen`` (``rlhflab.sampling``); with ``policy_b``, k/2 from each of the two policies (k
    even), so that people compare them. Responses repeated within a prompt are kept once
    (``both`` policies when each wrote it) and a prompt left with fewer than two is dropped;
    the task's meta names each response's policy (``a``/``b``) and whether it ended. Returns
    (tasks, prompts dropped)."""
    from rlhflab.data import load_rows
    from rlhflab.sampling import check_sample_budget

    if not 2 <= k <= MAX_RESPONSES:
        raise InputError(f"--k: expected 2..{MAX_RESPONSES} responses per prompt, got {k}")
    if policy_b is not None and k % 2:
        raise InputError(f"--k: with --policy-b half the responses come from each policy: expected an even --k, "
                         f"got {k}")
    if overlap < 1:
        raise InputError(f"--overlap: expected an integer >= 1, got {overlap}")
    rows = load_rows(prompts_path, "prompt")
    check_sample_budget(len(rows) * k, 1, gen.max_new_tokens, what=f"{len(rows)} prompts x {k} responses",
                        field="--k", hint="fewer prompts or a lower --k")
    per = k if policy_b is None else k // 2
    sampled = {"a": _sample(policy, [r["prompt"] for r in rows], per, gen, seed)}
    if policy_b is not None:
        sampled["b"] = _sample(policy_b, [r["prompt"] for r in rows], per, gen, seed)
    tasks, dropped = [], 0
    for i, row in enumerate(rows):
        seen: dict[tuple[str, bool], str] = {}
        for name, done in sampled.items():
            for c in done[i * per:(i + 1) * per]:
                if c.text.strip():
                    key = (c.text, bool(c.eos))
                    seen[key] = name if seen.get(key, name) == name else "both"
        if len(seen) < 2:
            dropped += 1
            continue
        meta = {"policy": str(policy), "eos": [e for _, e in seen], "line": i + 1,
                **({"family": row["family"]} if isinstance(row.get("family"), str) else {})}
        if policy_b is not None:
            meta.update(policy_b=str(policy_b), policies=list(seen.values()))
        tasks.append({"prompt": row["prompt"], "responses": [t for t, _ in seen], "overlap": overlap, "gold": None,
                      "meta": meta})
    return tasks, dropped


def _sample(policy: str | Path, prompts: list, per: int, gen, seed: int) -> list:
    """``per`` samples of every prompt from the policy at ``policy``, prompt by prompt."""
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.sampling import sample

    path = Path(policy)
    path = path / "model" if (path / "model" / "config.json").is_file() else path
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer)
    return sample(model, tokenizer, [p for p in prompts for _ in range(per)], temperature=gen.temperature,
                  top_k=gen.top_k, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size,
                  seed=seed)


def pair_labels(answer: dict | None) -> dict[tuple[int, int], Any]:
    """An answer as one label per pair (i, j), i < j: the index of the better response,
    ``tie`` or ``both_bad``."""
    if not answer:
        return {}
    if answer.get("tie"):
        return {(0, 1): "tie"}
    if answer.get("both_bad"):
        return {(0, 1): "both_bad"}
    place = {idx: p for p, idx in enumerate(answer["ranking"])}
    return {(i, j): (i if place[i] < place[j] else j) for i, j in combinations(sorted(place), 2)}


def _answered(store) -> list[tuple]:
    return [(v, t, u) for v, t, u in store.votes() if v.status == "submitted"]


def export_rows(store, task_ids: set[int] | None = None) -> tuple[list[dict], dict]:
    """TRL preference rows from the votes (module docstring), and counts; of the tasks
    ``task_ids`` only, where given."""
    labels: dict[int, dict[tuple[int, int], list]] = defaultdict(lambda: defaultdict(list))
    tasks = {}
    for vote, task, _ in _answered(store):
        if task.gold is not None or (task_ids is not None and task.id not in task_ids):
            continue
        tasks[task.id] = task
        for pair, label in pair_labels(vote.answer).items():
            labels[task.id][pair].append(label)
    rows, counts = [], Counter()
    for task_id in sorted(labels):
        task = tasks[task_id]
        for (i, j), got in sorted(labels[task_id].items()):
            wins = Counter(got)
            counts["pairs"] += 1
            if wins[i] == wins[j]:
                counts["pairs_without_majority"] += 1
                continue
            chosen, rejected = (i, j) if wins[i] > wins[j] else (j, i)
            row = {"prompt": task.prompt, "chosen": task.responses[chosen], "rejected": task.responses[rejected],
                   "votes": [1] * wins[chosen] + [0] * wins[rejected], "source": "human",
                   "group": f"task{task_id}", "ties": wins["tie"], "both_bad": wins["both_bad"]}
            eos = (task.meta or {}).get("eos")
            if isinstance(eos, list) and len(eos) == len(task.responses):  # sampled: whether each ended
                row["chosen_eos"], row["rejected_eos"] = bool(eos[chosen]), bool(eos[rejected])
            policies = (task.meta or {}).get("policies")
            if isinstance(policies, list) and len(policies) == len(task.responses):  # --policy-b: whose each is
                row["chosen_policy"], row["rejected_policy"] = policies[chosen], policies[rejected]
            rows.append(row)
    counts["rows"] = len(rows)
    return rows, dict(counts)


def readings(store, low: float = 0.6, min_shared: int = 5) -> dict:
    """What the admin's page shows: throughput, agreement (pairwise with its 95% interval,
    with the majority, Fleiss' kappa, Krippendorff's alpha, the mean Cohen's kappa of the
    labeler pairs who share at least ``min_shared`` pairs), per labeler (answers, pairs per
    labeler-hour, gold accuracy, position bias, agreement with the others' majority), the
    tasks whose majority agreement is below ``low``, and the rater-agreement analysis
    ``rlhflab eval-rm`` gives on the export."""
    from rlhflab.instruments.agreement import rater_agreement

    all_votes = store.votes()
    answered = [(v, t, u) for v, t, u in all_votes if v.status == "submitted"]
    items: dict[tuple, dict[str, Any]] = defaultdict(dict)  # (task, i, j) -> {labeler: label}
    per: dict[str, dict] = defaultdict(lambda: {"answers": 0, "skipped": 0, "pairs": 0, "seconds": 0.0,
                                                "gold": [], "first": []})
    for vote, _task, user in all_votes:
        if vote.status == "skipped":
            per[user.name]["skipped"] += 1
    for vote, task, user in answered:
        p = per[user.name]
        labels = pair_labels(vote.answer)
        p["answers"] += 1
        p["pairs"] += len(labels)
        p["seconds"] += vote.seconds or 0.0
        if task.gold is not None:
            truth = pair_labels(task.gold)
            p["gold"] += [labels.get(pair) == label for pair, label in truth.items()]
        else:
            for (i, j), label in labels.items():
                items[(task.id, i, j)][user.name] = label
        if "ranking" in vote.answer:  # the rank given to the response shown first
            p["first"].append((vote.answer["ranking"].index(vote.shown[0]), len(task.responses)))
    units = [list(v.values()) for v in items.values()]
    shared = [u for u in units if len(u) >= 2]
    unit_agreement = [pairwise_agreement([u]) for u in shared]
    mean, half = mean_interval(unit_agreement)
    names = sorted(per)
    kappas = []
    for a, b in combinations(names, 2):
        both = [(v[a], v[b]) for v in items.values() if a in v and b in v]
        if len(both) >= min_shared:
            kappas.append(cohen_kappa([x for x, _ in both], [y for _, y in both]))
    kappas = [k for k in kappas if k == k]
    labelers = []
    for name in names:
        p = per[name]
        others = []  # agreement with the majority of the other labelers, where they have one
        for v in items.values():
            if name in v:
                rest = Counter(label for who, label in v.items() if who != name).most_common(2)
                if rest and (len(rest) == 1 or rest[0][1] > rest[1][1]):
                    others.append(v[name] == rest[0][0])
        hours = p["seconds"] / 3600
        labelers.append({"name": name, "answers": p["answers"], "skipped": p["skipped"], "pairs": p["pairs"],
                         "pairs_per_hour": p["pairs"] / hours if hours > 0 else float("nan"),
                         "gold_items": len(p["gold"]), "gold_accuracy": fmean(p["gold"]) if p["gold"] else float("nan"),
                         "position_bias": rank_position_bias(p["first"]), "position_answers": len(p["first"]),
                         "agrees_with_others": fmean(others) if others else float("nan")})
    by_task: dict[int, list[float]] = defaultdict(list)
    for (task_id, _, _), v in items.items():
        if len(v) >= 2:
            by_task[task_id].append(majority_agreement([list(v.values())]))
    low_tasks = sorted(((t, fmean(a)) for t, a in by_task.items() if fmean(a) < low), key=lambda x: x[1])
    total_hours = sum(p["seconds"] for p in per.values()) / 3600
    rows, _ = export_rows(store)
    return {
        "answers": len(answered), "labelers": len(names), "tasks": len(store.tasks()),
        "pairs_per_labeler_hour": sum(p["pairs"] for p in per.values()) / total_hours if total_hours > 0 else float("nan"),
        "agreement": {"units": len(shared), "pairwise": mean, "pairwise_interval": half,
                      "majority": majority_agreement(shared), "fleiss_kappa": fleiss_kappa(shared),
                      "krippendorff_alpha": krippendorff_alpha_nominal(shared),
                      "cohen_kappa_mean": fmean(kappas) if kappas else float("nan"), "cohen_pairs": len(kappas)},
        "labelers_table": labelers,
        "low_agreement_tasks": [{"task": t, "majority_agreement": a} for t, a in low_tasks],
        "low": low,
        "export": rater_agreement(rows, low=low),
    }


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "-" if x != x else f"{x:.3f}"
    return str(x)


def readings_html(r: dict) -> str:
    """The readings as HTML tables (every value escaped)."""
    from html import escape

    def table(head: list[str], rows: list[list[Any]]) -> str:
        return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
                + "</table>")

    a = r["agreement"]
    out = ["<h1>Labeling</h1>",
           table(["tasks", "answers", "labelers", "pairs per labeler-hour"],
                 [[r["tasks"], r["answers"], r["labelers"], r["pairs_per_labeler_hour"]]]),
           "<h2>Agreement</h2>",
           table(["units (pairs with 2+ answers)", "pairwise", "95% interval +-", "with the majority",
                  "Fleiss' kappa", "Krippendorff's alpha", "Cohen's kappa (mean)", "labeler pairs"],
                 [[a["units"], a["pairwise"], a["pairwise_interval"], a["majority"], a["fleiss_kappa"],
                   a["krippendorff_alpha"], a["cohen_kappa_mean"], a["cohen_pairs"]]]),
           "<h2>Labelers</h2>",
           table(["name", "answers", "skipped", "pairs", "pairs/hour", "gold items", "gold accuracy",
                  "position bias", "agrees with the others' majority"],
                 [[x["name"], x["answers"], x["skipped"], x["pairs"], x["pairs_per_hour"], x["gold_items"],
                   x["gold_accuracy"], x["position_bias"], x["agrees_with_others"]] for x in r["labelers_table"]]),
           f"<h2>Tasks below {escape(_fmt(r['low']))} agreement with the majority</h2>",
           table(["task", "majority agreement"], [[t["task"], t["majority_agreement"]] for t in r["low_agreement_tasks"]]),
           "<h2>The export's rater agreement (as rlhflab eval-rm reports it)</h2>",
           table(["reading", "value"], [[k, v] for k, v in r["export"].items()])]
    return "".join(out)
