"""``report.html`` of a run directory written by ``rlhflab run``: every section is built from
the artifacts on disk and skipped (with a note) when its artifact is absent.

Expected layout (each piece optional): ``summary.json`` (stage timings), ``config.yaml`` (the
resolved config: the arms and the sizes of the probe sets), ``sft/``, ``rm/metrics.json``,
``rm_eval/rm_eval.json``, one directory per arm with ``metrics.jsonl`` (training curve),
``eval/<name>/eval.json`` + ``samples.json`` + ``diagnosis.json``, ``bon/bon.json`` (the
best-of-n arm), ``sweep/frontier.json``, ``bandit_frontier.json`` and ``attack/attack.json``
(``rlhflab attack-rm --out RUN/attack``: what the reward model pays for).

Three rules keep the figures honest:

- every gold figure names the prompts it was measured on: the SFT stage's own sample, each
  training run's held-out evaluation and the eval probes are different prompt sets, and the
  same SFT policy scores differently on each (``section_sft_gold`` sets them side by side);
- an axis says what a step is, and arms whose steps differ (an online RL step samples a
  rollout batch and updates on it; a preference-loss step is one optimizer step on a batch
  of pairs) are never drawn on one step axis;
- each arm keeps one colour in every chart (``svg.Palette``, assigned once from the run's
  arm list), and every verdict is shown with the readings it rests on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlhflab.diagnose import instrument_status
from rlhflab.registry import PREFERENCE_LOSSES, SAMPLING_ARMS
from rlhflab.report.html import esc, page, table, write_page
from rlhflab.report.svg import NEUTRAL, Palette, line_plot

HEADLINE = (
    ("gold/mean", "gold utility"), ("rm/score_mean", "RM score"), ("kl/sequence_mean", "KL from SFT"),
    ("win_rate/gold", "win-rate vs SFT (gold)"), ("win_rate/judge", "win-rate vs base (judge)"),
    ("win_rate/rm", "win-rate vs base (RM)"), ("win_rate/raters", "win-rate (rater panel)"),
    ("win_rate/gold_length_controlled", "win-rate (length-controlled)"),
    ("refusal/harmful_rate", "harmful refused"), ("refusal/benign_rate", "benign refused"),
    ("sycophancy/agree_rate", "agrees with wrong user"), ("capability/accuracy", "capability"),
    ("length/mean", "mean length"), ("diversity/distinct_2", "distinct-2"), ("keywords/density", "keyword density"),
)

# The judges of a win-rate against the base, most trusted first, as ``rlhflab.diagnose`` reads
# them: the world's gold, ``rlhflab eval --judge``, a reward model.
JUDGES = ("gold", "judge", "rm")

RL_STEP = "RL step (one rollout batch and its updates)"


def preference_step(arms) -> str:
    """The x label of preference-loss arms: one optimizer step on a batch of pairs."""
    return f"{' / '.join(a.upper() for a in arms)} optimizer step (one batch of preference pairs)"


def _load(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _jsonl(path: Path) -> list[dict]:
    try:
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    return [r for r in rows if isinstance(r, dict)]


def _config(path: Path) -> dict:
    """A resolved ``config.yaml`` as a mapping; {} when absent or unreadable."""
    try:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, ImportError):
        return {}
    except Exception:  # yaml.YAMLError: a hand-edited file is no reason to lose the report
        return {}
    return data if isinstance(data, dict) else {}


def _setting(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _curve(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(_num(r["step"]), _num(r[key])) for r in rows if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def arm_kind(arm: str, run: Path | None = None) -> str:
    """"preference" (a loss of the DPO family: optimizer steps on pairs), "sampling"
    (best-of-n: no training) or "online" (an RL algorithm, or an AI-feedback arm running
    one: one step per rollout batch)."""
    if arm in PREFERENCE_LOSSES.names():
        return "preference"
    if arm in SAMPLING_ARMS.names():
        return "sampling"
    return "online"


class ProbeSets:
    """Which prompts each gold figure of a run was measured on, in words, from the resolved
    config (``config.yaml`` of the run, or of the arm): the SFT stage samples the first
    ``sft.n_samples`` prompts of the world's held-out split, a preference arm's evaluation
    the first ``dpo.n_world_eval``, an online arm's the first ``rl.n_eval`` (one stream of
    prompts: each set is the start of the same list), and ``rlhflab eval`` the eval probes,
    ``world.n_eval`` of each family."""

    def __init__(self, run: Path, n_probes: int | None = None) -> None:
        self.run, self.cfg, self.n_probes = run, _config(run / "config.yaml"), n_probes

    def _n(self, dotted: str, arm: str | None = None):
        own = _config(self.run / arm / "config.yaml") if arm else {}
        n = _setting(own, dotted)
        return n if isinstance(n, int) else _setting(self.cfg, dotted)

    def first(self, dotted: str, arm: str | None = None) -> str:
        """"the first <dotted> = N held-out world prompts", N from ``arm``'s config or the run's."""
        n = self._n(dotted, arm)
        return (f"the first {dotted} = {n} held-out world prompts" if isinstance(n, int)
                else f"the held-out world prompts of {dotted}")

    def sft(self) -> str:
        return self.first("sft.n_samples")

    def arm(self, arm: str) -> str:
        return self.first("dpo.n_world_eval" if arm_kind(arm) == "preference" else "rl.n_eval", arm)

    def probes(self) -> str:
        k = _setting(self.cfg, "world.n_eval")
        per = f"world.n_eval = {k} per family" if isinstance(k, int) else "world.n_eval per family"
        return f"the {self.n_probes} eval probes ({per})" if self.n_probes else f"the eval probes ({per})"


def section_pipeline(run: Path) -> str:
    summary = _load(run / "summary.json") or {}
    seconds = summary.get("seconds", {})
    boxes = " &rarr; ".join(f"<span>{esc(k)}<br><small>{_num(v):.0f} s</small></span>" for k, v in seconds.items())
    total = sum(_num(v) for v in seconds.values())
    return f'<p class="pipeline">{boxes}</p><p class="small">total {total:.0f} s</p>' if seconds else "<p>no summary</p>"


def section_sft_gold(run: Path, curves: dict[str, list[dict]], evals: dict[str, dict], probe_sets: ProbeSets) -> str:
    """The one SFT policy's gold as each part of the run measured it, each on its own prompts."""
    rows = []
    sft = (_load(run / "summary.json") or {}).get("sft") or _load(run / "sft" / "metrics.json") or {}
    if isinstance(sft, dict) and isinstance(sft.get("gold/mean"), (int, float)):
        rows.append(["the SFT stage's own sample, after training", probe_sets.sft(), float(sft["gold/mean"])])
    for arm, arm_rows in curves.items():
        first = next((r for r in arm_rows if r.get("step") == 0 and "gold/mean" in r), None)
        if first is not None:
            rows.append([f"step 0 of {arm}'s held-out evaluation (its training curve's first point)",
                         probe_sets.arm(arm), _num(first["gold/mean"])])
    base = next((e["base/gold/mean"] for e in evals.values() if "base/gold/mean" in e), None)
    if base is not None:
        rows.append(["rlhflab eval: the SFT column of the instruments table", probe_sets.probes(), _num(base)])
    if not rows:
        return "<p><em>no gold measured of the SFT policy</em></p>"
    return (table(["measured by", "on", "SFT gold"], rows)
            + '<p class="small">One policy, different prompts: each figure is the mean gold over its own prompt '
              "set (the world's held-out prompts are one list, and each set is its start; the eval probes take "
              "the same number from each family, whose gold differs by family). Compare an arm with SFT on the "
              "same prompts only: a training curve with its own step 0, an arm's instruments with the SFT "
              "column beside them.</p>")


