"""Bad inputs, round two: what used to crash deep inside or be accepted in silence.

- Data smaller than one batch, for every stage that trains on a user's rows (SFT, reward
  model, DPO, KTO): one line naming ``<stage>.batch_size``, nothing written.
- A prompt longer than the model's positions, in every command that samples a user's
  prompts (``eval``, ``bon``, ``sample``, an online run, SFT's samples after training): it
  loses its start and the cut is said on stderr; ``generation.max_new_tokens`` leaving no room
  for any prompt is one line before anything is trained or sampled.
- A ``datasets`` directory whose Arrow shard is cut short anywhere: one line naming the shard.
- A reward model given where a policy goes, in every command that takes one.
- ``rlhflab bandit``: every option and flag checked against its domain; an unknown KL
  estimator, negative steps; numbers written as YAML 1.1 would read them as strings.
- ``--set`` and preset numbers in every way a user writes them (``1e-3``, ``017``, ``0x10``),
  and the forms that are not numbers, refused naming the field.
- ``diagnose`` on a number too large for a float: one line naming the key.
- Work that cannot fit in memory (``bon --n 100000000``) refused with the numbers before any
  sampling; long sampling shows progress.

Each bad case runs ``rlhflab.cli.main`` in-process: exit code 2, no traceback, one error line
naming what is wrong, and nothing written. The tiny models are saved once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhflab.cli import main
from rlhflab.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["--set", "generation.max_new_tokens=4", "--set", "world.n_eval=2", "--set", "world.n_prompts=16"]
LONG_PROMPT = " ".join(["what is 3 plus 4 ?"] * 20)  # about 100 tokens: past the tiny model's 64 positions


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from rlhflab.config import load_config
    from rlhflab.models import create_causal_lm, save_pretrained_atomic
    from rlhflab.reward_model import RewardModel, create_reward_model
    from rlhflab.world import World

    base = tmp_path_factory.mktemp("round2_assets")
    cfg = load_config(TINY)
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    policy = save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, base / "policy")
    model, rm_tok = create_reward_model(policy, seed=0)
    rm = RewardModel([model], rm_tok, max_length=48).save(base / "rm")
    # a reward model as a plain HF sequence-classification checkpoint (no reward_model.json)
    plain_rm = base / "plain_rm"
    model.save_pretrained(str(plain_rm), safe_serialization=True)
    rm_tok.save_pretrained(str(plain_rm))
    files = {}
    rows = {"sft": {"prompt": "what is 3 plus 4 ?", "completion": "the answer is 7 ."},
            "pref": {"prompt": "what is 3 plus 4 ?", "chosen": "the answer is 7 .", "rejected": "8 ."},
            "prompts": {"prompt": "what is 3 plus 4 ?"}}
    for name, row in rows.items():
        files[name] = base / f"{name}.jsonl"
        files[name].write_text(json.dumps(row) + "\n" + json.dumps({**row, "prompt": "compute 9 minus 2 ."}) + "\n")
    long_prompts = base / "long_prompts.jsonl"
    long_prompts.write_text(json.dumps({"prompt": LONG_PROMPT}) + "\n" + json.dumps({"prompt": "hi ."}) + "\n")
    long_sft = base / "long_sft.jsonl"
    long_sft.write_text("".join(json.dumps({"prompt": LONG_PROMPT if i % 2 == 0 else f"what is {i} plus 1 ?",
                                            "completion": "the answer is 7 ."}) + "\n" for i in range(48)))
    return {"base": base, "policy": policy, "rm": rm, "plain_rm": plain_rm, **files, "long_prompts": long_prompts,
            "long_sft": long_sft}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def expect_one_line(argv: list[str], capsys, tmp_path: Path, *needles: str, keep: tuple[str, ...] = ()) -> str:
    """Exit code 2, no traceback, one error line holding every needle, and nothing new in
    ``tmp_path`` beyond ``keep`` (the case's own inputs)."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc}, stderr: {err[-2000:]!r}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert _leftovers(tmp_path) == sorted(keep), _leftovers(tmp_path)
    return lines[0]


def _fill(argv: list[str], assets, out: Path, **more) -> list[str]:
    paths = {**{k: str(v) for k, v in assets.items()}, "out": str(out), **{k: str(v) for k, v in more.items()}}
    return [a.format(**paths) for a in argv]


# ----------------------------------------------------------------------------- less than one batch

SMALL_DATA = {
    "sft": (["sft", "--config", TINY, "--data", "{sft}", "--eval-data", "{sft}", "--out", "{out}"], "sft.batch_size",
            "fewer than one batch"),
    "sft_world": (["sft", "--config", TINY, "--out", "{out}", "--set", "world.n_sft=20"], "sft.batch_size",
                  "fewer than one batch"),
    "rm": (["rm", "--config", TINY, "--sft", "{policy}", "--data", "{pref}", "--eval-data", "{pref}",
            "--out", "{out}"], "rm.batch_size", "fewer than one batch"),
    "dpo": (["dpo", "--config", TINY, "--sft", "{policy}", "--data", "{pref}", "--out", "{out}"], "dpo.batch_size",
            "fewer than one batch"),
    "kto": (["dpo", "--loss", "kto", "--unpaired-from-pairs", "--config", TINY, "--sft", "{policy}", "--data",
             "{pref}", "--out", "{out}"], "dpo.batch_size", "fewer than one batch"),
    "sft_micro_split": (["sft", "--config", TINY, "--out", "{out}", "--set", "sft.micro_batch_size=5"],
                        "sft.batch_size", "must split into 1 processes x micro-batches of 5"),
}


@pytest.mark.parametrize("stage", list(SMALL_DATA))
def test_less_than_one_batch_is_one_line_naming_the_batch_size(stage, assets, tmp_path, capsys):
    argv, field, said = SMALL_DATA[stage]
    expect_one_line(_fill(argv, assets, tmp_path / "out"), capsys, tmp_path, field, said)


# ----------------------------------------------------------------------------- prompts past the positions

LONG = {
    "eval": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--prompts", "{long_prompts}",
             "--rm", "{rm}", "--out", "{out}", *FAST],
    "bon": ["bon", "--config", TINY, "--policy", "{policy}", "--rm", "{rm}", "--prompts", "{long_prompts}",
            "--n", "1,2", "--out", "{out}", *FAST],
    "eval_lm_judge": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--prompts",
                      "{very_long_prompts}", "--judge", "lm:{lm_judge}", "--out", "{out}", *FAST],
    "sample": ["sample", "--config", TINY, "--policy", "{policy}", "--prompts", "{long_prompts}", *FAST],
    "grpo": ["grpo", "--config", TINY, "--sft", "{policy}", "--reward-fn", "length", "--prompts", "{long_prompts}",
             "--out", "{out}", *FAST, "--set", "rl.steps=1", "--set", "rl.batch_size=4", "--set",
             "rl.samples_per_prompt=2", "--set", "rl.eval_every=0"],
    "sft": ["sft", "--config", TINY, "--data", "{long_sft}", "--out", "{out}", *FAST, "--set", "sft.max_steps=1",
            "--set", "sft.batch_size=8", "--set", "sft.eval_every=100", "--set", "sft.n_show=4"],
}


