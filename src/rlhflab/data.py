"""Dataset formats (TRL-compatible JSONL), their validation, tokenization and collation.

Formats, one JSON object per line:

| format      | fields                                                                 |
|-------------|------------------------------------------------------------------------|
| sft         | ``prompt``, ``completion``                                             |
| preference  | ``prompt``, ``chosen``, ``rejected``; optional ``votes`` (list of 0/1, 1 = a vote for chosen), ``margin`` (number), ``label_prob`` (a soft label: P(chosen better) in [0, 1], as ``rlhflab rlaif`` writes it), ``source`` (where the comparison came from, e.g. ``human``, ``ai``), ``chosen_eos``/``rejected_eos`` (bool), ``group``, ``responses``/``responses_eos``/``rankings`` (as ``rlhflab collect`` writes them) |
| unpaired    | ``prompt``, ``completion``, ``label`` (bool: desirable or not); optional ``completion_eos`` (bool) |
| prompt      | ``prompt`` (other fields are kept, e.g. the world's ``family``)        |

Each text field is a non-empty string ("standard" format) or, in the conversational
format, a list of ``{"role": ..., "content": ...}`` messages (roles ``system``, ``user``,
``assistant``), rendered with the tokenizer's chat template. Every problem is an
:class:`InputError` naming the file, the line and the field, and nothing is read past the
first bad line. Besides the formats' own fields, every row is checked for what JSON lets
through but nothing downstream can use: ``NaN``/``Infinity`` (and numbers too large for a
float), and unpaired surrogates in strings (``"\\ud800"``). A pair whose chosen and
rejected texts are equal up to white space (and end alike) is an error, like an identical
pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhflab.errors import InputError
from rlhflab.readers import (
    SURROGATES,
    Reshaped,
    bad_value,
    normalize_row,
    read_records,
)

FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
}

ROLES = ("system", "user", "assistant")
# Optional fields that must be true or false when present, per format.
FLAGS: dict[str, tuple[str, ...]] = {
    "preference": ("chosen_eos", "rejected_eos"),
    "unpaired": ("completion_eos",),
}


class Messages(list):
    """A conversational text field as read from a file: a list of messages that remembers
    where it came from (``where``: file, line, field), so that rendering it with a chat
    template can name the row when the template fails. Equal to, and serialized as, a
    plain list."""

    def __init__(self, messages=(), where: dict | None = None) -> None:
        super().__init__(messages)
        self.where = dict(where or {})


class Text(str):
    """A text field as read from a file: a string that remembers where it came from
    (``where``), as ``Messages`` does, so that a chat template failing on it names the row."""

    where: dict

    def __new__(cls, value: str, where: dict | None = None) -> Text:
        obj = super().__new__(cls, value)
        obj.where = dict(where or {})
        return obj


def _check_text(value: Any, where: dict, name: str) -> Any:
    """The text field, checked: a string as it is, a message list as ``Messages``."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError("empty text", field=name, **where)
        return Text(value, where)
    if isinstance(value, list) and value:
        for i, msg in enumerate(value):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise InputError(f"message {i}: expected {{'role': str, 'content': str}}", field=name, **where)
            if msg["role"] not in ROLES:
                raise InputError(f"message {i}: unknown role {msg['role']!r} (expected one of {', '.join(ROLES)})",
                                 field=name, **where)
        return value if isinstance(value, Messages) else Messages(value, {**where, "field": name})
    raise InputError(
        f"expected a non-empty string or list of messages, got {type(value).__name__}", field=name, **where
    )


