"""The commands of README.md and docs/*.md, read out of the Markdown and run as a user runs
them (docs/architecture.md, "How the docs are tested").

What a user copies is a fenced block tagged ``bash``, ``sh``, ``shell``, ``console`` or
``python``: every command in it runs, block after block, in one fresh working directory per
document (``configs/`` and the repository's files beside it, ``rlhflab`` on PATH). A block of
any language whose first line is a comment naming a file (``# my_rewards.py``) is that file:
it is written into the directory, not run. A Python block runs on its own (a fresh
namespace), as a user pastes it. In a ``console`` block a ``$ `` line is a command
and the lines under it its output, compared where the command ran at its documented size.
Everything else that names an ``rlhflab`` command (a backticked span in prose or a table, an
untagged or indented block: syntax with placeholders such as ``DIR``) is checked against the
command-line parser instead: the subcommand, every flag, every choice named, every config key.

Sizes are shrunk by the rules of :func:`shrink`, and nothing else in a command changes:
``configs/demo.yaml`` in the working directory is the tiny preset; a command that takes
``--config`` and names none gets ``--config configs/tiny.yaml``; a ``--set`` of a field the
tiny preset sizes takes the preset's value; and the prompt counts of ``SIZE_FLAGS`` are
left to the preset. Commands that cannot run here are in ``NOT_RUN``, each with its reason.

Speed: ``rlhflab`` commands run in this process (``rlhflab.cli.main``, the console script's
function, with the same arguments), and a command run earlier in the session with the same
arguments on the same inputs is not run again: its output is copied (:class:`Memo`). A run
directory a document reads and does not make (``runs/sft`` in docs/online-rl.md) is made
first by the command another document gives for it (:func:`producers`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"bash", "sh", "shell", "console", "python", "py"}
TINY = ROOT / "configs" / "tiny.yaml"

# Commands that do not run here, each with the reason; matched against the command as written.
# A pattern that no documented command matches any more is an error (test_not_run_is_current).
NOT_RUN: list[tuple[str, str]] = [
    (r"^make test\b", "the test suite itself"),
    (r"^(\w+=\S+ )*(make bench\b|(\.venv/bin/)?python bench/(?!run\.py --help))",
     "a benchmark against TRL: installs TRL into .venv-bench and runs for minutes (docs/benchmarks.md); "
     "its results are bench/results/*.json"),
    (r"^accelerate launch --multi_gpu --num_processes 2 ",
     "a 2-process launch on a fixed port (accelerate's 29500, which parallel test runs share): each "
     "stage's 2-process run is a test of its own, on a free port and against one process "
     "(tests/component/test_{sft,rm,dpo,rl}_training.py)"),
]

# Flags that set a size (prompts sampled or evaluated) and whose default is the preset's:
# dropped, so that the tiny preset's value applies.
SIZE_FLAGS: dict[str, tuple[str, ...]] = {
    "eval": ("--n",),
    "collect": ("-n", "--n-prompts"),
    "bon": ("--n-prompts",),
    "rs": ("--n-prompts",),
    "rlaif": ("-n", "--n-prompts"),
    "cai-sl": ("-n", "--n-prompts"),
}


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Every field the tiny preset sets but its learning rates: the sizes.
TINY_SIZES = {k: v for k, v in _flatten(yaml.safe_load(TINY.read_text())).items() if not k.endswith(".lr")}


# ---------------------------------------------------------------------------------------
# Reading the Markdown


@dataclass
class Block:
    doc: str          # path relative to the repository
    line: int         # line of the block's first content line
    lang: str
    lines: list[str]
    file: str | None  # a block whose first line is "# NAME.EXT" is that file


@dataclass
class Command:
    doc: str
    line: int
    text: str                          # as written (continuation lines and heredocs included)
    expected: list[str] | None = None  # a console block's output lines under the command
    kind: str = "shell"                # shell, python or file
    file: str | None = None
    lang: str = "bash"

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
FILE_COMMENT = re.compile(r"^(?:#|//)\s*([\w.-]+\.(?:py|jsonl|json|yaml|yml|txt))\s*$")


def read_doc(path: Path, text: str | None = None) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and its lines with every fenced block blanked
    (for the inline spans and indented blocks)."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    rel = str(path.relative_to(ROOT)) if path.is_absolute() else str(path)
    blocks, rest = [], list(lines)
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        body = [x[len(indent):] if x.startswith(indent) else x.lstrip() for x in lines[i + 1:j]]
        named = FILE_COMMENT.match(body[0]) if body else None
        blocks.append(Block(rel, i + 2, lang, body, named.group(1) if named else None))
        for k in range(i, min(j + 1, len(lines))):
            rest[k] = ""
        i = j + 1
    return blocks, rest


HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")


def commands(block: Block) -> list[Command]:
    """The commands of a runnable block, in order."""
    if block.file:
        return [Command(block.doc, block.line, "\n".join(block.lines[1:]) + "\n", kind="file", file=block.file)]
    if block.lang in ("python", "py"):
        return [Command(block.doc, block.line, "\n".join(block.lines) + "\n", kind="python")]
    out: list[Command] = []
    console = block.lang == "console"
    i = 0
    while i < len(block.lines):
        line = block.lines[i]
        start = i
        if console:
            if not line.startswith("$ "):
                if out and out[-1].expected is not None:
                    out[-1].expected.append(line)
                i += 1
                continue
            line = line[2:]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        parts = [line]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(block.lines):
            i += 1
            parts.append(block.lines[i][2:] if console and block.lines[i].startswith("> ") else block.lines[i])
        heredoc = HEREDOC.search(parts[-1])
        if heredoc:
            while i + 1 < len(block.lines):
                i += 1
                parts.append(block.lines[i])
                if block.lines[i].strip() == heredoc.group(1):
                    break
        out.append(Command(block.doc, block.line + start, "\n".join(parts), [] if console else None,
                           lang=block.lang))
        i += 1
    return out


def argv_of(text: str) -> list[str] | None:
    """The words of a simple command (no pipes, redirections, lists, substitutions or
    heredocs), comments dropped; None for anything a shell must run."""
    text = text.replace("\\\n", " ")
    if "\n" in text.strip() or "$" in text or "`" in text:
        return None
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        words = list(lex)
    except ValueError:
        return None
    if any(w and set(w) <= set("|&;<>()") for w in words):
        return None
    return words


def doc_commands(path: Path, text: str | None = None) -> list[Command]:
    """The runnable commands of a document, in order."""
    blocks, _ = read_doc(path, text)
    return [c for b in blocks if b.lang in RUNNABLE or b.file for c in commands(b)]


def docs_commands() -> dict[str, list[Command]]:
    """Every runnable command of every document, by document (README first), in order."""
    out = {str(p.relative_to(ROOT)): doc_commands(p) for p in DOCS}
    return {doc: cmds for doc, cmds in out.items() if cmds}


def not_run_reason(text: str) -> str | None:
    flat = " ".join(text.replace("\\\n", " ").split())
    return next((reason for pattern, reason in NOT_RUN if re.search(pattern, flat)), None)


def make_recipe(target: str) -> list[str] | None:
    """A Makefile target's recipe when every line of it is an ``rlhflab`` command."""
    text = (ROOT / "Makefile").read_text()
    m = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n?)+)", text, re.M)
    if not m:
        return None
    lines = [x.strip() for x in m.group(1).splitlines()]
    if not lines or not all(x.startswith("$(BIN)/rlhflab ") for x in lines):
        return None
    return [x.removeprefix("$(BIN)/") for x in lines]


