"""The report: built from a run directory's artifacts, self-contained, rendered by Chromium."""

import json
import os
import re
import shutil
import subprocess

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