def section_reward_model(run: Path) -> str:
    ev = _load(run / "rm_eval" / "rm_eval.json")
    if not ev:
        return "<p><em>no reward-model evaluation in this run</em></p>"
    return reward_model_readings(ev)


def reward_model_readings(ev: dict) -> str:
    """The reward model's headline readings and its reliability diagram."""
    from rlhflab.instruments.rm_eval import HEADLINE as RM_HEADLINE

    rows = [[label, ev[key]] for key, label in RM_HEADLINE if isinstance(ev.get(key), (int, float))]
    parts = [table(["reading", "value"], rows)]
    rel = ev.get("calibration/reliability")
    if isinstance(rel, list) and rel and isinstance(rel[0], dict):
        xs = [_num(r.get("p_mean")) for r in rel]
        ys = [_num(r.get("frequency")) for r in rel]
        parts.append(line_plot({"perfect calibration": ([0.0, 1.0], [0.0, 1.0])}, points={"observed": (xs, ys)},
                               colors={"perfect calibration": "#999999", "observed": NEUTRAL},
                               styles={"perfect calibration": "dashed"},
                               title="RM calibration (held-out votes)", xlabel="predicted P(chosen)",
                               ylabel="observed frequency"))
    return "\n".join(parts)


def section_rm_attack(record: dict, rows: int = 8) -> str:
    """``rlhflab attack-rm``'s ``attack.json``: the patterns the reward model pays for (reward
    gain of each inserted into held-out responses, its interval, what the truth makes of it),
    the known probes beside them, and the largest gains the search found."""
    def truth(p: dict):
        return p.get("gold_gain", p.get("judge_win_rate", "-"))

    verdict = {True: "exploit", False: "no", None: "unverified"}
    kind = "gold gain" if any("gold_gain" in p for p in record.get("patterns", [])) else "judge win-rate"
    items = [(p.get("text", ""), p) for p in record.get("patterns", [])[:rows]]
    items += [(f"probe: {k}", v) for k, v in record.get("probes", {}).items()]
    parts = [table(["pattern", "reward gain", "95% CI", kind, "verdict"],
                   [[name, p.get("gain"), f"{_num(p.get('ci_low')):+.2f} to {_num(p.get('ci_high')):+.2f}", truth(p),
                     verdict.get(p.get("exploit"), "-")] for name, p in items])]
    found = [[e.get("prompt", ""), e.get("start", ""), e.get("found", ""), e.get("gain"), e.get("gold_found", "-")]
             for e in record.get("exploits", [])[:3]]
    if found:
        parts.append(table(["prompt", "start", "found", "reward gain", "gold of found"], found))
    cost = record.get("cost", {})
    parts.append(f"<p class=\"small\">{esc(str(cost.get('starts_searched', '?')))} starts from "
                 f"{esc(str(record.get('starts_from', '?')))}; {esc(str(cost.get('sequences_scored', '?')))} sequences "
                 f"scored in {_num(cost.get('seconds')):.0f} s; model output as written (escaped, never run)</p>")
    return "\n".join(parts)


