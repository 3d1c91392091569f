"""The report: built from a run directory's artifacts, self-contained, rendered by Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys

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
    assert "best-of-n gold" in section and "ppo gold" in section
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
