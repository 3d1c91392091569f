"""``report.html`` of a run directory written by ``rlhflab run``: every section is built from
the artifacts on disk and skipped (with a note) when its artifact is absent.

Expected layout (each piece optional): ``summary.json`` (stage timings), ``sft/``,
``rm/metrics.json``, ``rm_eval/rm_eval.json``, one directory per arm with ``metrics.jsonl``
(training curve), ``eval/<name>/eval.json`` + ``samples.json`` + ``diagnosis.json``,
``sweep/frontier.json`` and ``bandit_frontier.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlhflab.diagnose import instrument_status
from rlhflab.report.html import esc, page, table, write_page
from rlhflab.report.svg import line_plot

HEADLINE = (
    ("gold/mean", "gold utility"), ("rm/score_mean", "RM score"), ("kl/sequence_mean", "KL from SFT"),
    ("win_rate/gold", "win-rate vs SFT (gold)"), ("win_rate/raters", "win-rate (rater panel)"),
    ("win_rate/gold_length_controlled", "win-rate (length-controlled)"),
    ("refusal/harmful_rate", "harmful refused"), ("refusal/benign_rate", "benign refused"),
    ("sycophancy/agree_rate", "agrees with wrong user"), ("capability/accuracy", "capability"),
    ("length/mean", "mean length"), ("diversity/distinct_2", "distinct-2"), ("keywords/density", "keyword density"),
)


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _curve(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], _num(r[key])) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def section_pipeline(run: Path) -> str:
    summary = _load(run / "summary.json") or {}
    seconds = summary.get("seconds", {})
    boxes = " &rarr; ".join(f"<span>{esc(k)}<br><small>{_num(v):.0f} s</small></span>" for k, v in seconds.items())
    total = sum(_num(v) for v in seconds.values())
    return f'<p class="pipeline">{boxes}</p><p class="small">total {total:.0f} s</p>' if seconds else "<p>no summary</p>"


def section_reward_model(run: Path) -> str:
    ev = _load(run / "rm_eval" / "rm_eval.json")
    if not ev:
        return "<p><em>no reward-model evaluation in this run</em></p>"
    from rlhflab.instruments.rm_eval import HEADLINE

    rows = [[label, ev[key]] for key, label in HEADLINE if isinstance(ev.get(key), (int, float))]
    parts = [table(["reading", "value"], rows)]
    rel = ev.get("calibration/reliability")
    if isinstance(rel, list) and rel and isinstance(rel[0], dict):
        xs = [_num(r.get("p_mean")) for r in rel]
        ys = [_num(r.get("frequency")) for r in rel]
        parts.append(line_plot({"perfect calibration": ([0.0, 1.0], [0.0, 1.0])}, points={"observed": (xs, ys)},
                               title="RM calibration (held-out votes)", xlabel="predicted P(chosen)",
                               ylabel="observed frequency"))
    return "\n".join(parts)


def section_training(arms: dict[str, list[dict]]) -> str:
    if not arms:
        return "<p><em>no RL or DPO arm in this run</em></p>"
    plots = []
    for key, label in (("objective/scores", "RM score (proxy)"), ("gold/mean", "gold utility"),
                       ("objective/kl", "KL (nats)"), ("kl/beta", "beta"), ("rewards/margins", "DPO margin")):
        series = {name: _curve(rows, key) for name, rows in arms.items()}
        series = {k: v for k, v in series.items() if v[0]}
        if series:
            plots.append(line_plot(series, title=label, xlabel="step", ylabel=label))
    return f'<div class="plots">{"".join(plots)}</div>'


def overoptimization_note(name: str, fit: dict, kl_measured: float) -> str | None:
    """What the Gao fit of one arm supports: its gold peak when the peak lies within the
    measured KL, else "no peak within the measured KL" (the formula's d* is then an
    extrapolation, however precise its number). ``kl_measured``: the largest KL measured,
    used when the readings predate ``overopt/fit_peak_in_range``."""
    kl_peak, r2 = _num(fit.get("overopt/fit_kl_peak")), _num(fit.get("overopt/fit_r2"))
    if not math.isfinite(_num(fit.get("overopt/fit_alpha"))):
        return None
    d_max = _num(fit.get("overopt/fit_d_max"))
    kl_max = d_max**2 if math.isfinite(d_max) else kl_measured
    in_range = _num(fit.get("overopt/fit_peak_in_range"))
    if not math.isfinite(in_range):
        in_range = float(math.isfinite(kl_peak) and kl_peak <= kl_max)
    observed = (f"; observed peak {_num(fit.get('overopt/gold_peak')):.3f} at KL "
                f"{_num(fit.get('overopt/gold_peak_kl')):.2f}")
    if in_range:
        return f"{esc(name)}: fitted gold peak at KL = {kl_peak:.2f} nats (R^2 {r2:.2f}){observed}"
    return (f"{esc(name)}: no peak within the measured KL (measured up to {kl_max:.2f} nats; "
            f"fit R^2 {r2:.2f}){observed}")


def section_overoptimization(arms: dict[str, list[dict]], readings: dict[str, dict]) -> str:
    """Gold and proxy of each evaluation against d = sqrt(KL), as points (the run's order in
    time is not the x axis's: KL may fall as well as rise), with the Gao fit drawn over the
    measured range only."""
    plots, notes = [], []
    for name, rows in arms.items():
        pts = [(math.sqrt(max(0.0, _num(r["objective/kl"]))), _num(r["gold/mean"]), _num(r.get("objective/scores")))
               for r in rows if "gold/mean" in r and "objective/kl" in r]
        if len(pts) < 2:
            continue
        d = [p[0] for p in pts]
        points = {"gold": (d, [p[1] for p in pts])}
        if all(math.isfinite(p[2]) for p in pts):
            points["proxy (RM)"] = (d, [p[2] for p in pts])
        fit = readings.get(name, {})
        a, b = _num(fit.get("overopt/fit_alpha")), _num(fit.get("overopt/fit_beta_g"))
        series = {}
        lo, hi = min((x for x in d if x > 0), default=0.0), max(d)
        if math.isfinite(a) and math.isfinite(b) and hi > lo > 0:
            xs = [lo + (hi - lo) * i / 40 for i in range(41)]
            series["Gao fit (gold)"] = (xs, [pts[0][1] + x * (a - b * math.log(x)) for x in xs])
        note = overoptimization_note(name, fit, max(d) ** 2)
        if note:
            notes.append(note)
        plots.append(line_plot(series, points=points, title=f"{name}: gold and proxy vs sqrt(KL)",
                               xlabel="d = sqrt(KL)", ylabel="score"))
    if not plots:
        return "<p><em>no gold-vs-proxy curve recorded</em></p>"
    return f'<div class="plots">{"".join(plots)}</div>' + "".join(f"<p>{n}</p>" for n in notes)


def section_frontier(run: Path) -> str:
    parts = []
    sweep = _load(run / "sweep" / "frontier.json")
    if isinstance(sweep, list) and sweep:
        by_algo: dict[str, list] = {}
        for row in sweep:
            by_algo.setdefault(row.get("algo", "?"), []).append(row)
        points = {a: ([_num(r.get("kl")) for r in rs], [_num(r.get("gold")) for r in rs]) for a, rs in by_algo.items()}
        parts.append(line_plot({}, points=points, title="world: gold vs KL per beta", xlabel="KL from SFT (nats)",
                               ylabel="gold utility"))
        parts.append(table(["algo", "beta", "KL", "gold", "RM score"],
                           [[r.get("algo"), _num(r.get("beta")), _num(r.get("kl")), _num(r.get("gold")),
                             _num(r.get("proxy"))] for r in sweep]))
    bandit = _load(run / "bandit_frontier.json")
    if isinstance(bandit, dict) and bandit.get("exact"):
        ex = bandit["exact"]
        series = {"exact pi* frontier": ([_num(r["kl"]) for r in ex], [_num(r["reward"]) for r in ex])}
        points = {a: ([_num(r["kl"]) for r in rs], [_num(r["reward"]) for r in rs])
                  for a, rs in bandit.get("measured", {}).items()}
        parts.append(line_plot(series, points=points, title="bandit: reward-KL frontier", xlabel="KL(pi || pi_ref)",
                               ylabel="expected reward"))
    return "\n".join(parts) or "<p><em>no sweep in this run</em></p>"


def section_instruments(evals: dict[str, dict]) -> str:
    if not evals:
        return "<p><em>no policy evaluations</em></p>"
    keys = [(k, label) for k, label in HEADLINE if any(k in e for e in evals.values())]
    first = next(iter(evals.values()))
    statuses = {n: instrument_status(e) for n, e in evals.items()}
    rows, classes = [], []
    for key, label in keys:
        base = first.get(f"base/{key}")
        rows.append([label, "" if base is None else _num(base), *[_num(e.get(key)) for e in evals.values()]])
        classes.append(["", "", *[statuses[n].get(key, "") for n in evals]])
    legend = ('<p class="small"><span class="pass">pass</span> <span class="warn">warn</span> '
              '<span class="fail">fail</span> against the heuristics of <code>rlhflab.diagnose</code></p>')
    return table(["reading", "SFT", *evals], rows, classes) + legend


def section_diagnosis(diagnoses: dict[str, dict]) -> str:
    if not diagnoses:
        return "<p><em>no diagnosis</em></p>"
    parts = []
    for name, d in diagnoses.items():
        parts.append(f'<h3>{esc(name)}: <span class="verdict">{esc(d.get("verdict"))}</span></h3>')
        rows = [[f["severity"], f["name"], f["symptom"], f["evidence"], f["instrument"], f["root_cause"], f["fix"]]
                for f in d.get("findings", [])]
        classes = [["fail" if r[0] == "fail" else "warn" if r[0] == "warn" else "pass"] + [""] * 6 for r in rows]
        parts.append(table(["", "finding", "symptom", "evidence", "instrument", "root cause", "fix"], rows, classes))
        to_measure = d.get("to_measure") or {}
        if to_measure:
            parts.append('<p class="small">to measure: ' + "; ".join(
                f"<b>{esc(what)}</b>: <code>{esc(how)}</code>" for what, how in to_measure.items()) + "</p>")
    return "\n".join(parts)


def section_samples(samples: dict[str, dict], per_family: int = 2) -> str:
    if not samples:
        return "<p><em>no samples</em></p>"
    names = list(samples)
    first = samples[names[0]]
    prompts, fams = first.get("prompts", []), first.get("families", [])
    chosen, seen = [], {}
    for i, f in enumerate(fams):
        if seen.get(f, 0) < per_family:
            seen[f] = seen.get(f, 0) + 1
            chosen.append(i)
    rows = []
    for i in chosen:
        row = [fams[i], prompts[i], f'{first["base"][i]}  [{_num(first["gold_base"][i]):+.2f}]']
        for n in names:
            s = samples[n]
            row.append(f'{s["policy"][i]}  [{_num(s["gold_policy"][i]):+.2f}]')
        rows.append(row)
    return table(["family", "prompt", "SFT"] + names, rows) + '<p class="small">[gold utility]</p>'


def build_run_report(run: str | Path, arms: list[str]) -> Path:
    run = Path(run)
    curves = {a: _jsonl(run / a / "metrics.jsonl") for a in arms}
    curves = {a: rows for a, rows in curves.items() if rows}
    evals = {a: e for a in arms if (e := _load(run / "eval" / a / "eval.json"))}
    diagnoses = {a: d for a in arms if (d := _load(run / "eval" / a / "diagnosis.json"))}
    samples = {a: s for a in arms if (s := _load(run / "eval" / a / "samples.json"))}
    readings = {a: {k: v for k, v in e.items() if k.startswith("overopt/")} for a, e in evals.items()}
    sections = [
        ("Pipeline at a glance", section_pipeline(run)),
        ("Reward model", section_reward_model(run)),
        ("Training curves", section_training(curves)),
        ("Over-optimization (Gao et al. 2022)", section_overoptimization(curves, readings)),
        ("Reward-KL frontier", section_frontier(run)),
        ("Instruments per policy", section_instruments(evals)),
        ("Diagnosis", section_diagnosis(diagnoses)),
        ("Samples side by side", section_samples(samples)),
    ]
    return write_page(run / "report.html", page("rlhflab run report", sections, subtitle=str(run.resolve())))
