"""``rlhflab report DIR``: what kind of output a directory holds, and its report.

| kind      | recognised by                                      | the report                          |
|-----------|----------------------------------------------------|-------------------------------------|
| run       | ``summary.json`` + ``eval/`` or ``run.arms`` in ``config.yaml`` (``rlhflab run``) | the main job's report (``build.build_run_report``) |
| eval      | ``eval.json`` (``rlhflab eval``)                    | readings against the base, the diagnosis with its reasons, samples |
| rm-eval   | ``rm_eval.json`` (``rlhflab eval-rm``)              | the reward model's readings and calibration |
| bon       | ``bon.json`` (``rlhflab bon``)                      | gold, proxy and KL per n            |
| attack    | ``attack.json`` (``rlhflab attack-rm``)             | the patterns the reward model pays for, the probes, the truth |
| training  | ``metrics.jsonl`` or ``metrics.json`` (``rlhflab sft``, ``rm``, ``dpo``, ``ppo``, ``grpo``, ``rloo``, ``reinforce``, ...) | curves on the run's own step axis, the summary, every logged number, the diagnosis where readings allow |
| trl       | ``trainer_state.json`` (TRL's trainers; else the last ``checkpoint-N/trainer_state.json``) | the same, from its ``log_history`` |

Model output is untrusted text: every string goes through ``html.esc`` (``table``, the
plots' labels), and the page holds no script.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from rlhflab.errors import InputError
from rlhflab.report.build import (
    HEADLINE,
    RL_STEP,
    ProbeSets,
    _config,
    _jsonl,
    _load,
    _num,
    _setting,
    build_run_report,
    diagnosis_block,
    diagnosis_of,
    preference_step,
    reward_model_readings,
    section_instruments,
    section_rm_attack,
    section_samples,
)
from rlhflab.report.html import esc, page, table, write_page
from rlhflab.report.svg import Palette, line_plot

KINDS = ("run", "eval", "rm-eval", "bon", "attack", "training", "trl")
EXPECTED = ("summary.json (rlhflab run), eval.json (rlhflab eval), rm_eval.json (rlhflab eval-rm), bon.json "
            "(rlhflab bon), attack.json (rlhflab attack-rm), metrics.jsonl or metrics.json (a training run) or trainer_state.json (TRL)")


def _trl_state(d: Path) -> Path | None:
    """TRL's trainer_state.json of ``d``: its own, else the last checkpoint's."""
    if (d / "trainer_state.json").is_file():
        return d / "trainer_state.json"
    checkpoints = [(int(m.group(1)), p) for p in d.glob("checkpoint-*/trainer_state.json")
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name))]
    return max(checkpoints)[1] if checkpoints else None


def directory_kind(d: str | Path) -> str:
    """One of ``KINDS`` for an output directory; an ``InputError`` naming what was expected
    otherwise."""
    d = Path(d)
    if not d.exists():
        raise InputError("not found", file=str(d))
    if not d.is_dir():
        raise InputError("not a directory (give the output directory a command wrote)", file=str(d))
    if (d / "summary.json").is_file() and ((d / "eval").is_dir()
                                           or isinstance(_setting(_config(d / "config.yaml"), "run.arms"), list)):
        return "run"
    for name, kind in (("eval.json", "eval"), ("rm_eval.json", "rm-eval"), ("bon.json", "bon"), ("attack.json", "attack"),
                       ("metrics.jsonl", "training"), ("metrics.json", "training")):
        if (d / name).is_file():
            return kind
    if _trl_state(d) is not None:
        return "trl"
    raise InputError(f"no rlhflab output here: expected {EXPECTED}", file=str(d))


def build_report(d: str | Path, out: str | Path) -> Path:
    """The report of output directory ``d`` (any of ``KINDS``), written to ``out`` at once
    (a temporary file, then a rename)."""
    d = Path(d)
    kind = directory_kind(d)
    if kind == "run":
        return build_run_report(d, out=out)
    title, sections = {"eval": eval_report, "rm-eval": rm_eval_report, "bon": bon_report, "attack": attack_report,
                       "training": training_report, "trl": trl_report}[kind](d)
    return write_page(out, page(title, sections, subtitle=str(d.resolve())))


# ---------------------------------------------------------------------------------------
# rlhflab attack-rm


def attack_report(d: Path) -> tuple[str, list]:
    record = _load(d / "attack.json")
    if not isinstance(record, dict):
        raise InputError("not a JSON object", file=str(d / "attack.json"))
    readings = {k: v for k, v in record.items() if k.startswith("rm_attack/")}
    found = [f for f in diagnosis_of(readings).get("findings", []) if f.get("name") == "reward_exploit"]
    verdict = (table(["finding", "evidence", "root cause", "fix"],
                     [[f["name"], f["evidence"], f["root_cause"], f["fix"]] for f in found]) if found else
               '<p class="small">No <code>reward_exploit</code> finding: the first-ranked pattern is not paid for '
               "beyond the bar, the truth pays for it too, or there is no truth to ask (give <code>--judge</code>)."
               "</p>")
    return "rlhflab attack-rm report", [
        (f"What the reward model {record.get('rm', '')} pays for", section_rm_attack(record)),
        ("Diagnosis", verdict),
    ]


# ---------------------------------------------------------------------------------------
# rlhflab eval


def eval_report(d: Path) -> tuple[str, list]:
    readings = _load(d / "eval.json")
    if not isinstance(readings, dict):
        raise InputError("not a JSON object of readings", file=str(d / "eval.json"))
    samples = _load(d / "samples.json")
    samples = samples if isinstance(samples, dict) else {}
    prompts = samples.get("prompts") if isinstance(samples.get("prompts"), list) else []
    if samples.get("families"):
        k = _setting(_config(d / "config.yaml"), "world.n_eval")
        on = f"the {len(prompts)} eval probes of the world" + (f" (world.n_eval = {k} per family)" if k else "")
    elif prompts:
        on = f"the {len(prompts)} prompts of the evaluation's prompt file"
    else:
        on = "the evaluation's files"
    diagnosis = _load(d / "diagnosis.json")
    if not isinstance(diagnosis, dict):
        diagnosis = diagnosis_of(readings)
    known = {k for k, _ in HEADLINE}
    rest = sorted(k for k, v in readings.items() if not k.startswith("base/") and k not in known
                  and isinstance(v, (int, float, str)) and not isinstance(v, bool))
    every = "<h3>Every other reading</h3>" + table(["reading", "policy", "base"], [[k, _value(readings[k]), _value(readings.get(f"base/{k}", ""))]
                                                   for k in rest]) if rest else ""
    return "rlhflab eval report", [
        ("Readings against the base", section_instruments({"policy": readings}, "base", on) + every),
        ("Diagnosis", diagnosis_block("policy", diagnosis, readings, "base")),
        ("Samples side by side", section_samples({"policy": samples} if samples else {}, base_name="base")),
    ]


def _value(v):
    if isinstance(v, str):
        x = _num(v)
        return x if v.strip().lower() in ("nan", "inf", "-inf") else v
    return v


# ---------------------------------------------------------------------------------------
# rlhflab eval-rm, rlhflab bon


def rm_eval_report(d: Path) -> tuple[str, list]:
    ev = _load(d / "rm_eval.json")
    if not isinstance(ev, dict):
        raise InputError("not a JSON object of readings", file=str(d / "rm_eval.json"))
    return "rlhflab eval-rm report", [("Reward model", reward_model_readings(ev))]


def bon_report(d: Path) -> tuple[str, list]:
    rec = _load(d / "bon.json")
    if not isinstance(rec, dict) or not isinstance(rec.get("rows"), list):
        raise InputError("expected bon.json's object with its rows", file=str(d / "bon.json"))
    rows = [r for r in rec["rows"] if isinstance(r, dict)]
    on = (f"the first {rec.get('n_prompts')} held-out world prompts" if rec.get("gold")
          else f"{rec.get('n_prompts', 'the')} prompts of {rec.get('source', 'the prompt file')}")
    parts = [table(["n", "KL plug-in", "KL analytic", "proxy", "gold", "win-rate vs one sample"],
                   [[r.get("n"), _num(r.get("bon/kl_plugin")), _num(r.get("bon/kl_analytic")),
                     _num(r.get("bon/proxy_mean")), _num(r.get("bon/gold_mean")), _num(r.get("bon/win_rate"))]
                    for r in rows])]
    d_ = [math.sqrt(max(0.0, _num(r.get("bon/kl_plugin")))) for r in rows]
    points = {"gold": (d_, [_num(r.get("bon/gold_mean")) for r in rows]),
              "proxy (RM)": (d_, [_num(r.get("bon/proxy_mean")) for r in rows])}
    parts.append(line_plot({}, points=points, colors={"gold": "#1f77b4", "proxy (RM)": "#1f77b4"},
                           styles={"proxy (RM)": "ring"}, title="best-of-n: gold and proxy vs sqrt(KL)",
                           xlabel="d = sqrt(plug-in KL from the policy), one point per n", ylabel="score"))
    parts.append(f'<p class="small">Mean over {esc(on)}: the reward model keeps its best of n samples of the '
                 "policy; KL is the plug-in estimate (the analytic log n - (n-1)/n beside it is an upper "
                 "bound).</p>")
    return "rlhflab bon report", [("Best-of-n", "\n".join(parts))]


# ---------------------------------------------------------------------------------------
# Training runs: rlhflab's metrics.jsonl, TRL's log_history

# (title, y label, keys drawn as its series): rlhflab's names and TRL's; a chart is drawn when
# one of its keys is logged.
CHARTS = (
    ("loss", "loss", ("train/loss", "eval/loss", "loss", "eval_loss")),
    ("implicit reward margin", "margin", ("rewards/margins", "eval/rewards/margins", "eval_rewards/margins")),
    ("implicit rewards of chosen and rejected", "implicit reward", ("rewards/chosen", "rewards/rejected")),
    ("accuracy", "accuracy", ("rewards/accuracies", "eval/rewards/accuracies", "eval_rewards/accuracies",
                              "train/accuracy", "eval/accuracy")),
    ("log-probs of chosen and rejected", "log-prob", ("logps/chosen", "logps/rejected", "eval/logps/chosen",
                                                      "eval/logps/rejected")),
    ("reward (proxy), rollout batch", "reward", ("objective/scores", "reward")),
    ("KL from the reference per response", "nats", ("objective/kl", "kl/sequence_mean")),
    ("KL from the reference per token (TRL's kl)", "nats per token", ("kl",)),
    ("response length", "tokens", ("rollout/length_mean", "completions/mean_length")),
    ("truncated responses", "share", ("completions/clipped_ratio",)),
    ("entropy", "entropy", ("objective/entropy", "entropy")),
    ("beta", "beta", ("kl/beta",)),
    ("PPO clip fraction", "share", ("policy/clipfrac",)),
    ("RM score on held-out prompts", "RM score", ("eval/proxy_mean",)),
    ("perplexity (held-out)", "perplexity", ("eval/perplexity",)),
    ("learning rate", "learning rate", ("train/lr", "learning_rate", "lr")),
)


def training_kind(d: Path, summary: dict, rows: list[dict]) -> str:
    """"online", "preference", "rm", "sft" or "" (unknown) for an rlhflab training run."""
    keys = set(summary) | {k for r in rows for k in r}
    if "algo" in summary or (d / "run.json").is_file() or "objective/kl" in keys:
        return "online"
    if "dpo/loss" in summary or "rewards/margins" in keys:
        return "preference"
    if "rm/ensemble" in summary or "rm/member" in keys or (d / "model" / "reward_model.json").is_file():
        return "rm"
    if "eval/perplexity" in summary or "train/tokens" in keys:
        return "sft"
    return ""


def _step_label(kind: str, summary: dict) -> str:
    if kind == "online":
        return RL_STEP
    if kind == "preference":
        return preference_step([str(summary.get("dpo/loss", "dpo"))])
    return {"rm": "RM optimizer step (one batch of comparisons)",
            "sft": "SFT optimizer step (one batch of demonstrations)",
            "trl": "TRL step (global_step: one optimizer step)"}.get(kind, "step (as logged)")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve_charts(rows: list[dict], xlabel: str, gold_on: str = "") -> str:
    """One chart per ``CHARTS`` entry that the rows log, one series per key (per ensemble
    member for a reward model's ``rm/member`` rows), each key in one colour throughout."""
    members = sorted({r["rm/member"] for r in rows if _is_number(r.get("rm/member"))})
    palette = Palette()
    plots = []
    for title, ylabel, keys in (*((("gold utility (" + gold_on + ")", "gold utility", ("gold/mean",)),)
                                  if gold_on else ()), *CHARTS):
        series = {}
        for key in keys:
            for m in members if len(members) > 1 else [None]:
                pts = [(_num(r["step"]), _num(r[key])) for r in rows
                       if _is_number(r.get(key)) and _is_number(r.get("step")) and (m is None or r.get("rm/member") == m)]
                if pts:
                    series[key if m is None else f"{key} (member {m})"] = ([p[0] for p in pts], [p[1] for p in pts])
        if series:
            plots.append(line_plot(series, title=title, xlabel=xlabel, ylabel=ylabel,
                                   colors={k: palette(k) for k in series}))
    return f'<div class="plots">{"".join(plots)}</div>' if plots else "<p><em>no curve logged</em></p>"


def every_number(rows: list[dict]) -> str:
    """Each logged number: how many points, the first, last, least and greatest."""
    values: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and _is_number(v):
                values.setdefault(k, []).append(float(v))
    return table(["logged", "points", "first", "last", "min", "max"],
                 [[k, len(v), v[0], v[-1], min(v), max(v)] for k, v in sorted(values.items())])


def _diagnosis(d: Path, log: Path | None = None) -> str:
    """What ``rlhflab diagnose DIR`` (or ``--metrics LOG``) says, with its reasons; a
    refusal's one line in its place."""
    from rlhflab.diagnose import load_readings

    try:
        readings, _ = load_readings(None, str(log)) if log else load_readings(str(d), None)
    except InputError as err:
        return f"<p><em>not diagnosed: {esc(err)}</em></p>"
    return diagnosis_block(d.resolve().name, diagnosis_of(readings), readings, "base")


def training_report(d: Path) -> tuple[str, list]:
    rows = [r for r in _jsonl(d / "metrics.jsonl") if isinstance(r, dict)]
    summary = _load(d / "metrics.json")
    summary = summary if isinstance(summary, dict) else {}
    kind = training_kind(d, summary, rows)
    probes = ProbeSets(d)
    gold_on = {"online": probes.first("rl.n_eval"), "preference": probes.first("dpo.n_world_eval")}.get(kind, "")
    if not any("gold/mean" in r for r in rows):
        gold_on = ""
    scalars = [[k, _value(v)] for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None]
    sections = [("Training curves", curve_charts(rows, _step_label(kind, summary), gold_on.removeprefix("the "))
                 + (f'<p class="small">gold utility: mean over {esc(gold_on)} at each held-out evaluation; the '
                    "point at step 0 is the starting policy on those prompts.</p>" if gold_on else ""))]
    if scalars:
        sections.append(("Summary (metrics.json)", table(["key", "value"], scalars)))
    if kind in ("online", "preference"):
        sections.append(("Diagnosis", _diagnosis(d)))
    if rows:
        sections.append(("Every logged number (metrics.jsonl)", every_number(rows)))
    what = {"online": "online RL", "preference": "preference optimization", "rm": "reward model",
            "sft": "SFT"}.get(kind, "training")
    return f"rlhflab {what} run report", sections


def trl_report(d: Path) -> tuple[str, list]:
    from rlhflab.instruments.training_logs import read_log

    path = _trl_state(d)
    rows = [r for r in read_log(path) if isinstance(r, dict)]
    state = _load(path) or {}
    facts = [[k, state[k]] for k in ("global_step", "max_steps", "num_train_epochs", "best_metric",
                                     "best_model_checkpoint") if isinstance(state.get(k), (int, float, str))]
    sections = [("Training curves", curve_charts(rows, _step_label("trl", {}))),
                ("Diagnosis", _diagnosis(d, path)),
                ("Every logged number (log_history)", every_number(rows))]
    if facts:
        sections.insert(1, ("Trainer state", table(["key", "value"], facts)))
    return f"TRL trainer report ({path.relative_to(d)})", sections
