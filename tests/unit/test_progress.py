"""Without a terminal, progress is plain log lines carrying the bar's figures."""

from __future__ import annotations

import re

from rlhflab.progress import progress_bar


def _run(monkeypatch, capsys, seconds: str, steps: int = 3) -> list[str]:
    monkeypatch.setenv("RLHFLAB_LOG_SECONDS", seconds)
    with progress_bar(steps, "ppo") as bar:
        for i in range(steps):
            bar.update(reward=0.5 * i, kl=0.25, kl_status="ok")
    return capsys.readouterr().err.splitlines()


def test_lines_at_the_first_and_last_step_when_rate_limited(monkeypatch, capsys):
    lines = _run(monkeypatch, capsys, "1000")
    assert len(lines) == 2
    assert re.fullmatch(r"\[ppo\] step 1/3 \(33%\)  \d+s elapsed, ~\d+s left  reward 0  kl 0\.25  kl_status ok",
                        lines[0]), lines[0]
    assert lines[1].startswith("[ppo] step 3/3 (100%)") and "left" not in lines[1] and "reward 1" in lines[1]


def test_every_step_at_zero_seconds_and_silence_when_disabled(monkeypatch, capsys):
    assert len(_run(monkeypatch, capsys, "0", steps=4)) == 4
    with progress_bar(2, "sft", enabled=False) as bar:
        bar.update(loss=1.0)
    assert capsys.readouterr().err == ""
