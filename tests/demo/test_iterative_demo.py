"""Distribution shift and iterative RLHF at the demo's size (``make test-demo``).

1. The ``distribution_shift`` rule's cut, measured: the reward model's feature distance on
   the SFT policy's samples, a healthy PPO run (the demo's beta 0.2) and an over-optimized
   one (beta 0.005); the figures are in docs/iterative.md and beside the rule's thresholds
   in diagnose.py.
2. ``rlhflab iterate``: one round against three at the same number of comparisons and of
   RL steps; only what was measured to hold at this size is asserted (docs/iterative.md).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from rlhflab.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
pytestmark = pytest.mark.demo


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from rlhflab.commands.rm import run_rm
    from rlhflab.commands.sft import run_sft

    root = tmp_path_factory.mktemp("iterative_demo")
    cfg = load_config(DEMO)
    run_sft(copy.deepcopy(cfg), root / "sft")
    run_rm(copy.deepcopy(cfg), root / "rm", sft=str(root / "sft"))
    return root


def _ppo_evals(root: Path, name: str, overrides: list[str]) -> list[dict]:
    from rlhflab.commands.rl import run_rl

    cfg = load_config(DEMO, overrides)
    return run_rl(cfg, "ppo", root / name, sft=str(root / "sft"), rm=str(root / "rm"))["evals"]


def _limit(n: float) -> float:
    """The distribution_shift rule's cut at n samples (diagnose._distribution_shift)."""
    from rlhflab.diagnose import Thresholds

    t = Thresholds()
    p = t.shift_ood_base
    return p + t.shift_z * (p * (1 - p) / n) ** 0.5


def test_the_shift_rule_is_silent_on_healthy_runs_and_blind_to_over_optimization(base):
    """Measured (diagnose.py, docs/iterative.md): SFT samples 0.03 beyond the RM's held-out
    95th percentile, a healthy PPO run at most 0.01, an over-optimized one (beta 0.005, gold
    0.68 -> 0.27, KL 11 nats) at most 0.02, all under the cut of 0.096 at n = 200. The test
    asserts what holds: no false alarm, and the over-optimization is real (gold fell from its
    peak by more than 0.2 while the proxy rose; measured 0.41 and +0.24) yet unseen by the
    feature distance at this size."""
    healthy = _ppo_evals(base, "ppo_healthy", [])
    over = _ppo_evals(base, "ppo_low_beta", ["rl.beta=0.005"])
    for e in healthy:
        assert e["shift/ood_rate"] < _limit(e["shift/n"]), e
    peak = max(over, key=lambda e: e["gold/mean"])
    assert peak["gold/mean"] - over[-1]["gold/mean"] > 0.2
    assert over[-1]["eval/proxy_mean"] > peak["eval/proxy_mean"]
    assert all(e["shift/ood_rate"] < _limit(e["shift/n"]) for e in over)


def test_one_round_against_three(base):
    """``rlhflab iterate --algo ppo`` at the demo's size, one round against three at the same
    2048 comparison prompts and 60 PPO steps (docs/iterative.md). Measured over seeds 0 and
    1: the reward model's accuracy on the new policy's samples, before it retrains, was
    0.515-0.545 against 0.66-0.68 on the held-out split of the comparisons it trained on (a
    drop of 0.11-0.16, asserted > 0.05); both ended well above SFT (gains 0.35-0.76, asserted > 0.2).
    Three rounds ended higher in both seeds (+0.27, +0.11) but a fresh draw of the same
    policy's samples moves the gold by up to 0.17 here, and the proxy's over-statement went
    either way, so neither is asserted."""
    from rlhflab.commands.iterate import run_iterate

    records = {r: run_iterate(load_config(DEMO), str(base / "sft"), base / f"iterate_{r}", rounds=r, algo="ppo")
               for r in (1, 3)}
    sft_gold = records[1]["per_round"][0]["gold/mean"]
    for record in records.values():
        assert record["gold/final"] - sft_gold > 0.2
    rounds = records[3]["per_round"]
    for prev, cur in zip(rounds[1:], rounds[2:]):
        assert prev["rm/eval_accuracy"] - cur["iterate/rm_accuracy_on_policy"] > 0.05, (prev, cur)