@pytest.fixture(scope="module")
def lm_judge(assets):
    """A tiny GPT-2 (512 positions) with a BPE tokenizer that has tokens for 'A)' and 'B)',
    and prompts whose judge's question runs past its positions."""
    from rlhflab.models import save_pretrained_atomic
    from tests.user_models import bpe_tokenizer, tiny_causal_lm

    tok = bpe_tokenizer()
    judge = save_pretrained_atomic(tiny_causal_lm(tok, "gpt2"), tok, assets["base"] / "lm_judge")
    prompts = assets["base"] / "very_long_prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": " ".join(["what is 3 plus 4 ?"] * 200)}) + "\n")
    return {"lm_judge": judge, "very_long_prompts": prompts}


@pytest.mark.parametrize("command", list(LONG))
def test_a_prompt_past_the_positions_loses_its_start_and_says_so(command, assets, tmp_path, capsys, monkeypatch,
                                                                  request):
    import rlhflab.generation as generation

    monkeypatch.setattr(generation, "_CUT_REPORTED", set())  # said once per process: a fresh process here
    out = tmp_path / "out"
    more = request.getfixturevalue("lm_judge") if command == "eval_lm_judge" else {}
    rc = main(_fill(LONG[command], assets, out, **more))
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert "prompts are longer than the 60 tokens the model's positions leave beside 4 new tokens" in err
    assert "its start is cut" in err
    if command == "eval_lm_judge":  # and the judge's question, prompt and two answers too
        assert "the 510 tokens the model's positions leave beside 2 new tokens" in err


