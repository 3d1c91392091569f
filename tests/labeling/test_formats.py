"""Label Studio's and Argilla 2's JSON both ways: the export is what Label Studio's Pairwise
control and Argilla's ranking question write, and reading it back gives the same votes, so
the agreement and the TRL export agree across the trip."""

from __future__ import annotations

import json

from rlhflab.cli import main
from rlhflab.labeling.io import export_rows, readings
from rlhflab.labeling.store import Store

from .test_app import scratch_dir


def answered_store() -> Store:
    store = Store(f"sqlite:///{scratch_dir()}/ls.db")
    store.add_tasks([{"prompt": "what is 2 plus 2 ?", "responses": ["4 .", "5 ."], "overlap": 3},
                     {"prompt": "what is 1 plus 1 ?", "responses": ["3 .", "2 ."], "overlap": 3},
                     {"prompt": "rank", "responses": ["a", "b", "c"], "overlap": 3}])
    answers = {"u0": [{"ranking": [0, 1]}, {"ranking": [1, 0]}, {"ranking": [0, 1, 2]}],
               "u1": [{"ranking": [0, 1]}, {"tie": True}, {"ranking": [2, 1, 0]}],
               "u2": [{"ranking": [1, 0]}, {"ranking": [1, 0]}, {"ranking": [0, 2, 1]}]}
    for name, given in answers.items():
        user = store.authenticate(name, store.create_user(name, "labeler"))
        while (got := store.next_vote(user)) is not None:
            vote, task = got
            i = ["what is 2 plus 2 ?", "what is 1 plus 1 ?", "rank"].index(task.prompt)
            assert store.submit(user, vote.id, given[i], f"{name}-{vote.id:06d}", confidence=None) == "stored"
    return store


def test_label_studio_export_and_import_round_trip(tmp_path, capsys):
    store = answered_store()
    out = tmp_path / "ls.json"
    assert main(["label", "export", "--db", store.url, "--out", str(out), "--format", "label-studio"]) == 0
    said = capsys.readouterr().out
    assert "2 pairwise tasks with 5 annotations" in said and "1 rankings" in said and "1 ties" in said
    tasks = json.loads(out.read_text())
    first = next(t for t in tasks if t["data"]["prompt"] == "what is 2 plus 2 ?")
    assert first["data"] == {"prompt": "what is 2 plus 2 ?", "text1": "4 .", "text2": "5 ."}
    assert sorted(r["value"]["selected"] for a in first["annotations"] for r in a["result"]) == ["left", "left",
                                                                                                 "right"]
    assert {r["type"] for a in first["annotations"] for r in a["result"]} == {"pairwise"}
    # back into a new database: the same pairs with the same votes
    db = f"sqlite:///{scratch_dir()}/back.db"
    assert main(["label", "load", "--db", db, "--from", str(out), "--format", "label-studio"]) == 0
    assert "2 tasks with 5 votes" in capsys.readouterr().out
    back = Store(db)
    pairs = {(r["prompt"], r["chosen"], r["rejected"]): sorted(r["votes"]) for r in export_rows(back)[0]}
    before = {(r["prompt"], r["chosen"], r["rejected"]): sorted(r["votes"]) for r in export_rows(store)[0]
              if r["prompt"] != "rank"}
    assert pairs == before == {("what is 2 plus 2 ?", "4 .", "5 ."): [0, 1, 1], ("what is 1 plus 1 ?", "2 .", "3 ."): [1, 1]}
    assert sorted(u.name for u in back.users()) == ["ls-1", "ls-2", "ls-3"]
    assert readings(back)["agreement"]["units"] == 2


def test_label_studio_input_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"data": {"prompt": "p", "text1": "a", "text2": "b"}},
                               {"data": {"prompt": "p", "text1": "a"}}]))
    db = f"sqlite:///{scratch_dir()}/bad.db"
    assert main(["label", "load", "--db", db, "--from", str(bad), "--format", "label-studio"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json" in err and "2" in err and "text2" in err
    bad.write_text(json.dumps([{"data": {"prompt": "p", "text1": "a", "text2": "b"}, "annotations": [
        {"result": [{"type": "pairwise", "value": {"selected": "up"}}]}]}]))
    assert main(["label", "load", "--db", db, "--from", str(bad), "--format", "label-studio"]) == 2
    assert "left or right" in capsys.readouterr().err
    assert main(["label", "load", "--db", db, "--format", "label-studio", "--policy", "x", "--prompts", "y"]) == 2
    assert Store(db).tasks() == []


def test_argilla_export_and_import_round_trip(tmp_path, capsys):
    """Argilla 2's record JSON keeps rankings of three whole: every pair's votes come back."""
    from rlhflab.labeling.argilla import user_uuid

    store = answered_store()
    out = tmp_path / "argilla.json"
    assert main(["label", "export", "--db", store.url, "--out", str(out), "--format", "argilla"]) == 0
    assert "3 records with 8 ranking responses" in capsys.readouterr().out  # one tie left out
    records = json.loads(out.read_text())
    ranked = next(r for r in records if r["fields"]["prompt"] == "rank")
    assert ranked["fields"] == {"prompt": "rank", "response1": "a", "response2": "b", "response3": "c"}
    assert {(r["user_id"], tuple(r["value"])) for r in ranked["responses"]["ranking"]} == {
        (user_uuid("u0"), ("response1", "response2", "response3")),
        (user_uuid("u1"), ("response3", "response2", "response1")),
        (user_uuid("u2"), ("response1", "response3", "response2"))}
    db = f"sqlite:///{scratch_dir()}/from_argilla.db"
    assert main(["label", "load", "--db", db, "--from", str(out), "--format", "argilla"]) == 0
    assert "3 tasks with 8 votes" in capsys.readouterr().out
    back = Store(db)

    def pairs(s):
        return {(r["prompt"], r["chosen"], r["rejected"]): sorted(r["votes"]) for r in export_rows(s)[0]}

    assert pairs(back) == pairs(store) and len(pairs(back)) == 5
    assert sorted(u.name for u in back.users()) == sorted(f"argilla-{user_uuid(n)}" for n in ("u0", "u1", "u2"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"fields": {"prompt": "p", "response1": "a", "response2": "b"},
                                "responses": {"ranking": [{"value": ["response1"], "user_id": "x"}]}}]))
    assert main(["label", "load", "--db", db, "--from", str(bad), "--format", "argilla"]) == 2
    assert "expected a ranking of every one of response1, response2" in capsys.readouterr().err
