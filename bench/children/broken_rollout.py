"""An online RL run with a broken rollout, the instrument card's regression case:
``broken_rollout.py ALGO ARGS...`` runs ``rlhflab ALGO ARGS...`` with the sampler decoding at
``BROKEN_TEMPERATURE`` times the temperature the trainer's log-probs assume (a sampler that
is not the trainer's model, as a serving engine with other settings would be). Pass
``--set rl.mismatch_tolerance=1e9`` to switch the guard off (``OnlineRun._mismatch_guard``
stops such a run at its first update otherwise).
"""

from __future__ import annotations

import dataclasses
import sys

from rlhflab.threads import configure

configure()  # the threads rlhflab's own command chooses (RLHFLAB_THREADS too), before torch loads

import rlhflab.algos.online as online  # noqa: E402
from rlhflab.cli import main  # noqa: E402

BROKEN_TEMPERATURE = 1.5


def broken_rollout(self, step):
    """``OnlineRun.rollout`` with the generation settings' temperature scaled for the sampler only."""
    cfg = self.cfg
    kept = cfg.generation
    cfg.generation = dataclasses.replace(kept, temperature=kept.temperature * BROKEN_TEMPERATURE)
    try:
        return ORIGINAL(self, step)
    finally:
        cfg.generation = kept


ORIGINAL = online.OnlineRun.rollout

if __name__ == "__main__":
    online.OnlineRun.rollout = broken_rollout
    sys.exit(main(sys.argv[1:]))