ROOMLESS = {
    "sft": ["sft", "--config", TINY, "--out", "{out}", "--set", "sft.max_steps=1"],
    "sft_user_data": ["sft", "--config", TINY, "--data", "{long_sft}", "--out", "{out}", "--set", "sft.max_steps=1",
                      "--set", "sft.batch_size=8"],
    "eval": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--prompts", "{prompts}",
             "--out", "{out}"],
    "eval_world": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--out", "{out}"],
    "bon": ["bon", "--config", TINY, "--policy", "{policy}", "--rm", "{rm}", "--n", "1,2", "--out", "{out}"],
    "sample": ["sample", "--config", TINY, "--policy", "{policy}", "-n", "2"],
    "ppo": ["ppo", "--config", TINY, "--sft", "{policy}", "--reward-fn", "length", "--out", "{out}",
            "--set", "rl.steps=1", "--set", "rl.batch_size=4"],
    "dpo": ["dpo", "--config", TINY, "--sft", "{policy}", "--out", "{out}", "--set", "dpo.max_steps=1"],
}


@pytest.mark.parametrize("command,new_tokens", [pytest.param(c, n, id=f"{c}-{n}") for c in ROOMLESS
                                                for n in ((64, 1000) if c == "sft" else (64,))])
def test_no_room_for_a_prompt_is_one_line_before_any_training(command, new_tokens, assets, tmp_path, capsys,
                                                             monkeypatch):
    import rlhflab.algos.sft as sft

    def trained(*args, **kwargs):
        raise AssertionError("trained before checking the lengths")

    monkeypatch.setattr(sft, "train_sft", trained)
    argv = [*_fill(ROOMLESS[command], assets, tmp_path / "out"), "--set", f"generation.max_new_tokens={new_tokens}"]
    expect_one_line(argv, capsys, tmp_path, "field 'generation.max_new_tokens'",
                    f"{new_tokens} new tokens leave no room for a prompt in the model's 64 positions")


# ----------------------------------------------------------------------------- datasets directory, truncated


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    d = tmp_path_factory.mktemp("saved") / "prompts"
    datasets.Dataset.from_list([{"prompt": f"what is {i} plus 4 ?"} for i in range(50)]).save_to_disk(str(d))
    return d


@pytest.mark.parametrize("cut", ["empty", "8_bytes", "100_bytes", "half", "all_but_the_last_batch_end"])
def test_a_truncated_datasets_shard_is_one_line_naming_it(cut, saved_dataset, assets, tmp_path, capsys):
    import shutil

    d = tmp_path / "prompts"
    shutil.copytree(saved_dataset, d)
    shard = next(d.glob("*.arrow"))
    data = shard.read_bytes()
    keep = {"empty": 0, "8_bytes": 8, "100_bytes": 100, "half": len(data) // 2,
            "all_but_the_last_batch_end": len(data) - 200}[cut]
    shard.write_bytes(data[:keep])
    argv = ["grpo", "--config", TINY, "--sft", str(assets["policy"]), "--reward-fn", "length", "--prompts", str(d),
            "--out", str(tmp_path / "out")]
    expect_one_line(argv, capsys, tmp_path, str(shard), "not a readable Arrow shard", keep=("prompts",))


