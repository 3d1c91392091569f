"""`rlhflab diagnose` on rlhflab's own training runs: a run directory and its metrics.json, with
gold evaluations on the world and without them on a user's prompts."""

from __future__ import annotations

import json

import pytest

from rlhflab.cli import main
from tests.component.test_rl_rollout import tiny_policy_dir
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["--set", "rl.steps=2", "--set", "rl.batch_size=16", "--set", "generation.max_new_tokens=8",
        "--set", "rl.n_eval=8"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return str(tiny_policy_dir(tmp_path_factory.getbasetemp()))


def test_a_world_run_directory_is_diagnosed_from_its_gold_evaluations(sft, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert main(["ppo", "--config", TINY, "--sft", sft, "--reward-fn", "gold", "--out", str(out), *FAST,
                 "--set", "rl.eval_every=1"]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "metrics.json").read_text())
    assert result["source"] == {"file": str(out / "metrics.json"), "schema": "rlhflab", "how": "detected from its keys"}
    # gold measured at steps 0, 1 and 2: the regression and over-optimization rules are read
    assert "regression" not in result["not_measured"] and "over_optimization" not in result["not_measured"]
    assert result["verdict"] != "healthy"  # no judge's win-rate: never healthy
    assert summary["gold/initial"] is not None


def test_a_run_on_user_prompts_reads_its_nulls_as_not_measured(sft, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["what is 1 plus 2 ?", "how do i make tea ?", "tell me about dogs .", "compute 5 minus 3 ."]))
    out = tmp_path / "grpo"
    assert main(["grpo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--prompts", str(prompts),
                 "--out", str(out), *FAST, "--set", "rl.samples_per_prompt=4"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["gold/initial"] is None and isinstance(summary["kl/status_steps"], dict)
    capsys.readouterr()
    assert main(["diagnose", "--metrics", str(out / "metrics.json")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("verdict: not enough evidence\n")
    assert "--prompts F --judge rm:DIR" in text and "(rlhflab names, detected from its keys)" in text