ONLINE_CURVES = (("objective/scores", "RM score (proxy), rollout batch"), ("gold/mean", "gold utility"),
                 ("objective/kl", "KL from SFT (nats), rollout batch"), ("kl/beta", "beta"))
PREFERENCE_CURVES = (("rewards/margins", "implicit reward margin, train batch"), ("gold/mean", "gold utility"),
                     ("kl/sequence_mean", "KL from SFT (nats, sampled)"), ("train/loss", "loss, train batch"))


def _curve_plots(arms: dict[str, list[dict]], keys, xlabel: str, palette: Palette, gold_on: str) -> list[str]:
    plots = []
    for key, label in keys:
        series = {name: _curve(rows, key) for name, rows in arms.items()}
        series = {k: v for k, v in series.items() if v[0]}
        if series:
            title = f"{label} ({gold_on})" if key == "gold/mean" else label
            plots.append(line_plot(series, title=title, xlabel=xlabel, ylabel=label.partition(",")[0],
                                   colors={k: palette(k) for k in series}))
    return plots


def section_training(arms: dict[str, list[dict]], palette: Palette | None = None,
                     probe_sets: ProbeSets | None = None) -> str:
    """The training curves, online and preference-loss arms apart: their steps are not the
    same unit."""
    if not arms:
        return "<p><em>no RL or DPO arm in this run</em></p>"
    palette = palette or Palette(arms)
    online = {a: r for a, r in arms.items() if arm_kind(a) == "online"}
    offline = {a: r for a, r in arms.items() if arm_kind(a) == "preference"}
    parts = []

    def gold_note(group: dict) -> str:
        if probe_sets is None or not any("gold/mean" in r for rows in group.values() for r in rows):
            return ""
        sets = sorted({probe_sets.arm(a) for a in group})
        return (f'<p class="small">gold utility: mean over {"; ".join(esc(s) for s in sets)}, sampled at each '
                "held-out evaluation of the run; the point at step 0 is the SFT policy on those prompts.</p>")

    for group, keys, xlabel, what in ((online, ONLINE_CURVES, RL_STEP, "Online RL arms"),
                                      (offline, PREFERENCE_CURVES, preference_step(offline), "Preference-loss arms")):
        if not group:
            continue
        gold_on = (probe_sets.arm(next(iter(group))).removeprefix("the ").replace(" world prompts", " prompts")
                   if probe_sets else "held-out prompts")
        plots = _curve_plots(group, keys, xlabel, palette, gold_on)
        parts.append(f"<h3>{what} ({esc(', '.join(group))}): x = {esc(xlabel)}</h3>")
        parts.append(f'<div class="plots">{"".join(plots)}</div>' + gold_note(group))
    if online and offline:
        parts.append('<p class="small">An online RL step samples a rollout batch and takes its optimizer steps '
                     "on it; a preference-loss step is one optimizer step on a batch of pairs. The two are not "
                     "the same unit, so they are drawn on separate charts.</p>")
    return "\n".join(parts)


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




