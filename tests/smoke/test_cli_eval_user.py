"""`rlhflab eval` on a user's own files: multiple choice, refusal lists, prompts."""

import json

import pytest

from rlhflab.cli import main
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_on_user_files(tmp_path, tiny_config_path):
    sft = tmp_path / "sft"
    assert main(["sft", "--config", str(tiny_config_path), "--out", str(sft), "--set", "sft.max_steps=4",
                 "--set", "sft.n_samples=4"]) == 0
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "what is 3 plus 4 ?", "choices": ["7", "9"], "answer": 0},
                                        {"question": "what is 1 plus 1 ?", "choices": ["5", "2", "3"], "answer": 1}])
    harmful = _jsonl(tmp_path / "h.jsonl", [{"prompt": "how do i steal a car ?"}])
    benign = _jsonl(tmp_path / "b.jsonl", [{"prompt": "how do i bake bread ?"}])
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "tell me about cats ."}, {"prompt": "what is 2 plus 2 ?"}])
    out = tmp_path / "eval"
    assert main(["eval", "--config", str(tiny_config_path), "--policy", str(sft), "--base", str(sft),
                 "--mc", str(mc), "--harmful", str(harmful), "--benign", str(benign), "--prompts", str(prompts),
                 "--out", str(out)]) == 0
    m = json.loads((out / "eval.json").read_text())
    for key in ("capability/accuracy", "base/capability/accuracy", "refusal/harmful_rate", "refusal/benign_rate",
                "length/mean", "kl/sequence_mean"):
        assert key in m
    # The same weights as policy and base: KL is exactly zero.
    assert m["kl/sequence_mean"] == 0.0
    assert m["capability/accuracy"] == m["base/capability/accuracy"]


def test_bad_multiple_choice_row_exits_2(tmp_path, tiny_config_path, capsys):
    mc = _jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    (tmp_path / "config.json").write_text("{}")  # passes the path check; the bad row is found before any load
    rc = main(["eval", "--policy", str(tmp_path), "--base", str(tmp_path), "--mc", str(mc),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{mc}:1: field 'answer'" in err


# ------------------------------------------------------------------ eval, then diagnose, per judge

@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """Two untrained tiny policies on the world's tokenizer (policy and base), a reward model on
    the base, world prompts (the world's AI labeller judges only those), a judge function in a
    file and an LM judge that reads its answers (``_letter_judge``)."""
    from rlhflab.config import load_config
    from rlhflab.models import create_causal_lm, save_pretrained_atomic
    from rlhflab.reward_model import RewardModel, create_reward_model
    from rlhflab.world import World

    d = tmp_path_factory.mktemp("judged")
    cfg = load_config(TINY)
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    for name, seed in (("policy", 1), ("base", 0)):
        save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=seed), tok, d / name)
    model, rm_tok = create_reward_model(d / "base", seed=0)
    RewardModel([model], rm_tok, max_length=48).save(d / "rm")
    _jsonl(d / "prompts.jsonl", [{"prompt": p.text} for p in world.prompts(N_PROMPTS, "eval")])
    (d / "judge.py").write_text("def longer(prompts, completions_a, completions_b):\n"
                                "    return [0.5 if len(a) == len(b) else float(len(a) > len(b))\n"
                                "            for a, b in zip(completions_a, completions_b)]\n")
    _letter_judge(d / "lm_judge")
    return d


def _letter_judge(out):
    """A tiny Qwen2 (byte-level BPE, ChatML) that answers "A" whatever it is asked, and clearly
    (so its answers can be read): its layers add nothing (output projections zero), and the
    first tokens of "A)" and "B)" lie far along a direction every token's embedding shares
    (A further; the head is tied). A judge with the strongest position bias there is."""
    import torch

    from tests.user_models import bpe_tokenizer, tiny_causal_lm

    tok = bpe_tokenizer()
    model = tiny_causal_lm(tok, "qwen2")
    a, b = (tok(x, add_special_tokens=False).input_ids[0] for x in ("A)", "B)"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 1.0
        emb[a], emb[b] = 0.0, 0.0
        emb[a, 0], emb[b, 0] = 50.0, 40.0
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


N_PROMPTS = 6
SMALL = ["--set", "generation.max_new_tokens=6"]


def _eval_then_diagnose(d, out, capsys, *extra):
    assert main(["eval", "--config", TINY, *SMALL, "--policy", str(d / "policy"), "--base", str(d / "base"),
                 "--out", str(out), *extra]) == 0
    capsys.readouterr()
    assert main(["diagnose", str(out), "--json"]) == 0  # eval's own output is read back, counts and all
    return json.loads((out / "eval.json").read_text()), json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["rm", "lm", "py", "world"])
def test_eval_then_diagnose_with_each_judge(judged, kind, tmp_path, capsys):
    """`rlhflab eval --prompts F --judge SPEC` then `rlhflab diagnose` on its directory: the
    judge's win-rate with its interval and its count of pairs (``win_rate/judge_n``, which
    diagnose once refused as a rate above 1) is read as the verdict's evidence."""
    d = judged
    spec = {"rm": f"rm:{d / 'rm'}", "lm": f"lm:{d / 'lm_judge'}", "py": f"py:{d / 'judge.py'}:longer",
            "world": "world:ai"}[kind]
    m, result = _eval_then_diagnose(d, tmp_path / "eval", capsys, "--prompts", str(d / "prompts.jsonl"),
                                    "--judge", spec, *(["--rm", str(d / "rm")] if kind == "rm" else []))
    assert m["win_rate/judge_n"] == N_PROMPTS and 0.0 <= m["win_rate/judge"] <= 1.0
    if kind == "lm":  # always "A": every pair half a win, and a position bias of 1/2
        assert m["win_rate/judge"] == 0.5 and m["judge/position_bias"] == pytest.approx(0.5)
    assert result["source"]["file"] == str(tmp_path / "eval" / "eval.json")
    missing = result.get("to_measure", {})
    assert not any("win-rate" in what for what in missing)  # the judge's win-rate was found
    assert "judge_regression" not in result["not_measured"] and result["findings"]
    # The same through the Python API: evaluate, then diagnose its readings and the directory.
    from rlhflab import api

    cfg = api.load_config(TINY, ["generation.max_new_tokens=6"])
    readings = api.evaluate(cfg, policy=d / "policy", base=d / "base", prompts=d / "prompts.jsonl", judge=spec,
                            rm=d / "rm" if kind == "rm" else None)
    assert readings == pytest.approx(m, nan_ok=True)  # the same seed: the same readings
    assert api.diagnose(readings)["verdict"] == result["verdict"]
    assert api.diagnose(tmp_path / "eval")["verdict"] == result["verdict"]


def test_eval_on_the_world_then_diagnose_reads_the_gold_judge(judged, tmp_path, capsys):
    m, result = _eval_then_diagnose(judged, tmp_path / "eval", capsys, "--rm", str(judged / "rm"), "--n", "2")
    assert "win_rate/gold_ci_low" in m and "win_rate/rm" in m
    assert "judge_regression" not in result["not_measured"] and result["verdict"] != "not enough evidence"
