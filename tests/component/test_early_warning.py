"""The online run's early warning (instruments/early_warning.py): its math by hand, each
reading computed and logged by a tiny run, the rule read back by diagnose; and each finding's
measured record (instruments/card.py) from a card file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhflab.errors import InputError
from rlhflab.instruments.card import NO_RECORD, load_records, record_line, with_records
from rlhflab.instruments.early_warning import (
    feature_readings,
    fit_reference,
    proxy_judge_readings,
    triggers,
)
from tests.conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "card" / "instrument_card.json"


def test_reference_outlier_rate_and_shift_by_hand():
    """Draw A = (+-1, 0), (0, +-2): mean 0, ML covariance diag(0.5, 2); shrink 0.2 adds
    lambda = 0.2 * 2.5 / 2 = 0.25, so P = diag(4/3, 4/9). Draw B's distances: (1.5, 0) ->
    sqrt(2.25 * 4/3) = sqrt(3); (0, 3) -> 2; (0, 0) -> 0; (3, 3) -> sqrt(12 + 4) = 4. Their
    0.99 quantile (linear between order statistics): position 0.99 * 3 = 2.97, so
    2 + 0.97 * (4 - 2) = 3.94. B's mean (1.125, 1.5) lies sqrt(1.265625 * 4/3 + 2.25 * 4/9) =
    sqrt(2.6875) from 0. Policy samples (4, 0) (distance sqrt(64/3) = 4.62 > 3.94) and (0, 0):
    outlier rate 1/2; their mean (2, 0) lies sqrt(16/3) = 2.309 away, ratio 2.309 / 1.639."""
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    b = torch.tensor([[1.5, 0.0], [0.0, 3.0], [0.0, 0.0], [3.0, 3.0]])
    ref = fit_reference(a, b, shrink=0.2)
    assert torch.allclose(ref["precision"], torch.diag(torch.tensor([4 / 3, 4 / 9], dtype=torch.float64)))
    assert float(ref["cut"]) == pytest.approx(3.94)
    assert float(ref["floor"]) == pytest.approx(math.sqrt(2.6875))
    out = feature_readings([torch.tensor([[4.0, 0.0], [0.0, 0.0]])], [ref])
    assert out["warn/outlier_rate"] == 0.5
    assert out["warn/feature_shift"] == pytest.approx(math.sqrt(16 / 3))
    assert out["warn/feature_shift_ratio"] == pytest.approx(math.sqrt(16 / 3) / math.sqrt(2.6875))
    assert out["warn/n"] == 2.0


def test_triggers_and_the_proxy_judge_reading():
    """The outlier bar at n = 200: 0.01 + 3 sqrt(0.01 * 0.99 / 200) = 0.0311. The proxy/judge
    reading compares the last evaluation with the best win-rate's: proxy 0.9 - 0.5, win-rate
    0.62 - 0.48, and the last interval's top 0.55 lies below 0.62."""
    outlier = {"outlier_rate": (3.0, "")}  # logged, not in the shipped rule: a bar passed in
    assert triggers({"warn/outlier_rate": 0.032, "warn/n": 200.0}, outlier) == ["outlier_rate"]
    assert triggers({"warn/outlier_rate": 0.030, "warn/n": 200.0}, outlier) == []
    assert triggers({"warn/outlier_rate": 0.5, "warn/n": 200.0}) == []
    # the shipped bars, from the instrument card: feature shift 1.91, exploit gain 0.57, KL acceleration 0.44
    assert triggers({"warn/feature_shift_ratio": 1.95, "warn/ensemble_ratio": 1.4}) == ["feature_shift_ratio"]
    assert triggers({"warn/feature_shift_ratio": 1.85, "warn/kl_acceleration": 0.45}) == ["kl_acceleration"]
    assert triggers({"warn/exploit_gain": 0.58, "warn/proxy_up_judge_down": 0.0}) == ["exploit_gain"]
    assert triggers({"warn/exploit_gain": 0.41, "warn/length_drift": 2.0, "warn/entropy_drop": 0.9}) == []
    evals = [{"eval/proxy_mean": 0.1, "eval/win_rate": 0.5, "eval/win_rate_ci_high": 0.6},
             {"eval/proxy_mean": 0.5, "eval/win_rate": 0.62, "eval/win_rate_ci_high": 0.7},
             {"eval/proxy_mean": 0.9, "eval/win_rate": 0.48, "eval/win_rate_ci_high": 0.55}]
    out = proxy_judge_readings(evals)
    assert out["warn/proxy_gain"] == pytest.approx(0.4) and out["warn/judge_drop"] == pytest.approx(0.14)
    assert out["warn/proxy_up_judge_down"] == 1.0
    evals[-1]["eval/win_rate_ci_high"] = 0.65  # the interval reaches the best: no flag
    assert proxy_judge_readings(evals)["warn/proxy_up_judge_down"] == 0.0
    assert proxy_judge_readings([{"eval/proxy_mean": 0.1}]) == {}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from rlhflab.reward_model import RewardModel, create_reward_model
    from tests.component.test_rl_rollout import tiny_policy_dir

    policy = tiny_policy_dir(tmp_path_factory.getbasetemp())
    members, tok = [], None
    for s in (0, 1):
        model, tok = create_reward_model(policy, seed=s)
        members.append(model)
    rm = tmp_path_factory.mktemp("warn_rm") / "model"
    RewardModel(members, tok, max_length=48).save(rm)
    return policy, rm


