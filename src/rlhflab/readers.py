"""Rows from a data file or directory, whatever its container, and TRL's row shapes turned
into rlhflab's.

Containers (``read_records``):

| input                                   | read as                                             |
|-----------------------------------------|-----------------------------------------------------|
| ``*.jsonl`` (or any file of objects, one per line) | one JSON object per line                 |
| a file whose first character is ``[``   | a JSON array of objects (errors name each object's line) |
| ``*.parquet``                           | Parquet (needs ``pyarrow``)                         |
| ``*.arrow``, ``*.feather``              | an Arrow IPC stream or file (needs ``pyarrow``)     |
| a directory written by ``datasets``' ``save_to_disk`` | its Arrow shards in order (needs ``pyarrow``); a ``DatasetDict`` directory with one split is that split, with several it asks for ``DIR/SPLIT`` |

Row shapes (``normalize_row``), as TRL's dataset formats allow them (standard = strings,
conversational = lists of ``{"role", "content"}`` messages):

| format     | rlhflab's fields                | also accepted                                         |
|------------|---------------------------------|-------------------------------------------------------|
| sft        | ``prompt``, ``completion``      | ``messages``: the prompt is every message before the last assistant turn, the completion that turn |
| preference | ``prompt``, ``chosen``, ``rejected`` | implicit prompt: ``chosen``/``rejected`` hold the whole dialogue; the shared prefix is the prompt (TRL's ``extract_prompt``) |
| unpaired   | ``prompt``, ``completion``, ``label`` | (KTO's unpaired rows are already this shape)      |
| prompt     | ``prompt``                      | ``messages``: the conversation up to (not including) a final assistant turn |

What a reshaping did is counted (``Reshaped``) so that a loader can say so; a row that
cannot be reshaped is an ``InputError`` naming the file, the line (or row) and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhflab.errors import InputError

# Turn markers after which an implicit prompt ends: the shared prefix of two dialogues is cut
# just after the last one it contains, so that a reply's first characters shared by both
# answers ("I think" / "I don't") stay in the answers. Anthropic HH, ChatML, Llama 2.
ASSISTANT_MARKERS = ("\n\nAssistant:", "<|im_start|>assistant\n", "[/INST]")


# ---------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------

SURROGATES = re.compile("[\ud800-\udfff]")


def bad_value(obj: Any) -> str | None:
    """What JSON accepts that no row may hold: a non-finite number or a lone surrogate."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else f"not a finite number ({obj!r}; JSON has no NaN or Infinity)"
    if isinstance(obj, str):
        return "holds an unpaired surrogate (\\ud800-\\udfff), not valid Unicode" if SURROGATES.search(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = bad_value(k) or bad_value(v)
            if bad:
                return bad
    elif isinstance(obj, list):
        for v in obj:
            bad = bad_value(v)
            if bad:
                return bad
    return None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line; errors name file and line."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except OSError as err:
        raise InputError(f"cannot open: {err.strerror or err}", file=str(path)) from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("not valid UTF-8", file=str(path), line=lineno) from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError(f"not valid JSON ({err.msg})", file=str(path), line=lineno) from None
            if not isinstance(obj, dict):
                raise InputError("expected a JSON object", file=str(path), line=lineno)
            for key, value in obj.items():
                bad = bad_value(key) or bad_value(value)
                if bad:
                    field = key if not SURROGATES.search(key) else ascii(key)[1:-1]
                    raise InputError(bad, file=str(path), line=lineno, field=field)
            yield lineno, obj




def _needs_pyarrow(path: Path, what: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError(f"reading {what} needs pyarrow (pip install 'rlhflab[formats]' or pip install pyarrow)",
                         file=str(path)) from None


def _arrow_rows(tables, path: Path) -> Iterator[tuple[dict, dict]]:
    n = 0
    for table in tables:
        for row in table.to_pylist():
            n += 1
            yield {"file": str(path), "line": n, "unit": "row"}, row


def _arrow_batches(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
            return
        yield from reader


def _shard_batches(files: list[Path]):
    """The record batches of a saved dataset's shards, in order; a shard that is not a
    readable Arrow stream (empty, truncated, another file) is an InputError naming it."""
    import pyarrow as pa

    for f in files:
        try:
            batches = list(_arrow_batches(f))
        except (pa.ArrowInvalid, OSError) as err:
            said = str(err).strip().splitlines()
            raise InputError(f"not a readable Arrow shard ({said[0] if said else type(err).__name__})",
                             file=str(f)) from None
        yield from batches


def _dataset_dir(path: Path) -> list[Path]:
    """The Arrow shards of a ``save_to_disk`` directory, in order."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError, TypeError):
            raise InputError("not a readable dataset_dict.json", file=str(path / "dataset_dict.json")) from None
        if len(splits) != 1:
            raise InputError(f"a DatasetDict with splits {', '.join(splits)}: give one, e.g. {path}/{splits[0]}",
                             file=str(path))
        path = path / splits[0]
    state = path / "state.json"
    if not state.is_file():
        raise InputError("a directory that is not a saved dataset (no state.json or dataset_dict.json); "
                         "expected a file (.jsonl, .json, .parquet, .arrow) or a `datasets` save_to_disk directory",
                         file=str(path))
    try:
        files = [path / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise InputError("not a readable state.json (no _data_files)", file=str(state)) from None
    for f in files:
        if not f.is_file():
            raise InputError("a shard listed in state.json is missing", file=str(f))
    return files


def _json_array(path: Path, text: str) -> Iterator[tuple[dict, Any]]:
    """The elements of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)

    def skip(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip(i)
    if i < n and text[i] == "]":
        return
    while True:
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON ({err.msg})", file=str(path), line=text.count("\n", 0, err.pos) + 1
                             ) from None
        yield {"file": str(path), "line": line}, obj
        i = skip(i)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip(i + 1) != n:
                raise InputError("text after the closing ] of the JSON array", file=str(path),
                                 line=text.count("\n", 0, i) + 1)
            return
        raise InputError("expected , or ] between the array's objects", file=str(path),
                         line=text.count("\n", 0, min(i, n)) + 1)


def _first_char(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(4096)
        while head and not head.lstrip():
            head = fh.read(4096)
    return head.lstrip()[:1].decode("latin-1")


def read_records(path: str | Path) -> Iterator[tuple[dict, Any]]:
    """Yield ``(where, object)`` for every row of ``path``: ``where`` holds the file and the
    line (JSON) or row number (``"unit": "row"``, Parquet / Arrow / datasets), as
    ``InputError`` takes them. JSON Lines rows are read by ``iter_jsonl``
    (which checks each value); the other containers yield their objects for the same checks."""
    path = Path(path)
    if path.is_dir():
        _needs_pyarrow(path, "a datasets directory")
        yield from _arrow_rows(_shard_batches(_dataset_dir(path)), path)
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        _needs_pyarrow(path, "Parquet")
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(str(path))
        except Exception as err:  # pyarrow raises its own error types for a bad file
            raise InputError(f"not a readable Parquet file ({err})", file=str(path)) from None
        yield from _arrow_rows(pf.iter_batches(), path)
        return
    if suffix in (".arrow", ".feather", ".ipc"):
        _needs_pyarrow(path, "Arrow")
        import pyarrow as pa

        try:
            batches = list(_arrow_batches(path))
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(f"not a readable Arrow file ({err})", file=str(path)) from None
        yield from _arrow_rows(batches, path)
        return
    try:
        first = _first_char(path)
    except OSError as err:
        raise InputError(f"cannot open: {err.strerror or err}", file=str(path)) from None
    if first == "[":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("not valid UTF-8", file=str(path)) from None
        yield from _json_array(path, text)
        return
    for lineno, obj in iter_jsonl(path):
        yield {"file": str(path), "line": lineno}, obj


# ---------------------------------------------------------------------------------------
# Row shapes
# ---------------------------------------------------------------------------------------


class Reshaped(Counter):
    """How many rows each reshaping touched: ``{"messages -> prompt/completion": 12, ...}``."""

    def describe(self) -> str:
        return "; ".join(f"{n} row(s) {what}" for what, n in sorted(self.items()))


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _last_assistant(messages: list) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    return None


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two whole dialogues that share their start.

    Messages: the prompt is the longest common prefix of the two message lists. Strings: the
    longest common prefix of the two texts, then cut just after the last assistant turn
    marker it contains (``ASSISTANT_MARKERS``), or else as TRL's ``extract_prompt`` does (a
    space just before the split point goes with the answers). Raises ``ValueError`` when
    nothing is shared or one dialogue is the other's prefix."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str):
        cut = max((chosen.rfind(m, 0, idx) + len(m) for m in ASSISTANT_MARKERS if chosen.rfind(m, 0, idx) >= 0),
                  default=None)
        if cut is not None:
            idx = cut  # the answers keep their leading space, as TRL's split gives them
        elif 0 < idx < n and chosen[idx - 1] == " ":
            idx -= 1
    if idx == 0:
        raise ValueError("chosen and rejected share no prompt")
    if idx >= len(chosen) or idx >= len(rejected):
        raise ValueError("one of chosen and rejected is the start of the other: no answer left")
    return chosen[:idx], chosen[idx:], rejected[idx:]


def normalize_row(row: dict, fmt: str, where: dict, reshaped: Reshaped | None = None) -> dict:
    """``row`` in rlhflab's shape for ``fmt`` (a new dict; other columns kept), or ``row``
    itself when it already is. Errors name the file, line and field."""
    if fmt in ("sft", "prompt") and "prompt" not in row and "messages" in row:
        messages = row["messages"]
        if not _is_messages(messages) or not messages:
            raise InputError("expected a non-empty list of {role, content} messages", field="messages", **where)
        k = _last_assistant(messages)
        rest = {key: v for key, v in row.items() if key != "messages"}
        if fmt == "prompt":
            prompt = messages[:k] if k is not None and k == len(messages) - 1 else messages
            if not prompt:
                raise InputError("only an assistant turn: no prompt", field="messages", **where)
            if reshaped is not None:
                reshaped["messages -> prompt"] += 1
            return {**rest, "prompt": list(prompt)}
        if k is None:
            raise InputError("no assistant message to learn from", field="messages", **where)
        if k == 0:
            raise InputError("the first message is the assistant's: no prompt before it", field="messages", **where)
        if reshaped is not None:
            reshaped["messages -> prompt/completion"] += 1
        return {**rest, "prompt": messages[:k], "completion": messages[k:]}
    if fmt == "preference" and "prompt" not in row and "chosen" in row and "rejected" in row:
        chosen, rejected = row["chosen"], row["rejected"]
        if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
            raise InputError("chosen and rejected must both be text or both be message lists to share a prompt",
                             field="chosen", **where)
        try:
            prompt, c, r = extract_prompt(chosen, rejected)
        except ValueError as err:
            raise InputError(f"missing, and no implicit prompt: {err}", field="prompt", **where) from None
        if reshaped is not None:
            reshaped["implicit prompt extracted"] += 1
        return {**row, "prompt": prompt, "chosen": c, "rejected": r}
    return row
