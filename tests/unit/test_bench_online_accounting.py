"""bench/common.py's accounting of an online loop's time, the same for rlhflab and TRL: the
parts add up to the loop, the token rates divide by the right times, and timers that do not
nest are refused."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench


@pytest.fixture(scope="module")
def common():
    return load_bench("common")


def test_loop_parts_add_up(common):
    """Loop 10 s, rollout 6 s of which 4 s decoding, update 3.5 s: scoring 6 - 4 = 2, rest
    10 - 6 - 3.5 = 0.5; shares 0.4, 0.2, 0.35, 0.05."""
    parts = common.loop_parts(10.0, 6.0, 3.5, 4.0)
    assert parts["time/generate"] == 4.0 and parts["time/scoring"] == 2.0
    assert parts["time/update"] == 3.5 and parts["time/rest"] == pytest.approx(0.5)
    assert sum(parts[f"time/{k}"] for k in ("generate", "scoring", "update", "rest")) == pytest.approx(10.0)
    assert [parts[f"share/{k}"] for k in ("generate", "scoring", "update", "rest")] == pytest.approx(
        [0.4, 0.2, 0.35, 0.05])


def test_loop_parts_refuse_timers_that_do_not_nest(common):
    """Decoding longer than the rollout that contains it, or rollout + update longer than the
    loop, is a harness bug, not a reading."""
    with pytest.raises(ValueError, match="do not nest"):
        common.loop_parts(10.0, 6.0, 3.5, 6.5)
    with pytest.raises(ValueError, match="do not nest"):
        common.loop_parts(10.0, 7.0, 3.5, 4.0)
    assert common.loop_parts(10.0, 6.0, 4.0, 4.0)["time/rest"] == 0.0  # a loop spent entirely in its parts


def test_token_rates(common):
    """1200 tokens, loop 10 s, 4 s of it decoding: 120 tokens/s over the loop, 300 in
    generation, 200 in the rest; no generation measured reads None, never 0 or a division by 0."""
    out = common.token_rates({"train_seconds": 10.0, "time/generate": 4.0, "generated_tokens": 1200})
    assert (out["tokens_per_s"], out["gen_tokens_per_s"], out["train_tokens_per_s"]) == (120.0, 300.0, 200.0)
    none = common.token_rates({"train_seconds": 10.0, "time/generate": 0.0, "generated_tokens": 1200})
    assert none["gen_tokens_per_s"] is None and none["train_tokens_per_s"] == 120.0
