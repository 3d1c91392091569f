"""A training run's logs as readings: rlhflab's own, TRL's and OpenRLHF's metric names mapped
to the keys ``rlhflab.diagnose`` reads. docs/instruments.md has the tables with the trainers'
source files the names come from.

A log is a list of rows, one per logging step: rlhflab's ``metrics.jsonl`` or any JSONL of
``{"step": ..., name: value}`` rows, TRL's ``trainer_state.json`` (its ``log_history``), a JSON
array of rows, or one JSON object (``eval.json``, rlhflab's ``metrics.json`` summary, a row
exported from a tracker). A reading is the last value logged under its name: a curve's last
point, where rows that lack the name (TRL's closing ``train_runtime`` row) are passed over.

Two steps take a log to readings:

1. a trainer's names -> rlhflab's training names (``SCHEMAS``). TRL's PPO logs
   ``objective/kl`` (the KL summed over the response, averaged over responses) and
   ``objective/scores`` as rlhflab does. TRL's GRPO and RLOO and OpenRLHF log a per-token KL
   (``kl``) and the mean completion length in tokens; their product is the KL per response,

       objective/kl = kl/token_mean * rollout/length_mean,

   exact when the per-token mean is weighted by tokens over the same completions (TRL's
   RLOO), an approximation otherwise (a mean of per-response means, OpenRLHF). TRL's
   ``eval_``-prefixed rows (its evaluation loop) are read like the training rows and win
   over them; OpenRLHF's W&B export prefixes ``train/``, dropped.
2. rlhflab's training names -> readings (``TRAINING_READINGS``): ``objective/kl`` is the KL
   from the reference on the training prompts (``kl/sequence_mean``); rlhflab's held-out gold
   evaluations (``rl.eval_every``) give the gold and proxy scores of the policy and, from the
   evaluation before the first step, of the base. With gold evaluations along the curve, its
   over-optimization readings (``instruments.overoptimization.curve_readings``) come too.

Names no schema maps are kept for rlhflab's own files and dropped for the other trainers'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlhflab.errors import InputError

# trainer name -> rlhflab training name, per trainer. The first source of a target that a row
# holds wins.
SCHEMAS: dict[str, dict[str, tuple[str, ...]]] = {
    "trl": {
        "objective/kl": ("objective/kl",),  # PPO (trl/experimental/ppo/ppo_trainer.py)
        "objective/scores": ("objective/scores", "reward"),  # PPO; GRPO and RLOO: the summed reward
        "objective/entropy": ("objective/entropy",),
        "kl/token_mean": ("kl",),  # GRPO, RLOO: per token
        "rollout/length_mean": ("completions/mean_length",),
        "rollout/truncated_rate": ("completions/clipped_ratio",),
        "rollout/logprob_diff_max": ("sampling/sampling_logp_difference/max",),  # vLLM sampler vs trainer
    },
    "openrlhf": {
        "objective/scores": ("rollout/reward_mean", "reward"),
        "kl/token_mean": ("kl",),  # per token, averaged over responses
        "rollout/length_mean": ("rollout/response_length_mean", "response_length"),
        "rollout/truncated_rate": ("rollout/truncated_rate",),
    },
}
SCHEMA_NAMES = ("rlhflab", *SCHEMAS)

# Names only one trainer logs: detection counts them.
_MARKERS = {
    "rlhflab": {"kl/beta", "kl/status", "rollout/eos_rate", "gold/initial", "gold/final", "eval/proxy_mean",
                "kl/sequence_mean", "win_rate/gold", "win_rate/judge", "win_rate/rm", "length/mean", "algo"},
    "trl": {"completions/mean_length", "reward_std", "frac_reward_zero_std", "episode", "eps", "val/ratio",
            "policy/approxkl_avg", "num_tokens", "clip_ratio/region_mean"},
    "openrlhf": {"response_length", "rollout/reward_mean", "rollout/response_length_mean", "return", "ppo_kl",
                 "ppo_clip_ratio", "actor_lr", "generated_samples"},
}

# rlhflab training name -> reading. Curves add the base's from the evaluation at step 0.
TRAINING_READINGS = {
    "objective/kl": "kl/sequence_mean",
    "gold/final": "gold/mean", "gold/initial": "base/gold/mean",
    "eval/proxy_final": "rm/score_mean", "eval/proxy_initial": "base/rm/score_mean",
    "eval/proxy_mean": "rm/score_mean",
}


def _unprefixed(key: str) -> tuple[str, bool]:
    """(name, from an evaluation row): TRL's ``eval_`` and W&B's ``train/`` prefixes removed."""
    if key.startswith("eval_"):
        return key[len("eval_"):], True
    if key.startswith("train/"):
        return key[len("train/"):], False
    return key, False


def detect_schema(rows: list[dict]) -> str:
    """The trainer whose own names the rows hold most of; rlhflab on a tie or none."""
    keys = {_unprefixed(k)[0] for row in rows for k in row}
    hits = {name: len(keys & markers) for name, markers in _MARKERS.items()}
    best = max(hits.values())
    return "rlhflab" if best == 0 or hits["rlhflab"] == best else max(hits, key=hits.get)


def read_log(path: Path) -> list[dict]:
    """The rows of a log file: one JSON object (a ``log_history`` list inside it is the
    rows), a JSON array of objects, or JSONL."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise InputError(f"not valid JSON ({err})", file=str(path)) from None
        data = [_jsonl_row(line, n, path) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except ValueError as err:  # a bare NaN or Infinity
        raise InputError(f"not valid JSON ({err})", file=str(path)) from None
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        data = data["log_history"]  # TRL's trainer_state.json
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return data
    raise InputError("expected a JSON object of readings, a JSON array of log rows or JSONL", file=str(path))


def _jsonl_row(line: str, n: int, path: Path) -> dict:
    try:
        row = json.loads(line, parse_constant=_reject_constant)
    except ValueError as err:
        raise InputError(f"not valid JSON ({err})", file=str(path), line=n) from None
    if not isinstance(row, dict):
        raise InputError("expected a JSON object (one log row per line)", file=str(path), line=n)
    return row


def _reject_constant(name: str):
    spelled = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}.get(name, name)
    raise ValueError(f"bare {name}: JSON has no such number; write the string \"{spelled}\"")


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        x = float(v)
    except ValueError:
        return None
    return None if math.isnan(x) else x


