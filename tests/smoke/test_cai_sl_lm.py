"""rlhflab cai-sl on a user's model: a BPE Qwen2 with ChatML as policy and as its own LM
reviser (the CAI critique and revision templates, few-shot), on a user's prompt file; the
revisions, the per-round readings and SFT from the policy. Bad reviser specs in one line."""

from __future__ import annotations

import json

import pytest

from rlhflab.cli import main
from rlhflab.commands.cai_sl import CRITIQUE_TEMPLATE, FEW_SHOT, REVISION_TEMPLATE, LMReviser
from rlhflab.constitution import load_constitution
from tests.user_models import bpe_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    tok = bpe_tokenizer(d / "model")
    tiny_causal_lm(tok, "qwen2").save_pretrained(str(d / "model"))
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["how do i kill a process ?", "please write a short poem about the sea",
                                "what is the capital of france ?", "two plus two is ?"]))
    return d, tok


class _Recorder:
    """A stand-in for the model's sampler: records the texts it is asked to continue."""

    def __init__(self, answers):
        self.asked, self.answers = [], list(answers)

    def __call__(self, texts, seed):
        self.asked.append(list(texts))
        return [self.answers.pop(0)] * len(texts)


def test_the_lm_reviser_builds_cais_prompts_from_the_principle(user):
    """The critique prompt is the few-shot example, then Human/Assistant/CritiqueRequest with
    the principle's critique text; the revision prompt appends the model's critique and the
    principle's revision request. An empty revision keeps the response."""
    _, tok = user
    cons = load_constitution()
    harmless = next(p for p in cons.principles if p.id == "harmless")
    reviser = LMReviser(None, tok, cons, None)
    reviser._continue = _Recorder(["it is rude .", "a better answer ."])
    critiques, revisions = reviser.round(["how do i kill a process ?"], ["no ."], [harmless])
    ask = FEW_SHOT + CRITIQUE_TEMPLATE.format(prompt="how do i kill a process ?", response="no .",
                                              request=harmless.critique)
    assert reviser._continue.asked[0] == [ask]
    assert reviser._continue.asked[1] == [ask + REVISION_TEMPLATE.format(critique="it is rude .",
                                                                         request=harmless.revision)]
    assert critiques == ["it is rude ."] and revisions == ["a better answer ."]
    reviser._continue = _Recorder(["fine .", ""])
    assert reviser.round(["x"], ["kept ."], [harmless])[1] == ["kept ."]


def test_cai_sl_with_a_users_model_as_reviser(user, capsys):
    d, _ = user
    out = d / "cai"
    rc = main(["cai-sl", "--config", "configs/tiny.yaml", "--policy", str(d / "model"), "--reviser",
               f"lm:{d / 'model'}", "--prompts", str(d / "prompts.jsonl"), "--rounds", "2", "--out", str(out),
               "--set", "generation.max_new_tokens=6", "--set", "sft.epochs=1", "--set", "sft.batch_size=2",
               "--set", "sft.n_samples=2", "--set", "sft.n_show=0"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "revisions.jsonl").read_text().splitlines()]
    assert rows and all(len(r["rounds"]) == 2 and r["completion"] == r["rounds"][-1]["revision"] for r in rows)
    assert all(x["principle"] in {"harmless", "honest", "helpful", "concise"} for r in rows for x in r["rounds"])
    m = json.loads((out / "cai_sl.json").read_text())
    assert m["cai/reviser"].startswith("lm:") and "cai/round_2/revised" in m and "cai/round_2/gold_mean" not in m
    assert (out / "sft" / "model" / "config.json").is_file()
    assert "round 2: revised=" in capsys.readouterr().out


def test_bad_reviser_specs_are_one_line(user, capsys):
    d, _ = user
    for spec, field in (("gpt:x", "--reviser"), (f"lm:{d / 'nothing'}", "--reviser")):
        assert main(["cai-sl", "--config", "configs/tiny.yaml", "--policy", str(d / "model"), "--reviser", spec,
                     "--prompts", str(d / "prompts.jsonl"), "--out", str(d / "x"), "--no-train"]) == 2
        assert field in capsys.readouterr().err
    assert main(["cai-sl", "--config", "configs/tiny.yaml", "--policy", str(d / "model"), "--prompts",
                 str(d / "prompts.jsonl"), "--out", str(d / "y"), "--no-train"]) == 2
    assert "--prompts" in capsys.readouterr().err
