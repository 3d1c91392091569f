"""``report.html`` of a run directory written by ``rlhflab run``: every section is built from
the artifacts on disk and skipped (with a note) when its artifact is absent.

Expected layout (each piece optional): ``summary.json`` (stage timings), ``sft/``,
``rm/metrics.json``, ``rm_eval/rm_eval.json``, one directory per arm with ``metrics.jsonl``
(training curve), ``eval/<name>/eval.json`` + ``samples.json`` + ``diagnosis.json``,
``bon/bon.json`` (the best-of-n arm), ``sweep/frontier.json`` and ``bandit_frontier.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlhflab.diagnose import instrument_status
from rlhflab.registry import SAMPLING_ARMS
from rlhflab.report.html import esc, page, table, write_page
from rlhflab.report.svg import PALETTE, line_plot

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


def gold_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (d, gold) points no other point beats with less or equal d and more gold, in
    increasing d (and so increasing gold): the most gold a method was measured to reach
    for a given sqrt(KL)."""
    out: list[tuple[float, float]] = []
    for d, g in sorted(((d, g) for d, g in points if math.isfinite(d) and math.isfinite(g)),
                       key=lambda p: (p[0], -p[1])):
        if not out or g > out[-1][1]:
            out.append((d, g))
    return out


def kl_to_reach(frontier: list[tuple[float, float]], gold: float) -> float:
    """The least KL at which ``frontier`` (``gold_frontier``, straight lines between its
    points in d = sqrt(KL), as plotted) reaches ``gold``; nan above its highest gold."""
    if gold <= frontier[0][1]:
        return frontier[0][0] ** 2
    for (d0, g0), (d1, g1) in zip(frontier, frontier[1:]):
        if gold <= g1:
            return (d0 + (d1 - d0) * (gold - g0) / (g1 - g0)) ** 2
    return float("nan")


def kl_at_same_gold(rl: list[tuple[float, float]], bon: list[tuple[float, float]]) -> dict:
    """Which method spends more KL for the same gold, read off the measured points
    ((d, gold), d = sqrt(KL)) of an RL arm and of best-of-n: at every gold level measured
    by either method above both methods' starting gold (the gold of each one's least-KL
    point) and up to the lower of their highest golds, the KL each frontier needs
    (``kl_to_reach``). ``verdict``: "more" (RL needs more KL at every such level), "less",
    "mixed", or "no overlap" (no such level: the data cannot tell)."""
    fr, fb = gold_frontier(rl), gold_frontier(bon)
    if not fr or not fb:
        return {"verdict": "no overlap", "levels": []}
    lo, hi = max(fr[0][1], fb[0][1]), min(fr[-1][1], fb[-1][1])
    golds = sorted({g for _, g in fr + fb if lo < g <= hi})
    levels = [{"gold": g, "kl_rl": kl_to_reach(fr, g), "kl_bon": kl_to_reach(fb, g)} for g in golds]
    more = sum(x["kl_rl"] > x["kl_bon"] for x in levels)
    less = sum(x["kl_rl"] < x["kl_bon"] for x in levels)
    verdict = ("no overlap" if not levels else "more" if more == len(levels) else
               "less" if less == len(levels) else "mixed")
    return {"verdict": verdict, "levels": levels, "gold_low": lo, "gold_high": hi, "n_more": more,
            "n_less": less, "gold_max_rl": fr[-1][1], "gold_max_bon": fb[-1][1]}


def same_gold_sentence(name: str, cmp: dict) -> str:
    """One sentence from ``kl_at_same_gold``: does ``name`` spend more KL than best-of-n
    for the same gold? Numbers only from the measured points; no overlap is said as such."""
    if cmp["verdict"] == "no overlap":
        if "gold_low" not in cmp:
            return f"{name}: the data cannot tell (too few measured points)."
        return (f"{name}: the data cannot tell: the two methods' gold do not overlap above their starting "
                f"points ({name} reaches {cmp['gold_max_rl']:.3f}, best-of-n {cmp['gold_max_bon']:.3f}, "
                f"from {cmp['gold_low']:.3f}).")
    top = cmp["levels"][-1]
    at_top = (f"for gold {top['gold']:.3f}, the highest both reach, {name} needs {top['kl_rl']:.2f} nats "
              f"and best-of-n {top['kl_bon']:.2f}")
    span = f"gold {cmp['gold_low']:.3f} to {cmp['gold_high']:.3f}"
    if cmp["verdict"] == "more":
        return (f"{name}: yes, at every measured gold level both reach ({span}) {name} spends more KL "
                f"than best-of-n; {at_top}.")
    if cmp["verdict"] == "less":
        return (f"{name}: no, at every measured gold level both reach ({span}) {name} spends less KL "
                f"than best-of-n; {at_top}.")
    n = len(cmp["levels"])
    return (f"{name}: not throughout: over {span} {name} spends more KL than best-of-n at {cmp['n_more']} "
            f"of {n} measured gold levels and less at {cmp['n_less']}; {at_top}.")


def _rl_points(rows: list[dict]) -> list[tuple[float, float]]:
    """(d, gold) of an online arm's evaluations, d = sqrt(objective/kl) as in the
    over-optimization section, and the step-0 evaluation (the SFT policy itself, before any
    rollout: it logs no KL, and its KL is 0)."""
    return [(math.sqrt(max(0.0, _num(r.get("objective/kl", 0.0)))), _num(r["gold/mean"])) for r in rows
            if "gold/mean" in r and ("objective/kl" in r or r.get("step") == 0)]


