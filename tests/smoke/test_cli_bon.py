"""`rlhflab bon` on configs/tiny.yaml: the world (gold) and a user's prompts (judge only),
nested curves, the two KL readings, and bad input exiting 2."""

import json

import pytest

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.models import create_causal_lm, save_pretrained_atomic
from rlhflab.world import World

FAST = ["--set", "rm.max_steps=4", "--set", "rm.batch_size=8", "--set", "rm.n_prompts=24",
        "--set", "rm.n_eval_prompts=8", "--set", "rm.n_reference=16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config_path):
    """A tiny untrained policy and a reward model trained 4 steps on its samples: the
    command, not the quality, is under test."""
    cfg = load_config(tiny_config_path)
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    root = tmp_path_factory.mktemp("bon")
    save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, root / "sft" / "model")
    assert main(["rm", "--config", str(tiny_config_path), "--sft", str(root / "sft"), "--out", str(root / "rm"),
                 *FAST]) == 0
    return root


def test_bon_on_the_world(runs, tiny_config_path, capsys):
    out = runs / "bon"
    assert main(["bon", "--config", str(tiny_config_path), "--policy", str(runs / "sft"), "--rm", str(runs / "rm"),
                 "--n", "1,2,4,8", "--n-prompts", "12", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((out / "bon.json").read_text())
    assert printed == record and record["gold"] is True and record["n_prompts"] == 12
    rows = record["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    proxy = [r["bon/proxy_mean"] for r in rows]
    assert proxy == sorted(proxy)  # nested candidates: the best of more is never worse by the proxy
    assert rows[0]["bon/kl_analytic"] == 0.0 and rows[0]["bon/kl_plugin"] == pytest.approx(0.0, abs=1e-12)
    for r in rows:
        assert 0.0 <= r["bon/kl_plugin"] <= r["bon/kl_plugin_ceiling"] + 1e-12 <= r["bon/kl_analytic"] + 2e-12
        assert 0.0 <= r["bon/win_rate_ci_low"] <= r["bon/win_rate"] <= r["bon/win_rate_ci_high"] <= 1.0
        assert "bon/gold_mean" in r
    assert "bon/fit_alpha" in record["fit"]


def test_bon_on_a_users_prompts(runs, tiny_config_path, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("tell me about cats .", "what is 2 plus 2 ?")))
    out = tmp_path / "bon"
    assert main(["bon", "--config", str(tiny_config_path), "--policy", str(runs / "sft"), "--rm", str(runs / "rm"),
                 "--n", "1,4", "--prompts", str(prompts), "--out", str(out)]) == 0
    record = json.loads((out / "bon.json").read_text())
    assert record["gold"] is False and "no gold" in record["note"] and "proxy" in record["note"]
    assert all("bon/gold_mean" not in r and "bon/win_rate_judge" in r for r in record["rows"])
    assert "fit" not in record
    assert "no gold" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--n", "1,x"], "--n"),
    (["--n", "4,2"], "--n"),
    (["--n", "0,2"], "--n"),
    (["--judge", "rm:x"], "--judge"),
    (["--prompts", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
])
def test_bad_input_exits_2(runs, tmp_path, capsys, argv, message):
    rc = main(["bon", "--policy", str(runs / "sft"), "--rm", str(runs / "rm"), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