def section_overoptimization(arms: dict[str, list[dict]], readings: dict[str, dict], palette: Palette | None = None,
                             probe_sets: ProbeSets | None = None) -> str:
    """Gold and proxy of each evaluation against d = sqrt(KL), as points (the run's order in
    time is not the x axis's: KL may fall as well as rise), with the Gao fit drawn over the
    measured range only. Each arm's marks are in its colour: gold filled, proxy hollow."""
    palette = palette or Palette(arms)
    plots, notes, sets = [], [], set()
    for name, rows in arms.items():
        pts = [(math.sqrt(max(0.0, _num(r["objective/kl"]))), _num(r["gold/mean"]), _num(r.get("objective/scores")))
               for r in rows if "gold/mean" in r and "objective/kl" in r]
        if len(pts) < 2:
            continue
        color = palette(name)
        d = [p[0] for p in pts]
        points = {f"{name} gold": (d, [p[1] for p in pts])}
        if all(math.isfinite(p[2]) for p in pts):
            points[f"{name} proxy (RM)"] = (d, [p[2] for p in pts])
        fit = readings.get(name, {})
        a, b = _num(fit.get("overopt/fit_alpha")), _num(fit.get("overopt/fit_beta_g"))
        series = {}
        lo, hi = min((x for x in d if x > 0), default=0.0), max(d)
        if math.isfinite(a) and math.isfinite(b) and hi > lo > 0:
            xs = [lo + (hi - lo) * i / 40 for i in range(41)]
            series[f"{name} Gao fit (gold)"] = (xs, [pts[0][1] + x * (a - b * math.log(x)) for x in xs])
        note = overoptimization_note(name, fit, max(d) ** 2)
        if note:
            notes.append(note)
        if probe_sets is not None:
            sets.add(probe_sets.arm(name))
        plots.append(line_plot(series, points=points, colors={k: color for k in (*series, *points)},
                               styles={f"{name} proxy (RM)": "ring"}, title=f"{name}: gold and proxy vs sqrt(KL)",
                               xlabel="d = sqrt(KL from SFT), rollout batch", ylabel="score"))
    if not plots:
        return "<p><em>no gold-vs-proxy curve recorded</em></p>"
    where = (f'<p class="small">Each point is one held-out evaluation of the run: gold and the RM\'s proxy score '
             f"on {esc('; '.join(sorted(sets)))}.</p>" if sets else "")
    return f'<div class="plots">{"".join(plots)}</div>' + where + "".join(f"<p>{n}</p>" for n in notes)


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


