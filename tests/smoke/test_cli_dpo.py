"""CLI smoke runs of ``rlhflab dpo`` on configs/tiny.yaml: outputs, metrics, bad input."""

from __future__ import annotations

import json

import pytest

from rlhflab.cli import main
from rlhflab.data import write_jsonl


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tiny_config_path):
    """A briefly trained tiny SFT policy (12 steps: enough to be a policy, not a good one)."""
    out = tmp_path_factory.mktemp("runs") / "sft"
    assert main(["sft", "--config", str(tiny_config_path), "--out", str(out), "--set", "sft.max_steps=12",
                 "--set", "sft.n_samples=8", "--set", "sft.n_show=0"]) == 0
    return out


def _dpo(tiny_config_path, sft_dir, out, *extra):
    return main(["dpo", "--config", str(tiny_config_path), "--sft", str(sft_dir), "--out", str(out),
                 "--set", "dpo.n_world_eval=16", "--set", "dpo.n_show=0", *extra])


def test_dpo_on_the_world_writes_a_run_with_trl_metric_names(sft_dir, tmp_path, tiny_config_path):
    """One epoch of the tiny world's 256 pairs (8 steps of 32). Measured: held-out loss
    0.693 -> ~0.63, accuracy ~0.63 on 51 held-out pairs (chance 0.5)."""
    out = tmp_path / "dpo"
    assert _dpo(tiny_config_path, sft_dir, out, "--loss", "dpo", "--set", "dpo.world_eval_every=4") == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and first["kl/sequence_mean"] == 0.0  # the policy is the reference
    assert first["eval/loss"] == pytest.approx(0.693147, abs=1e-6)
    # cached reference log-probs were computed in the same chunks: log-ratios exactly 0
    assert first["eval/rewards/margins"] == 0.0 and first["eval/rewards/accuracies"] == 0.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "eval/rewards/chosen", "eval/rewards/rejected",
                "eval/rewards/margins", "eval/rewards/accuracies", "eval/logps/chosen", "eval/logps/rejected",
                "gold/mean", "kl/sequence_mean", "win_rate/gold", "train/loss", "train/lr"):
        assert key in last, key
    assert any("gold/mean" in r for r in rows if 0 < r["step"] < last["step"])  # every 4 steps
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["eval/loss"] < summary["eval/loss_initial"] - 0.02
    assert summary["eval/rewards/accuracies"] > 0.5
    assert summary["dpo/reference"] == "cached" and summary["data/source"] == "world"
    assert summary["win_rate/gold_ci_low"] <= summary["win_rate/gold"] <= summary["win_rate/gold_ci_high"]
    assert summary["win_rate/gold_n"] == 16 and "gold/mean_sft" in summary
    # 3 of the 256 world pairs are longer than tiny's 48 tokens: cut, counted, kept
    assert summary["data/truncated"] == 3 and summary["data/dropped"] == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    assert (out / "config.yaml").is_file()


def test_kto_needs_unpaired_rows_or_the_flag(sft_dir, tmp_path, tiny_config_path, capsys):
    rc = _dpo(tiny_config_path, sft_dir, tmp_path / "no", "--loss", "kto")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--unpaired-from-pairs" in err[0]
    assert not (tmp_path / "no").exists()
    out = tmp_path / "kto"
    assert _dpo(tiny_config_path, sft_dir, out, "--loss", "kto", "--unpaired-from-pairs",
                "--set", "dpo.max_steps=2", "--set", "dpo.world_eval_every=-1") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["data/desirable"] == summary["data/undesirable"] == 256
    assert "kl" in summary and "count/chosen" in summary


def _world_rows():
    return [
        {"prompt": "what is 3 plus 4 ?", "chosen": "the answer is 7 .", "rejected": "the answer is 8 ."},
        {"prompt": "what is 2 plus 2 ?", "chosen": "the answer is 4 .", "rejected": "certainly ! 5 ."},
    ] * 20


@pytest.mark.parametrize("rows, loss, message", [
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}],
     "dpo", ":2: field 'chosen': chosen and rejected are identical"),
    ([{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "b", "label": "yes"}],
     "kto", ":2: field 'label': expected true or false, got 'yes'"),
    ([{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "b"}],
     "kto", ":2: field 'label': missing"),
    ([{"prompt": "p", "completion": "a", "label": True}], "ipo", "use --loss kto"),
])
def test_bad_rows_exit_2_before_writing(rows, loss, message, sft_dir, tmp_path, tiny_config_path, capsys):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, rows)
    out = tmp_path / "out"
    rc = _dpo(tiny_config_path, sft_dir, out, "--loss", loss, "--data", str(data))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert str(data) in err[0] or "use --loss" in err[0]
    assert not out.exists()


def test_pairs_that_truncate_to_identical_responses_exit_2(sft_dir, tmp_path, tiny_config_path, capsys):
    """At max_length 6 the prompt keeps 1 token and both answers 'the answer is 3 plus 4 ,
    so 7 .' / '... so 8 .' (10 tokens + EOS) keep their first 5 tokens, identical in every
    pair: nothing is left to learn from."""
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"prompt": "what is 3 plus 4 ?", "chosen": "the answer is 3 plus 4 , so 7 .",
                        "rejected": "the answer is 3 plus 4 , so 8 ."}] * 40)
    rc = _dpo(tiny_config_path, sft_dir, tmp_path / "out", "--data", str(data), "--set", "dpo.max_length=6")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no usable pairs" in err[0] and "dpo.max_length" in err[0]
    assert not (tmp_path / "out").exists()


def test_user_file_with_long_prompts_is_truncated_and_counted(sft_dir, tmp_path, tiny_config_path):
    """Prompts of ~60 tokens with max_length 48: the prompt loses its start, the pair is
    kept, and data/truncated counts it. The prompts are not the world's, so no gold
    evaluation runs."""
    long_prompt = "tell me about cats . " * 12 + "what is 3 plus 4 ?"
    rows = [{"prompt": long_prompt, "chosen": "the answer is 7 .", "rejected": "8 ."}] * 38 + _world_rows()
    write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert _dpo(tiny_config_path, sft_dir, out, "--loss", "ipo", "--data", str(tmp_path / "d.jsonl"),
                "--set", "dpo.max_steps=2", "--set", "dpo.batch_size=16") == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["data/pairs"] == 74 and summary["data/truncated"] == 36  # 38 - 2 held out
    assert summary["data/source"].endswith("d.jsonl") and "gold/mean" not in summary


def test_unpaired_flag_needs_kto(sft_dir, tmp_path, tiny_config_path, capsys):
    rc = _dpo(tiny_config_path, sft_dir, tmp_path / "o", "--loss", "dpo", "--unpaired-from-pairs")
    assert rc == 2 and "kto only" in capsys.readouterr().err
