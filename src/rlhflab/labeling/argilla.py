"""Argilla 2's record JSON, both ways, for rankings of 2..10 responses.

The dataset's settings on the Argilla side: a text field ``prompt``, text fields
``response1`` .. ``responseK``, and a ranking question ``ranking`` whose values are
``response1`` .. ``responseK``:

    rg.Settings(fields=[rg.TextField("prompt"), rg.TextField("response1"), rg.TextField("response2")],
                questions=[rg.RankingQuestion("ranking", values=["response1", "response2"])])

``dataset.records.to_json(path)`` writes, and ``Record.from_dict`` (what Argilla's
``from_disk`` uses) reads, one object per record: ``{"id", "fields": {...}, "metadata": {...}, "suggestions": {},
"responses": {"ranking": [{"value": ["response2", "response1"], "user_id": "<uuid>"}]},
"vectors": {}}``, a ranking response's value the option values best first (Argilla 2's
SDK turns the server's ``[{"value", "rank"}]`` into that list). A ranking has no tie and no
"both bad": ``to_argilla`` leaves those answers out and counts them. Our labelers become
user ids by a UUID5 of their name; an Argilla user becomes the labeler ``argilla-<uuid>``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from rlhflab.errors import InputError
from rlhflab.labeling.io import MAX_RESPONSES, read_json_list

QUESTION = "ranking"


def user_uuid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"rlhflab-labeler:{name}"))


def to_argilla(store) -> tuple[list[dict], dict]:
    """Every task that is not gold as an Argilla record, each labeler's ranking a response;
    (records, counts)."""
    records: dict[int, dict] = {}
    for t in store.tasks():
        if t.gold is not None:
            continue
        fields = {"prompt": _text(t.prompt), **{f"response{i + 1}": _text(r) for i, r in enumerate(t.responses)}}
        records[t.id] = {"id": f"task-{t.id}", "fields": fields, "metadata": {"rlhflab_task": t.id},
                         "suggestions": {}, "responses": {QUESTION: []}, "vectors": {}}
    left_out = 0
    for vote, task, user in store.votes():
        if task.id not in records or vote.status != "submitted":
            continue
        if "ranking" not in vote.answer:
            left_out += 1
            continue
        records[task.id]["responses"][QUESTION].append(
            {"value": [f"response{i + 1}" for i in vote.answer["ranking"]], "user_id": user_uuid(user.name)})
    counts = {"records": len(records), "responses": sum(len(r["responses"][QUESTION]) for r in records.values()),
              "ties_or_both_bad_left_out": left_out}
    return list(records.values()), counts


def from_argilla(path: str | Path, *, overlap: int) -> list[tuple[dict, list[dict]]]:
    """(task, votes) per record of an Argilla 2 record JSON (``records.to_json``): the task
    as ``Store.add_tasks`` takes it, a vote per response to ``ranking``. Bad input is an
    InputError naming the record."""
    records = read_json_list(path, "Argilla's record JSON (records.to_json) of records")
    out = []
    for n, rec in enumerate(records, start=1):
        where = {"file": str(path), "line": n}
        fields = rec.get("fields") if isinstance(rec, dict) else None
        if not isinstance(fields, dict) or not isinstance(fields.get("prompt"), str):
            raise InputError("expected fields.prompt as text (record number shown as line)", field="fields", **where)
        responses = []
        while isinstance(fields.get(f"response{len(responses) + 1}"), str):
            responses.append(fields[f"response{len(responses) + 1}"])
        if not 2 <= len(responses) <= MAX_RESPONSES:
            raise InputError(f"expected fields response1..responseK as text, 2 <= K <= {MAX_RESPONSES}, got "
                             f"{len(responses)}", field="fields", **where)
        options = [f"response{i + 1}" for i in range(len(responses))]
        votes = []
        for r in (rec.get("responses") or {}).get(QUESTION) or []:
            value = r.get("value") if isinstance(r, dict) else None
            if not isinstance(value, list) or sorted(value) != sorted(options):
                raise InputError(f"expected a ranking of every one of {', '.join(options)}, got {value!r}",
                                 field=f"responses.{QUESTION}", **where)
            votes.append({"labeler": f"argilla-{r.get('user_id')}", "answer": {"ranking": [options.index(v)
                                                                                            for v in value]},
                          "seconds": None})
        meta = {"argilla_id": str(rec["id"])} if rec.get("id") is not None else {}
        out.append(({"prompt": fields["prompt"], "responses": responses, "overlap": max(overlap, len(votes)),
                     "meta": meta}, votes))
    return out


def _text(value) -> str:
    """A prompt or response as one text (conversations as 'role: content' lines)."""
    if isinstance(value, list):
        return "\n\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    return str(value)