# ---------------------------------------------------------------------------------------
# The parser, for the syntax checks and the size rules


_PARSER: argparse.ArgumentParser | None = None


def subparsers() -> dict[str, argparse.ArgumentParser]:
    global _PARSER
    if _PARSER is None:
        from rlhflab.cli import build_parser

        _PARSER = build_parser()
    action = next(a for a in _PARSER._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(sub: str) -> dict[str, argparse.Action]:
    return {s: a for a in subparsers()[sub]._actions for s in a.option_strings}


def _nested_options(sub: str, rest: list[str], problems: list[str]) -> tuple[dict[str, argparse.Action], list[str]]:
    """The options of ``sub``, or of its own subcommand (``rlhflab label serve ...``: the
    words ``serve``, or alternatives ``serve|load``, name it), and the words after it."""
    parser = subparsers()[sub]
    nested = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if nested is None or not rest or rest[0].startswith("-"):
        return options(sub), rest
    names = rest[0].strip("[]()").split("|")
    unknown = [n for n in names if n not in nested.choices and not is_placeholder(n)]
    problems.extend(f"{sub}: no command {n!r}" for n in unknown)
    chosen = [nested.choices[n] for n in names if n in nested.choices]
    opts = {s: a for p in (chosen or [parser]) for a in p._actions for s in a.option_strings}
    return opts, rest[1:]


PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")


def is_placeholder(word: str) -> bool:
    """DIR, F, N, RUN_DIR, F.jsonl, DIR/pairs.jsonl, rm.FIELD=VALUE: words a user replaces."""
    return bool(re.search(r"(^|[/.=:])[A-Z][A-Z0-9_]*($|[/.=:])", word)) or word in ("...", "…")


def config_keys() -> set[str]:
    from rlhflab.config import Config, to_dict

    return set(_flatten(to_dict(Config())))


def check_syntax(text: str, block: bool = False) -> list[str]:
    """What in an ``rlhflab ...`` syntax line does not exist: the subcommand, a flag, a
    choice named for a flag with choices, a config key of ``--set``. Placeholders, ``[...]``
    optional parts, ``a|b`` alternatives and ``...`` stay syntax. In a block (``block``), a
    line with none of them is a command that belongs in a runnable block."""
    text = " ".join(text.replace("\\|", "|").replace("\\\n", " ").split())
    parts = re.split(r";\s+|\s+&&\s+", text)  # "rlhflab world ...; rlhflab rlaif ..."
    if len(parts) > 1:
        return [p for part in parts for p in check_syntax(part, block)]
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    if not words or words[0] != "rlhflab":
        return []
    words = words[1:]
    if not words or words[0].startswith("-"):
        return []
    # the subcommand, or alternatives: "ppo|reinforce|rloo|grpo" or "ppo / reinforce / rloo"
    subs = words[0].split("|")
    rest = words[1:]
    while len(rest) >= 2 and rest[0] == "/":
        subs.append(rest[1])
        rest = rest[2:]
    if any(s.endswith(":") for s in subs):  # "rlhflab rm: error: ...": an error message
        return []
    known = subparsers()
    problems = [f"no command {s!r}" for s in subs if s not in known]
    if block and is_complete(text):
        problems.append("a whole command in an untagged block: tag the block ```bash, so that it runs")
    if problems:
        return problems
    keys = None
    for sub in subs:
        opts, args = _nested_options(sub, rest, problems)
        i = 0
        while i < len(args):
            word = args[i].lstrip("[(").rstrip("])")
            i += 1
            if not word.startswith("-") or word in ("-", "--"):
                continue
            flag, eq, value = word.partition("=")
            if flag not in opts:
                problems.append(f"{sub}: no option {flag}")
                continue
            action = opts[flag]
            if action.nargs == 0:
                continue
            if not eq:
                if i >= len(args) or args[i].lstrip("[(").startswith("-") or args[i] in ("|", "[", "]"):
                    continue
                value = args[i].lstrip("[(").rstrip(")]") if not flag == "--set" else args[i].lstrip("[(")
                i += 1
            if flag == "--set":
                key = value.partition("=")[0]
                if not is_placeholder(key):
                    keys = keys if keys is not None else config_keys()
                    if key not in keys and not any(k.startswith(key + ".") for k in keys):
                        problems.append(f"{sub}: no config field {key!r} (--set {value})")
            elif action.choices is not None:
                for alt in value.split("|"):
                    if alt and not is_placeholder(alt) and alt not in action.choices:
                        problems.append(f"{sub}: {flag} {alt!r} is not one of {', '.join(map(str, action.choices))}")
    return problems


def is_syntax(text: str) -> bool:
    """A shell line that is an ``rlhflab`` syntax line: an unquoted ``|`` (alternatives), a
    word opening an ``[optional part]``, ``...``, or a placeholder."""
    text = text.replace("\\\n", " ")
    lex = shlex.shlex(text, posix=True, punctuation_chars="|")
    lex.whitespace_split = True
    lex.commenters = "#"
    try:
        words = list(lex)
    except ValueError:
        return True
    return any(w == "|" or w.startswith("[") or w in ("...", "…") or PLACEHOLDER.fullmatch(w) for w in words)


def is_complete(text: str) -> bool:
    """A syntax line with nothing to fill in: no placeholder, optional part or alternative."""
    flat = text.replace("\\|", "|")
    return not any(ch in flat for ch in "[]|") and "..." not in flat and not any(
        is_placeholder(w) for w in flat.split())


def syntax_lines(path: Path, text: str | None = None) -> list[tuple[int, str, str]]:
    """(line, text, where) of every ``rlhflab ...`` that is not in a runnable block: backticked
    spans (prose, tables) and the lines of untagged, text or indented blocks."""
    blocks, rest = read_doc(path, text)
    out: list[tuple[int, str, str]] = []
    for b in blocks:
        if b.lang in RUNNABLE or b.file:
            continue
        for k, line in _joined(b.lines):
            if line.lstrip().startswith("rlhflab "):
                out.append((b.line + k, line.strip(), f"a ```{b.lang} block" if b.lang else "an untagged block"))
    text = "\n".join(rest)
    for m in re.finditer(r"`(rlhflab [^`]+?)`", text):
        out.append((text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()), "an inline span"))
    indented = [(k, x[4:]) for k, x in enumerate(rest) if x.startswith("    ") and x[4:].lstrip().startswith("rlhflab ")]
    for k, line in indented:
        tail = [line]
        j = k
        while tail[-1].rstrip().endswith("\\") and j + 1 < len(rest):
            j += 1
            tail.append(rest[j].strip())
        out.append((k + 1, " ".join(" ".join(tail).replace("\\", " ").split()), "an indented block"))
    return out


