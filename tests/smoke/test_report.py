"""The report: built from a run directory's artifacts, self-contained, rendered by Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
from html import escape

import pytest

from rlhflab.report.build import build_run_report


def ensure_chromium() -> str:
    """Debian's chromium, installed here when missing (root + apt-get); else skip, saying why."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"installing chromium failed: {proc.stderr.strip().splitlines()[-1:]}")
    path = shutil.which("chromium")
    if not path:
        pytest.skip("chromium still not found after apt-get install")
    return path


def _fake_run(run):
    """A run directory shaped like `rlhflab run` output, with made-up but plausible numbers."""
    (run / "ppo").mkdir(parents=True)
    (run / "eval" / "ppo").mkdir(parents=True)
    (run / "rm_eval").mkdir()
    (run / "summary.json").write_text(json.dumps({"seconds": {"world": 1.0, "sft": 60.0, "rm": 30.0, "ppo": 90.0}}))
    rows = [{"step": s, "objective/scores": 0.1 * s, "objective/kl": 0.3 * s, "kl/beta": 0.05,
             "gold/mean": 0.5 + 0.1 * s - 0.008 * s * s} for s in range(1, 15)]
    (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "rm_eval" / "rm_eval.json").write_text(json.dumps({
        "accuracy/labels": 0.71, "calibration/ece": 0.04, "calibration/reliability": [
            {"p_mean": 0.55, "frequency": 0.52}, {"p_mean": 0.75, "frequency": 0.73},
            {"p_mean": 0.95, "frequency": 0.9}]}))
    ev = {"gold/mean": 1.1, "base/gold/mean": 0.8, "kl/sequence_mean": 4.2, "win_rate/gold": 0.6,
          "win_rate/gold_ci_low": 0.54, "win_rate/gold_ci_high": 0.66, "length/mean": 9.0, "base/length/mean": 8.0,
          "overopt/fit_alpha": 0.4, "overopt/fit_beta_g": 0.2, "overopt/fit_kl_peak": 5.0, "overopt/fit_r2": 0.9,
          "overopt/gold_peak": 1.4, "overopt/gold_peak_kl": 2.1}
    (run / "eval" / "ppo" / "eval.json").write_text(json.dumps(ev))
    (run / "eval" / "ppo" / "diagnosis.json").write_text(json.dumps({"verdict": "healthy", "findings": [
        {"severity": "ok", "name": "healthy", "symptom": "s", "evidence": "e", "instrument": "i",
         "root_cause": "r", "fix": "none"}], "not_measured": []}))
    (run / "eval" / "ppo" / "samples.json").write_text(json.dumps({
        "prompts": ["what is 1 plus 1 ?"], "families": ["arithmetic"], "policy": ["the answer is 2 ."],
        "base": ["it is 3 ."], "gold_policy": [2.0], "gold_base": [-1.0]}))


