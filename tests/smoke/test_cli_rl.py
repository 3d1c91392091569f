"""CLI smoke runs of ppo, reinforce, rloo and grpo on configs/tiny.yaml: outputs, metric
names, the reward-model path end to end, early stopping, and bad input exiting 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhflab.cli import main
from tests.component.test_rl_rollout import tiny_policy_dir
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["--set", "rl.steps=2", "--set", "rl.batch_size=16", "--set", "generation.max_new_tokens=8",
        "--set", "rl.eval_every=2", "--set", "rl.n_eval=8"]
TRL_NAMES = {"objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy", "policy/clipfrac",
             "policy/approxkl", "rollout/length_mean", "rollout/eos_rate", "kl/beta", "kl/status", "loss/policy"}
MISMATCH = {"rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/first_ratio_mean"}


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return str(tiny_policy_dir(tmp_path_factory.getbasetemp()))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("command, extra", [
    (["ppo"], []),
    (["reinforce"], ["--set", "rl.kl_controller=linear"]),
    (["reinforce", "--variant", "reinforce++"], ["--set", "rl.entropy_coef=0.01"]),
    (["reinforce", "--variant", "reinforce++-baseline"], ["--set", "rl.kl_clip=10"]),
    (["rloo"], ["--set", "rl.micro_batch_size=2", "--set", "rl.kl_controller=adaptive"]),
    (["grpo"], ["--set", "rl.clip_eps_high=0.28", "--set", "rl.dual_clip=3", "--set", "rl.kl_estimator=k3_ratio"]),
    (["grpo", "--variant", "dr-grpo"], []),
], ids=["ppo", "reinforce", "reinforce++", "reinforce++-baseline", "rloo", "grpo", "dr-grpo"])
def test_each_command_runs_and_writes_its_outputs(command, extra, sft, tmp_path):
    out = tmp_path / "run"
    assert main([*command, "--config", TINY, "--sft", sft, "--reward-fn", "gold", "--out", str(out), *FAST,
                 *extra]) == 0
    for name in ("metrics.jsonl", "metrics.json", "config.yaml", "run.json", "model/config.json",
                 "model/model.safetensors"):
        assert (out / name).is_file(), name
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert TRL_NAMES <= set(rows[-1])
    for r in rows[1:]:  # the sampler's log-probs are the trainer's to float precision (measured <= 1e-6)
        assert MISMATCH <= set(r)
        assert r["rollout/logprob_diff_max"] < 1e-4 and r["rollout/first_ratio_mean"] == pytest.approx(1, abs=1e-4)
    assert rows[1]["objective/kl"] == pytest.approx(0, abs=1e-4)  # step 1: the policy is the reference
    assert {"gold/mean", "eval/proxy_mean"} <= set(rows[0]) and "gold/mean" in rows[-1]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 2 and summary["gold/initial"] == rows[0]["gold/mean"]
    assert (out / "value.safetensors").is_file() == (command == ["ppo"])
    if command == ["ppo"]:
        assert "val/explained_var" in rows[-1]
    if "rl.entropy_coef=0.01" in extra:
        assert "policy/entropy" in rows[-1]
    if "rl.dual_clip=3" in extra:
        assert "policy/dual_clipfrac" in rows[-1] and "loss/kl" in rows[-1]
    else:
        assert "policy/dual_clipfrac" not in rows[-1]
    if "rl.kl_controller=linear" in extra:  # beta 0.05 -> 0.005 over 2 steps: 0.05, then 0.0275
        assert [r["kl/beta"] for r in rows[1:]] == pytest.approx([0.05, 0.0275])


def test_ppo_with_a_reward_model_end_to_end(sft, tmp_path, capsys):
    """`rlhflab rm` (4 steps on a tiny policy), then `rlhflab ppo --rm` with the critic
    initialised from the reward model: the proxy is the RM (normalized), not the gold."""
    rm = tmp_path / "rm"
    assert main(["rm", "--config", TINY, "--sft", sft, "--out", str(rm), "--set", "rm.max_steps=4",
                 "--set", "rm.batch_size=8", "--set", "rm.n_prompts=24", "--set", "rm.n_eval_prompts=8",
                 "--set", "rm.n_reference=16"]) == 0
    out = tmp_path / "ppo"
    assert main(["ppo", "--config", TINY, "--sft", sft, "--rm", str(rm), "--out", str(out), *FAST,
                 "--set", "rl.value_init=rm"]) == 0
    rows = _rows(out / "metrics.jsonl")
    assert rows[0]["eval/proxy_mean"] != pytest.approx(rows[0]["gold/mean"])
    assert json.loads((out / "run.json").read_text())["rm"].endswith("rm")
    # The critic started from the RM: its head is not the zero-initialised one.
    value = load_file(str(out / "value.safetensors"))
    assert value["head.weight"].abs().sum() > 0
    assert "[ppo] 2 steps" in capsys.readouterr().out


def test_early_stopping_restores_the_best_policy(sft, tmp_path):
    """Rewarding minus the gold utility at a high learning rate makes the held-out gold fall:
    with patience 1 the run stops at the first evaluation below the best (step 0, the
    initial policy) and restores it, so model/ holds the initial weights. Measured: gold
    -1.483 at step 0, -1.613 at step 4 (-1.775 at step 6 without early stopping); the run
    stops after step 4 of 8. (Evaluations sample with the same per-row seeds, so after two
    steps the samples, and the gold, are still those of step 0.)"""
    out = tmp_path / "es"
    assert main(["reinforce", "--config", TINY, "--sft", sft, "--reward-fn", "gold=-1", "--out", str(out),
                 "--set", "rl.steps=8", "--set", "rl.batch_size=16", "--set", "generation.max_new_tokens=12",
                 "--set", "rl.eval_every=4", "--set", "rl.n_eval=16", "--set", "rl.early_stop_patience=1",
                 "--set", "rl.lr=3e-2"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["early_stop/stopped"] and summary["early_stop/restored_best"]
    assert summary["steps"] == 4 and summary["gold/best_step"] == 0
    assert summary["evals"][1]["gold/mean"] < summary["evals"][0]["gold/mean"]
    initial = load_file(f"{sft}/model.safetensors")
    final = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(initial[k], final[k]) for k in initial)


def test_user_prompt_file(sft, tmp_path):
    """--prompts FILE (prompt JSONL): trains on those prompts; no world evaluation."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["what is 1 plus 2 ?", "how do i make tea ?", "tell me about dogs .", "compute 5 minus 3 ."]))
    out = tmp_path / "run"
    assert main(["grpo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--prompts", str(prompts),
                 "--out", str(out), *FAST, "--set", "rl.samples_per_prompt=4"]) == 0
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and not any("gold/mean" in r for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert main(["grpo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--prompts", str(bad),
                 "--out", str(tmp_path / "bad_run")]) == 2
    assert not (tmp_path / "bad_run").exists()


def test_nan_reward_stops_the_run_naming_the_prompt(sft, tmp_path, capsys):
    fn = tmp_path / "bad_reward.py"
    fn.write_text("def r(prompts, completions):\n    return [float('nan')] * len(prompts)\n")
    rc = main(["rloo", "--config", TINY, "--sft", sft, "--reward-fn", f"{fn}:r", "--out", str(tmp_path / "o"),
               *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "reward nan" in err[0] and "for prompt '" in err[0]
    assert not (tmp_path / "o" / "model").exists()


@pytest.mark.parametrize("args, message", [
    (["--reward-fn", "gold"], "--sft is required"),
    (["--sft", "/nonexistent/sft", "--reward-fn", "gold"], "/nonexistent/sft"),
    (["--sft", "SFT"], "no reward source"),
    (["--sft", "SFT", "--reward-fn", "gold", "--set", "rl.kl_in=both"], "rl.kl_in"),
    (["--sft", "SFT", "--reward-fn", "gold", "--set", "rl.batch_size=6", "--set", "rl.samples_per_prompt=4"],
     "rl.batch_size"),
    (["--sft", "SFT", "--reward-fn", "gold", "--set", "rl.num_minibatches=3"], "rl.num_minibatches"),
    (["--sft", "SFT", "--rm", "/nonexistent/rm"], "/nonexistent/rm"),
    (["--sft", "SFT", "--reward-fn", "gold", "--set", "rl.scale_std=false"], "ppo has no group std"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, message, sft, tmp_path, capsys):
    out = tmp_path / "out"
    args = [sft if a == "SFT" else a for a in args]
    rc = main(["ppo", "--config", TINY, "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_resume_needs_a_checkpoint_and_out_must_be_empty(sft, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["rloo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--out", str(out), *FAST]) == 0
    assert main(["rloo", "--resume", str(out)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["rloo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--out", str(out), *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["grpo", "--resume", str(out)]) == 2
    assert "rloo run" in capsys.readouterr().err


def _perturbed_sampler(monkeypatch, shift: float):
    """The engine's recorded log-probs moved by ``shift`` nats: a sampler that disagrees with
    the trainer, as a broken KV cache or a sampler in another precision would."""
    import dataclasses

    import rlhflab.rollout as rollout

    original = rollout.generate

    def generate(*args, **kwargs):
        g = original(*args, **kwargs)
        return dataclasses.replace(g, logprobs=g.logprobs + shift * g.response_mask)

    monkeypatch.setattr(rollout, "generate", generate)


def test_a_sampler_that_disagrees_with_the_trainer_stops_the_run(sft, tmp_path, monkeypatch, capsys):
    """0.01 nats on every token (10 x rl.mismatch_tolerance): the run stops at step 1 with one
    line naming the readings and the setting, exit code 1, no model written."""
    _perturbed_sampler(monkeypatch, 0.01)
    out = tmp_path / "run"
    assert main(["grpo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error:" in line]) == 1
    line = next(line for line in err if "error:" in line)
    assert "step 1" in line and "rl.mismatch_tolerance" in line and "0.01" in line
    assert not (out / "model").exists()


def test_tis_trains_through_a_sampler_mismatch_and_logs_its_weights(sft, tmp_path, monkeypatch):
    """With rl.tis_cap the trainer scores the samples itself: the guard stands down, the old
    log-probs are the trainer's (first-update ratio 1) and the weights exp(-0.05) ~ 0.951 are
    logged."""
    _perturbed_sampler(monkeypatch, 0.05)
    out = tmp_path / "run"
    assert main(["grpo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--out", str(out), *FAST,
                 "--set", "rl.tis_cap=2"]) == 0
    for r in _rows(out / "metrics.jsonl")[1:]:
        assert r["rollout/logprob_diff_mean"] == pytest.approx(0.05, abs=1e-4)
        assert r["rollout/first_ratio_mean"] == pytest.approx(1, abs=1e-4)
        assert r["rollout/tis_weight_mean"] == pytest.approx(float(torch.exp(torch.tensor(-0.05))), abs=1e-4)
        assert r["rollout/tis_clipfrac"] == 0