def _squeezed(value: Any) -> Any:
    """A text field with runs of white space made one space and the ends stripped."""
    if isinstance(value, str):
        return " ".join(value.split())
    return [(m["role"], " ".join(m["content"].split())) for m in value]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_rankings(row: dict, where: dict) -> None:
    """``responses``, ``responses_eos`` and ``rankings`` of a row written by ``rlhflab collect``."""
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise InputError("expected a list of at least two responses", field="responses", **where)
    row["responses"] = [_check_text(r, where, "responses") for r in responses]
    n = len(responses)
    eos = row.get("responses_eos")
    if eos is not None and not (isinstance(eos, list) and len(eos) == n and all(isinstance(e, bool) for e in eos)):
        raise InputError(f"expected a list of {n} true/false flags, one per response", field="responses_eos", **where)
    rankings = row["rankings"]
    if not isinstance(rankings, list) or not rankings:
        raise InputError("expected a non-empty list of rankings", field="rankings", **where)
    for r in rankings:
        if not (isinstance(r, list) and len(r) >= 2 and all(_is_int(i) and 0 <= i < n for i in r)
                and len(set(r)) == len(r)):
            raise InputError(f"expected each ranking to list distinct response indices 0..{n - 1}, got {r!r}",
                             field="rankings", **where)


def validate_row(row: dict, fmt: str, where: dict) -> dict:
    """Check one row of ``fmt``; returns the row (conversational fields as ``Messages``).
    ``where`` = {"file": ..., "line": ...}."""
    for name in FORMATS[fmt]:
        if name not in row:
            raise InputError("missing", field=name, **where)
        if name == "label":
            if not isinstance(row[name], bool):
                raise InputError(f"expected true or false, got {row[name]!r}", field=name, **where)
        else:
            row[name] = _check_text(row[name], where, name)
    for name in FLAGS.get(fmt, ()):
        if name in row and not isinstance(row[name], bool):
            raise InputError(f"expected true or false, got {row[name]!r}", field=name, **where)
    if fmt == "preference":
        same_end = row.get("chosen_eos", True) == row.get("rejected_eos", True)
        if same_end and row["chosen"] == row["rejected"]:
            raise InputError("chosen and rejected are identical", field="chosen", **where)
        if same_end and _squeezed(row["chosen"]) == _squeezed(row["rejected"]):
            raise InputError("chosen and rejected are identical up to white space", field="chosen", **where)
        votes = row.get("votes")
        if votes is not None and not (
            isinstance(votes, list) and votes and all(v in (0, 1) and not isinstance(v, float) for v in votes)
        ):
            raise InputError("expected a non-empty list of 0/1 votes", field="votes", **where)
        margin = row.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise InputError(f"expected a number, got {margin!r}", field="margin", **where)
        label_prob = row.get("label_prob")
        if "label_prob" in row and (isinstance(label_prob, bool) or not isinstance(label_prob, (int, float))
                                    or not 0.0 <= label_prob <= 1.0):
            raise InputError(f"expected P(chosen better), a number in [0, 1], got {label_prob!r}",
                             field="label_prob", **where)
        group = row.get("group")
        if "group" in row and not (isinstance(group, str) or _is_int(group)):
            raise InputError(f"expected a string or an integer, got {group!r}", field="group", **where)
        if "rankings" in row:
            _check_rankings(row, where)
    return row


def load_rows(path: str | Path, fmt: str, *, quiet: bool = False) -> list[dict]:
    """All rows of ``path`` in format ``fmt`` (see the module docstring), validated. ``path``
    is a JSONL file, a JSON array, a Parquet or Arrow file or a ``datasets`` directory
    (``rlhflab.readers``), and TRL's other row shapes (``messages``; preference rows whose
    prompt is implicit in chosen/rejected) are reshaped first; a line on stderr says how
    many rows were (unless ``quiet``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    reshaped = Reshaped()
    rows = []
    for where, obj in read_records(path):
        if not isinstance(obj, dict):
            raise InputError("expected an object with the format's fields", **where)
        if not str(path).endswith(".jsonl") or where.get("unit") == "row":
            for key, value in obj.items():  # what iter_jsonl checks on JSON Lines
                bad = bad_value(key) or bad_value(value)
                if bad:
                    raise InputError(bad, field=key if not SURROGATES.search(key) else ascii(key)[1:-1], **where)
        rows.append(validate_row(normalize_row(obj, fmt, where, reshaped), fmt, where))
    if not rows:
        raise InputError("no rows", file=str(path))
    if reshaped and not quiet:
        import sys

        print(f"{path}: {len(rows)} {fmt} rows; {reshaped.describe()}", file=sys.stderr)
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file
        raise


# ---------------------------------------------------------------------------------------
# Rendering and tokenization


def _row_place(*values: Any) -> dict:
    """file and line of the row a conversational field came from, if known."""
    for v in values:
        where = getattr(v, "where", None)
        if where:
            return {k: where[k] for k in ("file", "line", "unit") if k in where}
    return {}


def apply_template(messages: list, tokenizer, *, add_generation_prompt: bool = False,
                   where: dict | None = None) -> str:
    """``tokenizer.apply_chat_template`` as text; a tokenizer without a template, or a
    template that raises, is an InputError naming the row (``where``, else the place the
    messages were read from) and the tokenizer's directory."""
    where = where or _row_place(messages)
    source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"conversational rows need a tokenizer with a chat template ({source} has none)", **where)
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # a user's Jinja template can raise anything
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"the chat template of {source} failed on this row: {first}", **where) from None