def _or_nan(v) -> float:
    x = _number(v)
    return float("nan") if x is None else x


def last_values(rows: list[dict]) -> dict:
    """Each name's last logged value that is not None (a row missing a name passes it over)."""
    out: dict = {}
    for row in rows:
        out.update({k: v for k, v in row.items() if v is not None})
    return out


def to_training_names(rows: list[dict], schema: str) -> list[dict]:
    """Rows in rlhflab's training names (step 1 of the module docstring); ``eval_`` values
    win over the training values of the same row."""
    if schema == "rlhflab":
        return rows
    table = SCHEMAS[schema]
    out = []
    for row in rows:
        train, held_out = {}, {}
        for key, value in row.items():
            name, is_eval = _unprefixed(key)
            (held_out if is_eval else train)[name] = value
        merged = {**train, **{k: v for k, v in held_out.items() if v is not None}}
        mapped = {"step": row["step"]} if "step" in row else {}
        for target, sources in table.items():
            value = next((merged[s] for s in sources if merged.get(s) is not None), None)
            if value is not None:
                mapped[target] = value
        token_kl, length = _number(mapped.get("kl/token_mean")), _number(mapped.get("rollout/length_mean"))
        if "objective/kl" not in mapped and token_kl is not None and length is not None:
            mapped["objective/kl"] = token_kl * length
        if len(mapped) > ("step" in mapped):
            out.append(mapped)
    return out


def readings_of(rows: list[dict]) -> dict:
    """Readings from rows in rlhflab's names (step 2 of the module docstring): each name's
    last value, the training names mapped to readings, the base's gold and proxy from the
    evaluation at step 0, and the curve's over-optimization readings."""
    last = last_values(rows)
    out = dict(last)
    for name, reading in TRAINING_READINGS.items():  # a reading logged as such wins
        if reading not in out and _number(last.get(name)) is not None:
            out[reading] = last[name]
    if last.get("early_stop/restored_best") is True and isinstance(last.get("evals"), list):
        # the saved policy is the best evaluation's, not the last one's
        best = next((e for e in last["evals"] if isinstance(e, dict) and e.get("step") == last.get("gold/best_step")),
                    {})
        for name, reading in (("gold/mean", "gold/mean"), ("eval/proxy_mean", "rm/score_mean")):
            if _number(best.get(name)) is not None:
                out[reading] = best[name]
    evals = [r for r in rows if _number(r.get("gold/mean")) is not None]
    first = evals[0] if evals else {}
    if first.get("step") == 0:  # evaluated before the first update: the base policy
        out.setdefault("base/gold/mean", first["gold/mean"])
        if _number(first.get("eval/proxy_mean")) is not None:
            out.setdefault("base/rm/score_mean", first["eval/proxy_mean"])
    curve = [r for r in evals if _number(r.get("objective/kl")) is not None]
    if len(curve) >= 2:
        from rlhflab.instruments.overoptimization import curve_readings

        out.update(curve_readings([_number(r["objective/kl"]) for r in curve], [_number(r["gold/mean"]) for r in curve],
                                  [_or_nan(r.get("objective/scores")) for r in curve]))
    return out
