"""rlhflab rs and rlhflab iterate on the tiny world; the RM's feature statistics."""

import json
import math
from pathlib import Path

import pytest
import torch

from rlhflab.cli import main

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rs_iterate")
    assert main(["sft", "--config", TINY, "--out", str(root / "sft")]) == 0
    assert main(["rm", "--config", TINY, "--sft", str(root / "sft"), "--out", str(root / "rm")]) == 0
    return root


def test_rm_saves_feature_stats_the_head_reads(trained):
    """The saved statistics load with the model, and the hooked features are what the head
    scores: head(features) = the raw score."""
    from rlhflab.instruments.distribution_shift import member_features, shift_readings
    from rlhflab.reward_model import RewardModel, reward_head

    rm = RewardModel.load(trained / "rm")
    assert rm.feature_stats is not None and rm.feature_stats["mean_0"].shape == (32,)
    prompts, responses = ["add 2 and 3", "add 2 and 3"], ["5", "the answer is 5"]
    feats = member_features(rm, prompts, responses)[0]
    with torch.no_grad():
        from_head = reward_head(rm.members[0])(feats)[:, 0]
    assert from_head.tolist() == pytest.approx(rm.raw_member_scores(prompts, responses)[0].tolist(), abs=1e-5)
    readings = shift_readings(rm, prompts, responses)
    assert {"shift/mahalanobis_mean", "shift/mahalanobis_ratio", "shift/ood_rate"} <= set(readings)


def test_rs_rounds(trained, capsys):
    out = trained / "rs"
    assert main(["rs", "--config", TINY, "--sft", str(trained / "sft"), "--rm", str(trained / "rm"),
                 "--rounds", "2", "--n", "2", "--n-prompts", "48", "--set", "sft.batch_size=16", "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["round"] for r in record["per_round"]] == [0, 1, 2]
    for r in record["per_round"]:
        assert math.isfinite(r["gold/mean"]) and math.isfinite(r["proxy/mean"]) and "shift/ood_rate" in r
    assert record["per_round"][1]["rs/kept"] >= 1
    assert (out / "round_2" / "model" / "config.json").is_file() and (out / "model" / "config.json").is_file()


def test_iterate_rl_rounds(trained):
    out = trained / "iterate"
    assert main(["iterate", "--config", TINY, "--sft", str(trained / "sft"), "--rounds", "2",
                 "--set", "rl.steps=2", "--set", "rl.eval_every=1", "--out", str(out)]) == 0
    record = json.loads((out / "iterate.json").read_text())
    r1, r2 = record["per_round"][1], record["per_round"][2]
    assert "iterate/rm_accuracy_on_policy" not in r1  # no earlier reward model to score
    assert 0.0 <= r2["iterate/rm_accuracy_on_policy"] <= 1.0
    assert r2["iterate/comparisons_total"] == r1["iterate/comparisons_new"] + r2["iterate/comparisons_new"]
    assert record["comparison_prompts"] == [48, 48] and record["rl_steps"] == [1, 1]
    assert "overopt/proxy_overstatement" in r2 and "gold/peak_step" in record
    assert (out / "model" / "config.json").is_file()


def test_iterate_online_dpo(trained):
    out = trained / "iterate_dpo"
    assert main(["iterate", "--config", TINY, "--sft", str(trained / "sft"), "--rounds", "2",
                 "--method", "online-dpo", "--out", str(out)]) == 0
    record = json.loads((out / "iterate.json").read_text())
    assert [r["round"] for r in record["per_round"]] == [0, 1, 2]
    assert "proxy/mean" not in record["per_round"][2]  # judged by the raters: no proxy to read
    assert (out / "round_2" / "dpo" / "model" / "config.json").is_file()


@pytest.mark.parametrize("argv", [["rs", "--rounds", "0"], ["rs", "--n", "0"], ["iterate", "--rounds", "0"]])
def test_bad_counts_exit_2(trained, argv, capsys):
    extra = ["--rm", str(trained / "rm")] if argv[0] == "rs" else []
    assert main([*argv, "--config", TINY, "--sft", str(trained / "sft"), *extra,
                 "--out", str(trained / "bad")]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert not (trained / "bad").exists()
