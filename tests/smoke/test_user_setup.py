"""A new user's setup end to end: a tiny Qwen2 with a byte-level BPE tokenizer and ChatML's
template (no pad token of its own), data in TRL's formats and containers, SFT -> RM -> DPO
and PPO -> eval with each judge, and every output checked in plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhflab.cli import main
from tests.user_models import bpe_tokenizer, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SETS = ["--set", "sft.epochs=1", "--set", "rm.epochs=1", "--set", "generation.max_new_tokens=8",
        "--set", "rl.steps=2", "--set", "rl.batch_size=8", "--set", "sft.batch_size=8",
        "--set", "rm.batch_size=8", "--set", "dpo.batch_size=8", "--set", "sft.max_length=64",
        "--set", "rm.max_length=64", "--set", "dpo.max_length=64"]

QUESTIONS = [("what is the capital of france?", "paris", "the sea"), ("two plus two?", "four", "nine"),
             ("say hello", "hello there", "no"), ("a poem about the sea", "the sea is blue", "paris"),
             ("is it safe?", "yes, it is safe", "i can't help with that")]


def _user(q):
    return [{"role": "user", "content": q}]


def _assistant(a):
    return [{"role": "assistant", "content": a}]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    tok = bpe_tokenizer()  # ChatML, eos <|im_end|>, no pad token
    base = d / "base"
    tiny_causal_lm(tok, "qwen2").save_pretrained(str(base))
    tok.save_pretrained(str(base))
    rows = QUESTIONS * 8
    # SFT: TRL's conversational `messages` rows (system turn included), JSON Lines.
    (d / "sft.jsonl").write_text("".join(json.dumps({"messages": [{"role": "system", "content": "be brief"}]
                                                     + _user(q) + _assistant(a)}) + "\n" for q, a, _ in rows))
    # Preferences: implicit prompts (the whole dialogue in chosen and rejected), as a JSON array.
    (d / "prefs.json").write_text(json.dumps([{"chosen": _user(q) + _assistant(a), "rejected": _user(q) + _assistant(b)}
                                              for q, a, b in rows], indent=1))
    # The same preferences, explicit and standard, as Parquet (DPO reads it).
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"prompt": q, "chosen": a, "rejected": b} for q, a, b in rows]),
                   d / "prefs.parquet")
    # Prompts with an extra column, as a `datasets` directory (RL reads it; the reward reads `answer`).
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": _user(q), "answer": a} for q, a, _ in rows]).save_to_disk(str(d / "prompts"))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a, _ in QUESTIONS))
    (d / "reward.py").write_text(
        "def exact(prompts, completions, answer, **kwargs):\n"
        "    text = [c[0]['content'] if isinstance(c, list) else c for c in completions]\n"
        "    return [float(a in t) for t, a in zip(text, answer)]\n"
        "def longer(prompts, completions_a, completions_b):\n"
        "    return [1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5 for a, b in zip(completions_a, "
        "completions_b)]\n")
    return d


def _run(argv):
    assert main(argv) == 0, argv


def test_the_pipeline_on_a_users_qwen2_with_chatml(user, capsys):
    d = user
    _run(["sft", "--config", TINY, *SETS, "--model", str(d / "base"), "--data", str(d / "sft.jsonl"),
          "--out", str(d / "sft")])
    out, err = capsys.readouterr()
    assert "sft.jsonl: 40 sft rows; 40 row(s) messages -> prompt/completion" in err
    # The samples table shows the held-out conversations, rendered through the chat template.
    assert "SFT samples" in out and "<|im_start|>user" in out
    # config.yaml says that the created-model fields were not used on the loaded Qwen2.
    saved = (d / "sft" / "config.yaml").read_text()
    assert "model.path loads a qwen2 checkpoint (2 layers" in saved and "were not used by this run" in saved
    from rlhflab.config import load_config

    assert load_config(d / "sft" / "config.yaml").model.path == str(d / "base")  # still a valid preset
    _run(["rm", "--config", TINY, *SETS, "--backbone", str(d / "sft"), "--data", str(d / "prefs.json"),
          "--out", str(d / "rm")])
    assert "implicit prompt extracted" in capsys.readouterr().err
    # The user's reward model on the user's pairs: no probe of the built-in world's prompts.
    _run(["eval-rm", "--config", TINY, *SETS, "--rm", str(d / "rm"), "--data", str(d / "prefs.json"),
          "--out", str(d / "rm_eval")])
    rm_eval = json.loads((d / "rm_eval" / "rm_eval.json").read_text())
    assert "accuracy/labels" in rm_eval and not any(k.startswith(("probe/sycophancy", "world/")) for k in rm_eval)
    assert "wrong user" not in capsys.readouterr().out
    _run(["dpo", "--config", TINY, *SETS, "--sft", str(d / "sft"), "--data", str(d / "prefs.parquet"),
          "--out", str(d / "dpo")])
    _run(["ppo", "--config", TINY, *SETS, "--sft", str(d / "sft"), "--rm", str(d / "rm"),
          "--reward-fn", f"{d / 'reward.py'}:exact=0.5", "--prompts", str(d / "prompts"),
          "--eval-prompts", str(d / "prompts.jsonl"), "--judge", f"rm:{d / 'rm'}", "--out", str(d / "ppo")])
    ppo = json.loads((d / "ppo" / "metrics.json").read_text())
    assert ppo["steps"] == 2 and ppo["gold/final"] is None  # no gold judge on user data: not measured
    # The held-out curve on the user's prompts: at step 0 and at the last step (rl.eval_every 2).
    assert ppo["eval/selected_on"] == "eval/win_rate" and [e["step"] for e in ppo["evals"]] == [0, 2]
    assert all(0.0 <= e["eval/win_rate"] <= 1.0 and "eval/kl" in e for e in ppo["evals"])
    assert all(0.0 <= e["shift/ood_rate"] <= 1.0 for e in ppo["evals"])  # the RM's feature distance, logged
    # At step 0 the policy is the reference, sampled with the same seed: every answer ties.
    assert ppo["evals"][0]["eval/win_rate"] == 0.5 and abs(ppo["evals"][0]["eval/kl"]) < 1e-5

    capsys.readouterr()
    _run(["sample", "--config", TINY, *SETS, "--policy", str(d / "dpo"), "--prompts", str(d / "prompts.jsonl"),
          "-n", "2"])
    table = capsys.readouterr().out
    assert "samples of" in table and "capital of france" in table and "two plus two" in table

    judges = {"rm": f"rm:{d / 'rm'}", "lm": f"lm:{d / 'sft'}", "py": f"py:{d / 'reward.py'}:longer"}
    for name, spec in judges.items():
        out = d / f"eval_{name}"
        _run(["eval", "--config", TINY, *SETS, "--policy", str(d / "dpo"), "--base", str(d / "sft"),
              "--rm", str(d / "rm"), "--prompts", str(d / "prompts.jsonl"), "--judge", spec, "--out", str(out)])
        m = json.loads((out / "eval.json").read_text())
        assert "rm/score_mean" in m and "base/rm/score_mean" in m and "kl/sequence_mean" in m
        if name == "lm":
            # A tiny SFT model as the judge: its answers cannot be read (neither letter likelier than the
            # rest of its vocabulary), so they are counted and no win-rate is made of them.
            assert m["judge/unreadable_rate"] == 1.0 and "win_rate/judge" not in m
            assert "answers could be read" in capsys.readouterr().err
            continue
        assert 0.0 <= m["win_rate/judge"] <= 1.0 and m["win_rate/judge_n"] == len(QUESTIONS)
        assert m["win_rate/judge_ci_low"] <= m["win_rate/judge"] <= m["win_rate/judge_ci_high"]
        if name == "rm":
            assert m["win_rate/rm"] == m["win_rate/judge"]


def test_outputs_load_in_plain_transformers_and_score_the_same(user):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhflab.data import render, tokenize_pair
    from rlhflab.reward_model import RewardModel

    d = user
    for stage in ("sft", "dpo", "ppo"):
        if not (d / stage / "model").is_dir():
            pytest.skip("needs the pipeline test first")
        AutoModelForCausalLM.from_pretrained(str(d / stage / "model"), use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(str(d / "sft" / "model"))
    assert tok.pad_token is not None and tok.pad_token != tok.eos_token  # added, and saved

    # The templated completion ends with the template's end of turn once, as apply_chat_template gives it.
    msgs = _user("say hello") + _assistant("hello there")
    x = tokenize_pair(*render(_user("say hello"), _assistant("hello there"), tok), tok, 64)
    plain = tok.apply_chat_template(msgs, tokenize=True)
    plain = list(plain["input_ids"]) if hasattr(plain, "keys") else list(plain)
    assert x.input_ids == plain
    assert x.input_ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2  # user's turn and the answer's

    # The reward model: rlhflab's score = gain * (plain transformers' logit on apply_chat_template's ids) + bias.
    rm = RewardModel.load(d / "rm")
    meta = json.loads((d / "rm" / "model" / "reward_model.json").read_text())["members"][0]
    hf = AutoModelForSequenceClassification.from_pretrained(str(d / "rm" / "model"), use_safetensors=True).eval()
    rm_tok = AutoTokenizer.from_pretrained(str(d / "rm" / "model"))
    for q, a, _ in QUESTIONS:
        ids = rm_tok.apply_chat_template(_user(q) + _assistant(a), tokenize=True)
        ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
        with torch.no_grad():
            logit = hf(input_ids=torch.tensor([ids])).logits[0, 0].item()
        ours = rm.score([_user(q)], [a]).item()
        assert ours == pytest.approx(meta["gain"] * logit + meta["bias"], abs=1e-4)
