"""Loaders, fuzzed: bad input files through the real CLI.

Tables of generated bad inputs for every loader: JSONL rows of every format (SFT
prompt/completion, conversational messages, preference pairs with votes, margins, EOS flags
and collected rankings, KTO rows, prompts), corrupt model, tokenizer and reward-model
directories, and bad metrics files for ``rlhflab diagnose``. Each case runs
``rlhflab.cli.main`` in-process and asserts exit code 2, exactly one line on stderr that
names the file (and the line and field where they apply), no traceback, and that nothing
was written: no output directory, and neither the case's inputs nor the shared models
changed. A few good inputs go through the same loaders as controls (a bad case must fail
for its flaw, not because the harness is broken).

Nearly every case fails in validation before any model is built, in milliseconds; the
tiny models the cases load are saved once per module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from rlhflab.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")

# ----------------------------------------------------------------------------- the rows

GOOD = {
    "sft": {"prompt": "what is 3 plus 4 ?", "completion": "the answer is 7 ."},
    "preference": {"prompt": "what is 3 plus 4 ?", "chosen": "the answer is 7 .", "rejected": "8 ."},
    "unpaired": {"prompt": "what is 3 plus 4 ?", "completion": "the answer is 7 .", "label": True},
    "prompt": {"prompt": "what is 3 plus 4 ?"},
}
TEXT_FIELDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
               "unpaired": ("prompt", "completion"), "prompt": ("prompt",)}
USER = [{"role": "user", "content": "hi"}]


def _dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=True)


def _with(fmt: str, **changes) -> str:
    return _dumps({**GOOD[fmt], **changes})


def _without(fmt: str, name: str) -> str:
    return _dumps({k: v for k, v in GOOD[fmt].items() if k != name})


def _raw_rows(fmt: str) -> list[tuple[str, str | bytes, str]]:
    """(case id, line 2 of the file, what the error must say) for any format."""
    good = _dumps(GOOD[fmt])
    some = TEXT_FIELDS[fmt][-1]
    cases = [
        ("bad_json", good[:-1], "not valid JSON"),
        ("trailing_garbage", good + " x", "not valid JSON"),
        ("array", "[1, 2]", "expected a JSON object"),
        ("string", '"prompt"', "expected a JSON object"),
        ("number", "3", "expected a JSON object"),
        ("null", "null", "expected a JSON object"),
        ("bom", b"\xef\xbb\xbf" + good.encode(), "not valid JSON"),
        ("latin1", good.replace('"what', '"caf\xe9 what').encode("latin-1"), "not valid UTF-8"),
        ("bad_bytes", b'{"prompt": "\xff\xfe"}', "not valid UTF-8"),
        ("nan_extra", good[:-1] + ', "score": NaN}', "field 'score': not a finite number"),
        ("inf_extra", good[:-1] + ', "score": Infinity}', "field 'score': not a finite number"),
        ("neg_inf_extra", good[:-1] + ', "score": -Infinity}', "field 'score': not a finite number"),
        ("overflow_extra", good[:-1] + ', "score": 1e999}', "field 'score': not a finite number"),
        ("nan_nested", good[:-1] + ', "meta": {"w": [1, NaN]}}', "field 'meta': not a finite number"),
        ("surrogate_text", _with(fmt, **{some: "fine \ud800 text"}), f"field '{some}': holds an unpaired surrogate"),
        ("low_surrogate", _with(fmt, prompt="\udc00"), "field 'prompt': holds an unpaired surrogate"),
        ("surrogate_extra", good[:-1] + ', "note": "\\udbff"}', "field 'note': holds an unpaired surrogate"),
        ("surrogate_key", good[:-1] + ', "\\ud800": 1}', "holds an unpaired surrogate"),
        ("surrogate_in_message", _with(fmt, prompt=[{"role": "user", "content": "\ud83d"}]),
         "field 'prompt': holds an unpaired surrogate"),
    ]
    for name in TEXT_FIELDS[fmt]:
        cases += [
            (f"{name}_missing", _without(fmt, name), f"field '{name}': missing"),
            (f"{name}_empty", _with(fmt, **{name: ""}), f"field '{name}': empty text"),
            (f"{name}_blank", _with(fmt, **{name: " \t\n "}), f"field '{name}': empty text"),
            (f"{name}_number", _with(fmt, **{name: 3}), f"field '{name}': expected a non-empty string"),
            (f"{name}_null", _with(fmt, **{name: None}), f"field '{name}': expected a non-empty string"),
            (f"{name}_bool", _with(fmt, **{name: True}), f"field '{name}': expected a non-empty string"),
            (f"{name}_object", _with(fmt, **{name: {"text": "a"}}), f"field '{name}': expected a non-empty string"),
            (f"{name}_no_messages", _with(fmt, **{name: []}), f"field '{name}': expected a non-empty string"),
            (f"{name}_role_wizard", _with(fmt, **{name: [{"role": "wizard", "content": "a"}]}),
             f"field '{name}': message 0: unknown role 'wizard'"),
            (f"{name}_role_case", _with(fmt, **{name: [*USER, {"role": "User", "content": "a"}]}),
             f"field '{name}': message 1: unknown role 'User'"),
            (f"{name}_role_missing", _with(fmt, **{name: [{"content": "a"}]}), f"field '{name}': message 0"),
            (f"{name}_role_number", _with(fmt, **{name: [{"role": 1, "content": "a"}]}), f"field '{name}': message 0"),
            (f"{name}_content_number", _with(fmt, **{name: [{"role": "user", "content": 1}]}),
             f"field '{name}': message 0"),
            (f"{name}_message_string", _with(fmt, **{name: ["hi"]}), f"field '{name}': message 0"),
        ]
    return cases


def _format_rows(fmt: str) -> list[tuple[str, str, str]]:
    """Cases only a format has."""
    if fmt == "preference":
        return [
            ("identical", _with(fmt, rejected=GOOD[fmt]["chosen"]), "field 'chosen': chosen and rejected are identical"),
            ("space_only", _with(fmt, chosen="8 .", rejected=" 8 . "), "identical up to white space"),
            ("tab_only", _with(fmt, chosen="the\tanswer is 7 .", rejected="the answer  is 7 ."),
             "identical up to white space"),
            ("newline_only", _with(fmt, rejected="the answer is 7 .\n"), "identical up to white space"),
            ("messages_identical", _with(fmt, chosen=[{"role": "assistant", "content": "7"}],
                                         rejected=[{"role": "assistant", "content": "7"}]), "identical"),
            ("messages_space_only", _with(fmt, chosen=[{"role": "assistant", "content": "7 ."}],
                                          rejected=[{"role": "assistant", "content": " 7  ."}]),
             "identical up to white space"),
            ("identical_same_eos", _with(fmt, rejected=GOOD[fmt]["chosen"], chosen_eos=False, rejected_eos=False),
             "identical"),
            ("votes_two", _with(fmt, votes=[1, 2]), "field 'votes'"),
            ("votes_empty", _with(fmt, votes=[]), "field 'votes'"),
            ("votes_string", _with(fmt, votes="1"), "field 'votes'"),
            ("votes_fraction", _with(fmt, votes=[0.5, 1]), "field 'votes'"),
            ("votes_float_one", _with(fmt, votes=[1.0]), "field 'votes'"),
            ("votes_nan", _dumps(GOOD[fmt])[:-1] + ', "votes": [1, NaN]}', "field 'votes': not a finite number"),
            ("margin_nan", _dumps(GOOD[fmt])[:-1] + ', "margin": NaN}', "field 'margin': not a finite number"),
            ("margin_inf", _dumps(GOOD[fmt])[:-1] + ', "margin": Infinity}', "field 'margin': not a finite number"),
            ("margin_overflow", _dumps(GOOD[fmt])[:-1] + ', "margin": -1e400}', "field 'margin': not a finite number"),
            ("margin_string", _with(fmt, margin="1.5"), "field 'margin': expected a number"),
            ("margin_bool", _with(fmt, margin=True), "field 'margin': expected a number"),
            ("margin_list", _with(fmt, margin=[1]), "field 'margin': expected a number"),
            ("chosen_eos_no", _with(fmt, chosen_eos="no"), "field 'chosen_eos': expected true or false"),
            ("chosen_eos_zero", _with(fmt, chosen_eos=0), "field 'chosen_eos': expected true or false"),
            ("rejected_eos_null", _with(fmt, rejected_eos=None), "field 'rejected_eos': expected true or false"),
            ("rejected_eos_false_string", _with(fmt, rejected_eos="false"), "field 'rejected_eos'"),
            ("group_list", _with(fmt, group=[1]), "field 'group': expected a string or an integer"),
            ("group_object", _with(fmt, group={"a": 1}), "field 'group'"),
            ("group_float", _with(fmt, group=1.5), "field 'group'"),
            ("rankings_without_responses", _with(fmt, rankings=[[0, 1]]), "field 'responses'"),
            ("responses_one", _with(fmt, responses=["a"], rankings=[[0]]), "field 'responses'"),
            ("responses_empty_text", _with(fmt, responses=["a", ""], rankings=[[0, 1]]),
             "field 'responses': empty text"),
            ("rankings_index", _with(fmt, responses=["a", "b"], rankings=[[0, 2]]), "field 'rankings'"),
            ("rankings_negative", _with(fmt, responses=["a", "b"], rankings=[[-1, 0]]), "field 'rankings'"),
            ("rankings_repeat", _with(fmt, responses=["a", "b"], rankings=[[0, 0]]), "field 'rankings'"),
            ("rankings_flat", _with(fmt, responses=["a", "b"], rankings=[0, 1]), "field 'rankings'"),
            ("rankings_empty", _with(fmt, responses=["a", "b"], rankings=[]), "field 'rankings'"),
            ("rankings_bool", _with(fmt, responses=["a", "b"], rankings=[[True, False]]), "field 'rankings'"),
            ("responses_eos_length", _with(fmt, responses=["a", "b"], rankings=[[0, 1]], responses_eos=[True]),
             "field 'responses_eos'"),
            ("responses_eos_string", _with(fmt, responses=["a", "b"], rankings=[[0, 1]], responses_eos=["y", "n"]),
             "field 'responses_eos'"),
        ]
    if fmt == "unpaired":
        return [
            ("label_yes", _with(fmt, label="yes"), "field 'label': expected true or false"),
            ("label_one", _with(fmt, label=1), "field 'label': expected true or false"),
            ("label_zero", _with(fmt, label=0), "field 'label': expected true or false"),
            ("label_null", _with(fmt, label=None), "field 'label': expected true or false"),
            ("label_string_true", _with(fmt, label="true"), "field 'label': expected true or false"),
            ("label_missing", _without(fmt, "label"), "field 'label': missing"),
            ("completion_eos_no", _with(fmt, completion_eos="no"), "field 'completion_eos': expected true or false"),
            ("completion_eos_one", _with(fmt, completion_eos=1), "field 'completion_eos': expected true or false"),
        ]
    return []


# Where each format is read, and the command line around the bad file (DATA, OUT and the
# shared models are filled in per case).
READERS = {
    "sft": [("sft", ["sft", "--config", TINY, "--data", "{data}", "--out", "{out}"]),
            ("sft-eval-data", ["sft", "--config", TINY, "--data", "{good_sft}", "--eval-data", "{data}",
                               "--out", "{out}"])],
    "preference": [
        ("rm", ["rm", "--config", TINY, "--backbone", "{policy}", "--data", "{data}", "--out", "{out}"]),
        ("rm-eval-data", ["rm", "--config", TINY, "--backbone", "{policy}", "--data", "{good_preference}",
                          "--eval-data", "{data}", "--out", "{out}"]),
        ("dpo", ["dpo", "--config", TINY, "--sft", "{policy}", "--data", "{data}", "--out", "{out}"]),
        ("eval-rm", ["eval-rm", "--config", TINY, "--rm", "{rm}", "--data", "{data}", "--out", "{out}"]),
        ("eval-rm-votes", ["eval-rm", "--config", TINY, "--rm", "{rm}", "--data", "{good_preference}",
                           "--votes", "{data}", "--out", "{out}"]),
    ],
    "unpaired": [("dpo-kto", ["dpo", "--config", TINY, "--set", "dpo.loss=kto", "--sft", "{policy}",
                              "--data", "{data}", "--out", "{out}"])],
    "prompt": [
        ("eval", ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--prompts", "{data}",
                  "--out", "{out}"]),
        ("ppo", ["ppo", "--config", TINY, "--sft", "{policy}", "--reward-fn", "length", "--prompts", "{data}",
                 "--out", "{out}"]),
    ],
}


def _row_cases():
    out = []
    for fmt, readers in READERS.items():
        rows = _raw_rows(fmt) + _format_rows(fmt)
        for reader, argv in readers:
            for case, line, expect in rows:
                out.append(pytest.param(fmt, argv, line, expect, id=f"{reader}-{case}"))
    return out


# ----------------------------------------------------------------------------- harness


def _snapshot(*dirs: Path) -> dict:
    seen = {}
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            for name in subdirs + files:
                p = Path(root) / name
                st = p.lstat()
                seen[str(p)] = (st.st_size, st.st_mtime_ns, p.is_dir())
    return seen


def _fill(argv: list[str], **paths) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]


def expect_input_error(argv: list[str], capsys, watch: list[Path], out: Path | None, *needles: str) -> str:
    """Run the CLI: exit code 2, one line on stderr holding every needle, no traceback,
    nothing written under ``watch`` and no ``out``."""
    capsys.readouterr()
    before = _snapshot(*watch)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith(f"rlhflab {argv[0]}: error: ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _snapshot(*watch) == before, "a file was written or changed"
    if out is not None:
        assert not out.exists(), f"{out} was created"
    return lines[0]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny policy, a reward model on it, a policy whose chat template raises, and good
    files of every format: saved once for the module."""
    from rlhflab.config import load_config
    from rlhflab.models import create_causal_lm, save_pretrained_atomic
    from rlhflab.reward_model import RewardModel, create_reward_model
    from rlhflab.world import World

    base = tmp_path_factory.mktemp("loader_assets")
    cfg = load_config(TINY)
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    policy = save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, base / "policy")
    model, rm_tok = create_reward_model(policy, seed=0)
    rm = RewardModel([model], rm_tok, max_length=48).save(base / "rm")
    tok.chat_template = "{{ raise_exception('the template refuses ' ~ messages[0]['role']) }}"
    raising = save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, base / "raising_template")
    tok.chat_template = None
    good = {}
    for fmt, row in GOOD.items():
        good[fmt] = base / f"good_{fmt}.jsonl"
        good[fmt].write_text("\n".join(_dumps(row) for _ in range(4)) + "\n")
    return {"base": base, "policy": policy, "rm": rm, "raising": raising, "good": good}