# ----------------------------------------------------------------------------- a reward model as a policy

POLICY_TAKERS = {
    "bon": ["bon", "--config", TINY, "--policy", "{bad}", "--rm", "{rm}", "--n", "1,2", "--out", "{out}"],
    "sample": ["sample", "--config", TINY, "--policy", "{bad}", "-n", "2"],
    "eval_policy": ["eval", "--config", TINY, "--policy", "{bad}", "--base", "{policy}", "--out", "{out}"],
    "eval_base": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{bad}", "--out", "{out}"],
    "eval_prompts": ["eval", "--config", TINY, "--policy", "{bad}", "--base", "{policy}", "--prompts", "{prompts}",
                     "--out", "{out}"],
    "grpo": ["grpo", "--config", TINY, "--sft", "{bad}", "--reward-fn", "length", "--out", "{out}"],
    "ppo": ["ppo", "--config", TINY, "--sft", "{bad}", "--rm", "{rm}", "--out", "{out}"],
    "dpo": ["dpo", "--config", TINY, "--sft", "{bad}", "--out", "{out}"],
    "collect": ["collect", "--config", TINY, "--policy", "{bad}", "-n", "2", "--out", "{out}"],
    "rlaif": ["rlaif", "--config", TINY, "--policy", "{bad}", "-n", "2", "--out", "{out}"],
    "cai-sl": ["cai-sl", "--config", TINY, "--policy", "{bad}", "-n", "2", "--out", "{out}"],
    "rs": ["rs", "--config", TINY, "--sft", "{bad}", "--rm", "{rm}", "--out", "{out}"],
    "iterate": ["iterate", "--config", TINY, "--sft", "{bad}", "--out", "{out}"],
    "sft_model": ["sft", "--config", TINY, "--model", "{bad}", "--out", "{out}"],
    "rm_sft": ["rm", "--config", TINY, "--sft", "{bad}", "--world-pairs", "--backbone", "{policy}", "--out", "{out}"],
    "lm_judge": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--prompts", "{prompts}",
                 "--judge", "lm:{bad}", "--out", "{out}", *FAST],
}


def _policy_cases():
    """Every command with rlhflab's reward model; a plain HF sequence-classification
    checkpoint (no reward_model.json) at the commands that read a policy for sampling only."""
    return [pytest.param(c, w, id=f"{c}-{w}") for c in POLICY_TAKERS
            for w in (("rm", "plain_rm") if c in ("bon", "sample", "eval_base", "grpo") else ("rm",))]


@pytest.mark.parametrize("command,which", _policy_cases())
def test_a_reward_model_given_as_a_policy_is_refused(command, which, assets, tmp_path, capsys):
    argv = _fill(POLICY_TAKERS[command], assets, tmp_path / "out", bad=assets[which])
    expect_one_line(argv, capsys, tmp_path, str(assets[which]), "a reward model", "not a policy")


# ----------------------------------------------------------------------------- bandit