def section_bon_vs_rl(bons: dict[str, dict], curves: dict[str, list[dict]], readings: dict[str, dict],
                      palette: Palette | None = None, probe_sets: ProbeSets | None = None) -> str:
    """Best-of-n's gold per n and the online arms' evaluations against d = sqrt(KL) on the same
    axes, each with its Gao law over its own measured range, and the sentence that answers
    whether RL spends more KL than best-of-n for the same gold."""
    if not bons:
        return "<p><em>no best-of-n arm in this run (add bon to run.arms)</em></p>"
    palette = palette or Palette([*curves, *bons])
    curves = {a: rows for a, rows in curves.items() if arm_kind(a) == "online"}
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
        for arm, pts in {**rl, bname: bon_pts}.items():
            color = palette(arm)
            label = f"{arm} (best-of-n)" if arm == bname else arm
            points[f"{label} gold"] = ([p[0] for p in pts], [p[1] for p in pts])
            if arm == bname:
                fit = rec.get("fit", {})
                law = _law(_num(rec.get("gold/single_mean")), _num(fit.get("bon/fit_alpha")),
                           _num(fit.get("bon/fit_beta_g")), points[f"{label} gold"][0], "bon")
                name = f"{label} law d(alpha - beta d)"
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
        on = probe_sets.arm(next(iter(rl))) if probe_sets is not None and rl else "the RL arms' held-out prompts"
        parts.append(line_plot(series, points=points, colors=colors, width=640, height=360,
                               title="gold vs sqrt(KL from SFT): RL arms and best-of-n",
                               xlabel="d = sqrt(KL) (best-of-n: plug-in KL)",
                               ylabel="gold utility (RL's held-out prompts)"))
        bon_on = (f"the first {rec['n_prompts']} of the same held-out world prompts"
                  if isinstance(rec.get("n_prompts"), int) else "the same held-out world prompts")
        parts.append(f'<p class="small">gold utility: the RL arms on {esc(on)}, best-of-n on {esc(bon_on)}.</p>')
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


def section_frontier(run: Path, palette: Palette | None = None) -> str:
    palette = palette or Palette()
    parts = []
    sweep = _load(run / "sweep" / "frontier.json")
    if isinstance(sweep, list) and sweep:
        by_algo: dict[str, list] = {}
        for row in sweep:
            by_algo.setdefault(row.get("algo", "?"), []).append(row)
        points = {a: ([_num(r.get("kl")) for r in rs], [_num(r.get("gold")) for r in rs]) for a, rs in by_algo.items()}
        parts.append(line_plot({}, points=points, colors={a: palette(a) for a in points},
                               title="world: gold vs KL per beta", xlabel="KL from SFT (nats)", ylabel="gold utility"))
        parts.append(table(["algo", "beta", "KL", "gold", "RM score"],
                           [[r.get("algo"), _num(r.get("beta")), _num(r.get("kl")), _num(r.get("gold")),
                             _num(r.get("proxy"))] for r in sweep]))
    bandit = _load(run / "bandit_frontier.json")
    if isinstance(bandit, dict) and bandit.get("exact"):
        ex = bandit["exact"]
        series = {"exact pi* frontier": ([_num(r["kl"]) for r in ex], [_num(r["reward"]) for r in ex])}
        points = {a: ([_num(r["kl"]) for r in rs], [_num(r["reward"]) for r in rs])
                  for a, rs in bandit.get("measured", {}).items()}
        parts.append(line_plot(series, points=points, colors={"exact pi* frontier": NEUTRAL,
                                                              **{a: palette(a) for a in points}},
                               title="bandit: reward-KL frontier", xlabel="KL(pi || pi_ref)",
                               ylabel="expected reward"))
        parts.append('<p class="small">The enumerable bandit (not the world): each algorithm at each beta, in '
                     "the colour of the arm of the same name.</p>")
    return "\n".join(parts) or "<p><em>no sweep in this run</em></p>"