def _case_dir(tmp_path: Path) -> Path:
    d = tmp_path / "case"
    d.mkdir()
    return d


# ----------------------------------------------------------------------------- JSONL rows


@pytest.mark.parametrize("fmt,argv,line,expect", _row_cases())
def test_bad_row_is_one_line_naming_file_and_line(fmt, argv, line, expect, assets, tmp_path, capsys):
    d = _case_dir(tmp_path)
    data = d / "data.jsonl"
    raw = line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")
    data.write_bytes(_dumps(GOOD[fmt]).encode() + b"\n" + raw + b"\n" + _dumps(GOOD[fmt]).encode() + b"\n")
    out = d / "out"
    argv = _fill(argv, data=data, out=out, policy=assets["policy"], rm=assets["rm"], good_sft=assets["good"]["sft"],
                 good_preference=assets["good"]["preference"])
    expect_input_error(argv, capsys, [d, assets["base"]], out, f"{data}:2: ", expect)


@pytest.mark.parametrize("fmt", list(GOOD))
def test_an_empty_file_has_no_rows(fmt, assets, tmp_path, capsys):
    d = _case_dir(tmp_path)
    data = d / "data.jsonl"
    data.write_text("\n  \n")
    out = d / "out"
    argv = _fill(READERS[fmt][0][1], data=data, out=out, policy=assets["policy"], rm=assets["rm"])
    expect_input_error(argv, capsys, [d, assets["base"]], out, str(data), "no rows")


