"""No verdict without evidence; readings from a training run's files and from other trainers'
logs (TRL, OpenRLHF); the over-optimization reading says when its peak is an extrapolation."""

import json
import math

import pytest

from rlhflab.cli import main
from rlhflab.diagnose import diagnose, load_readings
from rlhflab.instruments.training_logs import detect_schema, readings_of, to_training_names
from tests.unit.test_diagnose import HEALTHY


def _judged(readings: dict) -> dict:
    """HEALTHY as `rlhflab eval --prompts F --judge rm:DIR` reads it: no gold, a judge's win-rate."""
    out = {k: v for k, v in readings.items() if not k.startswith(("gold/", "base/gold/", "win_rate/gold"))}
    out.update({k.replace("win_rate/gold", "win_rate/judge"): v for k, v in readings.items()
                if k.startswith("win_rate/gold")})
    return out


def _names(result) -> list[str]:
    return [f["name"] for f in result["findings"]]


def test_no_judge_is_not_enough_evidence_and_says_how_to_measure():
    """The first reading of a user's run: KL 0.48 nats, no judge measured."""
    r = diagnose({"kl/sequence_mean": 0.48, "win_rate/gold": float("nan"), "length/mean": 9.0,
                  "base/length/mean": 8.5})
    assert r["verdict"] == "not enough evidence" and "healthy" not in _names(r)
    finding = next(f for f in r["findings"] if f["name"] == "not_enough_evidence")
    assert "win-rate" in finding["evidence"] and "KL 0.48 nats" in finding["evidence"]
    assert "rlhflab eval --policy DIR --base DIR" in finding["fix"] and "--prompts F --judge rm:DIR" in finding["fix"]
    how = r["to_measure"]
    assert any("win-rate" in k for k in how) and "--judge rm:DIR" in how["judge_regression"]
    assert "--harmful" in how["safety_regression"] and "--mc" in how["capability_regression"]


@pytest.mark.parametrize("drop", ["kl/sequence_mean", "length/mean", "win_rate/gold_ci_low"])
def test_each_reading_of_the_evidence_is_needed_for_healthy(drop):
    r = diagnose({k: v for k, v in HEALTHY.items() if k != drop})
    assert r["verdict"] == "not enough evidence"
    assert diagnose({**HEALTHY, drop: float("nan")})["verdict"] == "not enough evidence"


def test_a_hazard_seen_wins_over_missing_evidence():
    assert diagnose({"kl/sequence_mean": 20.0})["verdict"] == "needs attention"
    assert diagnose({"gold/mean": -1.0, "base/gold/mean": 0.2})["verdict"] == "regression"
    assert diagnose({"refusal/benign_rate": 0.5, "base/refusal/benign_rate": 0.1})["verdict"] == "reward hacking"
    caution = diagnose({"kl/sequence_mean": 10.0})  # a warn finding only: not enough for any verdict
    assert caution["verdict"] == "not enough evidence" and "kl_caution" in _names(caution)
    # A measured lack of improvement is evidence too.
    flat = {"win_rate/judge": 0.5, "win_rate/judge_ci_low": 0.42, "win_rate/judge_ci_high": 0.58}
    assert diagnose(flat)["verdict"] == "no improvement"


def test_the_judges_win_rate_stands_where_gold_is_absent():
    judged = _judged(HEALTHY)
    r = diagnose(judged)
    assert r["verdict"] == "healthy" and "judge win-rate 0.62" in r["findings"][0]["evidence"]
    worse = {**judged, "win_rate/judge": 0.3, "win_rate/judge_ci_low": 0.24, "win_rate/judge_ci_high": 0.37}
    r = diagnose(worse)
    assert r["verdict"] == "regression" and "judge win-rate against base 0.30" in r["findings"][0]["evidence"]
    # Longer answers whose edge vanishes at equal length: length hacking, read from the judge.
    hacked = {**judged, "length/mean": 12.0, "win_rate/judge_length_controlled": 0.45}
    assert "length_hacking" in _names(diagnose(hacked))
    # A reward model's win-rate counts when no other judge was asked.
    rm_only = {k.replace("win_rate/judge", "win_rate/rm"): v for k, v in judged.items()}
    assert diagnose(rm_only)["verdict"] == "healthy"


