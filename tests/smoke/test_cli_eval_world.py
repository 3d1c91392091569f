"""`rlhflab eval` on the world's probes, and `rlhflab diagnose` on its output."""

import json

import pytest

from rlhflab.cli import main


@pytest.fixture(scope="module")
def two_policies(tmp_path_factory, tiny_config_path):
    root = tmp_path_factory.mktemp("eval")
    for name, steps in (("long", 32),):
        assert main(["sft", "--config", str(tiny_config_path), "--out", str(root / name),
                     "--set", f"sft.max_steps={steps}", "--set", "sft.n_samples=4"]) == 0
    return root


def test_a_policy_against_itself_reads_zero_kl_and_even_win_rate(two_policies, tiny_config_path):
    out = two_policies / "self"
    assert main(["eval", "--config", str(tiny_config_path), "--policy", str(two_policies / "long"),
                 "--base", str(two_policies / "long"), "--out", str(out)]) == 0
    m = json.loads((out / "eval.json").read_text())
    assert m["kl/sequence_mean"] == 0.0 and m["win_rate/gold"] == 0.5
    for key in ("gold/mean", "capability/accuracy", "refusal/benign_rate", "length/mean", "diversity/distinct_2"):
        assert m[key] == m[f"base/{key}"]
    assert json.loads((out / "diagnosis.json").read_text())["verdict"] in ("no improvement", "healthy")


def test_diagnose_reads_the_eval_directory(two_policies, capsys):
    capsys.readouterr()
    assert main(["diagnose", str(two_policies / "self"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verdict"] in ("no improvement", "healthy", "needs attention")
    assert "beta_too_high" in [f["name"] for f in result["findings"]]  # KL 0 and win-rate 0.5
