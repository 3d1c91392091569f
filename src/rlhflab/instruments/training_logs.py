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
   RLOO), an approximation otherwise (a mean of per-response means, OpenRLHF). TRL's DPO
   logs the names rlhflab's DPO logs (``rewards/chosen``, ``rewards/rejected``,
   ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``). TRL's
   ``eval_``-prefixed rows (its evaluation loop) are read like the training rows and win
   over them; OpenRLHF's W&B export prefixes ``train/``, dropped.
2. rlhflab's training names -> readings (``TRAINING_READINGS``): the held-out sampled KL
   (``eval/kl``, with ``--eval-prompts``) or else ``objective/kl``, the KL from the reference on
   the training prompts, is ``kl/sequence_mean``; the held-out judge's win-rate of the policy
   over the reference (``eval/win_rate`` with its interval, ``--eval-prompts`` and ``--judge``)
   is ``win_rate/judge``; rlhflab's held-out gold evaluations (``rl.eval_every``) give the gold
   and proxy scores of the policy and, from the evaluation before the first step, of the
   base. With gold evaluations along the curve, its over-optimization readings
   (``instruments.overoptimization.curve_readings``) come too.

A curve's first logged row stands for the base where the log has nothing better
(``CURVE_READINGS``): the mean completion length and the truncated share
(``length/mean``, ``length/truncated_rate`` from the last row, ``base/...`` from the first;
rlhflab's rollouts stop at EOS or at the maximum length, so its truncated share is one minus
``rollout/eos_rate``)
and DPO's log-probs, margins and accuracies (``logps/chosen``, ..., ``base/logps/chosen``,
...; from the held-out rows, ``eval/logps/chosen`` ..., when they make a curve: rlhflab's DPO
evaluates the reference at step 0). ``curve/<group>_first_step`` and ``_last_step`` say which
rows they came from.

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
        # DPO (trl/trainer/dpo_trainer.py): the same names as rlhflab's
        **{name: (name,) for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                      "logps/chosen", "logps/rejected")},
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
            "policy/approxkl_avg", "num_tokens", "clip_ratio/region_mean",
            # transformers' Trainer (every TRL trainer): its names and its closing row
            "learning_rate", "train_runtime", "train_loss", "total_flos", "train_samples_per_second",
            "logits/chosen", "logits/rejected"},
    "openrlhf": {"response_length", "rollout/reward_mean", "rollout/response_length_mean", "return", "ppo_kl",
                 "ppo_clip_ratio", "actor_lr", "generated_samples"},
}

# rlhflab training name -> reading, from the last value; the first name of a reading that the
# log holds wins. Curves add the base's from the evaluation at step 0.
TRAINING_READINGS = {
    "eval/kl": "kl/sequence_mean",  # sampled on the held-out prompts, as ``rlhflab eval`` does
    "objective/kl": "kl/sequence_mean",
    "gold/final": "gold/mean", "gold/initial": "base/gold/mean",
    "eval/proxy_final": "rm/score_mean", "eval/proxy_initial": "base/rm/score_mean",
    "eval/proxy_mean": "rm/score_mean",
    # the held-out judge's win-rate of the policy over the reference (--eval-prompts, --judge)
    "eval/win_rate": "win_rate/judge", "eval/win_rate_ci_low": "win_rate/judge_ci_low",
    "eval/win_rate_ci_high": "win_rate/judge_ci_high", "eval/win_rate_final": "win_rate/judge",
}

# Curves whose first logged row stands for the base: group -> {training name: reading}, and
# the held-out names that replace the training ones when they make a curve (rlhflab's DPO).
CURVE_READINGS: dict[str, dict[str, str]] = {
    "length": {"rollout/length_mean": "length/mean", "rollout/truncated_rate": "length/truncated_rate"},
    "dpo": {"logps/chosen": "logps/chosen", "logps/rejected": "logps/rejected",
            "rewards/margins": "rewards/margins", "rewards/accuracies": "rewards/accuracies"},
}
HELD_OUT_CURVES = {"dpo": "eval/"}  # eval/logps/chosen, ...: the same pairs at every evaluation
# Last values only (the implicit reward beta * log pi/pi_ref is already relative to the reference).
DPO_LAST = ("rewards/chosen", "rewards/rejected")


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


# Names one loop of a trainer logs, for saying what a log is (``log_kind``).
_LOOPS = (("DPO", {"rewards/margins", "rewards/chosen", "logps/chosen", "logits/chosen"}),
          ("GRPO", {"completions/mean_length", "completions/clipped_ratio", "reward_std", "frac_reward_zero_std"}),
          ("PPO", {"objective/kl", "objective/scores", "val/ratio", "policy/approxkl_avg"}),
          ("reward model", {"rm/member", "train/accuracy"}),
          ("SFT", {"eval/perplexity", "mean_token_accuracy", "train/tokens"}))
_TRAINERS = {"rlhflab": "rlhflab", "trl": "TRL", "openrlhf": "OpenRLHF"}


def log_kind(rows: list[dict], schema: str) -> str:
    """What wrote the rows, as a message names it: "TRL DPO", "rlhflab SFT", "TRL"."""
    keys = {name for row in rows for k in row for name in (k, _unprefixed(k)[0])}
    loop = next((name for name, marks in _LOOPS if keys & marks), None)
    return f"{_TRAINERS.get(schema, schema)} {loop}" if loop else _TRAINERS.get(schema, schema)


