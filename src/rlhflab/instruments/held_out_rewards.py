"""Verifiable rewards on held-out prompts: the reward functions of training
(``rlhflab.rewards``: ``--reward-fn gold``, ``module:function``, ``file.py:function``, TRL's
signature ``fn(prompts, completions, **columns)``, the rows' other columns as keywords) on
the policy's and the base's samples of the same prompts.

Readings, per function ``<f>`` (its name: the built-in's, or the function's own after the
last ``:``; a second function of the same name is ``<f>_2``):

| key (and ``base/<key>``) | meaning |
|---|---|
| ``reward_fn/<f>/accuracy`` (+ ``_ci_low``, ``_ci_high``) | where every reward is 0 or 1 (a verifier): the share rewarded 1, 95% Wilson interval |
| ``reward_fn/<f>/mean`` (+ ``_ci_low``, ``_ci_high``) | otherwise: the mean reward, 95% normal interval |
| ``reward_fn/<f>/diff`` (+ ``_ci_low``, ``_ci_high``) | policy minus base, paired over prompts (no ``base/``) |
| ``reward_fn/n`` | prompts |

Weights (``gold=0.5``) are training's: a held-out reading is each function's own value.
"""

from __future__ import annotations

import math

from rlhflab.instruments.capability import Z95, paired_difference
from rlhflab.instruments.win_rate import wilson_interval


def load_functions(specs) -> list[tuple[str, object]]:
    """(reading name, ``rewards.FunctionReward``) per spec: a string, or through the Python API
    a callable or a ``(weight, callable)`` pair, as training takes them (``rewards.build_reward``,
    whose loader this is; the weight is not applied to a held-out reading)."""
    from rlhflab.errors import InputError
    from rlhflab.rewards import FunctionReward, load_reward_function

    out, seen = [], {}
    for spec in specs:
        if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[1]):
            spec = spec[1]
        if isinstance(spec, str):
            fn = load_reward_function(spec)[1]
        elif callable(spec):
            fn = FunctionReward(spec)
        else:
            raise InputError(f"reward function {spec!r}: expected a spec string, a callable or (weight, callable)",
                             field="--reward-fn")
        base = fn.name.rpartition(":")[2] or "reward"
        seen[base] = seen.get(base, 0) + 1
        out.append((base if seen[base] == 1 else f"{base}_{seen[base]}", fn))
    return out


def _summary(key: str, values: list[float], binary: bool) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    if binary:
        low, high = wilson_interval(mean, n)
        return {f"{key}/accuracy": mean, f"{key}/accuracy_ci_low": low, f"{key}/accuracy_ci_high": high}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    half = Z95 * sd / math.sqrt(n)
    return {f"{key}/mean": mean, f"{key}/mean_ci_low": mean - half, f"{key}/mean_ci_high": mean + half}


def reward_readings(functions, rows: list[dict], prompts: list[str], policy, base) -> tuple[dict[str, float], dict]:
    """(readings, rewards per sample) of ``functions`` (``load_functions``) on the
    ``policy``'s and ``base``'s completions (``sampling.Completion``, one per row)."""
    from rlhflab.rewards import score_responses

    out: dict[str, float] = {"reward_fn/n": float(len(rows))}
    drawn: dict[str, dict] = {}
    for name, fn in functions:
        got = {who: score_responses(fn, prompts, [c.text for c in comps], [c.eos for c in comps], rows=rows).tolist()
               for who, comps in (("policy", policy), ("base", base))}
        binary = all(v in (0.0, 1.0) for vs in got.values() for v in vs)
        key = f"reward_fn/{name}"
        out.update(_summary(key, got["policy"], binary))
        out.update({f"base/{k}": v for k, v in _summary(key, got["base"], binary).items()})
        d = paired_difference(got["policy"], got["base"])
        out.update({f"{key}/diff": d["diff"], f"{key}/diff_ci_low": d["ci_low"], f"{key}/diff_ci_high": d["ci_high"]})
        drawn[name] = got
    return out, drawn