def _law(base: float, a: float, b: float, d: list[float], form: str) -> tuple[list[float], list[float]] | None:
    """Gao's fitted law base + d (a - b log d) (RL) or base + d (a - b d) (best-of-n), over
    the measured d > 0 only."""
    d = [x for x in d if math.isfinite(x) and x > 0]
    if not (d and math.isfinite(a) and math.isfinite(b) and math.isfinite(base)) or max(d) <= min(d):
        return None
    lo, hi = min(d), max(d)
    xs = [lo + (hi - lo) * i / 40 for i in range(41)]
    shape = (lambda x: a - b * math.log(x)) if form == "rl" else (lambda x: a - b * x)
    return xs, [base + x * shape(x) for x in xs]


def section_bon_vs_rl(bons: dict[str, dict], curves: dict[str, list[dict]], readings: dict[str, dict]) -> str:
    """Best-of-n's gold per n and the RL arms' evaluations against d = sqrt(KL) on the same
    axes, each with its Gao law over its own measured range, and the sentence that answers
    whether RL spends more KL than best-of-n for the same gold."""
    if not bons:
        return "<p><em>no best-of-n arm in this run (add bon to run.arms)</em></p>"
    parts = []
    for bname, rec in bons.items():
        rows = rec.get("rows", [])
        parts.append(table(["n", "KL plug-in", "KL analytic", "proxy", "gold", "gold win-rate vs one sample"],
                           [[r.get("n"), _num(r.get("bon/kl_plugin")), _num(r.get("bon/kl_analytic")),
                             _num(r.get("bon/proxy_mean")), _num(r.get("bon/gold_mean")),
                             _num(r.get("bon/win_rate"))] for r in rows]))
        if not rec.get("gold"):
            parts.append("<p><em>best-of-n on prompts without gold: no comparison with RL</em></p>")
            continue
        bon_pts = [(math.sqrt(max(0.0, _num(r.get("bon/kl_plugin")))), _num(r.get("bon/gold_mean"))) for r in rows]
        rl = {a: pts for a, rows_ in curves.items() if len(pts := _rl_points(rows_)) >= 2}
        series, points, colors = {}, {}, {}
        for i, (arm, pts) in enumerate({**rl, bname: bon_pts}.items()):
            color = PALETTE[i % len(PALETTE)]
            label = "best-of-n" if arm == bname else arm
            points[f"{label} gold"] = ([p[0] for p in pts], [p[1] for p in pts])
            if arm == bname:
                fit = rec.get("fit", {})
                law = _law(_num(rec.get("gold/single_mean")), _num(fit.get("bon/fit_alpha")),
                           _num(fit.get("bon/fit_beta_g")), points[f"{label} gold"][0], "bon")
                name = "best-of-n law d(alpha - beta d)"
            else:
                # the law's base is the gold its fit was measured from (curve_readings: the
                # first evaluation with a KL reading), as in the over-optimization section
                fitted = [r for r in curves[arm] if "gold/mean" in r and "objective/kl" in r]
                fit = readings.get(arm, {})
                law = _law(_num(fitted[0]["gold/mean"]) if fitted else float("nan"),
                           _num(fit.get("overopt/fit_alpha")), _num(fit.get("overopt/fit_beta_g")),
                           points[f"{label} gold"][0], "rl")
                name = f"{arm} RL law d(alpha - beta log d)"
            colors[f"{label} gold"] = color
            if law:
                series[name], colors[name] = law, color
        parts.append(line_plot(series, points=points, colors=colors, width=640, height=360,
                               title="gold vs sqrt(KL from SFT): RL arms and best-of-n",
                               xlabel="d = sqrt(KL) (best-of-n: plug-in KL)", ylabel="gold utility"))
        if not rl:
            parts.append("<p>No RL arm with gold evaluations in this run: nothing to compare best-of-n "
                         "with.</p>")
        parts.append("<p><b>Does RL spend more KL than best-of-n for the same gold?</b> (Gao et al. 2022 "
                     "found it does.)</p>")
        parts.extend(f"<p>{esc(same_gold_sentence(arm, kl_at_same_gold(pts, bon_pts)))}</p>"
                     for arm, pts in rl.items())
    parts.append('<p class="small">Best-of-n: the reward model keeps its best of n samples of SFT on the '
                 "held-out prompts the RL arms' gold is measured on; its KL is the plug-in estimate "
                 "(analytic log n - (n-1)/n beside it, an upper bound). The RL arms' KL is the rollout's. "
                 "Each law is drawn over its own measured range only.</p>")
    return "\n".join(parts)


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
    bons = {a: b for a in arms if a in SAMPLING_ARMS and isinstance(b := _load(run / a / "bon.json"), dict)}
    sections = [
        ("Pipeline at a glance", section_pipeline(run)),
        ("Reward model", section_reward_model(run)),
        ("Training curves", section_training(curves)),
        ("Over-optimization (Gao et al. 2022)", section_overoptimization(curves, readings)),
        ("Best-of-n against RL (Gao et al. 2022)", section_bon_vs_rl(bons, curves, readings)),
        ("Reward-KL frontier", section_frontier(run)),
        ("Instruments per policy", section_instruments(evals)),
        ("Diagnosis", section_diagnosis(diagnoses)),
        ("Samples side by side", section_samples(samples)),
    ]
    return write_page(run / "report.html", page("rlhflab run report", sections, subtitle=str(run.resolve())))