def _joined(lines: list[str]) -> list[tuple[int, str]]:
    out, i = [], 0
    while i < len(lines):
        start, parts = i, [lines[i]]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        out.append((start, " ".join(p.rstrip().rstrip("\\").strip() for p in parts)))
        i += 1
    return out


# ---------------------------------------------------------------------------------------
# Sizes


def shrink(argv: list[str]) -> tuple[list[str], list[str]]:
    """``rlhflab`` arguments (the subcommand first) at the tiny size, and what changed."""
    sub = argv[0] if argv else ""
    if sub not in subparsers():
        return argv, []
    out, notes, i = [sub], [], 1
    drop = SIZE_FLAGS.get(sub, ())
    while i < len(argv):
        word = argv[i]
        flag, eq, _ = word.partition("=")
        if flag in drop:
            notes.append(f"{word if eq else word + ' ' + argv[i + 1]} left to the preset")
            i += 1 if eq else 2
            continue
        if word == "--set" and i + 1 < len(argv):
            key, _, value = argv[i + 1].partition("=")
            if key in TINY_SIZES and str(yaml.safe_load(value)) != str(TINY_SIZES[key]):
                out += ["--set", f"{key}={TINY_SIZES[key]}"]
                notes.append(f"--set {key}={value} -> {TINY_SIZES[key]}")
                i += 2
                continue
        out.append(word)
        i += 1
    if "--config" in options(sub) and not any(w == "--config" or w.startswith("--config=") for w in out) \
            and "--resume" not in out:
        out += ["--config", "configs/tiny.yaml"]
        notes.append("--config configs/tiny.yaml")
    return out, notes


