"""A user's own code, fuzzed: reward functions and judges that misbehave.

Every way a ``py:`` judge or a ``--reward-fn`` function can go wrong (raise, return None, a
single number, a string, a dict, strings or None inside the list, nested lists, a
two-dimensional tensor, too few or too many values, NaN or infinity, values outside [0, 1]
for a judge, a generator that raises as it is read, the wrong arguments, a column the rows
lack, ``sys.exit`` with 0, 3 or a message, a failure on a later call only), crossed with
every place rlhflab calls user code: the reward of an online run (its rollouts and its
held-out evaluation), the judge of an online run's held-out evaluation, ``eval --judge``,
``bon --judge`` and ``rlaif --judge``. Each case runs ``rlhflab.cli.main`` in-process and
asserts exit code 2, no traceback, one error line that names the function (file:function)
and the call it failed on, and nothing left behind: no output directory and no hidden
sibling. A module whose import calls ``sys.exit`` is one line too, and Ctrl-C inside a
user's function stops the run as Ctrl-C does anywhere (exit 130), leaving nothing.

The tiny untrained policy and reward model are saved once per module; each case decodes a
handful of 4-token responses, so a case takes a fraction of a second.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from rlhflab.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["--set", "generation.max_new_tokens=4", "--set", "world.n_prompts=16", "--set", "world.n_eval=2"]
RL_FAST = [*FAST, "--set", "rl.steps=2", "--set", "rl.batch_size=8", "--set", "rl.samples_per_prompt=4",
           "--set", "rl.n_eval=2"]

# (name, body of the function, what the error line says, kinds it applies to). The body
# sees ``n``, the number of responses (a reward function) or pairs (a judge) of the call,
# and ``CALLS``, how many times the function was called before (a fresh count per run: the
# user's file is imported anew by each run).
MISBEHAVIOURS = [
    ("raises", "raise ZeroDivisionError('division by zero')", ["raised ZeroDivisionError", "division by zero"], "rj"),
    ("raises_key_error", "return [{}['score'] for _ in range(n)]", ["raised KeyError", "'score'"], "rj"),
    ("raises_on_call_2", "return [0.5] * n if CALLS == 0 else 1 / 0", ["call 2", "raised ZeroDivisionError"], "rj"),
    ("returns_none", "return None", ["returned None"], "rj"),
    ("returns_float", "return 0.5", ["returned a float (0.5)"], "rj"),
    ("returns_int", "return 1", ["returned an int (1)"], "rj"),
    ("returns_str", "return '0.5'", ["returned a str ('0.5')"], "rj"),
    ("returns_dict", "return {'score': [0.5] * n}", ["returned a dict"], "rj"),
    ("returns_strings", "return ['1'] * n", ["'1' (a str) at position 0"], "rj"),
    ("returns_none_inside", "return [0.5] * (n - 1) + [None]", ["None (a NoneType) at position"], "rj"),
    ("returns_nested", "return [[0.5]] * n", ["[0.5] (a list) at position 0"], "rj"),
    ("returns_2d_tensor", "import torch; return torch.zeros(n, 2)", ["a tensor of shape (", ", 2)"], "rj"),
    ("returns_too_few", "return [0.5] * (n - 1)", ["values for"], "rj"),
    ("returns_too_many", "return [0.5] * (n + 1)", ["values for"], "rj"),
    ("returns_empty", "return []", ["returned 0 ", "values for"], "rj"),
    ("returns_nan", "return [0.5] * (n - 1) + [float('nan')]", ["nan at position"], "rj"),
    ("returns_inf", "return [float('-inf')] + [0.5] * (n - 1)", ["-inf at position 0"], "rj"),
    ("returns_above_one", "return [1.5] * n", ["1.5 at position 0", "P(a better) in [0, 1]"], "j"),
    ("returns_bools", "return [True] * n", ["True (a bool) at position 0"], "j"),
    ("generator_raises", "return (1 / 0 for _ in range(n))", ["raised ZeroDivisionError"], "rj"),
    ("exits_0", "import sys; sys.exit(0)", ["called sys.exit(0)"], "rj"),
    ("exits_3", "import sys; sys.exit(3)", ["called sys.exit(3)"], "rj"),
    ("exits_message", "import sys; sys.exit('giving up')", ["called sys.exit('giving up')"], "rj"),
    ("raises_system_exit", "raise SystemExit", ["called sys.exit(None)"], "rj"),
]

# Functions whose signature does not fit the call: (name, reward def, judge def, needle).
SIGNATURES = [
    ("too_few_parameters", "def {name}(prompts):", "def {name}(prompts, completions_a):", "cannot be called with"),
    ("too_many_parameters", "def {name}(prompts, completions, extra, more):",
     "def {name}(prompts, completions_a, completions_b, extra):", "cannot be called with"),
    ("a_column_the_rows_lack", "def {name}(prompts, completions, answer):",
     "def {name}(prompts, completions_a, completions_b, *, answer):", "cannot be called with"),
]


def _user_file(path: Path) -> Path:
    """One file holding every misbehaving reward function (``r_<name>``) and judge
    (``j_<name>``), each counting its calls."""
    parts = []
    for name, body, _, kinds in MISBEHAVIOURS:
        for kind, params in (("r", "prompts, completions, **kwargs"), ("j", "prompts, completions_a, completions_b, **kw")):
            if kind not in kinds:
                continue
            fn = f"{kind}_{name}"
            parts.append(textwrap.dedent(f"""
                def {fn}({params}):
                    n = len(prompts)
                    CALLS = _CALLS.get({fn!r}, 0)
                    _CALLS[{fn!r}] = CALLS + 1
                    {body}
                """))
    for name, reward_def, judge_def, _ in SIGNATURES:
        parts.append(f"\n{reward_def.format(name='r_' + name)}\n    return [0.0] * len(prompts)\n")
        parts.append(f"\n{judge_def.format(name='j_' + name)}\n    return [0.5] * len(prompts)\n")
    parts.append("\ndef r_ok(prompts, completions, **kwargs):\n    return [0.5] * len(prompts)\n")
    parts.append("\ndef j_ok(prompts, completions_a, completions_b, **kwargs):\n    return [0.5] * len(prompts)\n")
    parts.append("\ndef j_interrupted(prompts, completions_a, completions_b):\n    raise KeyboardInterrupt\n")
    parts.append("\ndef r_interrupted(prompts, completions):\n    raise KeyboardInterrupt\n")
    path.write_text("_CALLS = {}\n" + "".join(parts))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny untrained policy and reward model, a prompt file, a pair file and the user's
    file: saved once for the module."""
    from rlhflab.config import load_config
    from rlhflab.models import create_causal_lm, save_pretrained_atomic
    from rlhflab.reward_model import RewardModel, create_reward_model
    from rlhflab.world import World

    base = tmp_path_factory.mktemp("user_code_assets")
    cfg = load_config(TINY)
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    policy = save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, base / "policy")
    model, rm_tok = create_reward_model(policy, seed=0)
    rm = RewardModel([model], rm_tok, max_length=48).save(base / "rm")
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["what is 3 plus 4 ?", "how do i bake bread ?", "tell me about cats ."]))
    pairs = base / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "the answer is 7 .", "rejected": "8 ."}) + "\n"
                             for p in ["what is 3 plus 4 ?", "what is 2 plus 5 ?", "compute 9 minus 2 ."]))
    user = _user_file(base / "user_fns.py")
    (base / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n\ndef f(prompts, completions):\n    return []\n")
    return {"base": base, "policy": policy, "rm": rm, "prompts": prompts, "pairs": pairs, "user": user}


# Where user code is called: (site, kind, argv with {fn} the function's spec, {out}, calls a run makes at least).
SITES = {
    "rl_reward": ("r", ["grpo", "--config", TINY, "--sft", "{policy}", "--reward-fn", "{fn}", "--out", "{out}",
                        *RL_FAST, "--set", "rl.eval_every=0"]),
    "rl_reward_on_rows": ("r", ["grpo", "--config", TINY, "--sft", "{policy}", "--reward-fn", "{fn}",
                                "--prompts", "{prompts}", "--out", "{out}", *RL_FAST, "--set", "rl.eval_every=0"]),
    "rl_eval_reward": ("r", ["rloo", "--config", TINY, "--sft", "{policy}", "--reward-fn", "{fn}",
                             "--eval-prompts", "{prompts}", "--out", "{out}", *RL_FAST, "--set", "rl.eval_every=1"]),
    "rl_eval_judge": ("j", ["grpo", "--config", TINY, "--sft", "{policy}", "--reward-fn", "length",
                            "--eval-prompts", "{prompts}", "--judge", "py:{fn}", "--out", "{out}", *RL_FAST,
                            "--set", "rl.eval_every=1"]),
    "eval_judge": ("j", ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--prompts",
                         "{prompts}", "--judge", "py:{fn}", "--out", "{out}", *FAST]),
    "bon_judge": ("j", ["bon", "--config", TINY, "--policy", "{policy}", "--rm", "{rm}", "--prompts", "{prompts}",
                        "--judge", "py:{fn}", "--n", "1,2", "--out", "{out}", *FAST]),
    "rlaif_judge": ("j", ["rlaif", "--config", TINY, "--pairs", "{pairs}", "--judge", "py:{fn}", "--out", "{out}"]),
}
# Sites that call the function once only (a failure "on call 2" cannot happen there).
ONE_CALL = {"eval_judge", "rlaif_judge"}
# Every misbehaviour runs at the cheapest site of each kind; the other sites, which reach the
# same two calls (``FunctionReward.__call__``, ``CallableJudge.compare``) by their own paths,
# run a spread of them: one of each way of failing (raise, exit, wrong shape, wrong item,
# non-finite, wrong arguments).
FULL = {"rl_reward", "rlaif_judge"}
SPREAD = {"raises_on_call_2", "raises", "exits_3", "returns_none", "returns_strings", "returns_too_few",
          "returns_nan", "too_few_parameters", "a_column_the_rows_lack"}


