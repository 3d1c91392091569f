"""Dataset validation, tokenization masks, the SFT loss, and configuration loading."""

import json

import pytest
import torch

from rlhflab.config import load_config
from rlhflab.data import collate_sft, load_rows, tokenize_pair
from rlhflab.errors import InputError
from rlhflab.logprobs import response_mask_after_eos, token_logprobs
from rlhflab.losses import sft_loss
from rlhflab.world import World


def _write(path, lines):
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


@pytest.mark.parametrize("line,fmt,expect", [
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "preference", ":2: field 'chosen': chosen and rejected are identical"),
    ('{"prompt": "a", "chosen": "", "rejected": "b"}', "preference", ":2: field 'chosen': empty text"),
    ('{"prompt": "a", "chosen": "b"}', "preference", ":2: field 'rejected': missing"),
    ('{"prompt": "a", "completion": 3}', "sft", ":2: field 'completion': expected a non-empty string"),
    ('{"prompt": "a", "completion": "b"', "sft", ":2: not valid JSON"),
    ('["prompt"]', "sft", ":2: expected a JSON object"),
    ('{"prompt": "a", "completion": "b", "label": "yes"}', "unpaired", ":2: field 'label': expected true or false"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "votes": [1, 2]}', "preference", ":2: field 'votes'"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, line, fmt, expect):
    good = {"sft": '{"prompt": "a", "completion": "b"}', "preference": '{"prompt": "a", "chosen": "b", "rejected": "c"}',
            "unpaired": '{"prompt": "a", "completion": "b", "label": true}'}[fmt]
    path = _write(tmp_path / "d.jsonl", [good, line])
    with pytest.raises(InputError) as err:
        load_rows(path, fmt)
    msg = str(err.value)
    assert msg.startswith(str(path)) and expect in msg and "\n" not in msg


def test_non_utf8_file_names_the_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "completion": "b"}', b'{"prompt": "\xff\xfe"}'])
    with pytest.raises(InputError, match=r"d\.jsonl:2: not valid UTF-8"):
        load_rows(path, "sft")


def test_conversational_rows_are_accepted(tmp_path):
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    path = _write(tmp_path / "d.jsonl", [json.dumps(row)])
    assert load_rows(path, "sft")[0] == row


def test_sft_tokenization_masks_the_prompt():
    """'what is 3 plus 4 ?' is 6 tokens; 'the answer is 7 .' is 5 tokens plus EOS. The
    response mask is 0 on the 6 prompt positions and 1 on the 6 response positions."""
    tok = World(load_config().world).tokenizer()
    x = tokenize_pair("what is 3 plus 4 ?", "the answer is 7 .", tok, max_length=64)
    assert x.n_prompt == 6 and len(x.input_ids) == 12 and x.input_ids[-1] == tok.eos_token_id
    y = tokenize_pair("tell me about cats .", "cats .", tok, max_length=64)
    batch = collate_sft([x, y], tok.pad_token_id)
    assert batch["response_mask"][0].tolist() == [0] * 6 + [1] * 6
    assert batch["response_mask"][1].tolist() == [0] * 5 + [1] * 3 + [0] * 4
    assert batch["input_ids"][1, 8:].tolist() == [tok.pad_token_id] * 4


def test_truncation_keeps_the_response_and_says_so():
    tok = World(load_config().world).tokenizer()
    x = tokenize_pair("i think 3 plus 4 is 8 . what is 3 plus 4 ?", "the answer is 7 .", tok, max_length=10)
    assert x.truncated and len(x.input_ids) == 10 and x.input_ids[-1] == tok.eos_token_id
    assert x.n_prompt == 4  # the prompt's last 4 tokens: "3 plus 4 ?"