def rlhflab_argv(words: list[str]) -> tuple[int, list[str]] | None:
    """Where the rlhflab arguments start in a command's words: after ``rlhflab`` or after
    ``-m rlhflab.cli``."""
    for k, w in enumerate(words):
        if w == "rlhflab" and k == 0:
            return 1, words[1:]
        if w == "rlhflab.cli" and k and words[k - 1] == "-m":
            return k + 1, words[k + 1:]
    return None


# ---------------------------------------------------------------------------------------
# Running


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _out_of(argv: list[str]) -> str | None:
    for k, w in enumerate(argv):
        if w == "--out" and k + 1 < len(argv):
            return argv[k + 1]
        if w.startswith("--out="):
            return w[6:]
    return None


RUN_PATH = re.compile(r"(?<![\w./-])(runs/[\w.+-]+)")


class Memo:
    """Outputs of ``rlhflab`` commands run this session, by what determines them: the
    arguments (``--out`` aside, ``--overwrite`` dropped), the config file's content and,
    for each input path, how it was made (the key of the command that wrote it) or its
    content. The same key gives the same output: rlhflab's runs are seeded."""

    def __init__(self, store: Path) -> None:
        self.store = store  # a snapshot of each output, as its command left it
        self.outputs: dict[str, Path] = {}
        self.pending: dict[str, object] = {}  # key -> a callable that makes the output (a fixture)

    def keep(self, key: str, made: Path) -> None:
        """A copy of what a command made (a later command of its page may change it)."""
        snapshot = self.store / key / made.name
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if made.is_dir() else shutil.copy2)(made, snapshot)
        self.outputs[key] = snapshot

    def output(self, key: str) -> Path | None:
        if key not in self.outputs and key in self.pending:
            self.outputs[key] = Path(self.pending.pop(key)())
        return self.outputs.get(key)

    def key(self, argv: list[str], cwd: Path, made: dict[str, str]) -> str | None:
        words, i = [], 0
        while i < len(argv):
            w = argv[i]
            if w == "--overwrite":
                i += 1
                continue
            if w in ("--out", "--config") and i + 1 < len(argv):
                value = argv[i + 1]
                words += [w, "<out>" if w == "--out" else f"config:{_sha(cwd / value)}" if (cwd / value).is_file()
                          else value]
                i += 2
                continue
            for part in [w, *w.split(":")]:
                if part and not part.startswith("-") and (cwd / part).exists():
                    origin = _made_by(part, made)
                    if origin is not None:
                        w = w.replace(part, origin)
                    elif (cwd / part).is_file():
                        w = w.replace(part, f"file:{_sha(cwd / part)}")
                    else:
                        return None  # a directory of unknown making
                    break
            words.append(w)
            i += 1
        return hashlib.sha256(json.dumps(words).encode()).hexdigest()[:20]


