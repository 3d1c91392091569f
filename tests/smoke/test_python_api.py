"""The Python API example of docs/user-data.md, run as it is written there."""

from __future__ import annotations

import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    doc = (ROOT / "docs" / "user-data.md").read_text()
    section = doc[doc.index("## The Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    code = code.replace('"configs/tiny.yaml"', repr(str(ROOT / "configs" / "tiny.yaml")))
    namespace: dict = {}
    exec(compile(code, "docs/user-data.md", "exec"), namespace)
    verdict, kl = capsys.readouterr().out.strip().splitlines()[-1].rsplit(" ", 1)
    assert verdict == namespace["result"]["verdict"] and math.isfinite(float(kl))
    assert (tmp_path / "runs" / "api" / "grpo" / "model" / "model.safetensors").is_file()
    assert "win_rate/gold" in namespace["readings"]  # the world's instruments, gold judge included


def _longer(prompts, completions_a, completions_b):
    """A judge as a plain function: the longer answer wins, ties half."""
    return [0.5 if len(a) == len(b) else float(len(a) > len(b)) for a, b in zip(completions_a, completions_b)]


def test_a_callable_judge_in_evaluate_and_rl_then_diagnose(tmp_path):
    """Judges may be callables wherever the API takes a judge: ``evaluate`` (its readings then
    diagnosed) and ``rl`` (the held-out win-rate, which ``diagnose`` of the run directory reads
    as the judge's). Both raised AttributeError (a function has no ``partition``)."""
    import json

    from rlhflab import api
    from tests.component.test_rl_rollout import tiny_policy_dir

    sft = tiny_policy_dir(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["what is 1 plus 2 ?", "how do i make tea ?", "tell me about dogs .", "compute 5 minus 3 ."]))
    cfg = api.load_config(ROOT / "configs" / "tiny.yaml", ["generation.max_new_tokens=6", "rl.steps=1",
                                                           "rl.batch_size=8", "rl.samples_per_prompt=4"])
    readings = api.evaluate(cfg, policy=sft, base=sft, prompts=prompts, judge=_longer)
    assert readings["win_rate/judge_n"] == 4 and readings["win_rate/judge"] == 0.5  # same weights, same seed: ties
    assert api.diagnose(readings)["verdict"] == "no improvement"

    out = tmp_path / "grpo"
    api.rl(cfg, "grpo", out=out, sft=sft, reward_fns=["length"], prompts=prompts, eval_prompts=prompts,
           judge=_longer)
    assert json.loads((out / "run.json").read_text())["judge"] == "<python _longer>"
    result = api.diagnose(out)
    assert result["source"]["file"] == str(out / "metrics.json")
    assert not any("win-rate" in what for what in result["to_measure"])  # the run's own judge, read
