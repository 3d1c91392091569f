"""An online algorithm's settings: the RLConfig fields a user left empty filled from the
algorithm's defaults (``rlhflab.registry.ONLINE_ALGORITHMS``), then checked.

Torch-free, so that ``rlhflab run`` and the RL commands check every arm's settings before
they import torch or write anything.
"""

from __future__ import annotations

import dataclasses

from rlhflab.errors import InputError
from rlhflab.registry import LOSS_AGGREGATIONS, ONLINE_ALGORITHMS, SEQUENCE_BASELINES


def algorithm_defaults(algo: str, baseline: str | None = None) -> dict:
    """The values ``algo`` gives the RLConfig fields left empty. An algorithm with a choice
    of baseline (REINFORCE) takes the baseline's own defaults too: a group baseline needs
    several samples per prompt."""
    defaults = dict(ONLINE_ALGORITHMS.entry(algo).options["defaults"])
    if "baseline" in defaults:
        defaults.update(SEQUENCE_BASELINES.entry(baseline or defaults["baseline"]).options.get("defaults", {}))
    return defaults


def resolve_rl_config(rl, algo: str):
    """A copy of ``rl`` (an RLConfig) with empty fields filled from ``algorithm_defaults``,
    validated: every field in its domain (``rlhflab.config``), then the checks that depend on
    the algorithm; errors name the field."""
    from rlhflab.config import check_section

    rl = dataclasses.replace(rl)
    for key, value in algorithm_defaults(algo, rl.baseline).items():
        if getattr(rl, key) is None:
            setattr(rl, key, value)
    check_section(rl, "rl")  # before beta_end is derived from beta
    if rl.beta_end is None:
        rl.beta_end = rl.beta / 10
    if rl.loss_agg not in LOSS_AGGREGATIONS:
        raise InputError(f"expected {LOSS_AGGREGATIONS.domain()}", field="rl.loss_agg")
    if rl.batch_size % rl.samples_per_prompt:
        raise InputError(f"batch_size {rl.batch_size} is not a multiple of samples_per_prompt "
                         f"{rl.samples_per_prompt}", field="rl.batch_size")
    least = ONLINE_ALGORITHMS.entry(algo).options["min_samples_per_prompt"]
    if rl.samples_per_prompt < least:
        raise InputError(f"{algo} needs at least {least} samples per prompt", field="rl.samples_per_prompt")
    return rl


def check_layout(rl, num_processes: int) -> None:
    """The global batch must split into whole prompt groups per process, minibatches and
    micro-batches; errors name the field."""
    n_prompts = rl.batch_size // rl.samples_per_prompt
    if n_prompts % num_processes:
        raise InputError(f"{n_prompts} prompts per step do not split over {num_processes} processes",
                         field="rl.batch_size")
    local_rows = rl.batch_size // num_processes
    if local_rows % rl.num_minibatches:
        raise InputError(f"{local_rows} rows per process do not split into {rl.num_minibatches} minibatches",
                         field="rl.num_minibatches")
    mb = local_rows // rl.num_minibatches
    if rl.micro_batch_size and mb % rl.micro_batch_size:
        raise InputError(f"minibatches of {mb} rows do not split into micro-batches of {rl.micro_batch_size}",
                         field="rl.micro_batch_size")
