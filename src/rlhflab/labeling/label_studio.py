"""Label Studio's JSON, both ways, for pairwise comparisons.

Label Studio's project for a pair is the Pairwise control over two texts (its
"Pairwise Classification" template, with the prompt shown above):

    <View>
      <Text name="prompt" value="$prompt"/>
      <Pairwise name="pw" toName="text1,text2"/>
      <Text name="text1" value="$text1"/>
      <Text name="text2" value="$text2"/>
    </View>

A task is ``{"id", "data": {"prompt", "text1", "text2"}, "annotations": [...]}``; an
annotation's ``result`` holds ``{"from_name": "pw", "to_name": "text1,text2"... "type":
"pairwise", "value": {"selected": "left" | "right"}}`` (left is ``text1``), with
``completed_by`` (the annotator's id), ``lead_time`` (seconds) and ``was_cancelled``.
The Pairwise control has no tie, no "both bad" and no ranking of more than two
(Label Studio's ranking tag is left aside): ``to_label_studio`` leaves those answers and
tasks out and counts them; ``from_label_studio`` reads the prompt and the two texts of
every task and every annotation with a selection (a cancelled one, or one without a
pairwise result, is no vote), each annotator a labeler ``ls-<id>`` (the order shown:
``text1`` on the left).
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.errors import InputError
from rlhflab.labeling.io import read_json_list

FROM_NAME = "pw"
SIDES = ("left", "right")


def to_label_studio(store) -> tuple[list[dict], dict]:
    """Every pair task that is not gold, with each labeler's answer as an annotation;
    (tasks, counts of what was left out)."""
    tasks = {t.id: {"id": t.id, "data": {"prompt": _text(t.prompt), "text1": _text(t.responses[0]),
                                         "text2": _text(t.responses[1])}, "annotations": []}
             for t in store.tasks() if t.gold is None and len(t.responses) == 2}
    counts = {"tasks": len(tasks), "rankings_left_out": sum(1 for t in store.tasks() if len(t.responses) > 2),
              "ties_or_both_bad_left_out": 0}
    for vote, task, user in store.votes():
        if task.id not in tasks or vote.status != "submitted":
            continue
        if "ranking" not in vote.answer:
            counts["ties_or_both_bad_left_out"] += 1
            continue
        selected = SIDES[vote.answer["ranking"][0]]
        tasks[task.id]["annotations"].append({
            "completed_by": user.id, "lead_time": vote.seconds, "was_cancelled": False,
            "result": [{"from_name": FROM_NAME, "to_name": "text1,text2", "type": "pairwise",
                        "value": {"selected": selected}}]})
    counts["annotations"] = sum(len(t["annotations"]) for t in tasks.values())
    return list(tasks.values()), counts


def from_label_studio(path: str | Path, *, overlap: int) -> list[tuple[dict, list[dict]]]:
    """(task, votes) per task of a Label Studio JSON export: the task as ``Store.add_tasks``
    takes it, each vote ``{"labeler": "ls-<completed_by>", "answer": {"ranking": ...},
    "seconds": lead_time}``. Bad input is an InputError naming the task."""
    tasks = read_json_list(path, "a Label Studio JSON export of tasks")
    out = []
    for n, task in enumerate(tasks, start=1):
        where = {"file": str(path), "line": n}
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("prompt", "text1", "text2")):
            raise InputError("expected data.prompt, data.text1 and data.text2 as text (task number shown as line)",
                             field="data", **where)
        votes = []
        for a in task.get("annotations") or []:
            if not isinstance(a, dict) or a.get("was_cancelled"):
                continue
            picks = [r.get("value", {}).get("selected") for r in a.get("result") or []
                     if isinstance(r, dict) and r.get("type") == "pairwise"]
            if not picks:
                continue
            if len(picks) != 1 or picks[0] not in SIDES:
                raise InputError(f"expected one pairwise selection, left or right, got {picks}", field="annotations",
                                 **where)
            who = a.get("completed_by")
            who = who.get("id", who.get("email")) if isinstance(who, dict) else who
            seconds = a.get("lead_time")
            votes.append({"labeler": f"ls-{who}", "answer": {"ranking": [0, 1] if picks[0] == "left" else [1, 0]},
                          "seconds": float(seconds) if isinstance(seconds, (int, float)) else None})
        meta = {"label_studio_id": task["id"]} if isinstance(task.get("id"), int) else {}
        out.append(({"prompt": data["prompt"], "responses": [data["text1"], data["text2"]],
                     "overlap": max(overlap, len(votes)), "meta": meta}, votes))
    return out


def _text(value) -> str:
    """A prompt or response as Label Studio's Text tag shows it (conversations as lines)."""
    if isinstance(value, list):
        return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    return str(value)
