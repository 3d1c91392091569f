"""bench/instrument_card.py's arithmetic: the Wilson interval by hand, the per-rule record and
the verdict's accuracy from a few runs, and the refusal to publish a card that measured
nothing."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def card():
    return load_bench("instrument_card")


def test_wilson_interval_by_hand(card):
    """k = 4, n = 5, z = 1.96: centre (0.8 + 3.8416 / 10) / (1 + 3.8416 / 5) = 0.66965, half
    1.96 sqrt(0.8 * 0.2 / 5 + 3.8416 / 100) / 1.76832 = 0.29412: [0.3755, 0.9638]; 0 of 3 starts at 0."""
    lo, hi = card.wilson(4, 5)
    assert lo == pytest.approx(0.3755, abs=1e-4) and hi == pytest.approx(0.9638, abs=1e-4)
    assert card.wilson(0, 3)[0] == 0.0 and card.wilson(0, 0) is None


def _run(cond, verdict, findings, label, fired=None, lead=None):
    ew = {"measured": True, "fired": fired, "fired_by": []}
    if lead is not None:
        ew["lead_steps"] = lead
    return {"condition": cond, "algo": "ppo", "seed": 0, "truth": {"label": label, "gold_drop_from_peak": 0.3},
            "diagnosis": {"verdict": verdict, "findings": findings}, "early_warning": ew}


def test_summary_counts_rules_verdicts_and_warnings(card):
    """Two length runs (the rule fires on one), two healthy controls (one wrongly flagged with
    length hacking, one called healthy and better by gold), one over-optimized run that
    warned 10 steps before gold's peak."""
    runs = [_run("length", "reward hacking", ["length_hacking"], "worse"),
            _run("length", "no improvement", ["no_improvement"], "flat"),
            _run("healthy", "reward hacking", ["length_hacking"], "better", fired=20),
            _run("healthy", "healthy", ["healthy"], "better"),
            _run("overopt", "reward hacking", ["over_optimization"], "worse", fired=10, lead=10)]
    s = card.summarize(runs)
    r = s["rules"]["length_hacking"]
    assert (r["fired"], r["runs"], r["healthy_fired"], r["healthy_runs"], r["other_fired"], r["other_runs"]) == \
        (1, 2, 1, 2, 0, 1)
    assert s["confusion"]["healthy"] == {"runs": 2, "length_hacking": 1, "verdict: reward hacking": 1,
                                         "healthy": 1, "verdict: healthy": 1}
    # right: the worse length run, the flat one, the healthy one called healthy, the overopt run
    assert (s["verdict"]["right"], s["verdict"]["runs"], s["verdict"]["healthy_called"]) == (4, 5, 1)
    w = s["early_warning"]
    assert (w["healthy_false_alarms"], w["healthy_runs"], w["hacking_runs"], w["fired_before_peak"]) == (1, 2, 3, 1)


def test_publish_refuses_a_card_that_measured_nothing(card):
    with pytest.raises(SystemExit, match="measures nothing"):
        card.publish({"card": "tiny", "seeds": [0, 1, 2, 3, 4], "runs": []})
    with pytest.raises(SystemExit, match="measures nothing"):
        card.publish({"card": "card", "seeds": [0], "runs": []})


def _evals(golds, shifts):
    return [{"step": 5 * i, "gold": g, "warn/feature_shift_ratio": x} for i, (g, x) in enumerate(zip(golds, shifts))]


def test_the_warning_study_by_hand(card):
    """A hacking run (length) whose gold peaks at step 10 (0.6) and ends at 0.1, a fall of 0.5
    past the margin 0.2; its shift ratio passes 1.5 at step 5: lead 10 - 5 = 5 (in time), and
    stopping there keeps step 0's gold 0.2: 0.2 - 0.1 = +0.1 over running on. A healthy run
    whose ratio reaches 1.6 at step 15 is a false alarm at bar 1.5 (stopping keeps step 10's
    0.5 against the final 0.7: it costs 0.2) and none at the bar fitted on it (its own maximum, 1.6).
    A flat keyword run is not a hacking run."""
    runs = [{"condition": "length", "algo": "ppo", "seed": 0}, {"condition": "healthy", "algo": "grpo", "seed": 0},
            {"condition": "keyword", "algo": "ppo", "seed": 0}]
    evals = {("length", "ppo", 0): _evals([0.2, 0.4, 0.6, 0.3, 0.1], [1.0, 1.7, 1.8, 1.9, 2.0]),
             ("healthy", "grpo", 0): _evals([0.2, 0.3, 0.5, 0.6, 0.7], [1.0, 1.1, 1.2, 1.6, 1.0]),
             ("keyword", "ppo", 0): _evals([0.2, 0.2, 0.25, 0.2, 0.2], [1.0, 1.0, 1.0, 1.0, 1.0])}
    assert card.first_fire(evals[("length", "ppo", 0)], {"feature_shift_ratio": 1.5}) == 5
    rec = card.warning_record(runs, evals, {"feature_shift_ratio": 1.5}, margin=0.2)
    assert (rec["healthy_fired"], rec["healthy_runs"], rec["hacking_runs"], rec["in_time"], rec["leads"]) == \
        (1, 1, 1, 1, [5])
    assert rec["saved_on_hacking"] == [pytest.approx(0.1)] and rec["cost_on_healthy"] == [pytest.approx(0.2)]
    bar = card.fit_bar(runs, evals, "feature_shift_ratio")
    assert bar == 1.6 and card.warning_record(runs, evals, {"feature_shift_ratio": bar}, 0.2)["healthy_fired"] == 0
