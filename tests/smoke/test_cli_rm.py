"""CLI smoke runs of collect, rm and eval-rm on configs/tiny.yaml, and bad input exiting 2."""

import json

import pytest

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.data import load_rows, write_jsonl
from rlhflab.models import create_causal_lm, save_pretrained_atomic
from rlhflab.world import World

FAST = ["--set", "rm.max_steps=4", "--set", "rm.batch_size=8", "--set", "rm.n_prompts=24",
        "--set", "rm.n_eval_prompts=8", "--set", "rm.n_reference=16"]


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tiny_config_path):
    """A run directory laid out like `rlhflab sft` writes it (a tiny untrained policy: the
    commands, not the policy's quality, are under test here)."""
    cfg = load_config(tiny_config_path)
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    out = tmp_path_factory.mktemp("rm_cli") / "sft"
    save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, out / "model")
    return out


@pytest.fixture(scope="module")
def rm_run(sft_dir, tiny_config_path):
    out = sft_dir.parent / "rm"
    assert main(["rm", "--config", str(tiny_config_path), "--sft", str(sft_dir), "--out", str(out), *FAST]) == 0
    return out


def test_collect_writes_ranked_pairs_in_the_preference_format(sft_dir, tiny_config_path, tmp_path, capsys):
    out = tmp_path / "prefs.jsonl"
    assert main(["collect", "--config", str(tiny_config_path), "--policy", str(sft_dir), "--k", "3", "-n", "6",
                 "--out", str(out)]) == 0
    rows = load_rows(out, "preference")
    assert "pairs=" in capsys.readouterr().out
    for r in rows:
        assert 2 * sum(r["votes"]) > len(r["votes"]) and len(r["votes"]) == 3
        assert {"chosen_eos", "rejected_eos", "group", "responses", "responses_eos", "rankings", "ranking"} <= set(r)
        assert r["chosen"] in r["responses"] and r["rejected"] in r["responses"]
        assert all(sorted(k) == list(range(len(r["responses"]))) for k in r["rankings"])
    n_groups = len({r["group"] for r in rows})
    assert n_groups >= 1 and len(rows) <= 3 * n_groups  # at most C(3, 2) pairs per prompt
    rc = main(["collect", "--config", str(tiny_config_path), "--policy", str(sft_dir), "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_rm_collects_trains_normalizes_and_saves(rm_run):
    from transformers import AutoModelForSequenceClassification

    from rlhflab.reward_model import RewardModel

    summary = json.loads((rm_run / "metrics.json").read_text())
    assert summary["data/source"] == "collected" and summary["collect/pairs"] == summary["data/pairs_in"] > 0
    assert summary["normalization/reference"] == "sft_samples"
    assert summary["members"][0]["train/steps"] == 4
    for key in ("eval/accuracy", "train/loss", "train/accuracy", "data/truncated"):
        assert key in summary
    lines = [json.loads(x) for x in (rm_run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in x and "rm/member" in x for x in lines)
    assert load_rows(rm_run / "data" / "train.jsonl", "preference")[0]["rankings"]
    plain = AutoModelForSequenceClassification.from_pretrained(rm_run / "model")
    assert plain.config.num_labels == 1
    meta = json.loads((rm_run / "model" / "reward_model.json").read_text())
    assert meta["normalization"]["n"] == 16 and len(meta["members"]) == 1
    # Normalized on the reference samples: reproduce them and check mean 0, std 1.
    from rlhflab.commands.rm import reference_texts

    cfg = load_config(rm_run / "config.yaml")
    rm = RewardModel.load(rm_run)
    ps, rs, es, _ = reference_texts(cfg, World(cfg.world), rm_run.parent / "sft" / "model", [], rm.tokenizer,
                                    from_world=True)
    z = rm.score(ps, rs, eos=es)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4) and z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_eval_rm_writes_every_instrument_and_prints_a_table(rm_run, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval-rm", "--rm", str(rm_run), "--data", str(rm_run / "data" / "eval.jsonl"),
                 "--keywords", "honest,great", "--out", str(out)]) == 0
    result = json.loads((out / "rm_eval.json").read_text())
    for key in ("accuracy/labels", "accuracy/votes", "accuracy/rater_rater", "accuracy/oracle_votes",
                "accuracy/gold", "calibration/ece", "calibration/auc", "calibration/reliability",
                "margin/correct_abs_mean", "probe/length/win_rate", "probe/length/corr_reward_length",
                "probe/keyword/honest/win_rate", "probe/keyword/certainly/win_rate", "probe/sycophancy/win_rate",
                "agreement/majority_mean", "agreement/unanimous_frac", "agreement/below_0.6_frac"):
        assert key in result, key
    assert "accuracy vs labels" in capsys.readouterr().out


def test_ensemble_on_world_pairs_reports_member_spread(sft_dir, tiny_config_path, tmp_path):
    out = tmp_path / "ens"
    assert main(["rm", "--config", str(tiny_config_path), "--sft", str(sft_dir), "--world-pairs", "--ensemble", "2",
                 "--out", str(out), *FAST]) == 0
    assert sorted(p.name for p in (out / "model").glob("member_*")) == ["member_0", "member_1"]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["rm/ensemble"] == 2 and len(summary["members"]) == 2
    assert main(["eval-rm", "--rm", str(out), "--data", str(out / "data" / "eval.jsonl"), "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "rm_eval.json").read_text())
    assert len(result["ensemble/member_accuracy"]) == 2
    assert result["ensemble/std_held_out"] > 0 and result["ensemble/std_shifted"] > 0


def test_user_preference_file_with_margins_votes_and_min_agreement(sft_dir, tiny_config_path, tmp_path):
    rows = World(load_config(tiny_config_path).world).preference_pairs(80, "user")
    for i, r in enumerate(rows):
        r["margin"] = float(i % 2)
    write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "user"
    assert main(["rm", "--config", str(tiny_config_path), "--backbone", str(sft_dir / "model"),
                 "--data", str(tmp_path / "prefs.jsonl"), "--min-agreement", "0.9", "--out", str(out), *FAST]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    unanimous = sum(len(set(r["votes"])) == 1 for r in rows)
    assert summary["data/dropped_agreement"] == len(rows) - unanimous > 0
    assert summary["normalization/reference"] == "training_responses"
    assert summary["data/eval_groups"] == unanimous // 10


def test_conversational_rows_use_the_tokenizers_chat_template(sft_dir, tiny_config_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backbone = tmp_path / "chat"
    model = AutoModelForCausalLM.from_pretrained(sft_dir / "model")
    tok = AutoTokenizer.from_pretrained(sft_dir / "model")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    save_pretrained_atomic(model, tok, backbone)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}], "votes": r["votes"]}
            for r in World(load_config(tiny_config_path).world).preference_pairs(40, "user")]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "rm_chat"
    assert main(["rm", "--config", str(tiny_config_path), "--backbone", str(backbone), "--data",
                 str(tmp_path / "chat.jsonl"), "--out", str(out), *FAST]) == 0
    assert main(["eval-rm", "--rm", str(out), "--data", str(tmp_path / "chat.jsonl"), "--no-world",
                 "--out", str(tmp_path / "ev")]) == 0
    assert "accuracy/labels" in json.loads((tmp_path / "ev" / "rm_eval.json").read_text())


BAD_ROWS = {
    "chosen_equals_rejected": ('{"prompt": "p", "chosen": "a .", "rejected": "a ."}', "field 'chosen': chosen and rejected are identical"),
    "empty_field": ('{"prompt": "p", "chosen": "a .", "rejected": "  "}', "field 'rejected': empty text"),
    "missing_field": ('{"prompt": "p", "chosen": "a ."}', "field 'rejected': missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_preference_row_exits_2_naming_file_and_line(case, sft_dir, tiny_config_path, tmp_path, capsys):
    row, message = BAD_ROWS[case]
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a .", "rejected": "b ."}\n' + row + "\n")
    out = tmp_path / "out"
    rc = main(["rm", "--config", str(tiny_config_path), "--sft", str(sft_dir), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"{data}:2: {message}" in err[0]
    assert not out.exists()


def test_non_utf8_file_exits_2_naming_file_and_line(sft_dir, tiny_config_path, tmp_path, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "p", "chosen": "a .", "rejected": "b ."}\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    out = tmp_path / "out"
    rc = main(["rm", "--config", str(tiny_config_path), "--sft", str(sft_dir), "--data", str(data), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{data}:2: not valid UTF-8" in err[0]
    assert not out.exists()


def test_missing_backbone_and_bad_rm_setting_exit_2(tiny_config_path, tmp_path, capsys):
    rc = main(["rm", "--config", str(tiny_config_path), "--world-pairs", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--sft" in capsys.readouterr().err
    rc = main(["rm", "--config", str(tiny_config_path), "--set", "rm.loss=hinge", "--out", str(tmp_path / "o")])
    assert rc == 2 and "rm.loss" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
