"""The bias probes catch a bias the raters have, and stay quiet when they have none.

Three reward models on the tiny world's off-policy pairs (`rlhflab rm --world-pairs`, a
freshly initialised tiny GPT-2 backbone, 32 steps), differing only in the raters:

- base: no length bias (``world.rater.length_bias=0``), no keyword bias;
- length: raters add 0.3 per response token (the default 0.1 does not outweigh the gold
  penalty of two filler sentences: the raters themselves prefer the padded response in
  only ~13% of cases, so there is nothing for the probe to find);
- keyword: raters add 1.0 per keyword ("certainly", "delve"), no length bias.

Probes run on the held-out pairs' responses. Measured on world seeds 0 / 1 / 2:

| run     | padding win rate | keyword win rate |
|---------|------------------|------------------|
| base    | 0.00 / 0.04 / 0.00 | 0.26 / 0.52 / 0.45 |
| length  | 1.00 / 0.95 / 1.00 | 0.86 / 0.83 / 0.92 |
| keyword | 0.00 / 0.00 / 0.00 | 0.92 / 0.77 / 0.87 |

Without the bias the padding probe sits far below chance (the RM learned the gold's
filler penalty, as the raters vote it) and the keyword probe near or below chance; with
it, both jump well above. Thresholds (seed 0 is tested): padding < 0.25 off and > 0.75 on;
keyword < 0.6 off and > 0.7 on. The keyword probe also fires under a pure length bias
(inserting "certainly ," adds two tokens), which the docs point out.
"""

import random

import pytest

from rlhflab.commands.rm import run_rm
from rlhflab.config import load_config
from rlhflab.data import load_rows
from rlhflab.instruments.rm_eval import _responses, keyword_probe, length_probe
from rlhflab.reward_model import RewardModel
from rlhflab.world import World
from tests.conftest import save_tiny_backbone

RUNS = {
    "base": ["world.rater.length_bias=0", "world.rater.keyword_bias=0"],
    "length": ["world.rater.length_bias=0.3", "world.rater.keyword_bias=0"],
    "keyword": ["world.rater.length_bias=0", "world.rater.keyword_bias=1.0"],
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probes(tmp_path_factory, tiny_config_path):
    root = tmp_path_factory.mktemp("rm_bias")
    save_tiny_backbone(load_config(tiny_config_path), root / "backbone")
    results = {}
    for name, sets in RUNS.items():
        cfg = load_config(tiny_config_path, sets + [f"rm.backbone={root / 'backbone'}"])
        run_rm(cfg, root / name, world_pairs=True)
        rm = RewardModel.load(root / name)
        world = World(cfg.world)
        responses = _responses(load_rows(root / name / "data" / "eval.jsonl", "preference"), rm.tokenizer, 200)
        results[name] = {**length_probe(rm, responses, random.Random(0), world),
                         **keyword_probe(rm, responses, ("certainly", "delve"), world)}
    return results


def test_length_probe_detects_a_rater_length_bias_and_not_its_absence(probes):
    off, on = probes["base"], probes["length"]
    assert off["probe/length/n"] >= 50
    assert off["probe/length/win_rate"] < 0.25
    assert on["probe/length/win_rate"] > 0.75
    # The truth agrees: the biased raters prefer padding, the unbiased ones do not.
    assert on["probe/length/rater_pref"] > 0.9 and off["probe/length/rater_pref"] < 0.1
    assert on["probe/length/corr_reward_length"] > 0.5 > off["probe/length/corr_reward_length"]
    assert probes["keyword"]["probe/length/win_rate"] < 0.25  # a keyword bias is not a length bias


def test_keyword_probe_detects_a_rater_keyword_bias_and_not_its_absence(probes):
    off, on = probes["base"], probes["keyword"]
    assert off["probe/keyword/win_rate"] < 0.6
    assert on["probe/keyword/win_rate"] > 0.7
    assert on["probe/keyword/certainly/rater_pref"] > 0.9 and off["probe/keyword/certainly/rater_pref"] < 0.1