def test_gold_is_preferred_to_the_other_judges():
    both = {**HEALTHY, "win_rate/judge": 0.2, "win_rate/judge_ci_low": 0.1, "win_rate/judge_ci_high": 0.3}
    r = diagnose(both)
    assert r["verdict"] == "healthy" and "gold win-rate" in r["findings"][0]["evidence"]


# ------------------------------------------------------------------ a run's own files

def _summary(**changes) -> dict:
    """metrics.json as OnlineRun.finish writes it (algos/online.py), here for a run on user
    prompts: no gold evaluation, so the gold entries are null."""
    return {"algo": "ppo", "steps": 2, "processes": 1, "objective/kl": 0.48, "objective/scores": 0.3,
            "objective/entropy": 10.2, "rollout/length_mean": 8.0, "rollout/eos_rate": 0.9, "kl/beta": 0.05,
            "kl/status": 0.0, "gold/initial": None, "gold/final": None, "gold/best": None, "gold/best_step": None,
            "eval/proxy_initial": None, "eval/proxy_final": None, "early_stop/stopped": False,
            "early_stop/restored_best": False, "kl/status_steps": {"ok": 2, "caution": 0, "warning": 0},
            "evals": [], "time/rollout": 1.0, "time/update": 1.0, "time/rollout_share": None, **changes}


