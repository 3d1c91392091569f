"""``rlhflab label``: the server on loopback by default, bad input as one line with exit 2, a
task left open going back to the queue."""

from __future__ import annotations

import json
from datetime import timedelta

from rlhflab.cli import build_parser, main
from rlhflab.labeling.store import Store, Vote


def test_serve_binds_loopback_unless_told(tmp_path, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    db = str(tmp_path / "l.db")
    assert main(["label", "serve", "--db", db]) == 0
    assert (calls[-1]["host"], calls[-1]["port"]) == ("127.0.0.1", 8000)
    assert "reachable from other machines" not in capsys.readouterr().err
    assert main(["label", "serve", "--db", db, "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert (calls[-1]["host"], calls[-1]["port"]) == ("0.0.0.0", 8123)
    assert "reachable from other machines" in capsys.readouterr().err
    args = build_parser(load=("label",)).parse_args(["label", "serve"])
    assert args.db == "sqlite:///labels.db"


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    db = str(tmp_path / "l.db")
    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "what is 2 plus 2 ?", "chosen": "4 .", "rejected": "5 ."}) + "\n")
    assert main(["label", "user", "--db", db, "--name", "alice"]) == 0
    assert "alice (labeler) token: " in capsys.readouterr().out
    cases = [
        (["label", "user", "--db", db, "--name", "alice"], "a user 'alice' exists already"),
        (["label", "user", "--db", db, "--name", "a b"], "name: expected"),
        (["label", "load", "--db", db, "--from", str(tmp_path / "nope.jsonl")], "nope.jsonl: cannot open"),
        (["label", "load", "--db", db, "--from", str(prefs), "--overlap", "0"], "--overlap: expected"),
        (["label", "load", "--db", db, "--from", str(prefs), "--gold", str(tmp_path / "g.jsonl")], "g.jsonl"),
        (["label", "export", "--db", db, "--out", str(tmp_path / "out.jsonl")], "no pair has a majority yet"),
        (["label", "export", "--db", db, "--out", str(prefs)], "exists already"),
        (["label", "bots", "--db", db, "--n", "0"], "--n: expected"),
        (["label", "serve", "--db", db, "--port", "0"], "--port: expected"),
        (["label", "user", "--db", "nosuch://x", "--name", "bob"], "cannot use the database URL"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


def test_a_task_left_open_goes_back_to_the_queue():
    store = Store("sqlite://")
    users = [store.authenticate(n, store.create_user(n, "labeler")) for n in ("u1", "u2")]
    store.add_tasks([{"prompt": "what is 2 plus 2 ?", "responses": ["4 .", "5 ."], "overlap": 1}])
    vote, _ = store.next_vote(users[0])
    assert store.next_vote(users[1]) is None  # the one slot is held
    with store.session.begin() as s:
        s.get(Vote, vote.id).served_at -= timedelta(hours=2)
    assert store.next_vote(users[1]) is not None


def test_load_samples_tasks_from_a_policy(tmp_path, tiny_config_path, capsys):
    from rlhflab.config import load_config
    from tests.conftest import save_tiny_backbone

    policy = save_tiny_backbone(load_config(tiny_config_path), tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("what is 2 plus 2 ?", "say something about trees .")))
    db = str(tmp_path / "l.db")
    argv = ["label", "load", "--db", db, "--policy", str(policy), "--prompts", str(prompts), "--k", "3",
            "--config", str(tiny_config_path), "--overlap", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    tasks = Store(f"sqlite:///{db}").tasks()
    assert [t.prompt for t in tasks] == ["what is 2 plus 2 ?", "say something about trees ."]
    for t in tasks:
        assert 2 <= len(t.responses) <= 3 and len(set(t.responses)) == len(t.responses)
        assert len(t.meta["eos"]) == len(t.responses) and t.overlap == 2 and t.gold is None
    assert main(["label", "load", "--db", db, "--policy", str(policy)]) == 2
    assert "--policy and --prompts go together" in capsys.readouterr().err
    assert main(["label", "load", "--db", db, "--policy", str(policy), "--prompts", str(prompts),
                 "--from", str(prompts)]) == 2


def test_load_samples_half_of_each_task_from_a_second_policy(tmp_path, tiny_config_path, capsys):
    """--policy-b: k/2 responses from each policy per prompt, each response's policy in the
    task's meta and, once people chose, in the export's chosen_policy / rejected_policy."""
    from rlhflab.config import load_config
    from rlhflab.labeling.io import export_rows
    from rlhflab.models import create_causal_lm, save_pretrained_atomic
    from rlhflab.world import World
    from tests.conftest import save_tiny_backbone

    cfg = load_config(tiny_config_path)
    policy = save_tiny_backbone(cfg, tmp_path / "policy")
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    other = tmp_path / "other"
    save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=1), tok, other)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("what is 2 plus 2 ?", "say something about trees .")))
    db = str(tmp_path / "l.db")
    base = ["label", "load", "--db", db, "--policy", str(policy), "--prompts", str(prompts), "--config",
            str(tiny_config_path), "--overlap", "1"]
    assert main([*base, "--policy-b", str(other), "--k", "3"]) == 2
    assert "expected an even --k, got 3" in capsys.readouterr().err
    assert main(["label", "load", "--db", db, "--policy-b", str(other), "--prompts", str(prompts)]) == 2
    assert "--policy-b goes with --policy" in capsys.readouterr().err
    assert main([*base, "--policy-b", str(other), "--k", "4"]) == 0, capsys.readouterr().err
    store = Store(f"sqlite:///{db}")
    tasks = store.tasks()
    assert len(tasks) == 2
    for t in tasks:
        policies = t.meta["policies"]
        assert len(policies) == len(t.responses) and set(policies) <= {"a", "b", "both"}
        assert sum(p in ("a", "both") for p in policies) <= 2 and sum(p in ("b", "both") for p in policies) <= 2
        assert t.meta["policy_b"] == str(other)
    assert {p for t in tasks for p in t.meta["policies"]} >= {"a", "b"}
    user = store.authenticate("u", store.create_user("u", "labeler"))
    while (got := store.next_vote(user)) is not None:
        vote, task = got
        store.submit(user, vote.id, {"ranking": list(range(len(task.responses)))}, f"key-{vote.id:06d}")
    rows, _ = export_rows(store)
    for r in rows:
        t = next(t for t in tasks if t.prompt == r["prompt"])
        assert r["chosen_policy"] == t.meta["policies"][t.responses.index(r["chosen"])]
        assert r["rejected_policy"] == t.meta["policies"][t.responses.index(r["rejected"])]