@pytest.mark.parametrize("reader", ["sft", "rm", "dpo", "eval-rm", "dpo-kto", "eval", "ppo"])
def test_a_missing_file_is_named(reader, assets, tmp_path, capsys):
    argv = next(a for readers in READERS.values() for r, a in readers if r == reader)
    d = _case_dir(tmp_path)
    data, out = d / "nope.jsonl", d / "out"
    argv = _fill(argv, data=data, out=out, policy=assets["policy"], rm=assets["rm"])
    expect_input_error(argv, capsys, [d, assets["base"]], out, str(data))


def test_a_directory_as_data_is_named(assets, tmp_path, capsys):
    d = _case_dir(tmp_path)
    (d / "dir.jsonl").mkdir()
    out = d / "out"
    argv = _fill(READERS["sft"][0][1], data=d / "dir.jsonl", out=out, policy=assets["policy"], rm=assets["rm"])
    expect_input_error(argv, capsys, [d, assets["base"]], out, str(d / "dir.jsonl"))


def test_the_first_bad_line_is_the_one_named(assets, tmp_path, capsys):
    d = _case_dir(tmp_path)
    data = d / "data.jsonl"
    lines = [_dumps(GOOD["sft"])] * 5 + ["", _with("sft", completion=""), _with("sft", prompt=3)]
    data.write_text("\n".join(lines) + "\n")
    out = d / "out"
    argv = _fill(READERS["sft"][0][1], data=data, out=out, policy=assets["policy"], rm=assets["rm"])
    expect_input_error(argv, capsys, [d, assets["base"]], out, f"{data}:7: field 'completion': empty text")


