"""Truncated importance sampling: weight the KL term in the loss too (rlhflab), or the
policy-gradient term only (TRL 1.16, verl, OpenRLHF)? Measured on the enumerable bandit.

    .venv/bin/python bench/tis_kl.py

The samples come from softmax(theta / T_s) while the update treats them as drawn from
pi_theta (``rlhflab bandit --option sampler_temperature=T_s``); TIS weights each token by
min(pi_theta / pi_sampler, C) (``--option tis_cap=C``). With the KL in the loss (k2, whose
gradient is the reverse KL's), the distance KL(pi || pi*) after the algorithm's bandit
default of 300 steps at beta 0.5, seed 0, is measured twice: with rlhflab's
``losses.policy_gradient_loss`` (both terms weighted) and with the peers' convention (the
same function with the KL term added unweighted, after the weighted surrogate). Writes
``bench/results/tis_kl.json``.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import rlhflab.algos.update as update
from rlhflab import losses
from rlhflab.algos.bandit_online import train_bandit
from rlhflab.bandit import default_bandit, distance_to_optimum
from rlhflab.kl import kl_estimate

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = losses.policy_gradient_loss


def surrogate_only(logprobs, old_logprobs, advantages, mask, counts, hp, *, ref_logprobs=None, is_weights=None,
                   **rest):
    """The peers' convention: the importance weights on the policy-gradient term, the KL term
    added after, unweighted (TRL's ``_compute_loss``, verl's ``dp_actor``, OpenRLHF's
    ``PolicyLoss`` + ``ppo_actor``)."""
    loss, sums = ORIGINAL(logprobs, old_logprobs, advantages, mask, counts, dataclasses.replace(hp, kl_coef=0.0),
                          is_weights=is_weights, **rest)
    if hp.kl_coef and ref_logprobs is not None:
        kl_t = kl_estimate(hp.kl_estimator, logprobs, ref_logprobs, old_logprobs=old_logprobs, cap=hp.kl_clip)
        loss = loss + hp.kl_coef * losses.LOSS_AGGREGATIONS[hp.loss_agg](kl_t, mask, counts)
    return loss, sums


def main() -> int:
    problem = default_bandit()
    rows = []
    for algo in ("reinforce", "rloo"):
        for sampler_temperature in (0.7, 1.5):
            for cap in (None, 2.0, 100.0):
                row = {"algo": algo, "sampler_temperature": sampler_temperature, "tis_cap": cap}
                for name, fn in (("both_weighted", ORIGINAL), ("surrogate_only", surrogate_only)):
                    if cap is None and name == "surrogate_only":
                        continue  # no weights: the two are the same loss
                    update.policy_gradient_loss = fn
                    try:
                        policy = train_bandit(algo, problem, 0.5, seed=0, kl_in="loss", kl_estimator="k2",
                                              sampler_temperature=sampler_temperature, tis_cap=cap).policy
                    finally:
                        update.policy_gradient_loss = ORIGINAL
                    row[name] = distance_to_optimum(policy, problem.optimum(0.5))["kl_to_optimum"]
                rows.append(row)
                print(json.dumps(row))
    out = ROOT / "bench" / "results" / "tis_kl.json"
    out.write_text(json.dumps({"command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
                               "beta": 0.5, "kl": "k2 in the loss", "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