def read_log(path: Path) -> list[dict]:
    """The rows of a log file: one JSON object (a ``log_history`` list inside it is the
    rows), a JSON array of objects, or JSONL."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text, parse_constant=_reject_constant, **_NUMBERS)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise InputError(f"not valid JSON ({err})", file=str(path)) from None
        data = [_jsonl_row(line, n, path) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except ValueError as err:  # a bare NaN or Infinity
        raise InputError(f"not valid JSON ({err})", file=str(path)) from None
    else:
        _refuse_overflow(data, path)
    if isinstance(data, dict) and isinstance(data.get("log_history"), list):
        data = data["log_history"]  # TRL's trainer_state.json
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return data
    raise InputError("expected a JSON object of readings, a JSON array of log rows or JSONL", file=str(path))


class _Overflow(str):
    """A JSON number too large for a float (``1e400``, which Python's json reads as inf)."""


def _float(text: str):
    x = float(text)
    return _Overflow(text) if math.isinf(x) else x


def _int(text: str):
    value = int(text)
    try:
        float(value)
    except OverflowError:
        return _Overflow(text)
    return value


_NUMBERS = dict(parse_float=_float, parse_int=_int)


def _refuse_overflow(obj, path: Path, line: int | None = None, key: str | None = None) -> None:
    """An InputError naming the key of the first number too large for a float: JSON has no
    infinity, and reading ``1e400`` as one would report "KL inf" from a typo."""
    if isinstance(obj, _Overflow):
        shown = obj if len(obj) <= 40 else obj[:37] + "..."
        raise InputError(f"{shown} overflows a float (largest about 1.8e308)", file=str(path), line=line, field=key)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        _refuse_overflow(v, path, line, k if isinstance(obj, dict) else key)


def _jsonl_row(line: str, n: int, path: Path) -> dict:
    try:
        row = json.loads(line, parse_constant=_reject_constant, **_NUMBERS)
    except ValueError as err:
        raise InputError(f"not valid JSON ({err})", file=str(path), line=n) from None
    _refuse_overflow(row, path, n)
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
    win over the training values of the same row, and are also kept as ``eval/<name>`` (the
    curves of ``curve_bases`` do not mix evaluation rows into a training curve)."""
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
                if any(held_out.get(s) is not None for s in sources):  # kept apart for the curves too
                    mapped[f"eval/{target}"] = value
        token_kl, length = _number(mapped.get("kl/token_mean")), _number(mapped.get("rollout/length_mean"))
        if "objective/kl" not in mapped and token_kl is not None and length is not None:
            mapped["objective/kl"] = token_kl * length
        if len(mapped) > ("step" in mapped):
            out.append(mapped)
    return out


def curve_bases(rows: list[dict], have: dict) -> dict:
    """The ``CURVE_READINGS`` of ``rows``: per group, each name's last value as its reading and,
    where two rows or more hold it, its first value as the base's (``base/...``), with the
    steps they came from (``curve/<group>_first_step``, ``_last_step``); a base ``have``
    holds already (an ``eval.json``'s ``base/length/mean``) is kept, and so is a reading
    logged under its own name where the curve is another's (``length/mean``)."""
    out: dict = {}
    for group, names in CURVE_READINGS.items():
        source = ""  # the held-out names, where they make a curve
        prefix = HELD_OUT_CURVES.get(group)
        if prefix and sum(_number(r.get(prefix + next(iter(names)))) is not None for r in rows) >= 2:
            source = prefix
        for name, reading in names.items():
            held = [r for r in rows if _number(r.get(source + name)) is not None
                    and (source or f"eval/{name}" not in r)]  # a training curve of training rows only
            if not held or f"base/{reading}" in have or (reading in have and reading not in names):
                continue
            out[reading] = _number(held[-1][source + name])
            if len(held) >= 2:
                out[f"base/{reading}"] = _number(held[0][source + name])
                stepped = [r for r in held if _number(r.get("step")) is not None]
                if stepped:
                    out.setdefault(f"curve/{group}_first_step", _number(stepped[0]["step"]))
                    out.setdefault(f"curve/{group}_last_step", _number(stepped[-1]["step"]))
        if group == "dpo" and out.keys() & set(names.values()):
            out[f"curve/{group}_held_out"] = float(bool(source))
            for name in DPO_LAST:  # the implicit rewards of the same rows
                x = _number(last_values(rows).get(source + name))
                if x is not None:
                    out[name] = x
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
        step = last.get("eval/best_step", last.get("gold/best_step"))
        best = next((e for e in last["evals"] if isinstance(e, dict) and e.get("step") == step), {})
        for name, reading in (("gold/mean", "gold/mean"), ("eval/proxy_mean", "rm/score_mean"),
                              ("eval/kl", "kl/sequence_mean"), ("eval/win_rate", "win_rate/judge")):
            if _number(best.get(name)) is not None:
                out[reading] = best[name]
        if _number(best.get("eval/win_rate")) is not None:  # its interval from the log's row of that step
            row = next((r for r in rows if r.get("step") == step and _number(r.get("eval/win_rate")) is not None), {})
            for bound in ("_ci_low", "_ci_high"):
                out.pop(f"win_rate/judge{bound}", None)
                if _number(row.get(f"eval/win_rate{bound}")) is not None:
                    out[f"win_rate/judge{bound}"] = row[f"eval/win_rate{bound}"]
    # rlhflab's rollouts end at EOS or at the maximum length: the rest of the EOS rate is truncated
    rollouts = [{**r, "rollout/truncated_rate": 1.0 - _number(r["rollout/eos_rate"])}
                if "rollout/length_mean" in r and _number(r.get("rollout/eos_rate")) is not None
                and "rollout/truncated_rate" not in r else r for r in rows]
    out.update(curve_bases(rollouts, out))
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