# ----------------------------------------------------------------------------- chat templates


CONVERSATIONAL = {
    "sft": {"prompt": USER, "completion": [{"role": "assistant", "content": "yo"}]},
    "preference": {"prompt": USER, "chosen": "the answer is 7 .", "rejected": "8 ."},
    "prompt": {"prompt": USER},
}
# Every command that renders rows with the tokenizer of MODEL, and the format it reads.
TEMPLATE_READERS = {
    "sft": ("sft", ["sft", "--config", TINY, "--model", "{model}", "--data", "{data}", "--out", "{out}"]),
    "dpo": ("preference", ["dpo", "--config", TINY, "--sft", "{model}", "--data", "{data}", "--out", "{out}"]),
    "rm": ("preference", ["rm", "--config", TINY, "--set", "rm.batch_size=2", "--backbone", "{model}",
                          "--data", "{data}", "--out", "{out}"]),
    "ppo": ("prompt", ["ppo", "--config", TINY, "--sft", "{model}", "--reward-fn", "length", "--prompts", "{data}",
                       "--out", "{out}"]),
}


def _conversational_file(d: Path, fmt: str) -> Path:
    """Two standard rows, then a conversational one at line 3, then enough rows for a batch."""
    data = d / "data.jsonl"
    rows = [GOOD[fmt]] * 2 + [CONVERSATIONAL[fmt]] + [GOOD[fmt]] * 8
    data.write_text("\n".join(_dumps(r) for r in rows) + "\n")
    return data


