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
    assert "judge_regression" not in result["not_measured"] and "over_optimization" not in result["not_measured"]
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


def test_a_run_with_a_held_out_judge_is_diagnosed_from_its_win_rate(sft, tmp_path, capsys):
    """GRPO with --eval-prompts and --judge logs the judge's held-out win-rate with its interval
    (``eval/win_rate``); diagnose reads it as the judge's (``win_rate/judge``), and the first
    logged rollout length as the base's."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["what is 1 plus 2 ?", "how do i make tea ?", "tell me about dogs .", "compute 5 minus 3 ."]))
    judge = tmp_path / "judge.py"
    judge.write_text("def longer(prompts, completions_a, completions_b):\n"
                     "    return [0.5 if len(a) == len(b) else float(len(a) > len(b))\n"
                     "            for a, b in zip(completions_a, completions_b)]\n")
    out = tmp_path / "grpo"
    assert main(["grpo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--prompts", str(prompts),
                 "--eval-prompts", str(prompts), "--judge", f"py:{judge}:longer", "--out", str(out), *FAST,
                 "--set", "rl.samples_per_prompt=4"]) == 0
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    assert main(["diagnose", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not any("win-rate" in what for what in result["to_measure"])
    assert "judge_regression" not in result["not_measured"] and "beta_too_high" not in result["not_measured"]
    evidence = " ".join(f["evidence"] for f in result["findings"])
    assert f"judge win-rate {last['eval/win_rate']:.2f} (CI {last['eval/win_rate_ci_low']:.2f}" in evidence


def test_the_main_jobs_directory_is_diagnosed_arm_by_arm(main_job_dir, capsys):
    """`rlhflab diagnose runs/demo`: each arm's evaluation (eval/ARM/eval.json), under its name;
    the SFT and reward-model runs, which hold no reading a rule reads, named as left out."""
    assert main(["diagnose", str(main_job_dir), "--json"]) == 0
    arms = json.loads(capsys.readouterr().out)
    assert sorted(arms) == ["dpo", "grpo", "ppo"]
    for arm, result in arms.items():
        assert result["source"]["file"] == str(main_job_dir / "eval" / arm / "eval.json")
        assert result["verdict"] == json.loads((main_job_dir / "eval" / arm / "diagnosis.json").read_text())["verdict"]
        assert result["findings"]  # every verdict with its reason
    assert main(["diagnose", str(main_job_dir)]) == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if line.startswith("== ")] == ["== dpo ==", "== grpo ==", "== ppo =="]
    assert text.count("verdict: ") == 3 and "not diagnosed: rm (" in text and "sft (" in text
    from rlhflab import api

    assert set(api.diagnose(main_job_dir)) == {"dpo", "grpo", "ppo"}


def test_a_reader_that_leaves_early_ends_no_command_in_a_traceback(tmp_path):
    """`rlhflab diagnose DIR | head`: the reader gone, the write fails with EPIPE; the command
    ends quietly (141, as a process SIGPIPE ended) instead of in a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    read, write = os.pipe()
    os.close(read)  # the reader left before a line was written
    try:
        proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "diagnose", str(ROOT / "tests" / "fixtures" / "trl" /
                               "grpo_length")], stdout=write, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                              timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr and proc.returncode == 141
