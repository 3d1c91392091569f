"""Every stage on every architecture users bring: tiny Qwen2, Llama, Mistral and GPT-NeoX
models with byte-level BPE tokenizers trained here, each with the habits of its family:

| arch | template | BOS | pad token | padding side | rows |
|---|---|---|---|---|---|
| qwen2 | ChatML | none | none given (Qwen2Tokenizer pads with `<|endoftext|>`) | right | conversational |
| llama | Llama 2 [INST], writes its BOS | added by the tokenizer | equals EOS | left | conversational |
| mistral | Mistral [INST], writes its BOS | added by the tokenizer | missing | left | conversational |
| gpt_neox | none (plain text) | none | equals EOS | right | standard text |

SFT -> RM -> DPO, PPO and GRPO run through the CLI on each (one tiny run per stage), and
every output loads in plain transformers and gives the logits of the trained model; a LoRA
DPO run's merged model and adapter (transformers + peft) agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhflab.cli import main
from tests.user_models import CHATML, LLAMA2, MISTRAL, bpe_tokenizer, tiny_causal_lm

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SETS = [f"--set={k}" for k in (
    "sft.epochs=1", "rm.epochs=1", "dpo.epochs=1", "generation.max_new_tokens=6", "rl.steps=1",
    "rl.batch_size=8", "rl.n_eval=8", "rl.eval_every=1", "sft.batch_size=8", "rm.batch_size=8", "dpo.batch_size=8",
    "sft.max_length=64", "rm.max_length=64", "dpo.max_length=64")]

ARCHS = {
    "qwen2": dict(template=CHATML, eos="<|im_end|>", bos=None, pad=None, add_bos=False, padding_side="right"),
    "llama": dict(template=LLAMA2, eos="</s>", bos="<s>", pad="</s>", add_bos=True, padding_side="left"),
    "mistral": dict(template=MISTRAL, eos="</s>", bos="<s>", pad=None, add_bos=True, padding_side="left"),
    "gpt_neox": dict(template=None, eos="<|endoftext|>", bos=None, pad="<|endoftext|>", add_bos=False,
                     padding_side="right"),
}

# The pad token AutoTokenizer gives the saved base: missing (mistral), EOS (llama, gpt_neox),
# or Qwen2Tokenizer's own default. rlhflab adds '<pad>' where it is missing or EOS.
LOADED_PAD = {"qwen2": "<|endoftext|>", "llama": "</s>", "mistral": None, "gpt_neox": "<|endoftext|>"}

QUESTIONS = [("what is the capital of france?", "paris", "the sea"), ("two plus two?", "four", "nine"),
             ("say hello", "hello there", "no"), ("a poem about the sea", "the sea is blue", "paris"),
             ("is it safe?", "yes, it is safe", "i can't help with that")]


def _rows(chat: bool):
    rows = QUESTIONS * 4
    user = (lambda q: [{"role": "user", "content": q}]) if chat else (lambda q: q + "\n")
    answer = (lambda a: [{"role": "assistant", "content": a}]) if chat else (lambda a: " " + a)
    sft = [{"prompt": user(q), "completion": answer(a)} for q, a, _ in rows]
    prefs = [{"prompt": user(q), "chosen": answer(a), "rejected": answer(b)} for q, a, b in rows]
    prompts = [{"prompt": user(q)} for q, _, _ in rows]
    return sft, prefs, prompts


def _write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    tok = bpe_tokenizer(**ARCHS[arch])
    tiny_causal_lm(tok, arch).save_pretrained(str(d / "base"))
    tok.save_pretrained(str(d / "base"))
    sft, prefs, prompts = _rows(ARCHS[arch]["template"] is not None)
    files = {"sft": _write(d / "sft.jsonl", sft), "prefs": _write(d / "prefs.jsonl", prefs),
             "prompts": _write(d / "prompts.jsonl", prompts)}
    return arch, d, files


def _run(argv):
    assert main([argv[0], "--config", TINY, *SETS, *argv[1:]]) == 0, argv


def test_every_stage_runs_and_loads_in_plain_transformers(setup):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhflab.models import load_causal_lm, load_tokenizer

    arch, d, f = setup
    _run(["sft", "--model", str(d / "base"), "--data", f["sft"], "--out", str(d / "sft")])
    _run(["rm", "--backbone", str(d / "sft"), "--data", f["prefs"], "--out", str(d / "rm")])
    _run(["dpo", "--sft", str(d / "sft"), "--data", f["prefs"], "--out", str(d / "dpo")])
    _run(["ppo", "--sft", str(d / "sft"), "--rm", str(d / "rm"), "--prompts", f["prompts"], "--out", str(d / "ppo")])
    _run(["grpo", "--sft", str(d / "sft"), "--rm", str(d / "rm"), "--prompts", f["prompts"],
          "--out", str(d / "grpo")])
    base = AutoTokenizer.from_pretrained(str(d / "base"))
    assert base.pad_token == LOADED_PAD[arch]  # the user's tokenizer as transformers loads it

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    for stage in ("sft", "dpo", "ppo", "grpo"):
        model_dir = d / stage / "model"
        assert json.loads((model_dir / "config.json").read_text())["model_type"] == arch
        plain = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).eval()
        ours = load_causal_lm(model_dir, load_tokenizer(model_dir)).eval()
        with torch.no_grad():
            assert torch.equal(plain(input_ids=ids).logits, ours(input_ids=ids).logits), stage
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id, stage
        assert len(tok) <= plain.get_input_embeddings().num_embeddings
        assert tok.padding_side == ARCHS[arch]["padding_side"]
    for stage in ("ppo", "grpo"):
        m = json.loads((d / stage / "metrics.json").read_text())
        assert m["steps"] == 1, stage

    # LoRA on the family's own linear layers (GPT-NeoX's fused query_key_value, the others'
    # q/k/v/o and MLP projections): the merged model and the adapter both load outside rlhflab.
    from peft import PeftModel

    _run(["dpo", "--sft", str(d / "sft"), "--data", f["prefs"], "--set=lora.r=4", "--out", str(d / "dpo_lora")])
    merged = AutoModelForCausalLM.from_pretrained(str(d / "dpo_lora" / "model"), use_safetensors=True).eval()
    sft_model = AutoModelForCausalLM.from_pretrained(str(d / "sft" / "model"), use_safetensors=True)
    adapted = PeftModel.from_pretrained(sft_model, str(d / "dpo_lora" / "model" / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)
    rm = AutoModelForSequenceClassification.from_pretrained(str(d / "rm" / "model"), use_safetensors=True)
    assert rm.config.model_type == arch and rm.config.num_labels == 1


@pytest.mark.parametrize("template", [LLAMA2, MISTRAL])
def test_a_bos_adding_tokenizer_with_a_template_that_writes_its_bos_gives_one_bos(template):
    from rlhflab.data import prompt_ids, render, tokenize_pair

    tok = bpe_tokenizer(template=template, eos="</s>", bos="<s>", add_bos=True)
    assert tok("hi").input_ids[0] == tok.bos_token_id  # the tokenizer adds BOS on its own
    user, answer = [{"role": "user", "content": "say hello"}], [{"role": "assistant", "content": "hello there"}]
    prompt, completion = render(user, answer, tok)
    p = prompt_ids(prompt, tok)
    plain = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
    plain = list(plain["input_ids"]) if hasattr(plain, "keys") else list(plain)
    assert p == plain and p.count(tok.bos_token_id) == 1
    x = tokenize_pair(prompt, completion, tok, 64)
    full = tok.apply_chat_template(user + answer, tokenize=True)
    full = list(full["input_ids"]) if hasattr(full, "keys") else list(full)
    assert x.input_ids == full and x.input_ids.count(tok.bos_token_id) == 1
    assert x.input_ids[-1] == tok.eos_token_id and x.input_ids.count(tok.eos_token_id) == 1


def test_a_bos_adding_tokenizer_without_a_template_gets_its_bos_once():
    from rlhflab.data import prompt_ids, tokenize_pair

    tok = bpe_tokenizer(template=None, eos="</s>", bos="<s>", add_bos=True)
    p = prompt_ids("say hello\n", tok)
    assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
    x = tokenize_pair("say hello\n", " hello there", tok, 64)
    assert x.input_ids[:x.n_prompt] == p and x.input_ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("arch", list(ARCHS))
def test_left_and_right_padding_sides_train_the_same(arch, tmp_path):
    """rlhflab pads its batches itself (right for training, left for decoding), whatever the
    tokenizer's padding_side says: one SFT step from the same model gives bit-identical
    weights with either side."""
    from safetensors.torch import load_file

    sft, _, _ = _rows(ARCHS[arch]["template"] is not None)
    data = _write(tmp_path / "sft.jsonl", sft)
    weights = {}
    for side in ("left", "right"):
        spec = dict(ARCHS[arch], padding_side=side)
        tok = bpe_tokenizer(**spec)
        base = tmp_path / f"base_{side}"
        tiny_causal_lm(tok, arch).save_pretrained(str(base))
        tok.save_pretrained(str(base))
        _run(["sft", "--model", str(base), "--data", data, "--out", str(tmp_path / side)])
        weights[side] = load_file(str(tmp_path / side / "model" / "model.safetensors"))
    assert weights["left"].keys() == weights["right"].keys()
    assert all(torch.equal(weights["left"][k], weights["right"][k]) for k in weights["left"])