@pytest.mark.parametrize("reader", list(TEMPLATE_READERS))
def test_a_chat_template_that_raises_names_the_row_and_the_tokenizer(reader, assets, tmp_path, capsys):
    d = _case_dir(tmp_path)
    fmt, argv = TEMPLATE_READERS[reader]
    data, out = _conversational_file(d, fmt), d / "out"
    argv = _fill(argv, model=assets["raising"], data=data, out=out)
    # A tokenizer with a chat template renders plain-text rows through it too, so the first row
    # a stage renders fails (which one depends on the stage's order): the file and a line are named.
    expect_input_error(argv, capsys, [d, assets["base"]], out, f"{data}:", str(assets["raising"]),
                       "the template refuses user")


@pytest.mark.parametrize("reader", list(TEMPLATE_READERS))
def test_conversational_rows_without_a_chat_template_name_the_row(reader, assets, tmp_path, capsys):
    d = _case_dir(tmp_path)
    fmt, argv = TEMPLATE_READERS[reader]
    data, out = _conversational_file(d, fmt), d / "out"
    argv = _fill(argv, model=assets["policy"], data=data, out=out)
    expect_input_error(argv, capsys, [d, assets["base"]], out, f"{data}:3: ", "need a tokenizer with a chat template",
                       str(assets["policy"]))


# ----------------------------------------------------------------------------- model directories


