"""Diagnosis of what rlhflab and other trainers write: counts beside rates in eval.json, TRL's
DPO and GRPO logs (tests/fixtures/trl/, made the way TRL writes trainer_state.json), an
rlhflab run's held-out judge, a directory of runs; and verdicts that state their reason and
never contradict the rules listed as not measured."""

import json
import re

import pytest

from rlhflab.cli import main
from rlhflab.diagnose import REGRESSION, diagnose, format_findings, load_readings, reading_domain
from rlhflab.errors import InputError
from tests.conftest import ROOT
from tests.unit.test_diagnose import HEALTHY

TRL = ROOT / "tests" / "fixtures" / "trl"


def _names(result) -> list[str]:
    return [f["name"] for f in result["findings"]]


def _finding(result, name) -> dict:
    return next(f for f in result["findings"] if f["name"] == name)


# ------------------------------------------------------------------ counts beside rates

def test_counts_beside_win_rates_are_counts_and_rates_stay_rates(tmp_path):
    """`rlhflab eval --judge` writes win_rate/judge_n (pairs judged), the DPO run's summary
    win_rate/gold_n and win_rate/gold_ties: counts, not rates."""
    for key in ("win_rate/judge_n", "win_rate/rm_n", "win_rate/gold_n", "win_rate/gold_ties", "judge/unreadable",
                "shift/n", "base/capability/n"):
        assert reading_domain(key) == "non_negative", key
    for key in ("win_rate/judge", "win_rate/judge_ci_low", "win_rate/judge_length_controlled",
                "judge/unreadable_rate", "rewards/accuracies"):
        assert reading_domain(key) == "rate", key
    path = tmp_path / "eval.json"
    judged = {k.replace("win_rate/gold", "win_rate/judge"): v for k, v in HEALTHY.items()}
    path.write_text(json.dumps({**judged, "win_rate/judge_n": 25, "win_rate/gold_ties": 27, "judge/unreadable": 0}))
    readings, _ = load_readings(str(tmp_path), None)
    assert readings["win_rate/judge_n"] == 25 and diagnose(readings)["verdict"] == "healthy"
    for bad, why in (({"win_rate/judge_n": -1}, "must be >= 0"), ({"win_rate/judge": 1.2}, "a rate must lie in [0, 1]")):
        path.write_text(json.dumps({**judged, **bad}))
        with pytest.raises(InputError, match=re.escape(why)):
            load_readings(str(tmp_path), None)
    # The API checks a readings dict as a file's readings are checked.
    from rlhflab import api

    assert api.diagnose({**judged, "win_rate/judge_n": 25})["verdict"] == "healthy"
    with pytest.raises(InputError, match=re.escape("field 'win_rate/judge': a rate must lie in [0, 1], got 25")):
        api.diagnose({**judged, "win_rate/judge": 25})


# ------------------------------------------------------------------ TRL's DPO

def test_a_trl_dpo_log_with_both_log_probs_falling_is_named_likelihood_displacement(capsys):
    """TRL's DPOTrainer log (0.x fields): logps/chosen -182.4 -> -262.1 and logps/rejected
    -195.0 -> -322.7 from step 10 to 60 while the margin grows 0.01 -> 4.81."""
    run = TRL / "dpo_displacement"
    readings, source = load_readings(str(run), None)
    assert source["schema"] == "trl" and source["file"] == str(run / "trainer_state.json")
    result = diagnose(readings)
    found = _finding(result, "likelihood_displacement")
    assert found["severity"] == "warn" and "Razin" in found["root_cause"] and "DPOP" in found["fix"]
    assert found["evidence"] == (
        "logps/chosen -182.4 -> -262.1 and logps/rejected -195.0 -> -322.7 (training batches, first logged row "
        "(step 10) -> last (step 60)); rewards/margins 0.01 -> 4.81; rewards/accuracies 52% -> 94%; "
        "rewards/chosen -8.11: the chosen responses are less likely than under the reference")
    # No judge, no KL: the verdict still says what is missing.
    assert result["verdict"] == "not enough evidence"
    assert "win-rate" in _finding(result, "not_enough_evidence")["evidence"]
    assert main(["diagnose", str(run)]) == 0
    assert "likelihood_displacement" in capsys.readouterr().out