def has_chat_template(tokenizer) -> bool:
    """Whether prompts given to this tokenizer's model go through its chat template: a
    conversational prompt always must; a plain-text prompt does too when the tokenizer has
    a template (it becomes the user's message), so that training, rollout, evaluation and
    scoring all give the model what ``apply_chat_template`` gives it."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(prompt: Any, tokenizer, where: dict | None = None) -> str:
    """The text a model is given for ``prompt`` (text or messages): the chat template with
    its generation prompt when the prompt is conversational or the tokenizer has a
    template, else the text itself."""
    if isinstance(prompt, str) and not has_chat_template(tokenizer):
        return prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return apply_template(messages, tokenizer, add_generation_prompt=True, where=where or _row_place(prompt))


def render(prompt: Any, completion: Any, tokenizer, where: dict | None = None) -> tuple[str, str]:
    """(prompt text, completion text); conversational rows, and every row when the tokenizer
    has a chat template (``has_chat_template``), go through the template.

    The completion text is what the template adds after the prompt's generation prompt,
    so prompt + completion tokenizes as the template would. Errors name the row's file and
    line (``where``, else where ``load_rows`` read the messages).
    """
    if isinstance(prompt, str) and isinstance(completion, str) and not has_chat_template(tokenizer):
        return prompt, completion
    where = where or _row_place(prompt, completion)
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion_msgs = (
        [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    )
    p = apply_template(prompt_msgs, tokenizer, add_generation_prompt=True, where=where)
    full = apply_template(prompt_msgs + completion_msgs, tokenizer, where=where)
    if not isinstance(p, str) or not isinstance(full, str) or not full.startswith(p):
        raise InputError("chat template does not extend the prompt; cannot split the completion", **where)
    return p, full[len(p):]


def prompt_ids(text: str, tokenizer) -> list[int]:
    """A prompt's ids: special tokens added (a BOS-adding tokenizer's BOS) unless the text
    came from a chat template, which writes its own (Llama 2's ``{{ bos_token }}``), so that
    the ids equal ``apply_chat_template``'s with no second BOS."""
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer)).input_ids


@dataclass
class Tokenized:
    """One prompt + response as ids; ``n_prompt`` leading ids are the prompt."""

    input_ids: list[int]
    n_prompt: int
    truncated: bool


def completion_ids(completion: str, tokenizer, add_eos: bool) -> list[int]:
    """The completion's ids ending with EOS exactly once when ``add_eos``, and without it
    otherwise. A completion rendered by a chat template already closes its turn with the
    template's end-of-turn marker; when that marker is the tokenizer's EOS (ChatML's
    ``<|im_end|>`` for Qwen2) no second EOS is appended, and the template's text after it
    (ChatML's newline) is kept, so the ids equal ``apply_chat_template``'s. A response that
    never emitted EOS (``add_eos`` false: cut at the token limit) loses the marker the
    template put there and what follows it."""
    eos_text = tokenizer.eos_token
    if eos_text and eos_text in completion:
        if not add_eos:
            completion = completion[:completion.rfind(eos_text)]
        return tokenizer(completion, add_special_tokens=False).input_ids
    ids = tokenizer(completion, add_special_tokens=False).input_ids
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def tokenize_pair(prompt: str, completion: str, tokenizer, max_length: int, add_eos: bool = True) -> Tokenized:
    """Prompt and completion tokenized separately (no merge across the boundary), EOS
    appended once (``completion_ids``).

    Truncation policy: when too long, the prompt loses tokens from its start (the end of a
    prompt is what the response answers); if the response alone is too long it loses its
    end. Either way ``truncated`` is set, and callers count it.
    """
    p_ids = prompt_ids(prompt, tokenizer)
    c_ids = completion_ids(completion, tokenizer, add_eos)
    truncated = False
    if len(p_ids) + len(c_ids) > max_length:
        truncated = True
        keep_p = max(1, max_length - len(c_ids))
        p_ids = p_ids[-keep_p:]
        c_ids = c_ids[: max_length - len(p_ids)]
    return Tokenized(p_ids + c_ids, len(p_ids), truncated)