def _argv(site: str, fn: str, assets, out: Path) -> list[str]:
    _, argv = SITES[site]
    paths = {**{k: str(v) for k, v in assets.items()}, "fn": fn, "out": str(out)}
    return [a.format(**paths) for a in argv]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def expect_user_code_error(argv: list[str], capsys, tmp_path: Path, out: Path, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one error line holding every needle, and nothing
    left in ``tmp_path`` (no ``out``, no hidden sibling of it)."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc}, stderr: {err[-2000:]!r}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not out.exists() and _leftovers(tmp_path) == [], _leftovers(tmp_path)
    return lines[0]


def _cases():
    out = []
    for site, (kind, _) in SITES.items():
        for name, _, needles, kinds in MISBEHAVIOURS:
            if kind not in kinds or (name == "raises_on_call_2" and site in ONE_CALL) or \
                    (site not in FULL and name not in SPREAD):
                continue
            call = "call 2" if name == "raises_on_call_2" else "call 1"
            needles = [("rewards for" if kind == "r" else "values for") if n == "values for" else n for n in needles]
            out.append(pytest.param(site, f"{kind}_{name}", [call, *needles], id=f"{site}-{name}"))
        for name, *_, needle in SIGNATURES:
            if site not in FULL and name not in SPREAD:
                continue
            out.append(pytest.param(site, f"{kind}_{name}", [needle], id=f"{site}-{name}"))
    return out


@pytest.mark.parametrize("site,fn,needles", _cases())
def test_a_misbehaving_user_function_is_one_line_naming_it_and_its_call(site, fn, needles, assets, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    spec = f"{assets['user']}:{fn}"
    what = "reward function" if SITES[site][0] == "r" else "judge"
    line = expect_user_code_error(_argv(site, spec, assets, out), capsys, tmp_path, out, *needles)
    assert f"{what} " in line and f"user_fns.py:{fn}" in line


@pytest.mark.parametrize("site", list(SITES))
def test_the_controls_run(site, assets, tmp_path, capsys):
    """A function that behaves runs through every site (the cases fail for their flaw)."""
    kind = SITES[site][0]
    out = tmp_path / "out"
    assert main(_argv(site, f"{assets['user']}:{kind}_ok", assets, out)) == 0, capsys.readouterr().err[-2000:]
    assert out.is_dir()


@pytest.mark.parametrize("site", ["rl_reward", "eval_judge"])
def test_a_module_that_exits_on_import_is_one_line(site, assets, tmp_path, capsys):
    out = tmp_path / "out"
    expect_user_code_error(_argv(site, f"{assets['base'] / 'exits_on_import.py'}:f", assets, out), capsys,
                           tmp_path, out, "exits_on_import.py", "sys.exit(0)")


@pytest.mark.parametrize("site", ["rl_reward", "bon_judge"])
def test_ctrl_c_inside_a_user_function_stops_the_run_and_leaves_nothing(site, assets, tmp_path, capsys):
    out = tmp_path / "out"
    kind = SITES[site][0]
    assert main(_argv(site, f"{assets['user']}:{kind}_interrupted", assets, out)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_the_traceback_is_shown_on_request(assets, tmp_path, capsys, monkeypatch):
    """RLHFLAB_TRACEBACK=1: the user's traceback (their file, their line) comes first, the
    one line still last."""
    monkeypatch.setenv("RLHFLAB_TRACEBACK", "1")
    out = tmp_path / "out"
    assert main(_argv("eval_judge", f"{assets['user']}:j_raises", assets, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "user_fns.py" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].startswith("rlhflab eval: error: judge ")
    assert not out.exists()


def test_an_earlier_run_stays_when_the_function_fails_during_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv("bon_judge", f"{assets['user']}:j_ok", assets, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([*_argv("bon_judge", f"{assets['user']}:j_returns_none", assets, out), "--overwrite"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _leftovers(tmp_path) == ["out"]
