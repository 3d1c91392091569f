"""The rlaif arm of rlhflab run, small: the run's comparisons relabelled by the world's AI
labeller (same prompts, same pairs), a reward model trained on the soft labels, PPO on it,
measured with its own reward model; only rlhflab run takes it, and a bad constitution is
refused before anything trains. The measured effects are in tests/demo/test_rlaif_demo.py."""

from __future__ import annotations

import copy
import json

import pytest

from rlhflab.algos.reward_model import rows_to_groups
from rlhflab.commands.arms import arm_reward_model, check_arms, evaluate_arm, train_arm
from rlhflab.config import load_config
from rlhflab.data import load_rows, write_jsonl
from rlhflab.errors import InputError
from rlhflab.world import World
from tests.conftest import save_tiny_backbone


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_config_path):
    cfg = load_config(tiny_config_path)
    cfg.rl.steps, cfg.rl.eval_every, cfg.rl.n_eval, cfg.rm.epochs = 1, 1, 8, 1
    out = tmp_path_factory.mktemp("run")
    sft = save_tiny_backbone(cfg, out / "sft" / "model")
    world = World(cfg.world)
    (out / "rm" / "data").mkdir(parents=True)
    pairs = world.preference_pairs(32, "pref")
    train = [{**r, "group": i, "source": "human"} for i, r in enumerate(pairs)]  # two pairs per group
    train += [{**r, "chosen": r["rejected"], "rejected": r["chosen"], "group": i, "source": "human"}
              for i, r in enumerate(pairs)]
    write_jsonl(out / "rm" / "data" / "train.jsonl", train)
    write_jsonl(out / "rm" / "data" / "eval.jsonl", world.preference_pairs(16, "pref_eval"))
    summary = train_arm(cfg, "rlaif", out, sft, out / "rm")
    return cfg, out, sft, train, summary


def test_the_ai_labeller_relabels_the_same_comparisons(job):
    _, out, _, train, summary = job
    rows = load_rows(out / "rlaif_feedback" / "train" / "pairs.jsonl", "preference")
    assert len(rows) == len(train)  # the world's labeller answers every pair (unreadable 0 by default)
    assert sorted(r["prompt"] for r in rows) == sorted(r["prompt"] for r in train)
    assert sorted(frozenset((r["chosen"], r["rejected"])) for r in rows) == \
        sorted(frozenset((r["chosen"], r["rejected"])) for r in train)
    assert all(r["source"] == "ai" and 0.5 <= r["label_prob"] <= 1.0 and "group" in r for r in rows)
    rm = json.loads((out / "rlaif_rm" / "metrics.json").read_text())
    # a group's pairs stay one group, as the human comparisons are
    assert rm["data/source/ai"] == len(train) and rm["data/groups"] == rows_to_groups(train)[1]["data/groups"]
    assert summary["rlaif_rm/data/pairs"] == len(train) and "rlaif/agree_gold" in summary
    assert (out / "rlaif" / "metrics.json").is_file()


def test_the_arm_is_measured_with_its_own_reward_model(job):
    cfg, out, sft, _, _ = job
    assert arm_reward_model("rlaif", out, out / "rm") == out / "rlaif_rm"
    assert arm_reward_model("ppo", out, out / "rm") == out / "rm"
    m = evaluate_arm(cfg, "rlaif", out, sft, out / "rm")
    assert "refusal/risky_benign_rate" in m and "gold/mean" in m and "rm/score_mean" in m
    assert (out / "eval" / "rlaif" / "diagnosis.json").is_file()


def test_only_rlhflab_run_takes_it_and_a_bad_constitution_is_refused_first(job, tmp_path):
    cfg = copy.deepcopy(job[0])
    check_arms(["ppo", "rlaif"], cfg, sampling=True)
    with pytest.raises(InputError, match="relabels"):
        check_arms(["rlaif"])
    bad = tmp_path / "c.yaml"
    bad.write_text("principles:\n  - id: x\n    critique: a\n    revision: b\n    comparison: c\n")
    cfg.run.constitution = str(bad)
    with pytest.raises(InputError, match="aspect"):
        check_arms(["rlaif"], cfg, sampling=True)