def _make_run(policy: Path, rm: Path, out: Path, overrides: list[str], held_out=None):
    from rlhflab.algos.online import OnlineRun
    from rlhflab.algos.rl_config import resolve_rl_config
    from rlhflab.config import load_config
    from rlhflab.distributed import make_accelerator
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.rewards import build_reward
    from rlhflab.world import World

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["rl.steps=4", "rl.eval_every=2", *overrides])
    cfg.rl = resolve_rl_config(cfg.rl, "grpo")
    tok = load_tokenizer(policy)
    world = World(cfg.world)
    out.mkdir(parents=True)
    run = OnlineRun(cfg, "grpo", make_accelerator(), load_causal_lm(policy, tok), load_causal_lm(policy, tok), tok,
                    build_reward(str(rm), []), [p.text for p in world.prompts(64, "rl")], out_dir=out,
                    world=None if held_out else world,
                    eval_prompts=None if held_out else world.prompts(cfg.rl.n_eval, "eval"), held_out=held_out)
    return run


def _run(policy: Path, rm: Path, out: Path, overrides: list[str], held_out=None):
    from rlhflab.algos.grpo import train_grpo

    summary = train_grpo(_make_run(policy, rm, out, overrides, held_out))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def test_a_world_run_logs_every_reading_and_diagnose_reads_the_warning(tiny_setup, tmp_path):
    """GRPO on the world with a 2-member reward model and the attack every 2 steps: the
    evaluations at steps 0, 2, 4 log the feature and ensemble readings, the attack's exploit
    gain joins the check at 2 and 4. The random reward model's first pattern gains 1.22 at the
    interval's low end at step 2 (measured; the bar is 0.4), so the rule fires there, and
    ``diagnose`` names it with the step."""
    from rlhflab.diagnose import diagnose, load_readings

    policy, rm = tiny_setup
    summary, rows = _run(policy, rm, tmp_path / "run", ["rl.attack_every=2"])
    evals = [r for r in rows if "warn/evals" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and [r["warn/evals"] for r in evals] == [1.0, 2.0, 3.0]
    for r in evals:
        assert 0.0 <= r["warn/outlier_rate"] <= 1.0 and r["warn/n"] == 16.0
        assert r["warn/feature_shift"] > 0 and r["warn/feature_shift_ratio"] > 0
        assert r["warn/ensemble_std"] > 0 and r["warn/ensemble_ratio"] > 0
    assert "warn/exploit_gain" not in evals[0] and evals[1]["warn/exploit_gain"] == evals[1]["rm_attack/top_gain_ci_low"]
    assert evals[1]["warn/fired"] == 2.0 and evals[1]["warn/fired_exploit_gain"] == 2.0
    assert "warn/fired" not in evals[2]  # the first step only
    # the curve's readings from the second window on (steps 3-4 against 1-2), logged as they are
    assert {"warn/entropy_drop", "warn/length_drift"} <= set(evals[2]) and "warn/entropy_drop" not in evals[1]
    assert summary["warn/fired"] == 2.0 and summary["warn/evals"] == 3.0
    readings, _ = load_readings(str(tmp_path / "run"), None)
    result = diagnose(readings)
    found = next(f for f in result["findings"] if f["name"] == "early_warning")
    assert found["evidence"].startswith("fired at step 2 by exploit_gain (3 evaluations checked)")
    assert "early_warning" not in result["not_measured"]


def test_a_user_run_with_a_judge_logs_the_proxy_judge_reading(tiny_setup, tmp_path):
    """On a user's held-out prompts with a judge (here the reward model itself): each
    evaluation logs the proxy/judge reading beside the feature readings; without a fire the
    rule is measured and silent in diagnose."""
    from rlhflab.algos.online import HeldOut
    from rlhflab.commands.rl import _load_prompts
    from rlhflab.config import load_config
    from rlhflab.diagnose import diagnose, load_readings
    from rlhflab.instruments.judges import load_judge
    from rlhflab.models import load_tokenizer
    from rlhflab.world import World

    policy, rm = tiny_setup
    prompts = tmp_path / "eval.jsonl"
    world = World(load_config(ROOT / "configs" / "tiny.yaml").world)
    prompts.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in world.prompts(12, "eval")))
    texts, rows = _load_prompts(str(prompts), load_tokenizer(policy))
    summary, logged = _run(policy, rm, tmp_path / "run", [], HeldOut(texts, rows, load_judge(f"rm:{rm}")))
    evals = [r for r in logged if "warn/evals" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert {"warn/proxy_gain", "warn/judge_drop", "warn/proxy_up_judge_down", "warn/outlier_rate",
                "warn/feature_shift_ratio", "warn/ensemble_ratio"} <= set(r)
    assert evals[0]["warn/proxy_gain"] == 0.0 and evals[0]["warn/judge_drop"] == 0.0
    result = diagnose(load_readings(str(tmp_path / "run"), None)[0])
    assert "warn/fired" not in summary and summary["warn/evals"] == 3.0  # measured: no reading past its bar
    assert "early_warning" not in result["not_measured"]
    assert all(f["name"] != "early_warning" for f in result["findings"])


def test_each_finding_carries_its_record_or_says_there_is_none(tmp_path):
    """A card file's records in words beside the findings; a rule without one says "no
    measured record"; a card file of the wrong shape is an error naming it."""
    from rlhflab.diagnose import diagnose, format_findings

    records = load_records(FIXTURE)
    assert record_line("length_hacking", records) == ("poor record (false alarms: demoted to a warning): fires on "
                                                      "4/5 length runs (95% CI 0.38-0.96), 1/6 healthy "
                                                      "(instrument card)")
    clean = {"length_hacking": {**records["length_hacking"], "healthy_fired": 0}}
    assert record_line("length_hacking", clean) == ("fires on 4/5 length runs (95% CI 0.38-0.96), 0/6 healthy "
                                                    "(instrument card)")
    missing = {"length_hacking": {**clean["length_hacking"], "fired": 2}}
    assert record_line("length_hacking", missing).startswith("poor record (misses most of its condition's runs): "
                                                             "fires on 2/5")
    # it caught both runs where the bias showed (gold did not find them better): no miss
    caught = {"length_hacking": {**missing["length_hacking"], "failed_fired": 2, "failed_runs": 2}}
    assert record_line("length_hacking", caught) == ("fires on 2/5 length runs (95% CI 0.38-0.96), 2/2 of those "
                                                     "gold did not find better, 0/6 healthy (instrument card)")
    assert record_line("healthy", records) == "right on 5/6 runs called healthy on the instrument card (95% CI 0.44-0.97)"
    assert record_line("sycophancy", records) == NO_RECORD
    assert load_records(tmp_path / "absent.json") == {}
    bad = tmp_path / "card.json"
    bad.write_text('{"rules": []}')
    with pytest.raises(InputError, match="card.json"):
        load_records(bad)
    m = {"length/mean": 30.0, "base/length/mean": 10.0, "win_rate/gold": 0.7, "win_rate/gold_ci_low": 0.6,
         "win_rate/gold_ci_high": 0.8, "win_rate/gold_length_controlled": 0.45, "kl/sequence_mean": 2.0}
    result = diagnose(m, records=clean)
    hack = next(f for f in result["findings"] if f["name"] == "length_hacking")
    assert hack["record"].startswith("fires on 4/5 length runs") and hack["severity"] == "fail"
    assert result["verdict"] == "reward hacking"
    assert "    record:     fires on 4/5 length runs" in format_findings(result)
    assert all(f["record"] == NO_RECORD for f in diagnose(m, records={})["findings"])
    # a fail rule that fired on 1 of 6 healthy controls is demoted: a warning, and not the verdict
    demoted = diagnose(m, records=records)
    hack = next(f for f in demoted["findings"] if f["name"] == "length_hacking")
    assert hack["severity"] == "warn" and hack["record"].startswith("poor record (false alarms")
    assert demoted["verdict"] == "healthy"
    # the one healthy firing confirmed by gold (its family's gold fell): no false alarm, no demotion
    confirmed = {"length_hacking": {**records["length_hacking"], "healthy_confirmed": 1}}
    assert record_line("length_hacking", confirmed).endswith("1/6 healthy (1 of them confirmed by gold) "
                                                             "(instrument card)")
    assert diagnose(m, records=confirmed)["verdict"] == "reward hacking"
    assert with_records(diagnose(m, records={}), records)["findings"][0]["record"] == record_line(
        diagnose(m, records={})["findings"][0]["name"], records)


def test_the_report_shows_each_findings_record():
    """The report's findings table has a measured-record column: a finding's own record, or,
    for a diagnosis written without one, the shipped card's (none yet: "no measured record")."""
    from rlhflab.report.build import diagnosis_block

    finding = {"severity": "fail", "name": "length_hacking", "symptom": "s", "evidence": "e", "instrument": "i",
               "root_cause": "r", "fix": "f"}
    html = diagnosis_block("ppo", {"verdict": "reward hacking", "findings": [
        {**finding, "record": "fires on 4/5 length runs (instrument card)"}]}, {})
    assert "measured record" in html and "fires on 4/5 length runs (instrument card)" in html
    old = diagnosis_block("ppo", {"verdict": "reward hacking", "findings": [finding]}, {})
    assert record_line("length_hacking", load_records()) in old


def test_early_warning_off_reads_nothing_and_leaves_the_run_as_it_was(tiny_setup, tmp_path):
    """``rl.early_warning=false``: no warn/* reading anywhere (not the attack's exploit gain
    either), diagnose names the rule not measured, and the run itself (its gold and losses)
    is the one it is with the warning on: the SFT draws use seeds of their own."""
    from rlhflab.diagnose import diagnose, load_readings

    policy, rm = tiny_setup
    _, on_rows = _run(policy, rm, tmp_path / "on", ["rl.attack_every=2"])
    summary, rows = _run(policy, rm, tmp_path / "off", ["rl.early_warning=false", "rl.attack_every=2"])
    assert not [k for r in rows for k in r if k.startswith("warn/")]
    assert not [k for k in summary if k.startswith("warn/")]
    assert {"warn/evals", "warn/exploit_gain", "warn/feature_shift_ratio"} <= {k for r in on_rows for k in r}
    assert any("rm_attack/top_gain_ci_low" in r for r in rows)  # the attack itself still runs

    def run_readings(rs):
        return [{k: v for k, v in r.items() if not k.startswith(("warn/", "time/")) and not k.endswith("seconds")}
                for r in rs]  # wall-clock readings aside

    assert run_readings(rows) == run_readings(on_rows)
    assert "early_warning" in diagnose(load_readings(str(tmp_path / "off"), None)[0])["not_measured"]


def test_an_online_run_calls_every_model_with_the_fused_gelu(tiny_setup, tmp_path):
    """GPT-2's ``gelu_new`` is swapped for torch's fused tanh GELU (``forward.fuse_activations``)
    in the policy, the reference and each reward-model member an online run calls, as the
    offline stages do."""
    from transformers.activations import NewGELUActivation

    from rlhflab.forward import FusedGELUTanh

    run = _make_run(*tiny_setup, tmp_path / "run", [])
    members = run._warn_model().members
    for model in (run.policy_module, run.reference, *members):
        kinds = {type(m) for m in model.modules()}
        assert NewGELUActivation not in kinds and FusedGELUTanh in kinds
    assert len(members) == 2


def test_stop_on_warning_stops_at_the_warning_and_keeps_the_policy_before_it(tiny_setup, tmp_path):
    """``rl.stop_on_warning``: the run of the first test, whose warning fires at step 2 (the
    exploit gain), stops there instead of going on to step 4, and its model is the policy of
    the evaluation before the warning, step 0: the SFT policy's weights exactly. diagnose says
    where it stopped and what it kept. Without the warning measured the setting is an error."""
    from safetensors.torch import load_file

    from rlhflab.config import load_config
    from rlhflab.diagnose import diagnose, load_readings

    policy, rm = tiny_setup
    out = tmp_path / "run"
    summary, rows = _run(policy, rm, out, ["rl.attack_every=2", "rl.stop_on_warning=true"])
    assert summary["steps"] == 2 and max(r["step"] for r in rows) == 2
    assert summary["warn/fired"] == 2.0 and summary["warn/stopped_at"] == 2.0 and summary["warn/kept_step"] == 0
    assert summary["early_stop/restored_best"] is True
    kept, start = load_file(out / "model" / "model.safetensors"), load_file(policy / "model.safetensors")
    assert kept.keys() == start.keys() and all(torch.equal(kept[k], start[k]) for k in kept)
    found = next(f for f in diagnose(load_readings(str(out), None)[0])["findings"] if f["name"] == "early_warning")
    assert "the run stopped there and kept the policy of step 0 (rl.stop_on_warning)" in found["evidence"]
    with pytest.raises(InputError, match="rl.stop_on_warning stops at the early warning"):
        load_config(ROOT / "configs" / "tiny.yaml", ["rl.stop_on_warning=true", "rl.early_warning=false"])


def test_the_curve_readings_by_hand():
    """Windows of 2 steps over 5 steps: KL means (0.1, 0.2) -> 0.15, (0.4, 0.6) -> 0.5, (1.5) -> 1.5:
    acceleration (1.5 - 0.5) - (0.5 - 0.15) = 0.65; entropy 2.0 -> 1.0: drop 0.5; length 10 -> 20:
    drift log 2. With two windows no acceleration; with one, nothing."""
    from rlhflab.instruments.early_warning import curve_readings

    kl, ent, length = [0.1, 0.2, 0.4, 0.6, 1.5], [2.0, 2.0, 1.5, 1.5, 1.0], [10, 10, 14, 16, 20]
    steps = [{"objective/kl": a, "objective/entropy": b, "rollout/length_mean": c} for a, b, c in zip(kl, ent, length)]
    out = curve_readings(steps, 2)
    assert out["warn/kl_acceleration"] == pytest.approx(0.65)
    assert out["warn/entropy_drop"] == pytest.approx(0.5) and out["warn/length_drift"] == pytest.approx(math.log(2))
    assert set(curve_readings(steps[:4], 2)) == {"warn/entropy_drop", "warn/length_drift"}
    assert curve_readings(steps[:2], 2) == {}


def test_a_warning_fired_by_a_rate_reads_as_a_step(tmp_path):
    """``warn/fired_outlier_rate`` holds the step the outlier rate fired at (20), not a rate:
    diagnose reads such a run (it refused it as a rate outside [0, 1]) and names the step."""
    from rlhflab.diagnose import diagnose, load_readings

    (tmp_path / "metrics.json").write_text(json.dumps({
        "algo": "ppo", "kl/beta": 0.2, "warn/evals": 5.0, "warn/fired": 20.0, "warn/fired_outlier_rate": 20.0}))
    found = next(f for f in diagnose(load_readings(str(tmp_path), None)[0])["findings"]
                 if f["name"] == "early_warning")
    assert found["evidence"].startswith("fired at step 20 by outlier_rate (5 evaluations checked)")