def _break_weights(src: Path, dst: Path, how: str) -> Path:
    """A copy of a model directory with one file broken; returns the file to be named."""
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "one_byte_short":
        weights.write_bytes(data[:-1])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "random":
        weights.write_bytes(os.urandom(4096))
    elif how == "header_only":
        weights.write_bytes(data[:8])
    elif how == "text":
        weights.write_text('{"not": "safetensors"}')
    elif how == "partial":  # a readable file that lacks one of the model's weights
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        del tensors[sorted(tensors)[1]]
        save_file(tensors, str(weights), metadata={"format": "pt"})
        return dst
    elif how == "pickle_only":
        weights.unlink()
        (dst / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
        return dst
    elif how == "config_not_json":
        (dst / "config.json").write_text("{not json")
        return dst
    elif how == "config_list":
        (dst / "config.json").write_text("[]")
        return dst
    elif how == "config_no_type":
        (dst / "config.json").write_text("{}")
        return dst
    elif how == "no_config":
        (dst / "config.json").unlink()
        return dst
    elif how == "tokenizer_not_json":
        (dst / "tokenizer.json").write_text("{garbage")
        return dst
    elif how == "no_tokenizer":
        for f in dst.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                f.unlink()
        return dst
    else:
        raise AssertionError(how)
    return weights


POLICY_FAULTS = ["truncated", "one_byte_short", "empty", "random", "header_only", "text", "partial", "pickle_only",
                 "config_not_json", "config_list", "config_no_type", "no_config", "tokenizer_not_json", "no_tokenizer"]
WEIGHT_FAULTS = POLICY_FAULTS[:7]

# Every command that loads a policy, tokenizer or backbone, with the broken directory as BAD.
POLICY_READERS = {
    "sft": ["sft", "--config", TINY, "--model", "{bad}", "--data", "{sft_data}", "--out", "{out}"],
    "ppo": ["ppo", "--config", TINY, "--sft", "{bad}", "--reward-fn", "length", "--out", "{out}"],
    "dpo": ["dpo", "--config", TINY, "--sft", "{bad}", "--data", "{pref_data}", "--out", "{out}"],
    "eval_policy": ["eval", "--config", TINY, "--policy", "{bad}", "--base", "{policy}", "--out", "{out}"],
    "eval_base": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{bad}", "--out", "{out}"],
    "rm_backbone": ["rm", "--config", TINY, "--set", "rm.batch_size=2", "--backbone", "{bad}", "--data", "{pref_data}", "--out", "{out}"],
    "sample": ["sample", "--config", TINY, "--policy", "{bad}"],
}


def _policy_cases():
    cases = []
    for reader, argv in POLICY_READERS.items():
        faults = POLICY_FAULTS
        if reader == "eval_base":  # the base's tokenizer is never read: the policy's is used
            faults = [f for f in POLICY_FAULTS if "tokenizer" not in f]
        if reader == "rm_backbone":  # a backbone gets a new head, and an encoder may lack its pooler
            faults = [f for f in POLICY_FAULTS if f != "partial"]
        for fault in faults:
            cases.append(pytest.param(reader, argv, fault, id=f"{reader}-{fault}"))
    return cases


@pytest.mark.parametrize("reader,argv,fault", _policy_cases())
def test_a_broken_model_directory_is_one_line_naming_it(reader, argv, fault, assets, tmp_path, capsys):
    d = _case_dir(tmp_path)
    named = _break_weights(assets["policy"], d / "broken", fault)
    out = d / "out"
    argv = _fill(argv, bad=d / "broken", out=out, policy=assets["policy"], sft_data=assets["good"]["sft"],
                 pref_data=assets["good"]["preference"])
    expect_input_error(argv, capsys, [d, assets["base"]], out if "--out" in argv else None, str(named))


def _break_rm(src: Path, dst: Path, how: str) -> Path:
    if how in WEIGHT_FAULTS:
        return _break_weights(src, dst, how)
    shutil.copytree(src, dst)
    meta_file = dst / "reward_model.json"
    meta = json.loads(meta_file.read_text())
    if how == "meta_not_json":
        meta_file.write_text("{oops")
    elif how == "meta_list":
        meta_file.write_text("[]")
    elif how == "members_empty":
        meta_file.write_text(json.dumps({**meta, "members": []}))
    elif how == "member_no_path":
        meta_file.write_text(json.dumps({**meta, "members": [{"gain": 1.0}]}))
    elif how == "member_escapes":
        meta_file.write_text(json.dumps({**meta, "members": [{"path": "../policy", "gain": 1.0, "bias": 0.0}]}))
    elif how == "member_absolute":
        meta_file.write_text(json.dumps({**meta, "members": [{"path": "/tmp", "gain": 1.0, "bias": 0.0}]}))
    elif how == "member_missing":
        meta_file.write_text(json.dumps({**meta, "members": [{"path": "member_7", "gain": 1.0, "bias": 0.0}]}))
    elif how == "gain_nan":
        meta_file.write_text(json.dumps({**meta, "members": [{"path": ".", "gain": float("nan"), "bias": 0.0}]}))
    elif how == "bias_string":
        meta_file.write_text(json.dumps({**meta, "members": [{"path": ".", "gain": 1.0, "bias": "0"}]}))
    elif how == "max_length_zero":
        meta_file.write_text(json.dumps({**meta, "max_length": 0}))
    else:
        raise AssertionError(how)
    return dst if how == "member_missing" else meta_file


RM_FAULTS = [*WEIGHT_FAULTS, "meta_not_json", "meta_list", "members_empty", "member_no_path", "member_escapes",
             "member_absolute", "member_missing", "gain_nan", "bias_string", "max_length_zero"]
RM_READERS = {
    "eval-rm": ["eval-rm", "--config", TINY, "--rm", "{bad}", "--data", "{pref_data}", "--out", "{out}"],
    "eval": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--rm", "{bad}",
             "--out", "{out}"],
    "ppo": ["ppo", "--config", TINY, "--sft", "{policy}", "--rm", "{bad}", "--out", "{out}"],
}


@pytest.mark.parametrize("fault", RM_FAULTS)
@pytest.mark.parametrize("reader", list(RM_READERS))
def test_a_broken_reward_model_is_one_line_naming_it(reader, fault, assets, tmp_path, capsys):
    d = _case_dir(tmp_path)
    named = _break_rm(assets["rm"], d / "broken_rm", fault)
    out = d / "out"
    argv = _fill(RM_READERS[reader], bad=d / "broken_rm", out=out, policy=assets["policy"],
                 pref_data=assets["good"]["preference"])
    expect_input_error(argv, capsys, [d, assets["base"]], out, str(named))