def section_instruments(evals: dict[str, dict], base_name: str = "SFT", on: str = "") -> str:
    """Each headline reading of each policy beside its base's, all on the same prompts."""
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
    where = (f'<p class="small">Every column on {esc(on)}, sampled with the same seed: the {esc(base_name)} '
             "column is the base each policy is compared with.</p>" if on else "")
    legend = ('<p class="small"><span class="pass">pass</span> <span class="warn">warn</span> '
              '<span class="fail">fail</span> against the heuristics of <code>rlhflab.diagnose</code></p>')
    return table(["reading", base_name, *evals], rows, classes) + where + legend


def _judge(m: dict) -> str | None:
    return next((j for j in JUDGES if isinstance(m.get(f"win_rate/{j}"), (int, float))), None)


def _gold_flat() -> float:
    try:
        from rlhflab.diagnose import Thresholds

        return float(Thresholds().gold_flat)
    except (ImportError, AttributeError, TypeError, ValueError):
        return 0.05


def verdict_reason(m: dict, base_name: str = "SFT") -> str:
    """The readings a verdict's improvement question rests on, in one sentence: the judge's
    win-rate against the base with its 95% interval and where the interval lies, or (with no
    win-rate) the gold against the base's, or that neither was measured."""
    j = _judge(m)
    lo, hi = _num(m.get(f"win_rate/{j}_ci_low")), _num(m.get(f"win_rate/{j}_ci_high"))
    if j and math.isfinite(lo) and math.isfinite(hi):
        n = _num(m.get(f"win_rate/{j}_n"))
        on = f", n = {n:.0f}" if math.isfinite(n) else ""
        where = ("the interval lies above 0.5: the policy beats " + base_name if lo > 0.5 else
                 "the interval lies below 0.5: " + base_name + " beats the policy" if hi < 0.5 else
                 "the interval holds 0.5: no improvement over " + base_name + " is shown")
        return (f"{j} win-rate against {base_name} {_num(m[f'win_rate/{j}']):.3f} "
                f"(95% interval {lo:.3f} to {hi:.3f}{on}): {where}")
    if j:
        return (f"{j} win-rate against {base_name} {_num(m[f'win_rate/{j}']):.3f}, without an interval: "
                "no improvement can be shown")
    g, b = _num(m.get("gold/mean")), _num(m.get("base/gold/mean"))
    if math.isfinite(g) and math.isfinite(b):
        flat = _gold_flat()
        return (f"no win-rate measured; gold {g:.3f} against {base_name}'s {b:.3f} on the same prompts "
                f"({g - b:+.3f}; a gain below {flat:g} counts as none)")
    return f"no win-rate or gold against {base_name} was measured: whether the policy improved is unknown"


EVIDENCE = (("kl/sequence_mean", "KL from the base (nats)"), ("length/mean", "mean length"),
            ("gold/mean", "gold utility"), ("rm/score_mean", "RM score"))


def _evidence_table(m: dict, base_name: str) -> str:
    rows = []
    j = _judge(m)
    if j:
        lo, hi = _num(m.get(f"win_rate/{j}_ci_low")), _num(m.get(f"win_rate/{j}_ci_high"))
        interval = f"{lo:.3f} to {hi:.3f}" if math.isfinite(lo) and math.isfinite(hi) else "not measured"
        rows.append([f"{j} win-rate against {base_name} (95% interval)", _num(m[f"win_rate/{j}"]), "0.5 = a tie",
                     interval])
    for key, label in EVIDENCE:
        if isinstance(m.get(key), (int, float)):
            base = m.get(f"base/{key}")
            rows.append([label, _num(m[key]), "" if base is None else _num(base), ""])
    return table(["reading", "policy", base_name, "interval"], rows) if rows else ""