BANDIT_BAD = [
    (["--algo", "ppo", "--kl-estimator", "k9"], "field '--kl-estimator': must be one of k1, k2"),
    (["--algo", "grpo", "--kl-estimator", "K1"], "field '--kl-estimator'"),
    (["--algo", "ppo", "--steps", "-5"], "field '--steps': must be an integer >= 1, got -5"),
    (["--algo", "rloo", "--steps", "0"], "field '--steps'"),
    (["--algo", "dpo", "--steps", "-1"], "field '--steps'"),
    (["--algo", "dpo", "--pairs", "0"], "field '--pairs'"),
    (["--algo", "ppo", "--seed", "-3"], "field '--seed'"),
    (["--algo", "ppo", "--option", "steps=-5"], "field '--option steps'"),
    (["--algo", "ppo", "--option", "steps=2.5"], "field '--option steps'"),
    (["--algo", "ppo", "--option", "steps=1e2"], "field '--option steps'"),
    (["--algo", "ppo", "--option", "lr=-1e-3"], "field '--option lr': must be a finite number > 0"),
    (["--algo", "ppo", "--option", "lr=0"], "field '--option lr'"),
    (["--algo", "ppo", "--option", "lr=.nan"], "field '--option lr'"),
    (["--algo", "ppo", "--option", "lr=.inf"], "field '--option lr'"),
    (["--algo", "ppo", "--option", "lr=1e400"], "field '--option lr'"),
    (["--algo", "ppo", "--option", "lr=abc"], "field '--option lr': expected float"),
    (["--algo", "ppo", "--option", "lr=true"], "field '--option lr'"),
    (["--algo", "ppo", "--option", "lr=[1]"], "field '--option lr'"),
    (["--algo", "ppo", "--option", "samples=0"], "field '--option samples'"),
    (["--algo", "grpo", "--option", "group_size=0"], "field '--option group_size'"),
    (["--algo", "ppo", "--option", "epochs=0"], "field '--option epochs'"),
    (["--algo", "ppo", "--option", "num_minibatches=-2"], "field '--option num_minibatches'"),
    (["--algo", "ppo", "--option", "clip_eps=-0.2"], "field '--option clip_eps'"),
    (["--algo", "ppo", "--option", "value_lr=0"], "field '--option value_lr'"),
    (["--algo", "ppo", "--option", "tis_cap=0"], "field '--option tis_cap'"),
    (["--algo", "ppo", "--option", "sampler_temperature=0"], "field '--option sampler_temperature'"),
    (["--algo", "ppo", "--option", "kl_in=sideways"], "field '--option kl_in': must be one of reward, loss"),
    (["--algo", "ppo", "--option", "kl_estimator=k9"], "field '--option kl_estimator'"),
    (["--algo", "ppo", "--option", "loss_agg=mean"], "field '--option loss_agg'"),
    (["--algo", "reinforce", "--option", "baseline=median"], "field '--option baseline'"),
    (["--algo", "grpo", "--option", "scale_std=maybe"], "field '--option scale_std'"),
    (["--algo", "ppo", "--option", "whiten_advantages=2"], "field '--option whiten_advantages'"),
    (["--algo", "ppo", "--option", "kl_epsilon=-1", "--option", "kl_controller=lagrangian"],
     "field '--option kl_epsilon'"),
    (["--algo", "ppo", "--option", "kl_dual_lr=0"], "field '--option kl_dual_lr'"),
    (["--algo", "dpo", "--option", "lr=-1"], "field '--option lr'"),
    (["--algo", "cdpo", "--option", "label_smoothing=0.7"], "field '--option label_smoothing'"),
    (["--algo", "simpo", "--option", "gamma=-1"], "field '--option gamma'"),
    (["--algo", "kto", "--option", "desirable_weight=-1"], "field '--option desirable_weight'"),
    (["--algo", "kto", "--option", "undesirable_weight=nan"], "field '--option undesirable_weight'"),
    (["--algo", "simpo", "--option", "nll_coef=-0.5"], "field '--option nll_coef'"),
    (["--algo", "ipo", "--option", "normalize=sometimes"], "field '--option normalize'"),
    (["--algo", "orpo", "--option", "nll=word"], "field '--option nll'"),
    (["--algo", "dpo", "--option", "deterministic=maybe"], "field '--option deterministic'"),
    (["--algo", "ppo", "--option", "nope=1"], "unknown option(s) nope"),
    (["--algo", "ppo", "--option", "=1"], "--option: expected KEY=VALUE"),
]


@pytest.mark.parametrize("args,expect", [pytest.param(a, e, id=" ".join(a)) for a, e in BANDIT_BAD])
def test_a_bad_bandit_option_is_one_line_naming_it(args, expect, tmp_path, capsys):
    expect_one_line(["bandit", *args, "--json"], capsys, tmp_path, expect)


