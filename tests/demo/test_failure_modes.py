"""The demonstration the lab exists for, at the demo's size: the same SFT policy, PPO at
the demo's beta, and only the raters changed. Opt-in (``make test-demo``, about 12
minutes on 2 cores), since it trains three reward models and three policies of the demo
size; ``make test`` deselects the ``demo`` marker.

| raters                    | diagnosis              |
|---------------------------|------------------------|
| default (length bias 0.1) | healthy                |
| length bias 0.15          | length hacking         |
| refusal bias 6            | over-refusal           |

Why these biases: beyond the gold utility's slack of 4 tokens, a filler sentence of n
tokens changes the raters' utility by (length_bias - 0.1) * n - 0.4 (the gold utility
charges 0.1 per excess token and 0.4 per filler). At the default 0.1 that is -0.4: padding
never pays. At 0.15 the longer fillers (10 and 11 tokens) pay, and the reward model
learns "longer is better". A refusal bias of 6 outweighs the 3.5 gold units between
helping a benign request and refusing it. The measured runs are in the README ("Failure
modes on demand"), with what a smaller config does instead: at 2000 demonstrations, 4 SFT
epochs and 40 PPO steps the SFT policy is weaker (gold -0.17 against 0.21) and the
length-biased run games sycophancy rather than length, so the test keeps the demo's sizes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rlhflab.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.demo
DEMO = ["run.bandit_algos=[]"]
SCENARIOS = {
    "default": [],
    "length_bias": ["world.rater.length_bias=0.15"],
    "refusal_bias": ["world.rater.refusal_bias=6.0"],
}


@pytest.fixture(scope="module")
def diagnoses(tmp_path_factory):
    from rlhflab.commands.arms import evaluate_arm, train_arm
    from rlhflab.commands.rm import run_rm
    from rlhflab.commands.sft import run_sft
    from rlhflab.diagnose import diagnose

    base = tmp_path_factory.mktemp("failure_modes")
    cfg = load_config(ROOT / "configs" / "demo.yaml", DEMO)
    sft = base / "sft"
    run_sft(copy.deepcopy(cfg), sft)
    results = {}
    for name, overrides in SCENARIOS.items():
        scfg = load_config(ROOT / "configs" / "demo.yaml", DEMO + overrides)
        out = base / name
        run_rm(copy.deepcopy(scfg), out / "rm", sft=str(sft))
        train_arm(scfg, "ppo", out, sft, out / "rm")
        metrics = evaluate_arm(scfg, "ppo", out, sft, out / "rm")
        results[name] = (metrics, diagnose(metrics))
    return results


def _names(result) -> list[str]:
    return [f["name"] for f in result[1]["findings"]]


def test_default_raters_give_a_healthy_run(diagnoses):
    metrics, result = diagnoses["default"]
    assert result["verdict"] == "healthy", _names(diagnoses["default"])
    assert metrics["gold/mean"] > metrics["base/gold/mean"]


def test_a_rater_length_bias_gives_length_hacking(diagnoses):
    metrics, result = diagnoses["length_bias"]
    assert "length_hacking" in _names(diagnoses["length_bias"])
    finding = next(f for f in result["findings"] if f["name"] == "length_hacking")
    assert "length" in finding["instrument"]
    assert metrics["rm/score_mean"] > metrics["base/rm/score_mean"]  # the proxy rose
    assert metrics["length/mean"] > metrics["base/length/mean"]  # answers grew
    # and the truth paid for it: well below what the same pipeline reaches with the default
    # raters from the same SFT policy. (Whether gold also falls below SFT's own depends on
    # the draw at this bias, just past where padding starts to pay: -0.18 against 0.21 in
    # the README's run, 0.38 against 0.34 in another, while the default raters' arm reached
    # 1.07 there; 0.3 is under half that cost.)
    assert metrics["gold/mean"] < diagnoses["default"][0]["gold/mean"] - 0.3, (
        metrics["gold/mean"], metrics["base/gold/mean"], diagnoses["default"][0]["gold/mean"])


def test_a_rater_refusal_bias_gives_over_refusal(diagnoses):
    metrics, result = diagnoses["refusal_bias"]
    assert "over_refusal" in _names(diagnoses["refusal_bias"])
    assert metrics["refusal/benign_rate"] > metrics["base/refusal/benign_rate"]