def test_the_controls_load(assets, tmp_path, capsys):
    """The good assets the cases break do load (a case fails for its flaw, not the harness)."""
    from rlhflab.data import load_rows
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.reward_model import RewardModel

    load_causal_lm(assets["policy"], load_tokenizer(assets["policy"]))
    assert RewardModel.load(assets["rm"]).n_members == 1
    for fmt, path in assets["good"].items():
        assert len(load_rows(path, fmt)) == 4
    # White space inside a pair's answers is fine when the words differ, and the same text
    # with and without EOS is a real comparison (the reward model sees the EOS token).
    d = _case_dir(tmp_path)
    ok = d / "ok.jsonl"
    ok.write_text("\n".join([_with("preference", chosen="7 .", rejected="7 . 8"),
                             _with("preference", rejected="the answer is 7 .", rejected_eos=False),
                             _with("preference", chosen=[{"role": "assistant", "content": "7"}],
                                   rejected=[{"role": "user", "content": "7"}])]) + "\n")
    assert len(load_rows(ok, "preference")) == 3


# ----------------------------------------------------------------------------- metrics files

HEALTHY = {"kl/sequence_mean": 3.0, "gold/mean": 1.2, "base/gold/mean": 0.8, "win_rate/gold": 0.62,
           "win_rate/gold_ci_low": 0.55, "win_rate/gold_ci_high": 0.69, "length/mean": 7.0, "base/length/mean": 7.5}

BAD_METRICS = [
    ("empty_object", "{}", "no readings"),
    ("only_metadata", '{"note": "from another tool", "run": "a"}', "no readings"),
    ("only_nan", '{"kl/sequence_mean": "nan", "win_rate/gold": "nan"}', "no readings"),
    ("only_other_numbers", '{"loss": 3.0, "step": 12}', "no readings"),
    ("array", "[1, 2]", "expected a JSON object"),
    ("number", "3", "expected a JSON object"),
    ("not_json", "{kl", "not valid JSON"),
    ("empty_file", "", "not valid JSON"),
    ("bare_nan", '{"kl/sequence_mean": NaN}', "bare NaN"),
    ("bare_infinity", '{"kl/sequence_mean": Infinity}', "bare Infinity"),
    ("bare_minus_infinity", '{"gold/mean": -Infinity}', "bare -Infinity"),
    ("bare_nan_unknown_key", '{"kl/sequence_mean": 1, "other": NaN}', "bare NaN"),
    ("string_reading", json.dumps({**HEALTHY, "kl/sequence_mean": "abc"}), "field 'kl/sequence_mean': expected a number"),
    ("empty_string", json.dumps({**HEALTHY, "gold/mean": ""}), "field 'gold/mean': expected a number"),
    ("number_as_string", json.dumps({**HEALTHY, "gold/mean": "1.5"}), "field 'gold/mean': expected a number"),
    ("bool_reading", json.dumps({**HEALTHY, "win_rate/gold": True}), "field 'win_rate/gold': expected a number"),
    ("list_reading", json.dumps({**HEALTHY, "length/mean": [7.0]}), "field 'length/mean': expected a number"),
    ("object_reading", json.dumps({**HEALTHY, "gold/mean": {"v": 1}}), "field 'gold/mean': expected a number"),
    ("base_string", json.dumps({**HEALTHY, "base/gold/mean": "high"}), "field 'base/gold/mean': expected a number"),
    ("unlisted_family_key", json.dumps({**HEALTHY, "gold/arithmetic": "x"}), "field 'gold/arithmetic'"),
    ("rate_above_one", json.dumps({**HEALTHY, "refusal/benign_rate": 7.5}), "field 'refusal/benign_rate': a rate"),
    ("rate_negative", json.dumps({**HEALTHY, "refusal/harmful_rate": -3}), "field 'refusal/harmful_rate': a rate"),
    ("win_rate_percent", json.dumps({**HEALTHY, "win_rate/gold": 62}), "field 'win_rate/gold': a rate"),
    ("ci_above_one", json.dumps({**HEALTHY, "win_rate/gold_ci_high": 1.01}), "field 'win_rate/gold_ci_high'"),
    ("base_rate", json.dumps({**HEALTHY, "base/sycophancy/agree_rate": 1.5}), "field 'base/sycophancy/agree_rate'"),
    ("accuracy_percent", json.dumps({**HEALTHY, "capability/accuracy": 85}), "field 'capability/accuracy'"),
    ("empty_rate", json.dumps({**HEALTHY, "length/empty_rate": 2}), "field 'length/empty_rate'"),
    ("duplicate_rate", json.dumps({**HEALTHY, "diversity/duplicate_rate": -0.1}), "field 'diversity/duplicate_rate'"),
    ("distinct_2", json.dumps({**HEALTHY, "diversity/distinct_2": 3}), "field 'diversity/distinct_2'"),
    ("repetition", json.dumps({**HEALTHY, "diversity/repetition": 1.2}), "field 'diversity/repetition'"),
    ("rate_inf", json.dumps({**HEALTHY, "refusal/benign_rate": "inf"}), "field 'refusal/benign_rate': a rate"),
    ("length_negative", json.dumps({**HEALTHY, "length/mean": -1}), "field 'length/mean': must be >= 0"),
    ("n_negative", json.dumps({**HEALTHY, "capability/n": -40}), "field 'capability/n': must be >= 0"),
    ("density_negative", json.dumps({**HEALTHY, "keywords/density": -0.1}), "field 'keywords/density'"),
]


