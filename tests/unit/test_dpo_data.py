"""Data for the DPO family: joint truncation of a pair, pairs -> unpaired, KTO partners."""

from __future__ import annotations

import copy

import pytest

from rlhflab.algos.dpo import tokenize_pairs, tokenize_unpaired
from rlhflab.config import load_config
from rlhflab.data import pairs_to_unpaired, tokenize_pair, tokenize_preference, tokenize_responses
from rlhflab.world import World


@pytest.fixture(scope="module")
def tok():
    return World(load_config().world).tokenizer()


def test_untruncated_pairs_equal_tokenize_pair(tok):
    row = {"prompt": "what is 3 plus 4 ?", "chosen": "the answer is 7 .", "rejected": "8 ."}
    chosen, rejected = tokenize_preference(row, tok, 64)
    assert chosen == tokenize_pair(row["prompt"], row["chosen"], tok, 64)
    assert rejected == tokenize_pair(row["prompt"], row["rejected"], tok, 64)


def test_truncation_cuts_the_prompt_the_same_for_both_answers(tok):
    """Prompt 'i think 3 plus 4 is 8 . what is 3 plus 4 ?' is 12 tokens; chosen 'the answer
    is 7 .' 5 + EOS = 6; rejected '8 .' 2 + EOS = 3. With max_length 10 the longer answer
    leaves room for 4 prompt tokens ('3 plus 4 ?') -- for BOTH answers; cut one by one,
    the short answer would have kept 7 prompt tokens and answered a different prompt."""
    prompt = "i think 3 plus 4 is 8 . what is 3 plus 4 ?"
    chosen, rejected = tokenize_responses(prompt, ["the answer is 7 .", "8 ."], tok, 10)
    assert chosen.n_prompt == rejected.n_prompt == 4
    assert chosen.input_ids[:4] == rejected.input_ids[:4]
    assert len(chosen.input_ids) == 10 and len(rejected.input_ids) == 7
    assert chosen.truncated and rejected.truncated
    alone = tokenize_pair(prompt, "8 .", tok, 10)
    assert alone.n_prompt == 7  # what separate truncation would have done


def test_long_answers_lose_their_end(tok):
    chosen, rejected = tokenize_responses("what is 3 plus 4 ?", ["the answer is 7 . " * 5, "no ."], tok, 12)
    assert chosen.n_prompt == rejected.n_prompt == 1  # at least one prompt token is kept
    assert len(chosen.input_ids) == 12 and chosen.input_ids[-1] != tok.eos_token_id
    assert rejected.input_ids[-1] == tok.eos_token_id


def test_pairs_that_become_identical_are_dropped_and_counted(tok):
    """Two answers that differ only after the 3rd token become identical at max_length 4
    (1 prompt token + 3 answer tokens): dropped, not trained on as a tie."""
    rows = [
        {"prompt": "what is 3 plus 4 ?", "chosen": "the answer is 7 .", "rejected": "the answer is 8 ."},
        {"prompt": "what is 3 plus 4 ?", "chosen": "7 .", "rejected": "8 ."},
    ]
    pairs, stats = tokenize_pairs(rows, tok, 4)
    assert stats == {"data/pairs": 2, "data/truncated": 2, "data/dropped": 1}
    assert len(pairs) == 1
    pairs, stats = tokenize_pairs(rows, tok, 64)
    assert stats["data/dropped"] == 0 and stats["data/truncated"] == 0


def test_responses_cut_without_eos_are_scored_without_eos(tok):
    """``rlhflab collect`` marks a response that hit the token limit with chosen_eos or
    rejected_eos false: it must not be scored as if it had ended."""
    row = {"prompt": "what is 3 plus 4 ?", "chosen": "the answer is 7 .", "rejected": "8 8 8",
           "rejected_eos": False}
    chosen, rejected = tokenize_preference(row, tok, 64)
    assert chosen.input_ids[-1] == tok.eos_token_id
    assert rejected.input_ids[-1] != tok.eos_token_id and len(rejected.input_ids) == 6 + 3


def test_pairs_to_unpaired():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "votes": [1, 1, 0]}]
    assert pairs_to_unpaired(rows) == [{"prompt": "p", "completion": "a", "label": True},
                                       {"prompt": "p", "completion": "b", "label": False}]


def test_kto_partners_are_other_examples_responses(tok):
    rows = [{"prompt": f"what is {i} plus 1 ?", "completion": f"the answer is {i + 1} .", "label": i % 2 == 0}
            for i in range(6)]
    examples, stats = tokenize_unpaired(rows, tok, 64, seed=3)
    assert stats["data/desirable"] == 3 and stats["data/undesirable"] == 3
    responses = [e.example.input_ids[e.example.n_prompt:] for e in examples]
    for i, e in enumerate(examples):
        mism = e.mismatched.input_ids[e.mismatched.n_prompt:]
        assert e.mismatched.input_ids[:e.mismatched.n_prompt] == e.example.input_ids[:e.example.n_prompt]
        assert mism != responses[i] and mism in responses
    # every response is used as a partner exactly once (a shifted permutation)
    used = sorted(responses.index(e.mismatched.input_ids[e.mismatched.n_prompt:]) for e in examples)
    assert used == list(range(6))
    with pytest.raises(ValueError, match="at least 2"):
        tokenize_unpaired(rows[:1], tok, 64)


def test_conversational_fields_remember_their_row_and_stay_plain_lists(tmp_path):
    import json

    from rlhflab.data import Messages, load_rows

    msgs = [{"role": "user", "content": "hi"}]
    row = {"prompt": msgs, "chosen": "a", "rejected": "b"}
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                                      + json.dumps(row) + "\n")
    got = load_rows(tmp_path / "p.jsonl", "preference")[1]
    assert isinstance(got["prompt"], Messages) and got["prompt"] == msgs and got == row
    assert got["prompt"].where == {"file": str(tmp_path / "p.jsonl"), "line": 2, "field": "prompt"}
    assert json.dumps(got) == json.dumps(row)
    assert pairs_to_unpaired([got])[0]["prompt"].where["line"] == 2


def test_a_raising_chat_template_names_the_row_and_the_tokenizer(tok):
    from rlhflab.data import Messages, render
    from rlhflab.errors import InputError

    prompt = Messages([{"role": "user", "content": "hi"}], {"file": "d.jsonl", "line": 7, "field": "prompt"})
    with pytest.raises(InputError, match=r"^d\.jsonl:7: conversational rows need a tokenizer with a chat template"):
        render(prompt, "yo", tok)
    templated = copy.deepcopy(tok)
    templated.chat_template = "{{ raise_exception('no system turns') }}"
    templated.name_or_path = "models/tok"
    with pytest.raises(InputError, match=r"^d\.jsonl:7: the chat template of models/tok failed on this row: "
                                         r"no system turns$"):
        render(prompt, "yo", templated)
    # A template that renders the prompt but not as a prefix of the full conversation.
    templated.chat_template = "{% if add_generation_prompt %}A{% else %}B{% endif %}"
    with pytest.raises(InputError, match=r"^d\.jsonl:7: chat template does not extend the prompt"):
        render(prompt, "yo", templated)
    templated.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert render(prompt, "yo", templated) == ("<user>hi<assistant>", "yo")
