"""A round with people (``rlhflab iterate --labels``): the samples become tasks, the round
waits for the labelers (bots here, through the HTTP API), and their votes come back as the
round's TRL pairs; without votes it goes on at its timeout and says so."""

from __future__ import annotations

import io
import threading
import time

import pytest

from rlhflab.commands.collect import SampledGroup
from rlhflab.config import load_config
from rlhflab.errors import RunError
from rlhflab.labeling.bots import run_bots, running_server
from rlhflab.labeling.rounds import people_round
from rlhflab.labeling.server import create_app
from rlhflab.labeling.store import Store, Task
from rlhflab.world import World

from .test_app import scratch_dir


def groups(n: int) -> list[SampledGroup]:
    cfg = load_config(None)
    rows = World(cfg.world).preference_pairs(n, "rounds-test")
    prompts = World(cfg.world).prompts(n, "pref")
    out = []
    for p, r in zip(prompts, rows):
        # a duplicate and an empty sample, kept once and dropped
        out.append(SampledGroup(p, [r["chosen"], r["rejected"], r["chosen"], " "], [True, True, True, False]))
    out.append(SampledGroup(prompts[0], ["same .", "same ."], [True, True]))  # one distinct response: no task
    return out


def test_a_round_waits_for_the_people_and_returns_their_votes():
    store = Store(f"sqlite:///{scratch_dir()}/rounds.db", seed=0)
    accounts = store.bot_accounts(3)
    rater = load_config(None).world.rater
    with running_server(create_app(store)) as url:
        answers = {}

        def labelers() -> None:  # the people arrive once the tasks are there
            while not store.tasks():
                time.sleep(0.02)
            answers.update(run_bots(url, accounts, rater, seed=2))

        people = threading.Thread(target=labelers)
        people.start()
        log = io.StringIO()
        rows, counts = people_round(store, groups(6), overlap=3, tag="round 1", poll=0.05, log=log)
        people.join()
    assert counts["labels/tasks"] == counts["labels/tasks_complete"] == 6 and counts["labels/groups_dropped"] == 1
    assert not counts["labels/timed_out"] and "round 1: 0/6 tasks" in log.getvalue()
    assert sum(answers.values()) == 18 and len(rows) == counts["labels/pairs"] - counts["labels/pairs_without_majority"]
    for r in rows:
        assert len(r["votes"]) + r["ties"] + r["both_bad"] == 3 and 2 * sum(r["votes"]) > len(r["votes"])
        assert r["source"] == "human" and isinstance(r["chosen_eos"], bool)
    tasks = store.tasks()
    assert all(t.meta["round"] == "round 1" and len(t.responses) == 2 for t in tasks)


def test_a_round_without_votes_stops_at_its_timeout():
    store = Store(f"sqlite:///{scratch_dir()}/rounds.db")
    with pytest.raises(RunError, match="no pair has a majority of people's votes after 0 s"):
        people_round(store, groups(2), overlap=1, tag="round 1", timeout=0.1, poll=0.02, log=io.StringIO())
    assert len(store.tasks()) == 2 and all(isinstance(t, Task) for t in store.tasks())


def test_iterates_labels_options_go_with_labels(tmp_path, tiny_config_path, capsys):
    from rlhflab.cli import main
    from tests.conftest import save_tiny_backbone

    sft = save_tiny_backbone(load_config(tiny_config_path), tmp_path / "sft")
    base = ["iterate", "--config", str(tiny_config_path), "--sft", str(sft), "--out", str(tmp_path / "o")]
    assert main([*base, "--labels-need", "3"]) == 2
    assert "go with --labels URL" in capsys.readouterr().err
    assert main([*base, "--labels", f"sqlite:///{tmp_path}/l.db", "--labels-overlap", "0"]) == 2
    assert "--labels-overlap" in capsys.readouterr().err
