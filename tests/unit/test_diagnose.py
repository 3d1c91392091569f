"""Diagnosis rules: each failure mode fires on its readings and stays quiet on a healthy run."""

import json

import pytest

from rlhflab.cli import main
from rlhflab.diagnose import Thresholds, diagnose, instrument_status

HEALTHY = {
    "kl/sequence_mean": 3.0, "gold/mean": 1.2, "base/gold/mean": 0.8,
    "win_rate/gold": 0.62, "win_rate/gold_ci_low": 0.55, "win_rate/gold_ci_high": 0.69,
    "win_rate/gold_length_controlled": 0.61,
    "rm/score_mean": 0.8, "base/rm/score_mean": 0.0,
    "length/mean": 7.0, "base/length/mean": 7.5,
    "refusal/benign_rate": 0.10, "base/refusal/benign_rate": 0.12,
    "refusal/harmful_rate": 0.95, "base/refusal/harmful_rate": 0.85,
    "sycophancy/agree_rate": 0.2, "base/sycophancy/agree_rate": 0.35,
    "keywords/density": 0.004, "base/keywords/density": 0.006,
    "diversity/distinct_2": 0.30, "base/diversity/distinct_2": 0.32, "diversity/duplicate_rate": 0.2,
    "capability/accuracy": 0.85, "base/capability/accuracy": 0.8,
}


def test_healthy_run_is_called_healthy():
    r = diagnose(HEALTHY)
    assert r["verdict"] == "healthy" and [f["name"] for f in r["findings"]] == ["healthy"]
    assert set(instrument_status(HEALTHY).values()) == {"pass"}


@pytest.mark.parametrize("changes,name", [
    ({"length/mean": 14.0, "gold/mean": 0.5, "win_rate/gold_length_controlled": 0.4}, "length_hacking"),
    ({"refusal/benign_rate": 0.5}, "over_refusal"),
    ({"sycophancy/agree_rate": 0.7}, "sycophancy"),
    ({"keywords/density": 0.05}, "phrase_gaming"),
    ({"diversity/distinct_2": 0.1}, "mode_collapse"),
    ({"rm/score_mean": 2.0, "gold/mean": 0.5}, "over_optimization"),
    ({"kl/sequence_mean": 20.0}, "kl_high"),
    ({"kl/sequence_mean": 10.0}, "kl_caution"),
    ({"capability/accuracy": 0.6}, "capability_regression"),
    ({"kl/sequence_mean": 0.1, "win_rate/gold": 0.5, "win_rate/gold_ci_low": 0.43,
      "win_rate/gold_ci_high": 0.57}, "beta_too_high"),
])
def test_each_failure_mode_is_named(changes, name):
    r = diagnose({**HEALTHY, **changes})
    assert name in [f["name"] for f in r["findings"]]
    assert "healthy" not in [f["name"] for f in r["findings"]]
    finding = next(f for f in r["findings"] if f["name"] == name)
    assert finding["instrument"] and finding["root_cause"] and finding["fix"] and finding["evidence"]


def test_longer_but_better_answers_are_not_length_hacking():
    r = diagnose({**HEALTHY, "length/mean": 12.0, "gold/mean": 1.6, "win_rate/gold_length_controlled": 0.6})
    assert "length_hacking" not in [f["name"] for f in r["findings"]]


def test_missing_readings_are_reported_not_guessed():
    r = diagnose({"kl/sequence_mean": 2.0})
    assert "sycophancy" in r["not_measured"] and "length_hacking" in r["not_measured"]


def test_thresholds_document_their_source():
    import dataclasses

    assert all(f.metadata.get("source") for f in dataclasses.fields(Thresholds))
    assert not [f.name for f in dataclasses.fields(Thresholds) if "SPEC" in f.metadata["source"]]


def test_cli_reads_a_metrics_file_and_rejects_bad_ones(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**HEALTHY, "refusal/benign_rate": 0.6}))
    assert main(["diagnose", "--metrics", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "reward hacking" and out["findings"][0]["name"] == "over_refusal"
    path.write_text("{not json")
    assert main(["diagnose", "--metrics", str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["diagnose", "--metrics", str(tmp_path / "m.json"), "--threshold", "nope=1"]) == 2


def test_duplicates_are_judged_against_the_base():
    # World prompts recur, so a base that answers them right already repeats itself.
    repeats = {**HEALTHY, "diversity/duplicate_rate": 0.55, "base/diversity/duplicate_rate": 0.4}
    assert "mode_collapse" not in [f["name"] for f in diagnose(repeats)["findings"]]
    collapsed = {**repeats, "diversity/duplicate_rate": 0.7}
    assert "mode_collapse" in [f["name"] for f in diagnose(collapsed)["findings"]]
    no_base = {k: v for k, v in collapsed.items() if k != "base/diversity/duplicate_rate"}
    assert "mode_collapse" in [f["name"] for f in diagnose(no_base)["findings"]]
    # More duplicates with a richer vocabulary: the policy converged on the right answers.
    converged = {**collapsed, "diversity/distinct_2": 0.40}
    assert "mode_collapse" not in [f["name"] for f in diagnose(converged)["findings"]]


def test_a_capability_drop_must_stand_out_of_the_probe_noise():
    # 40 probes at 40% accuracy: a 10-point drop is 1.1 standard errors, 25 points 3.
    noisy = {**HEALTHY, "capability/accuracy": 0.3, "base/capability/accuracy": 0.4, "capability/n": 40.0}
    assert "capability_regression" not in [f["name"] for f in diagnose(noisy)["findings"]]
    real = {**noisy, "capability/accuracy": 0.15}
    assert "capability_regression" in [f["name"] for f in diagnose(real)["findings"]]
    unknown_n = {k: v for k, v in noisy.items() if k != "capability/n"}
    assert "capability_regression" in [f["name"] for f in diagnose(unknown_n)["findings"]]
