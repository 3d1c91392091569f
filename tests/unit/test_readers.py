"""Containers (JSONL, JSON arrays, Parquet, Arrow, `datasets` directories) and TRL's row shapes."""

from __future__ import annotations

import json

import pytest

from rlhflab.errors import InputError
from rlhflab.readers import Reshaped, extract_prompt, normalize_row, read_records

ROWS = [{"prompt": "hi", "completion": "there"}, {"prompt": "a b", "completion": "c", "extra": 3}]


def _objects(path):
    return [obj for _, obj in read_records(path)]


def test_jsonl_and_json_array_give_the_same_rows_with_lines(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    arr = tmp_path / "a.json"
    arr.write_text("[\n  " + ",\n\n  ".join(json.dumps(r) for r in ROWS) + "\n]\n")
    assert _objects(jl) == _objects(arr) == ROWS
    # each object's own line: 2 and 4 (a blank line between them)
    assert [w["line"] for w, _ in read_records(arr)] == [2, 4]
    empty = tmp_path / "e.json"
    empty.write_text(" [ ] ")
    assert _objects(empty) == []


@pytest.mark.parametrize(("text", "line", "needle"), [
    ('[{"a": 1},\n {"a": }]', 2, "not valid JSON"),
    ('[{"a": 1}\n {"a": 2}]', 2, "expected , or ]"),
    ('[{"a": 1}] x', 1, "after the closing"),
])
def test_bad_json_arrays_name_the_line(tmp_path, text, line, needle):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(InputError) as err:
        _objects(p)
    assert err.value.line == line and needle in str(err.value) and str(p) in str(err.value)


def test_parquet_and_arrow_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"prompt": "hi", "completion": "there"}, {"prompt": "x", "completion": "y"}])
    pq.write_table(table, tmp_path / "d.parquet")
    feather.write_feather(table, tmp_path / "d.arrow")
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    want = table.to_pylist()
    for name in ("d.parquet", "d.arrow", "s.arrow"):
        got = list(read_records(tmp_path / name))
        assert [o for _, o in got] == want
        assert [w["line"] for w, _ in got] == [1, 2] and got[0][0]["unit"] == "row"
    err = InputError("empty text", field="prompt", **got[1][0])
    assert str(err) == f"{tmp_path / 's.arrow'}:row 2: field 'prompt': empty text"
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet"):
        _objects(tmp_path / "junk.parquet")


def test_datasets_save_to_disk_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant",
             "content": f"a{i}"}]} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    assert _objects(tmp_path / "one") == rows
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "single"))
    assert _objects(tmp_path / "single") == rows
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(InputError, match="splits train, test: give one"):
        _objects(tmp_path / "two")
    assert _objects(tmp_path / "two" / "test") == rows[:1]
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a saved dataset"):
        _objects(tmp_path / "plain")


def test_sft_messages_split_at_the_last_assistant_turn():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye?"},
            {"role": "assistant", "content": "bye"}]
    seen = Reshaped()
    row = normalize_row({"messages": msgs, "id": 7}, "sft", {"file": "f", "line": 3}, seen)
    assert row == {"id": 7, "prompt": msgs[:4], "completion": msgs[4:]}
    assert seen == {"messages -> prompt/completion": 1}
    assert normalize_row({"messages": msgs}, "prompt", {}, None) == {"prompt": msgs[:4]}
    with pytest.raises(InputError, match="f:3: field 'messages': no assistant message"):
        normalize_row({"messages": msgs[:2]}, "sft", {"file": "f", "line": 3})
    with pytest.raises(InputError, match="no prompt before it"):
        normalize_row({"messages": msgs[2:3]}, "sft", {"file": "f", "line": 3})


def test_implicit_prompt_strings_cut_after_the_assistant_marker():
    # Anthropic HH: both answers start with "I", so the common prefix runs into them; the
    # prompt ends at the last "\n\nAssistant:" instead, and the answers keep their space.
    c = "\n\nHuman: is it safe?\n\nAssistant: I think so."
    r = "\n\nHuman: is it safe?\n\nAssistant: I don't know."
    assert extract_prompt(c, r) == ("\n\nHuman: is it safe?\n\nAssistant:", " I think so.", " I don't know.")
    # No marker: TRL's rule (a space before the split goes with the answers).
    assert extract_prompt("Q: sky? blue", "Q: sky? red") == ("Q: sky?", " blue", " red")
    with pytest.raises(ValueError, match="no answer left"):
        extract_prompt("same", "same")
    with pytest.raises(ValueError, match="share no prompt"):
        extract_prompt("a", "b")


def test_implicit_prompt_messages_and_errors():
    user = {"role": "user", "content": "hi"}
    a, b = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    seen = Reshaped()
    row = normalize_row({"chosen": [user, a], "rejected": [user, b]}, "preference", {}, seen)
    assert row == {"chosen": [a], "rejected": [b], "prompt": [user]} and seen.describe() == (
        "1 row(s) implicit prompt extracted")
    with pytest.raises(InputError, match="both be text or both be message lists"):
        normalize_row({"chosen": "x", "rejected": [b]}, "preference", {})
    explicit = {"prompt": "p", "chosen": "x", "rejected": "y"}
    assert normalize_row(explicit, "preference", {}) is explicit