# every way to write 0.001 that YAML 1.1 reads as a string, and a few it reads as a number
LR_SPELLINGS = ["1e-3", "1E-3", "+1e-3", "1.e-3", "1.0e-3", "0.001", ".1e-2", "10e-4", "1e-03"]


@pytest.mark.parametrize("spelling", LR_SPELLINGS)
def test_bandit_numbers_written_without_a_dot_are_numbers(spelling, capsys):
    assert main(["bandit", "--algo", "ppo", "--option", f"lr={spelling}", "--steps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["lr"] == pytest.approx(1e-3)


def test_bandit_offline_numbers_too(capsys):
    assert main(["bandit", "--algo", "cdpo", "--option", "lr=5e-2", "--option", "label_smoothing=1e-1",
                 "--steps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


# ----------------------------------------------------------------------------- --set and preset numbers

# (spelling, value for a float field, value for an int field; None: refused naming the field)
NUMBERS = [
    ("1e-3", 1e-3, None), ("1E-3", 1e-3, None), ("+1e-3", 1e-3, None), ("5e2", 500.0, None),
    ("1.5e+2", 150.0, None), (".5", 0.5, None), ("3.", 3.0, None), ("7", 7.0, 7), ("+7", 7.0, 7),
    ("017", 17.0, 17), ("0x10", 16.0, 16), ("0o17", 15.0, 15), ("1_000", 1000.0, None), ("1:30", None, None),
    ("0b101", None, None), ("seven", None, None), ("1e400", None, None), (".inf", None, None), ("-.inf", None, None),
    (".nan", None, None), ("nan", None, None), ("true", None, None), ("[1]", None, None), ("7.5", 7.5, None),
]


@pytest.mark.parametrize("spelling,as_float,as_int", [pytest.param(*n, id=n[0]) for n in NUMBERS])
def test_set_and_preset_numbers(spelling, as_float, as_int, tmp_path):
    """Each spelling through ``--set`` and through a preset, in a float field (rl.lr) and
    an int field (rl.steps): the number it reads as, or one InputError naming the field."""
    from rlhflab.config import load_config

    for field, expect in (("rl.lr", as_float), ("rl.steps", as_int)):
        section, name = field.split(".")
        preset = tmp_path / f"{name}.yaml"
        preset.write_text(f"{section}:\n  {name}: {spelling}\n")
        for how in ("set", "preset"):
            if expect is None:
                with pytest.raises(InputError, match=f"field '{field}'"):
                    load_config(preset) if how == "preset" else load_config(None, [f"{field}={spelling}"])
                continue
            cfg = load_config(preset) if how == "preset" else load_config(None, [f"{field}={spelling}"])
            got = getattr(getattr(cfg, section), name)
            assert got == expect and type(got) is type(expect), (how, field, got)


def test_set_numbers_through_the_cli(tmp_path, capsys):
    expect_one_line(["sft", "--config", TINY, "--out", str(tmp_path / "out"), "--set", "sft.max_steps=1:30"],
                    capsys, tmp_path, "field 'sft.max_steps'", "1:30")


# ----------------------------------------------------------------------------- diagnose: overflow

OVERFLOWS = [
    ("json_float", '{"kl/sequence_mean": 1e400, "gold/mean": 1.0}', "kl/sequence_mean", "1e400"),
    ("json_negative", '{"gold/mean": -1e999}', "gold/mean", "-1e999"),
    ("json_int", '{"kl/sequence_mean": 1' + "0" * 400 + "}", "kl/sequence_mean", "overflows a float"),
    ("json_unknown_key", '{"kl/sequence_mean": 1.0, "note": 2e308}', "note", "2e308"),
    ("json_nested", '{"log_history": [{"loss": 1.0, "step": 1}, {"loss": 1e309, "step": 2}]}', "loss", "1e309"),
    ("json_array", '[{"objective/kl": 0.1, "step": 1}, {"objective/kl": 9e999, "step": 2}]', "objective/kl", "9e999"),
    ("jsonl", '{"step": 1, "objective/kl": 0.1}\n{"step": 2, "objective/kl": 1E400}\n', "objective/kl", "1E400"),
]


@pytest.mark.parametrize("case,text,key,shown", [pytest.param(*c, id=c[0]) for c in OVERFLOWS])
def test_a_number_that_overflows_a_float_is_named(case, text, key, shown, tmp_path, capsys):
    path = tmp_path / ("m.jsonl" if case == "jsonl" else "m.json")
    path.write_text(text)
    line = expect_one_line(["diagnose", "--metrics", str(path)], capsys, tmp_path, str(path), f"field '{key}'",
                           shown, "overflows a float", keep=(path.name,))
    assert ("m.jsonl:2:" in line) == (case == "jsonl")


def test_the_largest_float_still_reads(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text('{"kl/sequence_mean": 1.7e308, "length/mean": 7, "base/length/mean": 7}')
    assert main(["diagnose", "--metrics", str(path), "--json"]) == 0


# ----------------------------------------------------------------------------- unbounded work

HUGE = {
    "bon_n": (["bon", "--config", TINY, "--policy", "{policy}", "--rm", "{rm}", "--n", "1,2,100000000", "--out",
               "{out}"], "field '--n'"),
    "bon_n_prompts": (["bon", "--config", TINY, "--policy", "{policy}", "--rm", "{rm}", "--n", "1,2",
                       "--n-prompts", "10000000000", "--out", "{out}"], "field '--n-prompts'"),
    "bon_user_prompts": (["bon", "--config", TINY, "--policy", "{policy}", "--rm", "{rm}", "--prompts", "{prompts}",
                          "--n", "1,1000000000000", "--out", "{out}"], "field '--n'"),
    "sample": (["sample", "--config", TINY, "--policy", "{policy}", "-n", "100000000000"], "field '-n'"),
    "eval": (["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--n", "100000000000",
              "--out", "{out}"], "field '--n'"),
    "collect": (["collect", "--config", TINY, "--policy", "{policy}", "-n", "100000000000", "--out", "{out}"],
                "field '-n'"),
    "rlaif": (["rlaif", "--config", TINY, "--policy", "{policy}", "-n", "100000000000", "--out", "{out}"],
              "field '-n'"),
}


@pytest.mark.parametrize("command", list(HUGE))
def test_work_that_cannot_fit_in_memory_is_refused_with_the_numbers(command, assets, tmp_path, capsys):
    argv, field = HUGE[command]
    line = expect_one_line(_fill(argv, assets, tmp_path / "out"), capsys, tmp_path, field, "samples", "of memory",
                           "are available")
    assert "TB" in line or "PB" in line


@pytest.mark.parametrize("command", ["bon", "sample", "eval", "collect", "rlaif"])
def test_long_sampling_shows_progress(command, assets, tmp_path, capsys):
    """Sampling in more than one batch shows where it is (plain lines off a terminal)."""
    argv = {"bon": ["bon", "--config", TINY, "--policy", "{policy}", "--rm", "{rm}", "--n", "1,2", "--out", "{out}"],
            "sample": ["sample", "--config", TINY, "--policy", "{policy}", "-n", "6"],
            "eval": ["eval", "--config", TINY, "--policy", "{policy}", "--base", "{policy}", "--out", "{out}"],
            "collect": ["collect", "--config", TINY, "--policy", "{policy}", "-n", "3", "--out", "{out}"],
            "rlaif": ["rlaif", "--config", TINY, "--policy", "{policy}", "-n", "3", "--out", "{out}"]}[command]
    assert main([*_fill(argv, assets, tmp_path / "out"), *FAST, "--set", "generation.batch_size=2"]) == 0
    err = capsys.readouterr().err
    assert f"[{command}] batch 1/" in err and "(100%)" in err, err[-2000:]
