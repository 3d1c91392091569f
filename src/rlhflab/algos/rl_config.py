"""An online algorithm's settings: the RLConfig fields a user left empty filled from the
algorithm's defaults (``rlhflab.registry.ONLINE_ALGORITHMS``), then checked.

A setting the algorithm would not read is an error naming the algorithm (``ignored_settings``),
never a silent no-op: a critic's settings under a critic-free algorithm, a discount where no
returns are discounted, a baseline or group std where the algorithm has its own, advantage
whitening where the algorithm fixes it by definition, the clip where one optimizer step per
rollout keeps the ratio at exactly 1, a KL controller's settings under another controller.
Only a value set away from its default counts, so the defaults of every algorithm pass.

Torch-free, so that ``rlhflab run``, ``rlhflab sweep`` and the RL commands check every arm's
settings before they import torch or write anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from rlhflab.errors import InputError
from rlhflab.registry import KL_ESTIMATORS, LOSS_AGGREGATIONS, ONLINE_ALGORITHMS, SEQUENCE_BASELINES


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
    defaults = algorithm_defaults(algo, rl.baseline)
    for key, value in defaults.items():
        if getattr(rl, key) is None:
            setattr(rl, key, value)
    check_section(rl, "rl")  # before beta_end is derived from beta
    for name, why in ignored_settings(rl, algo):
        raise InputError(why, field=f"rl.{name}")
    if rl.beta_end is None:
        rl.beta_end = rl.beta / 10
    if rl.loss_agg not in LOSS_AGGREGATIONS:
        raise InputError(f"expected {LOSS_AGGREGATIONS.domain()}", field="rl.loss_agg")
    if rl.batch_size % rl.samples_per_prompt:
        raise InputError(f"batch_size {rl.batch_size} is not a multiple of samples_per_prompt "
                         f"{rl.samples_per_prompt}", field="rl.batch_size")
    check_sampler_installed(rl.sampler)
    least = ONLINE_ALGORITHMS.entry(algo).options["min_samples_per_prompt"]
    if rl.samples_per_prompt < least:
        raise InputError(f"{algo} needs at least {least} samples per prompt", field="rl.samples_per_prompt")
    return rl


def check_sampler_installed(sampler: str) -> None:
    """``rl.sampler=vllm`` where vllm is not installed: one line naming the field, before
    anything is written (``samplers.make_sampler`` imports it when the run starts)."""
    import importlib.util

    if sampler == "vllm" and importlib.util.find_spec("vllm") is None:
        raise InputError("vllm is not installed here: rlhflab pins torch, and vLLM's wheels bring a CUDA build of "
                         "their own (docs/scaling.md, 'An external inference engine'); install it beside a torch "
                         "it supports, or leave rl.sampler=engine", field="rl.sampler")


_CRITIC = ("vf_coef", "value_clip_eps", "value_lr", "value_init", "gae_lambda")
_CLIP = ("clip_eps", "clip_eps_high", "dual_clip", "target_kl")
_CONTROLLER_FIELDS = {"kl_target": "adaptive", "kl_horizon": "adaptive", "kl_epsilon": "lagrangian",
                      "kl_dual_lr": "lagrangian", "beta_end": "linear"}


def ignored_settings(rl, algo: str) -> Iterator[tuple[str, str]]:
    """(field, why) for each field of ``rl`` (an RLConfig with the algorithm's defaults
    filled in) that ``algo`` would not read although it is set away from its default (the
    algorithm's default, else RLConfig's); ``why`` names the algorithm and what to do."""
    from rlhflab.config import RLConfig

    options = ONLINE_ALGORITHMS.entry(algo).options
    estimator = options["estimator"]
    defaults = algorithm_defaults(algo, rl.baseline)
    field_defaults = {f.name: f.default for f in dataclasses.fields(RLConfig)}

    def set_away(name: str) -> bool:
        value = getattr(rl, name)
        if name == "beta_end":  # derived as beta / 10 when empty (a resolved config holds it)
            return value is not None and value != rl.beta / 10
        return value != defaults.get(name, field_defaults[name])

    def leave(name: str) -> str:
        default = defaults.get(name, field_defaults[name])
        if default is None:
            return "leave it empty"
        return f"leave it at {str(default).lower() if isinstance(default, bool) else default}"

    checks: list[tuple[tuple[str, ...], bool, str]] = [
        (_CRITIC, options["critic"], f"{algo} has no critic: the value model and GAE are ppo's"),
        (("whiten_rewards",), estimator == "gae", f"{algo} does not whiten per-token rewards (ppo does, before GAE)"),
        (("gamma",), estimator in ("gae", "token_returns"),
         f"{algo} discounts no per-token returns (gamma is read by ppo's GAE and reinforce++'s returns-to-go)"),
        (("baseline",), estimator == "sequence_baseline" and "baseline" not in options,
         f"{algo} has its own baseline (rl.baseline chooses reinforce's)"),
        (("scale_std",), estimator == "group_relative", f"{algo} has no group std (scale_std is grpo's)"),
        (("whiten_advantages",), not options.get("whiten"), f"{algo} {options.get('whiten')}"),
        (_CLIP, rl.epochs * rl.num_minibatches > 1,
         f"{algo} takes one optimizer step per rollout here (epochs {rl.epochs} x num_minibatches "
         f"{rl.num_minibatches}): the ratio is exactly 1, so no clip binds and no approx-KL stops anything; set "
         f"rl.epochs or rl.num_minibatches above 1"),
        (("mismatch_tolerance",), rl.tis_cap is None,
         "with rl.tis_cap the sampler and the trainer may differ and the mismatch guard stands down"),
    ]
    for name, controller in _CONTROLLER_FIELDS.items():
        checks.append(((name,), rl.kl_controller == controller,
                       f"read only by rl.kl_controller={controller}; this run's is {rl.kl_controller}"))
    for names, read, why in checks:
        for name in names:
            if not read and set_away(name):
                yield name, f"{why}; {leave(name)}"
    if KL_ESTIMATORS.entry(rl.kl_estimator).options.get("old_logprobs") and rl.kl_in == "reward":
        yield "kl_estimator", (f"{rl.kl_estimator} reads the ratio pi_theta / pi_old, which is 1 in the reward, "
                               "where only its value counts (k3's): use k3 there, or rl.kl_in=loss")


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
