"""The Python API: each stage as a function of its config, for notebooks and scripts.

    from rlhflab import api

    cfg = api.load_config("configs/tiny.yaml")
    api.sft(cfg, out="runs/a/sft")                                   # the world's demonstrations
    api.reward_model(cfg, out="runs/a/rm", sft="runs/a/sft")
    api.rl(cfg, "ppo", out="runs/a/ppo", sft="runs/a/sft", rm="runs/a/rm",
           reward_fns=[(0.1, my_reward)])                            # TRL's reward-function signature
    readings = api.evaluate(cfg, policy="runs/a/ppo", base="runs/a/sft", rm="runs/a/rm")
    api.diagnose(readings)["verdict"]

Each function does what the command of the same name does (``rlhflab sft``, ``rm``,
``dpo``, ``ppo|reinforce|rloo|grpo``, ``eval``, ``diagnose``), with the same validation,
artifacts and returned summary; a bad input raises ``rlhflab.errors.InputError`` (one line,
naming the file, line or field). ``cfg`` is a ``rlhflab.config.Config`` (``load_config``
reads a preset and ``--set``-style overrides); it is copied, never changed. Paths may be
``str`` or ``Path``. Reward functions and judges may be Python callables:
``fn(prompts, completions, **columns) -> list[float]`` (``rlhflab.rewards.FunctionReward``)
and ``fn(prompts, completions_a, completions_b) -> list[P(a better)]``
(``rlhflab.instruments.judges.CallableJudge``; a judge object with ``compare`` is used as it
is).

Threads: the CLI chooses torch's thread count and OpenMP wait policy from how busy the CPUs
are (``rlhflab.threads``); the API leaves its host process's threads alone (a notebook has
often imported torch already, and libgomp reads its policy only then). A script calls
``rlhflab.threads.configure()`` before ``import torch`` and may print the ``line`` of the
choice it returns, or sets ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhflab.config import Config, load_config

__all__ = ["Config", "load_config", "sft", "reward_model", "dpo", "rl", "evaluate", "diagnose"]


def _cfg(cfg: Config | None) -> Config:
    return copy.deepcopy(cfg) if cfg is not None else load_config()


def sft(cfg: Config | None = None, *, out: str | Path, data: str | Path | None = None,
        eval_data: str | Path | None = None, model: str | Path | None = None, overwrite: bool = False) -> dict:
    """Supervised fine-tuning (``rlhflab sft``): ``model`` (a local HF causal LM; default
    ``cfg.model.path``, else a new tiny model) on ``data`` (any format ``data.load_rows``
    reads; default the world's demonstrations). Writes ``out/model``; returns the summary."""
    from rlhflab.commands.sft import run_sft

    cfg = _cfg(cfg)
    if model is not None:
        cfg.model.path = str(model)
    return run_sft(cfg, Path(out), data=_str(data), eval_data=_str(eval_data), overwrite=overwrite)


def reward_model(cfg: Config | None = None, *, out: str | Path, sft: str | Path | None = None,
                 data: str | Path | None = None, eval_data: str | Path | None = None,
                 backbone: str | Path | None = None, overwrite: bool = False) -> dict:
    """A Bradley-Terry (or Plackett-Luce) reward model (``rlhflab rm``) on ``data``'s
    comparisons, or on comparisons the world's raters make of ``sft``'s samples."""
    from rlhflab.commands.rm import run_rm

    cfg = _cfg(cfg)
    if backbone is not None:
        cfg.rm.backbone = str(backbone)
    return run_rm(cfg, Path(out), sft=_str(sft), data=_str(data), eval_data=_str(eval_data), overwrite=overwrite)


def dpo(cfg: Config | None = None, *, out: str | Path, sft: str | Path, data: str | Path | None = None,
        eval_data: str | Path | None = None, loss: str | None = None, unpaired_from_pairs: bool = False,
        overwrite: bool = False) -> dict:
    """The DPO family (``rlhflab dpo``): ``loss`` is any name of
    ``rlhflab.registry.PREFERENCE_LOSSES`` (default ``cfg.dpo.loss``)."""
    from rlhflab.commands.dpo import run_dpo

    cfg = _cfg(cfg)
    if loss is not None:
        cfg.dpo.loss = loss
    return run_dpo(cfg, Path(out), Path(sft), data=_str(data), eval_data=_str(eval_data),
                   unpaired_from_pairs=unpaired_from_pairs, overwrite=overwrite)


def rl(cfg: Config | None = None, algo: str = "ppo", *, out: str | Path, sft: str | Path,
       rm: str | Path | None = None, reward_fns: Sequence[str | Callable | tuple[float, Callable]] = (),
       prompts: str | Path | None = None, eval_prompts: str | Path | None = None,
       judge: str | Callable | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    """Online RL (``rlhflab ppo|reinforce|rloo|grpo``): ``algo`` is any name of
    ``rlhflab.registry.ONLINE_ALGORITHMS``. The reward is ``rl.rm_weight`` x ``rm`` plus the
    ``reward_fns``: spec strings (``gold``, ``module:function=0.5``), callables or
    ``(weight, callable)`` pairs, called with the prompts' rows' columns as TRL calls them.
    ``judge`` (with ``eval_prompts``): a spec (``rm:DIR``, ``lm:DIR``, ``py:file.py:fn``) or a
    callable ``fn(prompts, completions_a, completions_b) -> list[P(a better)]``."""
    from rlhflab.commands.rl import run_rl
    from rlhflab.errors import InputError
    from rlhflab.registry import ONLINE_ALGORITHMS

    if algo not in ONLINE_ALGORITHMS:
        raise InputError(f"unknown algorithm {algo!r}; expected one of {', '.join(ONLINE_ALGORITHMS)}", field="algo")
    return run_rl(_cfg(cfg), algo, Path(out), sft=str(sft), rm=_str(rm), reward_fns=list(reward_fns),
                  prompts=_str(prompts), eval_prompts=_str(eval_prompts), judge=judge, overwrite=overwrite,
                  resume=resume)


def evaluate(cfg: Config | None = None, *, policy: str | Path, base: str | Path, rm: str | Path | None = None,
             prompts: str | Path | None = None, judge: str | Callable | None = None, mc: str | Path | None = None,
             harmful: str | Path | None = None, benign: str | Path | None = None, seed: int = 0,
             samples: bool = False, capability: str | None = None, capability_limit: int | None = None,
             sycophancy: str | Path | None = None, sycophancy_match: str | None = None,
             reward_fns: Sequence[str | Callable] = ()):
    """Every instrument of ``policy`` against ``base`` (``rlhflab eval``): on the world's
    probes, or on the user's files when any of ``prompts``/``mc``/``harmful``/``benign``/
    ``capability``/``sycophancy`` is given (``judge``: ``rm:DIR``, ``lm:DIR``,
    ``py:module:function``, ``world:ai`` or a callable
    ``fn(prompts, completions_a, completions_b) -> list[P(a better)]``; ``capability``: lm-eval
    tasks, comma-separated; ``reward_fns``: specs or callables with TRL's signature, scored on
    the samples of ``prompts``). Returns the readings (and the samples too with ``samples=True``)."""
    from rlhflab.commands.eval import evaluate_on_user_data, evaluate_policy

    cfg = _cfg(cfg)
    if prompts or mc or harmful or benign or capability or sycophancy:
        metrics, drawn = evaluate_on_user_data(cfg, str(policy), str(base), _str(rm), prompts=_str(prompts),
                                               mc=_str(mc), harmful=_str(harmful), benign=_str(benign),
                                               seed=seed, judge=judge, capability=capability,
                                               capability_limit=capability_limit, sycophancy=_str(sycophancy),
                                               sycophancy_match=sycophancy_match, reward_fns=list(reward_fns))
    elif reward_fns or sycophancy_match or capability_limit is not None:
        from rlhflab.errors import InputError

        raise InputError("reward_fns, sycophancy_match and capability_limit read a file of yours: give prompts, "
                         "sycophancy or capability with them")
    else:
        metrics, drawn = evaluate_policy(cfg, str(policy), str(base), _str(rm), None, seed)
    return (metrics, drawn) if samples else metrics


def diagnose(readings: dict | str | Path, schema: str = "auto") -> dict:
    """The diagnosis (``rlhflab diagnose``) of a readings dict (``evaluate``'s, checked as a
    file's readings are: a rate outside [0, 1] is an InputError naming it), a run directory or
    a metrics file (rlhflab's, TRL's or OpenRLHF's: ``schema``): the verdict, the findings,
    what is left to measure and (for a directory or a file) ``source``. A directory of runs
    (the main job's, a sweep's) gives ``{arm: diagnosis}``."""
    from rlhflab.diagnose import check_readings, diagnose_arms, holds_arms, load_readings
    from rlhflab.diagnose import diagnose as run_rules

    if isinstance(readings, dict):
        return run_rules(check_readings(readings))  # checked as a file's readings are
    path = Path(readings)
    if holds_arms(path):
        return diagnose_arms(path, schema)[0]
    readings, source = load_readings(str(path), None, schema) if path.is_dir() else load_readings(None, str(path), schema)
    return {**run_rules(readings), "source": source}


def _str(path: str | Path | None) -> str | None:
    return None if path is None else str(path)