def test_sft_loss_counts_response_tokens_only():
    """Two rows, T=4. Token log-probs (column 0 unused):
        row 0: [0, -1, -2, -3], response mask [0, 0, 1, 1] -> NLL 2 + 3 = 5
        row 1: [0, -4, -5, -6], response mask [0, 1, 1, 0] -> NLL 4 + 5 = 9
    Loss = (5 + 9) / 4 tokens = 3.5; with n_tokens=7 given: 14 / 7 = 2."""
    lp = torch.tensor([[0.0, -1, -2, -3], [0.0, -4, -5, -6]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    loss, m = sft_loss(lp, mask)
    assert loss.item() == pytest.approx(3.5) and m["sft/tokens"] == 4
    assert sft_loss(lp, mask, n_tokens=7)[0].item() == pytest.approx(2.0)


def test_prompt_tokens_get_no_gradient_from_sft_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 0, 1, 1]])
    loss, _ = sft_loss(token_logprobs(logits, ids), mask)
    loss.backward()
    # logits at t predict token t+1: only positions 2 and 3 feed response tokens 3 and 4.
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 4].abs().sum() == 0
    assert logits.grad[0, 2:4].abs().sum() > 0


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    lp = token_logprobs(logits, ids, temperature=0.7)
    ref = torch.log_softmax(logits / 0.7, -1)
    for b in range(2):
        for t in range(1, 4):
            assert lp[b, t].item() == pytest.approx(ref[b, t - 1, ids[b, t]].item(), abs=1e-6)


def test_response_mask_stops_after_first_eos():
    """eos=1, pad=0: [5, 1, 7, 0] keeps 5 and the EOS; [5, 6, 7, 8] never ends."""
    mask, eos = response_mask_after_eos(torch.tensor([[5, 1, 7, 0], [5, 6, 7, 8]]), eos_id=1, pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and eos.tolist() == [True, False]


def test_config_presets_and_overrides(tiny_config_path):
    cfg = load_config(tiny_config_path, ["sft.lr=5e-4", "world.rater.length_bias=0", "model.path="])
    assert cfg.sft.lr == 5e-4 and cfg.world.rater.length_bias == 0.0 and cfg.model.path is None
    assert cfg.model.d_model == 32  # from the preset


@pytest.mark.parametrize("text,expect", [
    ("sft:\n  lr: 1\n  lrr: 2\n", "c.yaml:3: field 'sft.lrr': unknown key"),
    ("sft:\n  batch_size: many\n", "c.yaml:2: field 'sft.batch_size': expected int"),
    ("world:\n  rater:\n    noise: [1]\n", "c.yaml:3: field 'world.rater.noise': expected float"),
    ("sft: [\n", "c.yaml:2: not valid YAML"),
    ("sft:\n  lr: .nan\n", "c.yaml:2: field 'sft.lr': must be a finite number > 0, got nan"),
    ("sft:\n  lr: 1\nsft:\n  epochs: 1\n", "c.yaml:3: field 'sft': duplicate key (first at line 1)"),
    ("model:\n  n_heads: 3\n", "c.yaml:2: field 'model.n_heads': model.d_model (64) must be a multiple"),
])
def test_config_errors_name_file_line_and_field(tmp_path, text, expect):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_config(path)
    assert expect in str(err.value)


def test_yaml_no_is_a_word_for_words_and_false_for_booleans(tmp_path):
    """YAML 1.1 reads `no` as False; a preset means the word where the field takes words."""
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  mixed_precision: no\n  packing: no\nrm:\n  packing: off\n")
    cfg = load_config(path, ["dpo.mixed_precision=no", "dpo.packing=no"])
    assert (cfg.sft.mixed_precision, cfg.sft.packing, cfg.rm.packing) == ("no", False, False)
    assert (cfg.dpo.mixed_precision, cfg.dpo.packing) == ("no", False)


def test_bad_override_is_an_input_error():
    with pytest.raises(InputError, match=r"^--set sft\.nope=1: field 'sft\.nope': unknown key"):
        load_config(None, ["sft.nope=1"])
    with pytest.raises(InputError, match="expected section.field=value"):
        load_config(None, ["sft.lr"])