def diagnosis_block(name: str, d: dict, readings: dict, base_name: str = "SFT") -> str:
    """One policy's verdict, the reason it rests on, the readings behind it and the findings;
    never an empty findings table."""
    verdict = d.get("verdict") or "none"
    findings = [f for f in d.get("findings", []) if isinstance(f, dict)]
    flagged = [f.get("name", "?") for f in findings if f.get("severity") in ("fail", "warn")]
    reason = verdict_reason(readings, base_name)
    if flagged:
        reason += "; the findings below name the cause (" + ", ".join(flagged) + ")"
    parts = [f'<h3>{esc(name)}: <span class="verdict">{esc(verdict)}</span></h3>',
             f'<p class="reason"><b>Why:</b> {esc(reason)}.</p>', _evidence_table(readings, base_name)]
    if findings:
        from rlhflab.instruments.card import load_records, record_line

        records = load_records()  # a diagnosis written before the card was shipped carries none
        rows = [[f.get("severity", ""), f.get("name", ""), f.get("symptom", ""), f.get("evidence", ""),
                 f.get("record") or record_line(str(f.get("name", "")), records),
                 f.get("instrument", ""), f.get("root_cause", ""), f.get("fix", "")] for f in findings]
        classes = [["fail" if r[0] == "fail" else "warn" if r[0] == "warn" else "pass"] + [""] * 7 for r in rows]
        parts.append(table(["", "finding", "symptom", "evidence", "measured record", "instrument", "root cause",
                            "fix"], rows, classes))
    else:
        parts.append('<p class="small">No rule of <code>rlhflab.diagnose</code> fired: the verdict rests on the '
                     "readings above.</p>")
    to_measure = d.get("to_measure") or {}
    if to_measure:
        parts.append('<p class="small">to measure: ' + "; ".join(
            f"<b>{esc(what)}</b>: <code>{esc(how)}</code>" for what, how in to_measure.items()) + "</p>")
    return "\n".join(p for p in parts if p)


def diagnosis_of(readings: dict) -> dict:
    """``rlhflab.diagnose`` on readings that came without a diagnosis.json; a reading it
    refuses becomes the verdict's reason instead of an error."""
    from rlhflab.diagnose import diagnose
    from rlhflab.errors import InputError

    try:
        return diagnose(readings)
    except (InputError, KeyError, TypeError, ValueError) as err:
        return {"verdict": "not diagnosed", "findings": [], "to_measure": {"a diagnosis": f"({err})"}}


def section_diagnosis(diagnoses: dict[str, dict], evals: dict[str, dict] | None = None,
                      base_name: str = "SFT") -> str:
    evals = evals or {}
    names = [*diagnoses, *(n for n in evals if n not in diagnoses)]
    if not names:
        return "<p><em>no diagnosis</em></p>"
    return "\n".join(diagnosis_block(n, diagnoses.get(n) or diagnosis_of(evals[n]), evals.get(n, {}), base_name)
                     for n in names)


def section_samples(samples: dict[str, dict], per_family: int = 2, n_plain: int = 8, base_name: str = "SFT") -> str:
    """A few prompts with each policy's answer beside the base's: two per family of the
    world's probes (with their gold), or the first prompts of a user's file."""
    samples = {n: s for n, s in samples.items() if isinstance(s, dict) and isinstance(s.get("prompts"), list)}
    if not samples:
        return "<p><em>no samples</em></p>"
    names = list(samples)
    first = samples[names[0]]
    prompts, fams = first.get("prompts", []), first.get("families") or []
    if fams:
        chosen, seen = [], {}
        for i, f in enumerate(fams):
            if seen.get(f, 0) < per_family:
                seen[f] = seen.get(f, 0) + 1
                chosen.append(i)
    else:
        chosen = list(range(min(n_plain, len(prompts))))

    def answer(s: dict, who: str, i: int) -> str:
        texts = s.get(who) or []
        text = str(texts[i]) if i < len(texts) else ""
        golds = s.get(f"gold_{who}") or []
        return f"{text}  [{_num(golds[i]):+.2f}]" if i < len(golds) else text

    rows = [[*([fams[i]] if fams else []), prompts[i], answer(first, "base", i), *[answer(samples[n], "policy", i)
                                                                                 for n in names]]
            for i in chosen]
    note = ('<p class="small">[gold utility]</p>' if any(s.get("gold_policy") for s in samples.values())
            else '<p class="small">model output as written (escaped, never run)</p>')
    return table([*(["family"] if fams else []), "prompt", base_name, *names], rows) + note