def collate_sft(batch: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``response_mask`` (B, T).

    ``response_mask[b, t]`` is 1 where token t of row b belongs to the response (EOS
    included); the loss reads only those positions.
    """
    T = max(len(x.input_ids) for x in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    resp = torch.zeros((len(batch), T), dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x.input_ids)
        ids[i, :n] = torch.tensor(x.input_ids)
        attn[i, :n] = 1
        resp[i, x.n_prompt : n] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def tokenize_responses(prompt: str, completions: list[str], tokenizer, max_length: int,
                       add_eos: bool | list[bool] = True) -> list[Tokenized]:
    """Several completions of ONE prompt, all keeping the same prompt ids.

    The truncation policy of ``tokenize_pair`` applied jointly: when the prompt plus the
    longest completion is too long, the prompt loses tokens from its start for every
    completion alike (keeping at least one), then each completion too long for what is left
    loses its end. Without truncation this equals ``tokenize_pair`` per completion. (Cut
    separately, two completions of different lengths could end up answering different
    prompts, which a comparison must never do.) ``add_eos`` may be one flag per completion:
    a sampled response cut at the token limit never emitted EOS and must not be scored as
    if it had.
    """
    p_ids = prompt_ids(prompt, tokenizer)
    eos_flags = add_eos if isinstance(add_eos, (list, tuple)) else [add_eos] * len(completions)
    c_ids = [completion_ids(c, tokenizer, e) for c, e in zip(completions, eos_flags)]
    longest = max(len(c) for c in c_ids)
    if len(p_ids) + longest <= max_length:
        return [Tokenized(p_ids + c, len(p_ids), False) for c in c_ids]
    keep_p = max(1, max_length - longest)
    p_ids = p_ids[-keep_p:]
    room = max_length - len(p_ids)
    return [Tokenized(p_ids + c[:room], len(p_ids), True) for c in c_ids]


def tokenize_preference(row: dict, tokenizer, max_length: int) -> tuple[Tokenized, Tokenized]:
    """(chosen, rejected) for one preference row, rendered like SFT rows and truncated by the
    same policy (jointly, see ``tokenize_responses``): both share the same prompt ids.
    EOS is appended unless the row says the response never emitted one
    (``chosen_eos``/``rejected_eos`` false, as ``rlhflab collect`` writes for responses cut
    at the token limit)."""
    p_text, c_text = render(row["prompt"], row["chosen"], tokenizer)
    _, r_text = render(row["prompt"], row["rejected"], tokenizer)  # same prompt text
    eos = [row.get("chosen_eos", True) is not False, row.get("rejected_eos", True) is not False]
    chosen, rejected = tokenize_responses(p_text, [c_text, r_text], tokenizer, max_length, add_eos=eos)
    return chosen, rejected


def pairs_to_unpaired(rows: list[dict]) -> list[dict]:
    """Preference rows -> unpaired rows (KTO): each pair gives its chosen response as a
    desirable example (``label`` true) and its rejected one as undesirable (``label``
    false), in that order. ``chosen_eos``/``rejected_eos`` become ``completion_eos``; other
    fields (``votes``, ``margin``) are dropped."""
    out = []
    for r in rows:
        for side, label in (("chosen", True), ("rejected", False)):
            row = {"prompt": r["prompt"], "completion": r[side], "label": label}
            if f"{side}_eos" in r:
                row["completion_eos"] = r[f"{side}_eos"]
            out.append(row)
    return out
