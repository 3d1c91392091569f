"""Every command of README.md and docs/*.md, as a user copies it: the runnable blocks run, in
order, one working directory per document, at the tiny size; the syntax lines are checked
against the parser (``doc_commands.py`` says how, docs/architecture.md why).

A failure names the document, the line, the command, its exit code and its stderr's tail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.outcomes import Failed

from tests.docs.doc_commands import (
    DOCS,
    NOT_RUN,
    ROOT,
    TINY,
    Block,
    Memo,
    check_syntax,
    commands,
    doc_commands,
    docs_commands,
    not_run_reason,
    producers,
    run_doc,
    shrink,
    syntax_lines,
    workdir,
)

ALL = docs_commands()
MAKERS = producers(ALL)


@pytest.fixture(scope="session")
def memo(tmp_path_factory) -> Memo:
    return Memo(tmp_path_factory.mktemp("doc_outputs"))


def _offer_main_job(memo: Memo, request) -> None:
    """``rlhflab run --config configs/demo.yaml --out runs/demo`` (``make demo``) with
    demo.yaml the tiny preset is the main job the smoke tests run on ``configs/tiny.yaml``:
    its directory is taken from that session fixture, if a document needs it."""
    key = memo.key(["run", "--config", str(TINY), "--out", "runs/demo"], ROOT, {})
    if key not in memo.outputs:
        memo.pending[key] = lambda: request.getfixturevalue("main_job_dir")


@pytest.mark.slow
@pytest.mark.parametrize("doc", list(ALL))
def test_documented_commands_run(doc, memo, tmp_path, request):
    _offer_main_job(memo, request)
    run = run_doc(doc, ALL[doc], workdir(tmp_path / "work"), memo, MAKERS)
    print("\n".join(run.log))


@pytest.mark.parametrize("doc", [str(p.relative_to(ROOT)) for p in DOCS])
def test_documented_syntax_matches_the_parser(doc):
    problems = [f"{doc}:{line} ({where}): `{text}`: {problem}" for line, text, where in syntax_lines(ROOT / doc)
                for problem in check_syntax(text, block=where != "an inline span")]
    assert not problems, "\n".join(problems)


def test_every_command_not_run_is_still_documented():
    """NOT_RUN stays the short list of what the docs hold: a pattern that matches no
    documented command any more is removed."""
    texts = [c.text for cmds in ALL.values() for c in cmds if c.kind == "shell"]
    for pattern, reason in NOT_RUN:
        assert any(not_run_reason(t) == reason for t in texts), pattern


# ---------------------------------------------------------------------------------------
# The harness itself: it fails where a user would, and says where


def test_a_failing_command_names_the_document_line_exit_code_and_stderr(tmp_path, memo):
    doc = "docs/example.md\n\n```bash\nrlhflab optimal --pi-ref 0.6,0.4 --reward 1,0 --beta 0.5\nrlhflab diagnose runs/nothing\n```\n"
    cmds = doc_commands(Path("docs/example.md"), doc)
    with pytest.raises(Failed) as err:
        run_doc("docs/example.md", cmds, workdir(tmp_path / "work"), memo, {})
    msg = str(err.value)
    assert msg.startswith("docs/example.md:5: exited 2\n    rlhflab diagnose runs/nothing")
    assert "exit code 2" in msg and "runs/nothing" in msg.split("stderr (tail)")[1]


def test_a_console_block_prints_what_it_shows(tmp_path, memo):
    block = Block("docs/example.md", 3, "console", ["$ rlhflab optimal --pi-ref 0.5,0.5 --reward 1,0 --beta inf",
                                                     "nothing like this"], None)
    with pytest.raises(Failed, match="prints other output than the document shows"):
        run_doc("docs/example.md", commands(block), workdir(tmp_path / "work"), memo, {})


def test_syntax_in_a_bash_block_is_refused(tmp_path, memo):
    block = Block("docs/example.md", 3, "bash", ["rlhflab dpo --loss dpo|ipo --sft runs/sft --out runs/dpo"], None)
    with pytest.raises(Failed, match="syntax, not a command"):
        run_doc("docs/example.md", commands(block), workdir(tmp_path / "work"), memo, {})


def test_syntax_lines_are_checked_against_the_parser():
    assert check_syntax("rlhflab eval --policy DIR --base DIR [--rm DIR] --out DIR") == []
    assert check_syntax("rlhflab dpo --loss dpo\\|cdpo\\|ipo --sft DIR --out DIR") == []
    assert check_syntax("rlhflab ppo / reinforce / rloo / grpo") == []
    assert check_syntax("rlhflab dpo --loss dpo|nope --sft DIR") == ["dpo: --loss 'nope' is not one of "
                                                                     + ", ".join(_choices("dpo", "--loss"))]
    assert check_syntax("rlhflab eval --policy DIR --no-such-flag") == ["eval: no option --no-such-flag"]
    assert check_syntax("rlhflab evaluate --policy DIR") == ["no command 'evaluate'"]
    # a command's own subcommands: rlhflab label serve|load|...
    assert check_syntax("rlhflab label serve --db URL [--host 127.0.0.1] [--port 8000]") == []
    assert check_syntax("rlhflab label serve --no-such URL") == ["label: no option --no-such"]
    assert check_syntax("rlhflab label nope --db URL") == ["label: no command 'nope'", "label: no option --db"]
    assert check_syntax("rlhflab run --set world.rater.no_such=1 --out DIR") == [
        "run: no config field 'world.rater.no_such' (--set world.rater.no_such=1)"]
    assert check_syntax("rlhflab sft --set sft.FIELD=VALUE") == []
    assert check_syntax("rlhflab optimal --pi-ref 0.6,0.4 --reward 1,0 --beta 0.5", block=True) == [
        "a whole command in an untagged block: tag the block ```bash, so that it runs"]


def test_sizes_shrink_by_the_documented_rules_only():
    argv, notes = shrink(["ppo", "--config", "configs/demo.yaml", "--set", "rl.beta=0.2", "--set", "rl.steps=60",
                          "--set", "rl.lr=3e-5", "--out", "runs/ppo"])
    assert argv == ["ppo", "--config", "configs/demo.yaml", "--set", "rl.beta=0.2", "--set", "rl.steps=4",
                    "--set", "rl.lr=3e-5", "--out", "runs/ppo"] and notes == ["--set rl.steps=60 -> 4"]
    argv, _ = shrink(["eval", "--policy", "p", "--base", "b", "--n", "100", "--out", "e"])
    assert argv == ["eval", "--policy", "p", "--base", "b", "--out", "e", "--config", "configs/tiny.yaml"]
    assert shrink(["optimal", "--pi-ref", "0.6,0.4", "--reward", "1,0", "--beta", "0.5"])[1] == []


def _choices(sub, flag):
    from tests.docs.doc_commands import options

    return [str(c) for c in options(sub)[flag].choices]