def build_run_report(run: str | Path, arms: list[str] | None = None, out: str | Path | None = None) -> Path:
    """``report.html`` of an ``rlhflab run`` directory (``out``: elsewhere); ``arms`` default
    to the run's ``config.yaml`` (``run.arms``), else every directory with a training curve."""
    run = Path(run)
    if arms is None:
        arms = run_arms(run)
    palette = Palette(arms)
    curves = {a: _jsonl(run / a / "metrics.jsonl") for a in arms}
    curves = {a: rows for a, rows in curves.items() if rows}
    evals = {a: e for a in arms if isinstance(e := _load(run / "eval" / a / "eval.json"), dict)}
    diagnoses = {a: d for a in arms if isinstance(d := _load(run / "eval" / a / "diagnosis.json"), dict)}
    samples = {a: s for a in arms if (s := _load(run / "eval" / a / "samples.json"))}
    readings = {a: {k: v for k, v in e.items() if k.startswith("overopt/")} for a, e in evals.items()}
    bons = {a: b for a in arms if a in SAMPLING_ARMS and isinstance(b := _load(run / a / "bon.json"), dict)}
    n_probes = next((len(s["prompts"]) for s in samples.values() if isinstance(s, dict)
                     and isinstance(s.get("prompts"), list)), None)
    probe_sets = ProbeSets(run, n_probes)
    sections = [
        ("Pipeline at a glance", section_pipeline(run)),
        ("The SFT policy's gold, by probe set", section_sft_gold(run, curves, evals, probe_sets)),
        ("Reward model", section_reward_model(run)),
        *([("What the reward model pays for (rlhflab attack-rm)", section_rm_attack(attack))]
          if isinstance(attack := _load(run / "attack" / "attack.json"), dict) else []),
        ("Training curves", section_training(curves, palette, probe_sets)),
        ("Over-optimization (Gao et al. 2022)",
         section_overoptimization({a: r for a, r in curves.items() if arm_kind(a) == "online"}, readings, palette,
                                  probe_sets)),
        ("Best-of-n against RL (Gao et al. 2022)", section_bon_vs_rl(bons, curves, readings, palette, probe_sets)),
        ("Reward-KL frontier", section_frontier(run, palette)),
        ("Instruments per policy", section_instruments(evals, "SFT", probe_sets.probes())),
        ("Diagnosis", section_diagnosis(diagnoses, evals)),
        ("Samples side by side", section_samples(samples)),
    ]
    target = Path(out) if out is not None else run / "report.html"
    return write_page(target, page("rlhflab run report", sections, subtitle=str(run.resolve())))


def run_arms(run: Path) -> list[str]:
    """The arms of a run: ``run.arms`` of its config.yaml, else each directory holding a
    training curve or a best-of-n record, besides the pipeline's own stages."""
    arms = _setting(_config(run / "config.yaml"), "run.arms")
    if isinstance(arms, list) and all(isinstance(a, str) for a in arms):
        return arms
    stages = {"world", "sft", "rm", "rm_eval", "eval", "sweep"}
    return sorted(p.name for p in run.iterdir() if p.is_dir() and p.name not in stages
                  and ((p / "metrics.jsonl").is_file() or (p / "bon.json").is_file()))