def _made_by(path: str, made: dict[str, str]) -> str | None:
    norm = os.path.normpath(path)
    for out, key in made.items():
        if norm == out or norm.startswith(out + os.sep):
            return f"made:{key}" + norm[len(out):]
    return None


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    note: str = ""


@dataclass
class DocRun:
    """One document's working directory and what was made in it."""

    doc: str
    cwd: Path
    memo: Memo
    made: dict[str, str] = field(default_factory=dict)   # output path -> memo key
    log: list[str] = field(default_factory=list)         # what ran, how long, what was shrunk
    producers: dict[str, Command] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def fail(self, cmd: Command, what: str, res: Result | None = None) -> None:
        import pytest

        tail = ""
        if res is not None:
            tail = f"\nexit code {res.rc}\n--- stderr (tail) ---\n{res.stderr[-2500:]}"
            if res.stdout.strip():
                tail += f"\n--- stdout (tail) ---\n{res.stdout[-1200:]}"
        before = "\n".join(self.log[-12:])
        before = f"\n--- {self.doc}'s commands before it ---\n{before}" if before else ""
        text = "\n".join("    " + line for line in cmd.text.rstrip().splitlines())
        pytest.fail(f"{cmd.where()}: {what}\n{text}{tail}{before}", pytrace=False)

    # -- a command

    def run(self, cmd: Command, needed_by: Command | None = None) -> None:
        reason = not_run_reason(cmd.text) if cmd.kind == "shell" else None
        if reason:
            self.log.append(f"{cmd.where()}: not run: {cmd.text.splitlines()[0]} ({reason})")
            return
        if cmd.kind == "file":
            (self.cwd / cmd.file).write_text(cmd.text, encoding="utf-8")
            self.log.append(f"{cmd.where()}: wrote {cmd.file}")
            return
        words = argv_of(cmd.text) if cmd.kind == "shell" else None
        if words and words[0] == "make" and len(words) == 2:
            recipe = make_recipe(words[1])
            if recipe is None:
                self.fail(cmd, f"make {words[1]}: its recipe is not rlhflab commands; add the command to NOT_RUN "
                               "in tests/docs/doc_commands.py with the reason it cannot run here")
            for line in recipe:
                self.run(Command(cmd.doc, cmd.line, line, cmd.expected), needed_by=cmd)
            return
        if cmd.kind == "shell" and cmd.text.startswith("rlhflab ") and is_syntax(cmd.text):
            self.fail(cmd, "syntax, not a command ([optional] parts, a|b alternatives, ... or a PLACEHOLDER) in a "
                           f"```{cmd.lang} block: write a command a user can run, or put the syntax in an untagged "
                           "block, where it is checked against the parser")
        self.provide_inputs(cmd, words)
        t0 = time.perf_counter()
        located = rlhflab_argv(words) if words else None
        notes: list[str] = []
        if cmd.kind == "python":
            res = self.python(cmd)
        elif located and located[0] == 1:
            argv, notes = shrink(located[1])
            res = self.rlhflab(argv)
        else:
            text = cmd.text
            if located:
                argv, notes = shrink(located[1])
                text = shlex.join(words[:located[0]] + argv)
            res = self.shell(text)
        took = time.perf_counter() - t0
        self.log.append(f"{cmd.where()}: {took:5.1f} s {res.note}{cmd.text.splitlines()[0][:100]}"
                        + (f"  [{'; '.join(notes)}]" if notes else ""))
        if res.rc != 0:
            what = f"exited {res.rc}" + (f" (run to make an input of {needed_by.where()})" if needed_by else "")
            self.fail(cmd, what, res)
        if cmd.expected and not notes and res.note == "":
            self.compare(cmd, res.stdout)

    def compare(self, cmd: Command, stdout: str) -> None:
        want = [x.rstrip() for x in cmd.expected if x.strip()]
        got = [x.rstrip() for x in stdout.splitlines() if x.strip()]
        same = len(want) == len(got) and all(w == g or _json_close(w, g) for w, g in zip(want, got))
        if not same:
            self.fail(cmd, "prints other output than the document shows\n--- documented ---\n" + "\n".join(want)
                      + "\n--- printed ---\n" + "\n".join(got))

    # -- inputs from other documents

    def provide_inputs(self, cmd: Command, words: list[str] | None) -> None:
        """Make each ``runs/X`` the command reads that is not here and that another
        document's command writes, with that command (and its own inputs first)."""
        own = None
        if words:
            located = rlhflab_argv(words)
            own = _out_of(located[1]) if located else None
        for path in dict.fromkeys(RUN_PATH.findall(cmd.text)):
            if (self.cwd / path).exists() or (own and os.path.normpath(own) == path):
                continue
            producer = self.producers.get(path)
            if producer is None or producer.doc == self.doc:
                continue  # the command says what is missing itself, or makes it
            self.log.append(f"{cmd.where()}: {path} is made by {producer.where()}")
            self.run(producer, needed_by=cmd)

    # -- the three ways a command runs

    def rlhflab(self, argv: list[str]) -> Result:
        out = _out_of(argv)
        key = self.memo.key(argv, self.cwd, self.made) if out else None
        if key is not None and self.made.get(os.path.normpath(out)) == key:
            return Result(0, "", "", "(made above) ")
        fixture = key is not None and key in self.memo.pending
        src = self.memo.output(key) if key is not None and not (self.cwd / out).exists() else None
        if src is not None:
            dst = self.cwd / out
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
            self.made[os.path.normpath(out)] = key
            return Result(0, "", "", "(the main job of tests/conftest.py: copied) " if fixture
                          else "(same command, same inputs: copied) ")
        from rlhflab.cli import main

        stdout, stderr = io.StringIO(), io.StringIO()
        with _cwd(self.cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                rc = main(list(argv))
            except SystemExit as err:  # argparse's errors and --help
                rc = err.code if isinstance(err.code, int) else (0 if err.code is None else 2)
        if rc == 0 and key is not None:
            self.memo.keep(key, self.cwd / out)
            self.made[os.path.normpath(out)] = key
        return Result(rc, stdout.getvalue(), stderr.getvalue())

    def python(self, cmd: Command) -> Result:
        code = "\n" * (cmd.line - 1) + cmd.text  # tracebacks name the document's lines
        stdout, stderr = io.StringIO(), io.StringIO()
        with _cwd(self.cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                exec(compile(code, str(ROOT / cmd.doc), "exec"), {"__name__": "__main__"})
                rc = 0
            except SystemExit as err:
                rc = err.code if isinstance(err.code, int) else 0
            except Exception:  # noqa: BLE001 - the block's failure is the finding
                import traceback

                stderr.write(traceback.format_exc())
                rc = 1
        return Result(rc, stdout.getvalue(), stderr.getvalue())

    def shell(self, text: str) -> Result:
        proc = subprocess.run(["bash", "-c", text], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=600)
        return Result(proc.returncode, proc.stdout, proc.stderr)


def _json_close(a: str, b: str) -> bool:
    try:
        x, y = json.loads(a), json.loads(b)
    except ValueError:
        return False
    return _close(x, y)


def _close(x, y) -> bool:
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y))
    if isinstance(x, float) or isinstance(y, float):
        return isinstance(x, (int, float)) and isinstance(y, (int, float)) and abs(x - y) <= 1e-9 * max(1, abs(x))
    return x == y


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def producers(all_commands: dict[str, list[Command]]) -> dict[str, Command]:
    """``runs/X`` -> the first command of the docs (README first) whose ``--out`` it is;
    ``make`` targets count by their recipe."""
    out: dict[str, Command] = {}
    for cmds in all_commands.values():
        for cmd in cmds:
            if cmd.kind != "shell" or not_run_reason(cmd.text):
                continue
            words = argv_of(cmd.text) or []
            lines = [cmd.text]
            if len(words) == 2 and words[0] == "make":
                lines = make_recipe(words[1]) or []
            for line in lines:
                located = rlhflab_argv(argv_of(line) or [])
                target = _out_of(located[1]) if located else None
                if target and RUN_PATH.fullmatch(os.path.normpath(target)):
                    out.setdefault(os.path.normpath(target), cmd)
    return out


COPIED = ("tests", "bench")  # what a command may write into (a report beside a fixture): copies


def workdir(path: Path) -> Path:
    """A fresh working directory as a user's clone looks: the repository's files (linked;
    ``COPIED`` copied), ``configs/`` with ``demo.yaml`` the tiny preset, no ``runs/``."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name in ("configs", "runs", ".git") or entry.name.startswith((".venv-", ".pytest")):
            continue
        if entry.name in COPIED:
            shutil.copytree(entry, path / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (path / entry.name).symlink_to(entry)
    (path / "configs").mkdir()
    for entry in (ROOT / "configs").iterdir():
        (path / "configs" / entry.name).symlink_to(entry)
    (path / "configs" / "demo.yaml").unlink()
    shutil.copy(TINY, path / "configs" / "demo.yaml")
    return path


def shell_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_doc(doc: str, cmds: list[Command], cwd: Path, memo: Memo, makers: dict[str, Command]) -> DocRun:
    run = DocRun(doc, cwd, memo, producers=makers, env=shell_env())
    gc.collect()
    gc.freeze()  # the commands' own gc.collect() calls then skip everything loaded before them
    try:
        for cmd in cmds:
            run.run(cmd)
    finally:
        gc.unfreeze()
    return run