def test_rlhflabs_own_metrics_json_is_read(tmp_path, capsys):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(_summary()))
    assert main(["diagnose", "--metrics", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("verdict: not enough evidence\n") and "KL 0.48 nats" in out
    assert f"readings: {path} (rlhflab names, detected from its keys)" in out
    readings, source = load_readings(None, str(path))
    assert readings["kl/sequence_mean"] == 0.48 and "gold/mean" not in readings and source["schema"] == "rlhflab"


def test_a_run_directory_reads_its_summary_and_its_curve(tmp_path, capsys):
    """A world run with gold evaluations at steps 0, 2 and 4: the base's gold from step 0, the
    policy's from the last, and the curve's over-optimization readings."""
    run = tmp_path / "ppo"
    run.mkdir()
    rows = [{"step": 0, "gold/mean": 0.2, "eval/proxy_mean": 0.0},
            {"step": 1, "objective/kl": 0.5, "objective/scores": 0.2},
            {"step": 2, "objective/kl": 1.0, "objective/scores": 0.5, "gold/mean": 0.6, "eval/proxy_mean": 0.5},
            {"step": 4, "objective/kl": 4.0, "objective/scores": 1.5, "gold/mean": -0.3, "eval/proxy_mean": 1.6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{"step": 0, "gold/mean": 0.2, "eval/proxy_mean": 0.0}, {"step": 2, "gold/mean": 0.6, "eval/proxy_mean": 0.5},
             {"step": 4, "gold/mean": -0.3, "eval/proxy_mean": 1.6}]
    (run / "metrics.json").write_text(json.dumps(_summary(**{
        "objective/kl": 4.0, "gold/initial": 0.2, "gold/final": -0.3, "gold/best": 0.6, "gold/best_step": 2,
        "eval/proxy_initial": 0.0, "eval/proxy_final": 1.6, "evals": evals})))
    readings, source = load_readings(str(run), None)
    assert source["file"] == str(run / "metrics.json")
    assert readings["base/gold/mean"] == 0.2 and readings["gold/mean"] == -0.3
    assert readings["base/rm/score_mean"] == 0.0 and readings["rm/score_mean"] == 1.6
    assert readings["overopt/gold_drop_from_peak"] == pytest.approx(0.9)
    assert readings["overopt/fit_peak_in_range"] in (0.0, 1.0)
    assert main(["diagnose", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"judge_regression", "over_optimization"} <= set(_names(result))
    assert result["verdict"] == "regression (reward hacking)"
    # Early stopping restored the best evaluation's policy: its readings are the best's.
    (run / "metrics.jsonl").unlink()
    (run / "metrics.json").write_text(json.dumps(_summary(**{
        "gold/initial": 0.2, "gold/final": -0.3, "gold/best": 0.6, "gold/best_step": 2, "eval/proxy_initial": 0.0,
        "eval/proxy_final": 1.6, "evals": evals, "early_stop/stopped": True, "early_stop/restored_best": True})))
    readings, _ = load_readings(str(run), None)
    assert readings["gold/mean"] == 0.6 and readings["rm/score_mean"] == 0.5


def test_a_run_directory_prefers_eval_json_and_names_itself_when_empty(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["diagnose", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "eval.json" in err and "metrics.jsonl" in err and len(err.strip().splitlines()) == 1
    (run / "metrics.json").write_text(json.dumps(_summary()))
    (run / "eval.json").write_text(json.dumps(HEALTHY))
    readings, source = load_readings(str(run), None)
    assert source["file"] == str(run / "eval.json") and readings == HEALTHY


def test_nested_entries_are_ignored_and_null_is_not_measured(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**HEALTHY, "kl/status_steps": {"ok": 3}, "evals": [{"step": 0}],
                                "capability/accuracy": None}))
    readings, _ = load_readings(None, str(path))
    assert "kl/status_steps" not in readings and "evals" not in readings and "capability/accuracy" not in readings
    assert "capability_regression" in diagnose(readings)["not_measured"]


# ------------------------------------------------------------------ other trainers' logs

# TRL GRPO's log_history rows (trl/trainer/grpo_trainer.py): a per-token KL, the mean
# completion length in tokens, the summed reward; the last row is the Trainer's summary.
TRL_GRPO = {"log_history": [
    {"step": 10, "epoch": 0.1, "loss": 0.01, "reward": 0.2, "reward_std": 0.3, "frac_reward_zero_std": 0.1,
     "kl": 0.01, "completions/mean_length": 40.0, "num_tokens": 1000.0, "clip_ratio/region_mean": 0.0},
    {"step": 20, "epoch": 0.2, "loss": 0.02, "reward": 0.6, "reward_std": 0.2, "frac_reward_zero_std": 0.2,
     "kl": 0.05, "completions/mean_length": 60.0, "num_tokens": 2000.0, "clip_ratio/region_mean": 0.0,
     "sampling/sampling_logp_difference/max": 0.4},
    {"step": 20, "train_runtime": 100.0, "train_loss": 0.015},
]}
# TRL PPO's rows (trl/experimental/ppo/ppo_trainer.py): the KL summed per response.
TRL_PPO = [{"episode": 64, "eps": 3, "objective/kl": 2.5, "objective/entropy": 30.0, "objective/scores": 1.2,
            "objective/rlhf_reward": 1.0, "policy/approxkl_avg": 0.01, "val/ratio": 1.0, "lr": 1e-6},
           {"episode": 128, "eps": 3, "objective/kl": 9.5, "objective/entropy": 25.0, "objective/scores": 2.2,
            "objective/rlhf_reward": 1.7, "policy/approxkl_avg": 0.01, "val/ratio": 1.0, "lr": 1e-6}]
# OpenRLHF's status as its W&B logger writes it (openrlhf/trainer/ppo_trainer.py, utils/logging_utils.py).
OPENRLHF = [{"train/global_step": 1, "train/kl": 0.02, "train/reward": 0.1, "train/response_length": 100.0,
             "train/policy_loss": 0.1, "train/rollout/reward_mean": 0.1, "train/rollout/response_length_mean": 100.0,
             "train/ppo_clip_ratio": 0.0, "train/return": 0.1},
            {"train/global_step": 2, "train/kl": 0.2, "train/reward": 0.5, "train/response_length": 90.0,
             "train/policy_loss": 0.1, "train/rollout/reward_mean": 0.5, "train/rollout/response_length_mean": 90.0,
             "train/ppo_clip_ratio": 0.1, "train/return": 0.4}]


@pytest.mark.parametrize("data,schema,kl", [
    (TRL_GRPO, "trl", 0.05 * 60.0), (TRL_PPO, "trl", 9.5), (OPENRLHF, "openrlhf", 0.2 * 90.0),
], ids=["trl-grpo", "trl-ppo", "openrlhf"])
def test_other_trainers_logs_are_detected_and_mapped(data, schema, kl, tmp_path, capsys):
    path = tmp_path / "log.json"
    path.write_text(json.dumps(data))
    readings, source = load_readings(None, str(path))
    assert source == {"file": str(path), "schema": schema, "how": "detected from its keys"}
    assert readings["kl/sequence_mean"] == pytest.approx(kl)
    assert main(["diagnose", "--metrics", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"({schema} names, detected from its keys)" in out and "healthy" not in out.splitlines()[0]
    # The same rows as JSONL, with the schema given.
    rows = data["log_history"] if isinstance(data, dict) else data
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    readings, source = load_readings(None, str(jsonl), schema)
    assert source["how"] == "as given" and readings["kl/sequence_mean"] == pytest.approx(kl)


def test_trl_held_out_rows_win_and_the_sampler_gap_is_read():
    rows = to_training_names([*TRL_GRPO["log_history"], {"step": 20, "eval_kl": 0.02,
                                                          "eval_completions/mean_length": 50.0}], "trl")
    r = readings_of(rows)
    assert r["kl/sequence_mean"] == pytest.approx(1.0) and r["rollout/logprob_diff_max"] == 0.4
    assert detect_schema([{"objective/kl": 1.0}]) == "rlhflab"  # shared names: rlhflab's reading


def test_a_training_log_of_a_high_kl_run_is_named():
    rows = to_training_names(TRL_PPO, "trl")
    assert diagnose(readings_of(rows))["verdict"] == "not enough evidence"  # KL 9.5: caution, no judge
    hot = [{**TRL_PPO[-1], "objective/kl": 30.0}]
    r = diagnose(readings_of(to_training_names(hot, "trl")))
    assert r["verdict"] == "needs attention" and "kl_high" in _names(r)


def test_a_log_with_none_of_the_schemas_names_is_refused(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"loss": 1.0, "step": 1}\n{"loss": 0.5, "step": 2}\n')
    assert main(["diagnose", "--metrics", str(path), "--schema", "trl"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"{path}: no readings a rule reads: this is a TRL log, which holds loss; the rules need " in err
    path.write_text('{"loss": 1.0}\n[1]\n')
    assert main(["diagnose", "--metrics", str(path)]) == 2
    assert f"{path}:2" in capsys.readouterr().err


# ------------------------------------------------------------------ over-optimization, supported

def test_an_extrapolated_peak_is_reported_as_none_within_the_measured_kl():
    from rlhflab.instruments.overoptimization import curve_readings
    from rlhflab.report.build import overoptimization_note, section_overoptimization

    kl = [0.05 * i for i in range(1, 12)]  # never past 1 nat
    d = [math.sqrt(k) for k in kl]
    gold = [x * (3 - 0.1 * math.log(x)) for x in d]  # still rising: d* = e^29
    fit = curve_readings(kl, gold, [2 * g for g in gold])
    assert fit["overopt/fit_peak_in_range"] == 0.0 and fit["overopt/fit_d_max"] == pytest.approx(d[-1])
    note = overoptimization_note("grpo", fit, max(kl))
    assert note.startswith("grpo: no peak within the measured KL (measured up to 0.55 nats")
    assert "fitted gold peak" not in note and "e+" not in note
    # Readings written before peak_in_range existed: the same from the measured range.
    old = {k: v for k, v in fit.items() if k not in ("overopt/fit_peak_in_range", "overopt/fit_d_max")}
    assert "no peak within the measured KL" in overoptimization_note("grpo", old, max(kl))
    # A peak the data show is reported as fitted.
    kl2 = [(0.2 * i) ** 2 for i in range(1, 30)]
    gold2 = [math.sqrt(k) * (1 - 0.5 * math.log(math.sqrt(k))) for k in kl2]
    within = curve_readings(kl2, gold2, [0.1 * i for i in range(29)])
    assert within["overopt/fit_peak_in_range"] == 1.0  # d* near e (KL 7.4) inside d up to 5.8
    note = overoptimization_note("ppo", within, max(kl2))
    assert note.startswith(f"ppo: fitted gold peak at KL = {within['overopt/fit_kl_peak']:.2f} nats (R^2")
    # The plot: points against sqrt(KL), a zigzag in time order drawn as dots, not a polyline through them.
    rows = [{"step": s, "objective/kl": k, "gold/mean": g, "objective/scores": 2 * g}
            for s, (k, g) in enumerate(zip([0.3, 0.1, 0.5, 0.2, 0.55], [0.5, 0.2, 0.9, 0.4, 1.0]))]
    html = section_overoptimization({"grpo": rows}, {"grpo": fit})
    assert html.count("<circle") >= 2 * len(rows) and "no peak within the measured KL" in html
    polylines = html.count("<polyline")
    assert polylines == 1  # the fitted curve only, drawn within the measured d


def test_every_rule_says_how_to_measure_its_readings():
    from rlhflab.diagnose import RULE_MEASURES, RULES

    assert set(RULE_MEASURES) == {r.name for r in RULES}
    assert all(how.strip() for how in RULE_MEASURES.values())