def test_a_healthy_trl_dpo_log_gets_no_displacement_finding():
    """TRL 1.x fields, with evaluation rows: the held-out chosen log-prob rises (-183.0 ->
    -181.9); the rule is measured, from the held-out rows, and quiet."""
    readings, source = load_readings(str(TRL / "dpo_healthy"), None)
    assert source["schema"] == "trl" and readings["curve/dpo_held_out"] == 1.0
    assert (readings["base/logps/chosen"], readings["logps/chosen"]) == (-183.0, -181.9)
    result = diagnose(readings)
    assert "likelihood_displacement" not in _names(result) + result["not_measured"]
    # Its training rows alone (no evaluation rows): the chosen log-prob rises too.
    rows = json.loads((TRL / "dpo_healthy" / "trainer_state.json").read_text())["log_history"]
    train = [r for r in rows if not any(k.startswith("eval_") for k in r)]
    assert "likelihood_displacement" not in _names(_diagnose_rows(train))


def _diagnose_rows(rows, tmp=None) -> dict:
    from rlhflab.instruments.training_logs import detect_schema, readings_of, to_training_names

    return diagnose(readings_of(to_training_names(rows, detect_schema(rows))))


def test_log_probs_that_fall_with_the_chosen_still_above_the_reference_are_not_displacement():
    """Summed log-probs of different batches move with the batches' lengths: a fall with the
    chosen responses' implicit reward still above 0 (more likely than under the reference) is
    not displacement; the same fall with it below 0 is."""
    rows = json.loads((TRL / "dpo_displacement" / "trainer_state.json").read_text())["log_history"]
    assert "likelihood_displacement" in _names(_diagnose_rows(rows))
    above = [{**r, "rewards/chosen": 0.3} if "rewards/chosen" in r else r for r in rows]
    assert "likelihood_displacement" not in _names(_diagnose_rows(above))
    small = [{**r, "logps/chosen": -182.9} if "logps/chosen" in r else r for r in rows]  # 0.5 nats: under the bar
    assert "likelihood_displacement" not in _names(_diagnose_rows(small))