def test_report_is_self_contained_and_renders_with_its_images(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    path = build_run_report(run, ["ppo"])
    text = path.read_text()
    assert not re.search(r"(src|href)=\"https?:", text) and "<script" not in text
    n_svg = text.count("<svg")
    assert n_svg >= 4  # calibration, training curves (3 keys), over-optimization
    for heading in ("Pipeline at a glance", "Reward model", "Training curves", "Over-optimization",
                    "Instruments per policy", "Diagnosis", "Samples side by side"):
        assert heading in text

    chromium = ensure_chromium()
    # Inject a probe that writes each SVG's rendered size into the title, then read the DOM.
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", "<script>document.title = JSON.stringify(Array.from("
                                  "document.querySelectorAll('svg')).map(s => { const r = s.getBoundingClientRect();"
                                  " return [r.width, r.height]; }));</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", dom.stdout, re.S)
    assert title, dom.stderr[-2000:]
    sizes = json.loads(title.group(1))
    assert len(sizes) == n_svg and all(w > 100 and h > 100 for w, h in sizes)
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


# ---------------------------------------------------------------------------------------
# Best-of-n against RL: which method spends more KL for the same gold


def test_kl_at_same_gold_by_hand():
    """RL points (d, gold) (0, 0), (1, .5), (2, 1); best-of-n (0, .1), (.5, .6), (1, .8).
    Both start at or below 0.1 and both reach 0.8, so the levels compared are the measured
    golds in (0.1, 0.8]: 0.5, 0.6, 0.8. Straight lines in d between points:
    RL reaches 0.5 at d = 1, 0.6 at d = 1.2, 0.8 at d = 1.6 -> KL 1, 1.44, 2.56;
    best-of-n reaches 0.5 at d = 0.4, 0.6 at d = 0.5, 0.8 at d = 1 -> KL 0.16, 0.25, 1.
    RL needs more KL at every level."""
    from rlhflab.report.build import kl_at_same_gold, same_gold_sentence

    rl = [(0.0, 0.0), (1.0, 0.5), (2.0, 1.0)]
    bon = [(0.0, 0.1), (0.5, 0.6), (1.0, 0.8)]
    cmp = kl_at_same_gold(rl, bon)
    assert cmp["verdict"] == "more"
    assert [x["gold"] for x in cmp["levels"]] == pytest.approx([0.5, 0.6, 0.8])
    assert [x["kl_rl"] for x in cmp["levels"]] == pytest.approx([1.0, 1.44, 2.56])
    assert [x["kl_bon"] for x in cmp["levels"]] == pytest.approx([0.16, 0.25, 1.0])
    assert same_gold_sentence("ppo", cmp).startswith("ppo: yes")
    assert "ppo needs 2.56 nats and best-of-n 1.00" in same_gold_sentence("ppo", cmp)
    # the methods swapped: the same numbers, the other verdict
    assert kl_at_same_gold(bon, rl)["verdict"] == "less"
    # a point with less gold at more KL is no part of the frontier: nothing changes
    assert kl_at_same_gold(rl + [(1.5, 0.2)], bon)["levels"] == cmp["levels"]


def test_no_overlap_in_gold_cannot_tell():
    """RL never rises above 0.05, best-of-n starts at 0.1: no gold level both reach above
    their starting points, and the sentence says the data cannot tell."""
    from rlhflab.report.build import kl_at_same_gold, same_gold_sentence

    cmp = kl_at_same_gold([(0.0, 0.0), (1.0, 0.05)], [(0.0, 0.1), (1.0, 0.5)])
    assert cmp["verdict"] == "no overlap" and cmp["levels"] == []
    assert "cannot tell" in same_gold_sentence("grpo", cmp)


@pytest.fixture(scope="module")
def ppo_bon_run(tmp_path_factory):
    """``rlhflab run`` on the tiny preset with arms ppo and bon (no bandit frontier)."""
    from tests.conftest import ROOT, subprocess_env

    out = tmp_path_factory.mktemp("ppo_bon") / "run"
    proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
                           "--out", str(out), "--set", "run.arms=[ppo, bon]", "--set", "run.bandit_algos=[]"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_the_bon_arm_writes_bon_json_and_the_report_compares_it_with_rl(ppo_bon_run):
    run, stdout = ppo_bon_run
    record = json.loads((run / "bon" / "bon.json").read_text())
    ns = [1, 2, 4, 8, 16, 32]  # run.bon_n's default
    assert record["n"] == ns and [r["n"] for r in record["rows"]] == ns
    assert record["n_prompts"] == 16  # tiny's rl.n_eval: the prompts the RL arm's gold is measured on
    assert record["gold"] is True and record["rows"][0]["bon/kl_analytic"] == 0
    assert not (run / "eval" / "bon").exists() and not (run / "bon" / "model").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert "bon" in summary["seconds"] and "eval_bon" not in summary["seconds"]
    assert [r["n"] for r in summary["bon"]["rows"]] == ns
    assert {"bon/gold_mean", "bon/proxy_mean", "bon/kl_plugin", "bon/kl_analytic"} <= set(summary["bon"]["rows"][-1])
    assert "best-of-n on world (16 prompts)" in stdout
    html = (run / "report.html").read_text()
    section = html[html.index("Best-of-n against RL"):html.index("Reward-KL frontier")]
    assert "gold vs sqrt(KL from SFT): RL arms and best-of-n" in section and "<svg" in section
    assert "bon (best-of-n) gold" in section and "ppo gold" in section
    # one answer for the RL arm, whichever the tiny run's numbers give
    assert re.search(r"<p>ppo: (yes|no|not throughout|the data cannot tell)", section), section[-2000:]


def test_only_rlhflab_run_takes_the_bon_arm():
    """Best-of-n has no beta: a sweep (check_arms without sampling) refuses it in one line."""
    from rlhflab.commands.arms import check_arms
    from rlhflab.errors import InputError

    check_arms(["ppo", "bon"], sampling=True)
    with pytest.raises(InputError, match="no beta to sweep"):
        check_arms(["bon"])
    with pytest.raises(InputError, match="sampling: bon"):
        check_arms(["bestofn"], sampling=True)


# ---------------------------------------------------------------------------------------
# One colour per arm, steps that say what they are, gold that names its prompts, verdicts
# with their reasons: a run of three arms whose curves log different keys (DPO logs no RM
# score, so a palette taken in order would shift GRPO's colour between charts)

ARMS = ["ppo", "dpo", "grpo"]
SCRIPT = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_three_arm_run(run):
    """``rlhflab run``'s layout with arms ppo, dpo and grpo: each SFT gold figure on its own
    prompt set (the SFT stage's 32 prompts, the online arms' 16, DPO's 32, the 40 eval probes),
    ppo's and dpo's verdicts "no improvement" with no finding, grpo's with one; a sample that
    holds markup."""
    for d in ("sft", *ARMS, *(f"eval/{a}" for a in ARMS)):
        (run / d).mkdir(parents=True)
    (run / "config.yaml").write_text("world:\n  n_eval: 8\nsft:\n  n_samples: 32\nrl:\n  n_eval: 16\n"
                                     "dpo:\n  n_world_eval: 32\nrun:\n  arms: [ppo, dpo, grpo]\n")
    (run / "summary.json").write_text(json.dumps({"seconds": {"sft": 4.0, "ppo": 1.0, "dpo": 2.0, "grpo": 1.0},
                                                  "sft": {"gold/mean": -2.184}}))
    for arm, shift in (("ppo", 0.0), ("grpo", 0.3)):
        _rows(run / arm / "metrics.jsonl", [{"step": 0, "gold/mean": -1.517}] + [
            {"step": s, "objective/scores": 0.5 + 0.1 * s + shift, "objective/kl": 0.1 * s * s, "kl/beta": 0.05,
             **({"gold/mean": -1.517 + 0.02 * s - shift / 10} if s % 2 == 0 else {})} for s in range(1, 5)])
    _rows(run / "dpo" / "metrics.jsonl", [{"step": 0, "gold/mean": -2.184, "kl/sequence_mean": 0.0}] + [
        {"step": s, "rewards/margins": 0.01 * s, "train/loss": 0.69 - 0.003 * s} for s in range(2, 17, 2)]
        + [{"step": 16, "gold/mean": -2.031, "kl/sequence_mean": 0.71}])
    for arm in ARMS:
        (run / "eval" / arm / "eval.json").write_text(json.dumps({
            "gold/mean": -1.69, "base/gold/mean": -1.765, "kl/sequence_mean": 1.03, "win_rate/gold": 0.525,
            "win_rate/gold_ci_low": 0.375, "win_rate/gold_ci_high": 0.671, "length/mean": 14.3,
            "base/length/mean": 15.3}))
        findings = [] if arm != "grpo" else [
            {"severity": "warn", "name": "beta_too_high", "symptom": "KL near zero", "evidence": "KL 0.07 nats",
             "instrument": "KL, win-rate", "root_cause": "the penalty pins the policy", "fix": "lower beta"}]
        (run / "eval" / arm / "diagnosis.json").write_text(json.dumps(
            {"verdict": "no improvement", "findings": findings, "not_measured": [], "to_measure": {}}))
        (run / "eval" / arm / "samples.json").write_text(json.dumps({
            "prompts": [f"say {SCRIPT}"] * 40, "families": ["open"] * 40, "policy": [SCRIPT] * 40,
            "base": ["it is 3 ."] * 40, "gold_policy": [0.0] * 40, "gold_base": [-1.0] * 40}))
    (run / "bandit_frontier.json").write_text(json.dumps({
        "exact": [{"kl": 0.1 * i, "reward": 0.2 + 0.05 * i} for i in range(10)],
        "measured": {"ppo": [{"beta": 0.1, "kl": 0.5, "reward": 0.4}], "dpo": [{"beta": 0.1, "kl": 0.6, "reward": 0.42}]}}))
    return run


@pytest.fixture(scope="module")
def three_arm_report(tmp_path_factory):
    run = _fake_three_arm_run(tmp_path_factory.mktemp("three_arms") / "run")
    return build_run_report(run, ARMS).read_text()


def _legend(svg: str) -> list[tuple[str, str]]:
    """(label, colour) of each legend entry of an SVG: a mark followed by its label."""
    out = []
    for attrs, label in re.findall(r"<(?:line|circle)\b([^>]*)/><text[^>]*>([^<]*)</text>", svg):
        colour = re.search(r"#[0-9a-fA-F]{6}", attrs)
        if colour:
            out.append((label, colour.group(0).lower()))
    return out


def _arm_of(label: str) -> str | None:
    return next((a for a in ARMS if label == a or label.startswith(a + " ")), None)


def _section(html: str, heading: str) -> str:
    start = html.index(f"<h2>{escape(heading)}")
    end = html.find("<h2>", start + 4)
    return html[start:end if end >= 0 else len(html)]


def test_each_arm_keeps_one_colour_in_every_chart_and_legends_sit_below_the_data(three_arm_report):
    svgs = re.findall(r"<svg.*?</svg>", three_arm_report, re.S)
    colours: dict[str, set] = {}
    for svg in svgs:
        for label, colour in _legend(svg):
            if _arm_of(label):
                colours.setdefault(_arm_of(label), set()).add(colour)
    assert set(colours) == set(ARMS)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == len(ARMS)  # and the arms' colours differ
    for svg in svgs:
        area = re.search(r'class="plot-area" x="[\d.]+" y="([\d.]+)" width="[\d.]+" height="([\d.]+)"', svg)
        legend = re.search(r'<g class="legend" data-top="([\d.]+)">', svg)
        assert area and legend, svg[:300]
        assert float(legend.group(1)) >= float(area.group(1)) + float(area.group(2))


def test_step_axes_say_what_a_step_is_and_never_mix_rl_and_dpo_steps(three_arm_report):
    section = _section(three_arm_report, "Training curves")
    svgs = re.findall(r"<svg.*?</svg>", section, re.S)
    assert len(svgs) >= 6
    for svg in svgs:
        xlabel = re.search(r'class="xlabel"[^>]*>([^<]*)<', svg)
        arms = {_arm_of(label) for label, _ in _legend(svg)} - {None}
        assert xlabel, svg[:300]
        if arms & {"ppo", "grpo"}:
            assert "dpo" not in arms and xlabel.group(1).startswith("RL step (one rollout batch")
        else:
            assert arms == {"dpo"} and xlabel.group(1).startswith("DPO optimizer step (one batch of preference")


def test_every_gold_figure_of_sft_names_its_prompts(three_arm_report):
    """The same SFT policy, four figures, four prompt sets: each row names its own."""
    section = _section(three_arm_report, "The SFT policy's gold")
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td[^>]*>(.*?)</td></tr>", section)
    assert [(who.split(" (")[0], on, value) for who, on, value in rows] == [
        ("the SFT stage's own sample, after training".replace("'", "&#x27;"),
         "the first sft.n_samples = 32 held-out world prompts", "-2.184"),
        ("step 0 of ppo&#x27;s held-out evaluation", "the first rl.n_eval = 16 held-out world prompts", "-1.517"),
        ("step 0 of dpo&#x27;s held-out evaluation", "the first dpo.n_world_eval = 32 held-out world prompts",
         "-2.184"),
        ("step 0 of grpo&#x27;s held-out evaluation", "the first rl.n_eval = 16 held-out world prompts", "-1.517"),
        ("rlhflab eval: the SFT column of the instruments table", "the 40 eval probes (world.n_eval = 8 per family)",
         "-1.765")]
    # each gold chart of the training curves names its prompts in its title
    titles = re.findall(r'font-size="13"[^>]*>(gold utility[^<]*)<', _section(three_arm_report, "Training curves"))
    assert sorted(titles) == ["gold utility (first dpo.n_world_eval = 32 held-out prompts)",
                              "gold utility (first rl.n_eval = 16 held-out prompts)"]
    assert "Every column on the 40 eval probes" in _section(three_arm_report, "Instruments per policy")


def test_every_verdict_states_its_reason_and_no_findings_table_is_empty(three_arm_report):
    section = _section(three_arm_report, "Diagnosis")
    for table_ in re.findall(r"<table>.*?</table>", section, re.S):
        assert table_.count("<tr>") >= 2, table_  # a header and at least one row
    why = re.findall(r"<h3>(\w+): .*?</h3>\s*<p class=\"reason\"><b>Why:</b> (.*?)</p>", section, re.S)
    assert [arm for arm, _ in why] == ARMS
    for _, reason in why:
        assert reason.startswith("gold win-rate against SFT 0.525 (95% interval 0.375 to 0.671): the interval "
                                 "holds 0.5"), reason
    assert "the findings below name the cause (beta_too_high)" in dict(why)["grpo"]


def test_model_output_is_escaped(three_arm_report):
    assert "<script" not in three_arm_report and "<img" not in three_arm_report
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in three_arm_report


# ---------------------------------------------------------------------------------------
# rlhflab report DIR


def _report(argv, capsys):
    from rlhflab.cli import main

    code = main(["report", *argv])
    return code, capsys.readouterr()


def test_rlhflab_report_on_a_user_data_eval_dir_escapes_model_output(tmp_path, capsys):
    """An `rlhflab eval --prompts` directory: no families, no gold, a judge's win-rate."""
    d = tmp_path / "eval"
    d.mkdir()
    (d / "eval.json").write_text(json.dumps({
        "win_rate/judge": 0.62, "win_rate/judge_ci_low": 0.55, "win_rate/judge_ci_high": 0.69, "win_rate/judge_n": 200,
        "kl/sequence_mean": 3.1, "length/mean": 40.0, "base/length/mean": 38.0}))
    (d / "samples.json").write_text(json.dumps({"prompts": ["hi"], "policy": [SCRIPT], "base": ["hello"]}))
    code, out = _report([str(d)], capsys)
    assert code == 0 and out.out.strip() == f"report (eval): {d / 'report.html'}"
    html = (d / "report.html").read_text()
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "judge win-rate against base 0.620 (95% interval 0.550 to 0.690, n = 200): the interval lies above 0.5" in html


def test_rlhflab_report_on_a_trl_trainer_state(tmp_path, capsys):
    """TRL's DPOTrainer log: its own step axis, its DPO curves."""
    d = tmp_path / "trl"
    (d / "checkpoint-20").mkdir(parents=True)
    log = [{"step": s, "epoch": s / 20, "loss": 0.69 - 0.01 * s, "rewards/chosen": -0.01 * s,
            "rewards/rejected": -0.03 * s, "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.01 * s,
            "logps/chosen": -80.0 - s, "logps/rejected": -85.0 - 2 * s, "learning_rate": 5e-7} for s in (10, 20)]
    (d / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": log}))
    out = tmp_path / "trl.html"
    code, _ = _report([str(d), "--out", str(out)], capsys)
    html = out.read_text()
    assert code == 0 and "TRL trainer report (checkpoint-20/trainer_state.json)" in html
    assert "log-probs of chosen and rejected" in html and "TRL step (global_step: one optimizer step)" in html


def test_rlhflab_report_refuses_a_bad_dir_and_keeps_a_file_it_did_not_write(tmp_path, capsys):
    code, out = _report([str(tmp_path)], capsys)
    assert code == 2 and out.err.count("\n") == 1 and "no rlhflab output here: expected summary.json" in out.err
    code, out = _report([str(tmp_path / "missing")], capsys)
    assert code == 2 and out.err.strip().endswith("missing: not found")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.5}\n')
    mine = tmp_path / "notes.html"
    mine.write_text("my notes")
    code, out = _report([str(tmp_path), "--out", str(mine)], capsys)
    assert code == 2 and "is not a report rlhflab wrote; pass --overwrite" in out.err
    assert mine.read_text() == "my notes"
    assert _report([str(tmp_path), "--out", str(mine), "--overwrite"], capsys)[0] == 0
    assert _report([str(tmp_path), "--out", str(mine)], capsys)[0] == 0  # its own report is replaced
    assert "step (as logged)" in mine.read_text() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_rlhflab_report_on_a_real_run_its_training_runs_and_eval_dirs(ppo_bon_run, tmp_path, capsys):
    run, _ = ppo_bon_run
    for d, kind, text in ((run, "run", "rlhflab run report"), (run / "eval" / "ppo", "eval", "Why:"),
                          (run / "ppo", "training", "RL step (one rollout batch"),
                          (run / "sft", "training", "SFT optimizer step"), (run / "bon", "bon", "best-of-n")):
        out = tmp_path / f"{kind}-{d.name}.html"
        code, printed = _report([str(d), "--out", str(out)], capsys)
        assert code == 0 and printed.out.startswith(f"report ({kind}): "), printed.err
        assert text in out.read_text()
