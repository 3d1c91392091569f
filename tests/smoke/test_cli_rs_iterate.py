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


def _metric_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rl_logs_the_shift_reading_of_its_reward_model(trained):
    """Each held-out evaluation of an RL run on an RM with feature statistics carries the
    shift readings, in metrics.jsonl and in the summary's evals."""
    out = trained / "rl_shift"
    assert main(["rloo", "--config", TINY, "--sft", str(trained / "sft"), "--rm", str(trained / "rm"),
                 "--set", "rl.steps=2", "--set", "rl.eval_every=1", "--out", str(out)]) == 0
    evals = [m for m in _metric_lines(out / "metrics.jsonl") if "gold/mean" in m]
    assert [m["step"] for m in evals] == [0, 1, 2]
    for m in evals:
        assert 0.0 <= m["shift/ood_rate"] <= 1.0 and m["shift/mahalanobis_ratio"] > 0 and m["shift/n"] == 16
    summary = json.loads((out / "metrics.json").read_text())
    assert all("shift/ood_rate" in e for e in summary["evals"])


def test_rl_reference_is_the_kl_anchor(trained):
    """run_rl(reference=...): the KL is taken to that policy. From a policy that moved away
    from SFT, the first rollout's KL to SFT is far from zero; with the default reference (the
    starting policy itself) it is zero up to float rounding, the two log-probs being the
    same model's."""
    from rlhflab.commands.rl import run_rl
    from rlhflab.config import load_config

    moved = trained / "moved"
    assert main(["rloo", "--config", TINY, "--sft", str(trained / "sft"), "--rm", str(trained / "rm"),
                 "--set", "rl.steps=4", "--set", "rl.lr=1e-3", "--set", "rl.eval_every=0", "--out", str(moved)]) == 0
    kl = {}
    for name, ref in (("self", None), ("sft", str(trained / "sft"))):
        cfg = load_config(TINY, ["rl.steps=1", "rl.eval_every=0"])
        run_rl(cfg, "rloo", trained / f"ref_{name}", sft=str(moved), rm=str(trained / "rm"), reference=ref)
        kl[name] = _metric_lines(trained / f"ref_{name}" / "metrics.jsonl")[0]["objective/kl"]
    assert kl["self"] == pytest.approx(0.0, abs=1e-5)
    assert abs(kl["sft"]) > 1e-2, kl  # measured 0.73 nats after 4 steps at lr 1e-3; -4e-8 to itself
    assert json.loads((trained / "ref_sft" / "run.json").read_text())["reference"].endswith("model")


def test_iterate_rm_continue(trained):
    """--rm-continue: round 2's reward model is trained from round 1's; every round's RL
    keeps its KL to the SFT policy."""
    out = trained / "iterate_continue"
    assert main(["iterate", "--config", TINY, "--sft", str(trained / "sft"), "--rounds", "2", "--rm-continue",
                 "--set", "rl.steps=2", "--set", "rl.eval_every=1", "--out", str(out)]) == 0
    record = json.loads((out / "iterate.json").read_text())
    assert record["rm_continue"] is True
    backbone = json.loads((out / "round_2" / "rm" / "metrics.json").read_text())["model/backbone"]
    assert Path(backbone).parts[-3:-1] == ("round_1", "rm")
    sft_model = str((trained / "sft" / "model").resolve())
    for r in (1, 2):
        assert json.loads((out / f"round_{r}" / "rl" / "run.json").read_text())["reference"] in (None, sft_model)
    assert json.loads((out / "round_2" / "rl" / "run.json").read_text())["reference"] == sft_model
