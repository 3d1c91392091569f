"""CLI smoke runs on configs/tiny.yaml: world export, SFT, errors that exit 2."""

import json
import subprocess
import sys

import pytest

from rlhflab.cli import main
from rlhflab.data import load_rows
from tests.conftest import ROOT, subprocess_env


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_config_path):
    out = tmp_path_factory.mktemp("runs") / "sft"
    assert main(["sft", "--config", str(tiny_config_path), "--out", str(out)]) == 0
    return out


def test_sft_lowers_held_out_loss_and_saves_a_plain_hf_model(sft_run):
    summary = json.loads((sft_run / "metrics.json").read_text())
    # Untrained: ~ln(vocab) = 5.5 nats. Measured after 32 tiny steps: ~4.1.
    assert summary["eval/loss"] < summary["eval/loss_initial"] - 0.8
    for key in ("samples/well_formed_rate", "gold/mean", "gold/ideal_mean", "gold/headroom", "eval/perplexity"):
        assert key in summary
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sft_run / "model")
    tok = AutoTokenizer.from_pretrained(sft_run / "model")
    assert tok.pad_token_id != tok.eos_token_id
    assert list((sft_run / "model").glob("*.safetensors")) and not list((sft_run / "model").glob("*.bin"))
    assert model.config.vocab_size == len(tok)
    assert (sft_run / "config.yaml").is_file()
    lines = (sft_run / "metrics.jsonl").read_text().splitlines()
    assert all("step" in json.loads(x) for x in lines)


def test_existing_run_is_refused_and_left_untouched(sft_run, tiny_config_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in sft_run.rglob("*")}
    rc = main(["sft", "--config", str(tiny_config_path), "--out", str(sft_run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "holds an earlier run" in err[0] and "--overwrite" in err[0]
    assert {p: p.stat().st_mtime_ns for p in sft_run.rglob("*")} == before


def test_sft_on_user_jsonl_with_a_bad_row_exits_2_before_writing(tmp_path, tiny_config_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "what is 1 plus 1 ?", "completion": "2 ."}\n{"prompt": "x"}\n')
    out = tmp_path / "out"
    rc = main(["sft", "--config", str(tiny_config_path), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"{data}:2: field 'completion': missing" in err[0]
    assert not out.exists()


def test_sft_on_user_jsonl_and_a_local_model(sft_run, tmp_path, tiny_config_path):
    """The user path: their own prompt/completion file and a local HF checkpoint."""
    from rlhflab.config import load_config
    from rlhflab.data import write_jsonl
    from rlhflab.world import World

    rows = World(load_config(tiny_config_path).world).sft_examples(96, "user")
    write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "user"
    assert main(["sft", "--config", str(tiny_config_path), "--data", str(tmp_path / "train.jsonl"),
                 "--model", str(sft_run / "model"), "--out", str(out), "--set", "sft.max_steps=3"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["data/source"].endswith("train.jsonl") and summary["train/steps"] == 3


def test_bad_config_value_exits_2(tmp_path, capsys):
    rc = main(["sft", "--out", str(tmp_path / "o"), "--set", "sft.lr_schedule=zigzag"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sft.lr_schedule" in err[0]


def test_world_export_writes_every_format(tmp_path, tiny_config_path):
    out = tmp_path / "world"
    assert main(["world", "--config", str(tiny_config_path), "--out", str(out)]) == 0
    assert len(load_rows(out / "sft.jsonl", "sft")) == 512
    prefs = load_rows(out / "preferences.jsonl", "preference")
    assert all(2 * sum(r["votes"]) >= len(r["votes"]) for r in prefs)
    probes = load_rows(out / "probes.jsonl", "prompt")
    assert {p["family"] for p in probes} == {"arithmetic", "sycophancy", "harmful", "benign", "open"}
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_console_script_exit_code_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "sft", "--data", str(tmp_path / "nope.jsonl"),
                           "--out", str(tmp_path / "o")], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.jsonl: cannot open" in proc.stderr


def test_a_command_without_models_does_not_load_transformers_and_the_libraries_stay_quiet():
    """`rlhflab diagnose` on a log loads no transformers (it cost every command 2-4 s); a
    command that loads it finds its progress bars off and its logs at errors only."""
    code = ("import sys; from rlhflab.cli import main; rc = main(['diagnose', 'tests/fixtures/trl/dpo_healthy']);"
            "loaded = 'transformers' in sys.modules;"
            "from transformers.utils import logging as l;"
            "print('RESULT', rc, loaded, l.is_progress_bar_enabled(), l.get_verbosity())")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          cwd=str(ROOT))
    assert proc.stdout.strip().splitlines()[-1] == "RESULT 0 False False 40", proc.stderr[-2000:]