@pytest.mark.parametrize("text,expect", [pytest.param(t, e, id=c) for c, t, e in BAD_METRICS])
def test_a_bad_metrics_file_is_one_line_naming_it(text, expect, tmp_path, capsys):
    d = _case_dir(tmp_path)
    path = d / "metrics.json"
    path.write_text(text, encoding="utf-8")
    expect_input_error(["diagnose", "--metrics", str(path)], capsys, [d], None, str(path), expect)


@pytest.mark.parametrize("case", ["directory", "missing", "latin1", "run_dir_without_eval"])
def test_a_metrics_path_that_is_no_json_file_is_named(case, tmp_path, capsys):
    d = _case_dir(tmp_path)
    if case == "directory":
        (d / "m").mkdir()
        argv, named = ["diagnose", "--metrics", str(d / "m")], str(d / "m")
    elif case == "missing":
        argv, named = ["diagnose", "--metrics", str(d / "m.json")], str(d / "m.json")
    elif case == "latin1":
        (d / "m.json").write_bytes(b'{"kl/sequence_mean": 1, "note": "\xe9"}')
        argv, named = ["diagnose", "--metrics", str(d / "m.json")], str(d / "m.json")
    else:
        (d / "run").mkdir()
        argv, named = ["diagnose", str(d / "run")], str(d / "run")
    expect_input_error(argv, capsys, [d], None, named)


@pytest.mark.parametrize("item,expect", [
    ("kl_warning=nan", "--threshold kl_warning"), ("kl_warning=NaN", "--threshold kl_warning"),
    ("kl_warning=abc", "--threshold kl_warning"), ("kl_warning=", "--threshold kl_warning"),
    ("kl_warning=-1", "--threshold kl_warning"), ("regression_win_rate=-0.5", "--threshold regression_win_rate"),
    ("nope=1", "--threshold 'nope=1'"), ("kl_warning", "--threshold 'kl_warning'"), ("=1", "--threshold '=1'"),
])
def test_a_bad_threshold_is_one_line_naming_it(item, expect, tmp_path, capsys):
    d = _case_dir(tmp_path)
    path = d / "metrics.json"
    path.write_text(json.dumps(HEALTHY))
    expect_input_error(["diagnose", "--metrics", str(path), "--threshold", item], capsys, [d], None, expect)


def test_what_rlhflab_writes_still_reads(tmp_path, capsys):
    """Controls: eval.json's non-finite strings read back (an infinite KL is a KL above every
    bar, a NaN win-rate is not measured), other tools' metadata is ignored, an infinite
    threshold switches a rule off."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**HEALTHY, "kl/sequence_mean": "inf", "note": "from wandb", "tags": ["a"],
                                "win_rate/gold_length_controlled": "nan", "capability/accuracy": None}))
    assert main(["diagnose", "--metrics", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "kl_high" in [f["name"] for f in result["findings"]]
    assert main(["diagnose", "--metrics", str(path), "--json", "--threshold", "kl_warning=inf",
                 "--threshold", "kl_caution=inf"]) == 0
    assert "kl_high" not in [f["name"] for f in json.loads(capsys.readouterr().out)["findings"]]



@pytest.mark.parametrize("reader", list(RM_READERS))
def test_a_policy_given_as_the_reward_model_is_refused(reader, assets, tmp_path, capsys):
    """A causal LM has no scalar head: loaded as a reward model it would score with a random
    one. Named, with the missing head."""
    d = _case_dir(tmp_path)
    out = d / "out"
    argv = _fill(RM_READERS[reader], bad=assets["policy"], out=out, policy=assets["policy"],
                 pref_data=assets["good"]["preference"])
    expect_input_error(argv, capsys, [d, assets["base"]], out, str(assets["policy"]), "score.weight")