def test_a_log_no_rule_reads_says_what_it_is_and_what_the_rules_need(tmp_path, capsys):
    """A TRL SFT log is not a broken file: the error says what it holds and what is needed."""
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": [
        {"epoch": 0.5, "grad_norm": 1.2, "learning_rate": 2e-5, "loss": 1.9, "mean_token_accuracy": 0.61,
         "num_tokens": 40960.0, "entropy": 1.7, "step": 10},
        {"epoch": 1.0, "step": 20, "total_flos": 0.0, "train_loss": 1.8, "train_runtime": 60.0,
         "train_samples_per_second": 5.0, "train_steps_per_second": 0.3}]}))
    assert main(["diagnose", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{path}: no readings a rule reads: this is a TRL SFT log, which holds epoch, grad_norm, " in err
    assert "the rules need a judge's win-rate against the base" in err and "logps/chosen" in err


# ------------------------------------------------------------------ TRL's GRPO: length and truncation

def test_a_trl_grpo_log_whose_completions_grow_and_are_cut_gets_its_findings():
    """TRL's GRPO at its default beta = 0 logs no KL; completions/mean_length 120 -> 520 and
    completions/clipped_ratio 0 -> 0.40, first logged row (step 20) -> last (step 200)."""
    readings, source = load_readings(str(TRL / "grpo_length"), None)
    assert source["schema"] == "trl" and "kl/sequence_mean" not in readings
    result = diagnose(readings)
    growth, cut = _finding(result, "length_growth"), _finding(result, "truncation")
    assert growth["severity"] == cut["severity"] == "warn"
    assert growth["evidence"].startswith("mean length 120.0 -> 520.0 tokens (x4.33), first logged row (step 20) "
                                         "-> last (step 200); no quality reading")
    assert "length-controlled win-rate" in growth["fix"]
    assert cut["evidence"] == "0% -> 40% of completions cut at the maximum length, first logged row (step 20) -> " \
                              "last (step 200)"
    # Length growth is not called length hacking without a quality reading: not enough evidence.
    assert result["verdict"] == "not enough evidence" and "length_hacking" in result["not_measured"]
    missing = _finding(result, "not_enough_evidence")["evidence"]
    assert "win-rate" in missing and "KL" in missing and "length" not in missing.partition("(")[0].split("KL")[1]
    # With a judge's length-controlled win-rate the length_hacking rule decides: growth is quiet.
    judged = {**readings, "win_rate/judge": 0.7, "win_rate/judge_ci_low": 0.6, "win_rate/judge_ci_high": 0.8,
              "win_rate/judge_length_controlled": 0.45}
    names = _names(diagnose(judged))
    assert "length_hacking" in names and "length_growth" not in names


def test_truncation_needs_a_rise_over_the_first_row():
    base = {"length/truncated_rate": 0.4, "rollout/length_mean": 100.0}
    assert "truncation" in _names(diagnose(base))  # no first row: 40% is many
    assert "truncation" not in _names(diagnose({**base, "base/length/truncated_rate": 0.35}))
    assert "truncation" not in diagnose(HEALTHY)["not_measured"]  # an eval's readings: not about rollouts


# ------------------------------------------------------------------ rlhflab's own run, its held-out judge

def test_an_rlhflab_runs_held_out_win_rate_is_the_judges(tmp_path):
    """A run with --eval-prompts and --judge: eval/win_rate (with its interval) is win_rate/judge,
    eval/kl the KL; with the best policy restored, the best evaluation's, with that row's interval."""
    run = tmp_path / "grpo"
    run.mkdir()
    rows = [{"step": 0, "eval/proxy_mean": 0.1, "eval/kl": 0.0, "eval/win_rate": 0.5, "eval/win_rate_ci_low": 0.3,
             "eval/win_rate_ci_high": 0.7},
            {"step": 1, "objective/kl": 0.2, "rollout/length_mean": 8.0, "rollout/eos_rate": 0.9},
            {"step": 2, "objective/kl": 0.6, "rollout/length_mean": 9.0, "rollout/eos_rate": 0.8, "eval/kl": 0.5,
             "eval/proxy_mean": 0.4, "eval/win_rate": 0.8, "eval/win_rate_ci_low": 0.62, "eval/win_rate_ci_high": 0.9},
            {"step": 4, "objective/kl": 1.6, "rollout/length_mean": 9.5, "rollout/eos_rate": 0.8, "eval/kl": 1.5,
             "eval/proxy_mean": 0.5, "eval/win_rate": 0.6, "eval/win_rate_ci_low": 0.4, "eval/win_rate_ci_high": 0.77}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{k: r[k] for k in ("step", "eval/proxy_mean", "eval/kl", "eval/win_rate")} for r in rows if "eval/kl" in r]
    summary = {"algo": "grpo", "objective/kl": 1.6, "rollout/length_mean": 9.5, "rollout/eos_rate": 0.8,
               "gold/initial": None, "eval/selected_on": "eval/win_rate", "eval/best": 0.8, "eval/best_step": 2,
               "eval/win_rate_final": 0.6, "early_stop/restored_best": False, "evals": evals}
    (run / "metrics.json").write_text(json.dumps(summary))
    readings, _ = load_readings(str(run), None)
    assert (readings["win_rate/judge"], readings["win_rate/judge_ci_low"], readings["win_rate/judge_ci_high"]) == \
        (0.6, 0.4, 0.77)
    assert readings["kl/sequence_mean"] == 1.5  # held out, as rlhflab eval samples it
    assert (readings["base/length/mean"], readings["length/mean"]) == (8.0, 9.5)
    assert readings["length/truncated_rate"] == pytest.approx(0.2)  # 1 - the EOS rate
    result = diagnose(readings)
    assert result["verdict"] == "no improvement" and "judge win-rate 0.60 (CI 0.40-0.77)" in \
        _finding(result, "no_improvement")["evidence"]
    (run / "metrics.json").write_text(json.dumps({**summary, "early_stop/restored_best": True}))
    readings, _ = load_readings(str(run), None)
    assert (readings["win_rate/judge"], readings["win_rate/judge_ci_low"], readings["win_rate/judge_ci_high"]) == \
        (0.8, 0.62, 0.9)
    assert readings["kl/sequence_mean"] == 0.5 and diagnose(readings)["verdict"] == "healthy"


# ------------------------------------------------------------------ verdicts: a reason, no contradiction

@pytest.mark.parametrize("readings", [
    HEALTHY,
    {**HEALTHY, "win_rate/gold": 0.5, "win_rate/gold_ci_low": 0.4, "win_rate/gold_ci_high": 0.6},
    {k: v for k, v in HEALTHY.items() if not k.startswith("win_rate/")} | {"gold/mean": 0.82},
    {"refusal/harmful_rate": 0.2, "base/refusal/harmful_rate": 0.9, "kl/sequence_mean": 1.0},
    {"length/mean": 0.8, "base/length/mean": 9.0},
    {"kl/sequence_mean": 20.0},
    {"refusal/benign_rate": 0.5, "base/refusal/benign_rate": 0.1},
    {"kl/sequence_mean": 1.0},
], ids=["healthy", "flat-win-rate", "flat-gold", "safety-only", "degenerate-only", "kl-high", "hacking", "kl-only"])
def test_every_verdict_states_its_reason_and_none_contradicts_what_was_not_measured(readings):
    """A verdict of "regression" reached by a safety or degenerate-output finding, with the
    judge's rule unmeasured, once printed "verdict: regression" beside "not measured:
    regression"; the judge's rule is judge_regression now. Every verdict has a finding."""
    result = diagnose(readings)
    verdict = result["verdict"].partition(" (")[0]
    assert verdict not in result["not_measured"] and result["findings"]
    text = format_findings(result)
    measured_line = next((line for line in text.splitlines() if line.startswith("not measured: ")), "")
    assert verdict not in measured_line.removeprefix("not measured: ").split(", ")
    if result["verdict"].startswith("regression"):
        assert set(_names(result)) & set(REGRESSION)


def test_no_improvement_gives_its_reason_as_a_finding(tmp_path, capsys):
    flat = {**HEALTHY, "win_rate/gold": 0.52, "win_rate/gold_ci_low": 0.44, "win_rate/gold_ci_high": 0.6}
    result = diagnose(flat)
    assert result["verdict"] == "no improvement"
    assert _finding(result, "no_improvement")["evidence"] == \
        "gold win-rate 0.52 (CI 0.44-0.60): the interval does not lie above 0.5"
    no_win = {k: v for k, v in HEALTHY.items() if not k.startswith("win_rate/")} | {"gold/mean": 0.82}
    assert _finding(diagnose(no_win), "no_improvement")["evidence"] == \
        "gold 0.80 -> 0.82 (+0.02, less than the 0.05 that counts as a gain); no judge's win-rate measured"
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(flat))
    assert main(["diagnose", "--metrics", str(path), "--json"]) == 0
    assert "no_improvement" in _names(json.loads(capsys.readouterr().out))
    assert main(["diagnose", "--metrics", str(path)]) == 0
    assert "- [warn] no_improvement: not measurably better than its base" in capsys.readouterr().out


# ------------------------------------------------------------------ a directory of runs

def test_a_directory_of_runs_is_diagnosed_run_by_run(tmp_path, capsys):
    """A sweep's layout: ARM/ALGO (the training run) and ARM/eval/ALGO (its evaluation, which
    wins); an SFT log beside them is left out by name; a broken file is an error."""
    sweep = tmp_path / "sweep"
    for beta, win in (("0.1", 0.7), ("0.5", 0.5)):
        (sweep / f"ppo_beta{beta}" / "eval" / "ppo").mkdir(parents=True)
        (sweep / f"ppo_beta{beta}" / "ppo").mkdir()
        (sweep / f"ppo_beta{beta}" / "ppo" / "metrics.json").write_text(json.dumps({"objective/kl": 30.0}))
        (sweep / f"ppo_beta{beta}" / "eval" / "ppo" / "eval.json").write_text(json.dumps(
            {**HEALTHY, "win_rate/gold": win, "win_rate/gold_ci_low": win - 0.1, "win_rate/gold_ci_high": win + 0.1}))
    (sweep / "sft").mkdir()
    (sweep / "sft" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0, "train/tokens": 300}\n')
    assert main(["diagnose", str(sweep), "--json"]) == 0
    arms = json.loads(capsys.readouterr().out)
    assert {k: v["verdict"] for k, v in arms.items()} == {"ppo_beta0.1/ppo": "healthy",
                                                          "ppo_beta0.5/ppo": "no improvement"}
    assert arms["ppo_beta0.1/ppo"]["source"]["file"] == str(sweep / "ppo_beta0.1" / "eval" / "ppo" / "eval.json")
    assert main(["diagnose", str(sweep)]) == 0
    text = capsys.readouterr().out
    assert "== ppo_beta0.1/ppo ==\nverdict: healthy\n" in text
    assert text.rstrip().endswith("not diagnosed: sft (" + str(sweep / "sft" / "metrics.jsonl")
                                  + ": an rlhflab SFT log with no reading a rule reads)")
    (sweep / "ppo_beta0.5" / "eval" / "ppo" / "eval.json").write_text("{not json")
    assert main(["diagnose", str(sweep)]) == 2
    assert "eval.json: not valid JSON" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "sft").mkdir(parents=True)
    (empty / "sft" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    assert main(["diagnose", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no readings here" in err and "sft: " in err and len(err.strip().splitlines()) == 1
