"""Config domains, fuzzed.

Every numeric and choice field of every config section (found by walking the dataclasses)
is fed values outside its domain: not-a-number, infinities, a value past each bound, the
wrong type (a string, a bool for a number, a fraction for an integer), an unknown word.
Each must be an InputError of one line that names the field and the place it came from (the
``--set`` item, or the file and line of a preset), raised by ``load_config`` itself, so before
any command writes anything. The values at the edges of each domain must still load. A
handful of the cases go through the real CLI, asserting exit code 2, one line on stderr, no
traceback and no output directory. Then the YAML-level cases: duplicate sections and keys,
bad YAML, unknown keys.

The bulk runs through ``load_config`` directly (about 2 ms a case).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from rlhflab.cli import main
from rlhflab.config import (
    Config,
    Domain,
    RLConfig,
    check_value,
    field_domain,
    load_config,
    save_config,
)
from rlhflab.errors import InputError
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

# Fields whose values are free text or are checked where they are used, not by a domain:
# paths to local checkpoints, and the lists of arms/algorithms (``rlhflab run`` checks them
# against its registry of algorithms), the module names LoRA adapts (``lora.attach`` checks
# them against the model's modules), the sampler of online RL (a registered name or
# module:factory: ``RLConfig.cross_check``).
FREE = {"model.path", "rm.backbone", "run.arms", "run.bandit_algos", "lora.target_modules", "run.constitution",
        "rl.sampler"}


def _leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, typing.Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out


def _base(tp: typing.Any) -> tuple[typing.Any, bool]:
    """(the type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


LEAVES = _leaves()
CHECKED = [(name, f, *_base(tp)) for name, f, tp in LEAVES if name not in FREE and _base(tp)[0] is not bool]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def bad_values(dom: Domain, base: typing.Any, optional: bool) -> list[str]:
    """YAML texts of values outside ``dom`` (and the field's type)."""
    if dom.item is not None:  # lists of numbers, the family-weight mapping
        if base is dict:
            return ["{arithmetic: -1}", "{arithmetic: .nan}", "{arithmetic: x}", "{arithmetic: .inf}", "[1]", "3"]
        return ["[-1]", "[0.5, .nan]", "[x]", "[.inf]", "3", "{a: 1}"]
    if dom.choices:
        out = ["bogus", "3", "true", "[a]", dom.choices[0].upper() + "x", " " + dom.choices[0] + "_"]
        return out if optional else out + ["null"]
    out = [".nan", "nan", ".inf", "-.inf", "1e400", "abc", "true", "[1]", "{a: 1}"]
    if not optional:
        out.append("null")
    if dom.integer:
        out += ["1.5", "2.0"]
        if dom.hi is not None:
            out.append("1" + "0" * 400)  # an integer past the bound, too large for a float
    else:
        out += ["1" + "0" * 400, "-1" + "0" * 400]  # integers too large for a float
    if dom.lo is not None:
        out += [_num(dom.lo - 1), _num(dom.lo - 1000)]
        if dom.lo_open:
            out.append(_num(dom.lo))
        elif not dom.integer:
            out.append(repr(dom.lo - 1e-9))
    if dom.hi is not None:
        out += [_num(dom.hi + 1), _num(dom.hi * 1000 + 1000)]
        if dom.hi_open:
            out.append(_num(dom.hi))
        elif not dom.integer:
            out.append(repr(dom.hi + 1e-9))
    return out


def good_values(dom: Domain, base: typing.Any) -> list[str]:
    """YAML texts of values at the edges of ``dom`` and inside it."""
    if dom.item is not None:
        if dom.item.choices:  # a list of words (report_to)
            return ["[]", f"[{dom.item.choices[0]}]", f"[{', '.join(dom.item.choices)}]"]
        if dom.item.integer and dom.item.lo is not None:  # increasing integers (run.bon_n)
            return ["[]", f"[{_num(dom.item.lo)}, {_num(dom.item.lo + 1)}]"]
        return ["{arithmetic: 1, open: 0}", "{benign: 0.5}"] if base is dict else ["[]", "[0.5, 2]"]
    if dom.choices:
        return list(dom.choices)
    lo = dom.lo if dom.lo is not None else (dom.hi - 10 if dom.hi is not None else -10.0)
    hi = dom.hi if dom.hi is not None else lo + 10
    out = [_num((lo + hi) / 2) if not dom.integer else _num(math.floor((lo + hi) / 2))]
    if dom.integer:
        out += [_num(lo + 1 if dom.lo_open else lo), _num(hi - 1 if dom.hi_open else hi)]
    else:
        out += [repr(lo + 1e-9) if dom.lo_open else _num(lo), repr(hi - 1e-9) if dom.hi_open else _num(hi)]
    return out


# Other fields a value needs to be valid on its own (the cross-field checks).
PARTNERS = {
    "model.d_model": ["model.n_heads=1"],
    "model.n_heads": ["model.d_model={v}"],
    "model.arch": ["model.n_heads=2"],
    "rl.kl_caution": ["rl.kl_warning=1e9"],
    "rl.kl_warning": ["rl.kl_caution=0"],
    "rl.rm_reduce_k": ["rl.rm_reduce=mean_minus_std"],
}

# (A field without a domain is left out here and reported by the test below.)
BAD = {name: bad_values(field_domain(f), base, optional) for name, f, base, optional in CHECKED if field_domain(f)}
GOOD = {name: good_values(field_domain(f), base) for name, f, base, _ in CHECKED if field_domain(f)}


def test_the_table_is_large():
    """Several values per field: 142 fields give 1949 bad and 423 good cases today."""
    assert sum(map(len, BAD.values())) >= 10 * len(CHECKED) and all(len(v) >= 6 for v in BAD.values())
    assert all(len(v) >= 2 for v in GOOD.values())


def test_every_numeric_and_choice_field_declares_a_domain():
    missing = [name for name, f, *_ in CHECKED if field_domain(f) is None]
    assert not missing, f"fields without a domain: {missing}"
    assert len(CHECKED) >= 140  # 142 fields today: the walk reached every section, raters and demonstrator included
    assert {"world.rater.noise", "world.demonstrator.p_wrong", "rl.gamma", "dpo.beta", "sft.lr"} <= {
        name for name, *_ in CHECKED}


def test_every_default_and_preset_is_in_its_domain():
    cfg = Config()
    for name, f, *_ in CHECKED:
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        assert check_value(f, value) is None, (name, value)
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        if preset.name != "constitution.yaml":  # the default constitution, not a config preset
            load_config(preset)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_values_by_set_name_the_item_and_field(name):
    """Each bad value of the field, one ``--set`` at a time over the defaults."""
    wrong = []
    for text in BAD[name]:
        item = f"{name}={text}"
        try:
            load_config(None, [item])
            wrong.append(f"{item}: accepted")
        except InputError as err:
            msg = str(err)
            shown = item if len(item) <= 80 else item[:77] + "..."  # a long item is shortened
            if not msg.startswith(f"--set {shown}: field '{name}") or "\n" in msg:
                wrong.append(f"{item}: {msg!r}")
    assert not wrong, wrong


# One bad value per field through a preset file: the error names the file and line.
SECTIONS = sorted({name.split(".")[0] for name in BAD})


@pytest.mark.parametrize("section", SECTIONS)
def test_bad_values_in_a_preset_name_file_line_and_field(tmp_path, section):
    wrong = []
    for name in (n for n in BAD if n.split(".")[0] == section):
        text = BAD[name][0]
        *parents, leaf = name.split(".")
        lines = ["# a preset", "sft:", "  lr: 1.0e-3"]
        start = 1 if parents[0] == "sft" else 0
        lines += [f"{'  ' * i}{p}:" for i, p in enumerate(parents[start:], start=start)]
        lines.append(f"{'  ' * len(parents)}{leaf}: {text}")
        path = tmp_path / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n")
        try:
            load_config(path)
            wrong.append(f"{name}: {text} accepted")
        except InputError as err:
            if not str(err).startswith(f"{path}:{len(lines)}: field '{name}"):
                wrong.append(f"{name}: {err}")
    assert not wrong, wrong


@pytest.mark.parametrize("name", list(GOOD))
def test_values_at_the_edges_of_a_domain_load(name):
    wrong = []
    for text in GOOD[name]:
        extra = [p.format(v=text) for p in PARTNERS.get(name, [])]
        try:
            cfg = load_config(None, [*extra, f"{name}={text}"])
        except InputError as err:
            wrong.append(f"{name}={text}: {err}")
            continue
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if isinstance(value, dict):
            ok = yaml.safe_load(text).items() <= value.items()
        elif isinstance(value, list):
            ok = value == yaml.safe_load(text)
        elif isinstance(value, str):
            ok = value == text  # "no" of mixed_precision is the word, not YAML 1.1's False
        else:
            ok = math.isclose(value, float(text), rel_tol=1e-12)
        if not ok:
            wrong.append(f"{name}={text}: loaded as {value!r}")
    assert not wrong, wrong


# Bad values written out by hand, independent of the declared domains.
REPORTED = [
    "rl.beta=nan", "rl.gamma=nan", "dpo.beta=.inf", "sft.lr=.inf", "sft.lr=-1", "sft.lr=nan", "rm.lr=-1",
    "rm.lr=nan", "dpo.lr=-1", "dpo.lr=nan", "rl.lr=-1", "rl.lr=nan", "sft.max_steps=-1", "sft.eval_every=0",
    "rm.max_steps=-3", "model.n_heads=3", "model.d_model=0", "sft.lr=0", "sft.warmup_ratio=5",
    "sft.max_length=0", "sft.max_grad_norm=-1", "sft.max_steps=0", "sft.epochs=0",
]


@pytest.mark.parametrize("item", REPORTED)
def test_reported_values_are_errors(item):
    with pytest.raises(InputError, match=f"field '{item.split('=')[0]}'"):
        load_config(TINY, [item])


@pytest.mark.parametrize("items,field,expect", [
    (["model.d_model=30", "model.n_heads=4"], "model.n_heads", "must be a multiple of model.n_heads (4)"),
    (["model.n_heads=4", "model.d_model=30"], "model.d_model", "must be a multiple"),
    (["model.arch=llama", "model.d_model=30", "model.n_heads=6"], "model.n_heads", "even head size"),
    (["rl.kl_caution=20"], "rl.kl_caution", "must not exceed rl.kl_warning (15)"),
    (["world.family_weights={maths: 1}"], "world.family_weights", "unknown family 'maths'"),
    (["world.family_weights={arithmetic: 0, sycophancy: 0, harmful: 0, benign: 0, open: 0}"],
     "world.family_weights", "some family a positive weight"),
])
def test_cross_field_errors_name_the_item_set_last(items, field, expect):
    with pytest.raises(InputError) as err:
        load_config(TINY, items)
    msg = str(err.value)
    assert msg.startswith(f"--set {items[-1][:77]}") and f"field '{field}'" in msg and expect in msg, msg


def test_cross_field_error_in_a_preset_names_its_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_heads: 4\n  d_model: 30\n")
    with pytest.raises(InputError, match=r"c\.yaml:3: field 'model\.d_model': model\.d_model \(30\) must be"):
        load_config(path)


# ---------------------------------------------------------------------------------------
# The domain vocabulary and the online-RL resolution


@pytest.mark.parametrize("spec,describe,inside,outside", [
    ("> 0", "a finite number > 0", [1e-300, 5], [0, -1, math.nan, math.inf, True, "1"]),
    (">= 0", "a finite number >= 0", [0, 2.5], [-1e-9, -math.inf, math.nan]),
    ("[0, 1]", "a finite number in [0, 1]", [0, 1, 0.5], [-0.1, 1.1, math.nan]),
    ("(0, 1]", "a finite number in (0, 1]", [1, 1e-9], [0, 1.5]),
    ("[0, 1)", "a finite number in [0, 1)", [0, 0.999], [1, -1]),
    ("finite", "a finite number", [-1e300, 0], [math.inf, math.nan, False]),
    ("int >= 1", "an integer >= 1", [1, 10**20], [0, 1.0, 1.5, True, "1"]),
    ("int >= -1", "an integer >= -1", [-1, 0], [-2]),
    ("int in [0, 2147483647]", "an integer in [0, 2147483647]", [0, 2**31 - 1], [-1, 2**31]),
    ("one of a, b", "one of a, b", ["a", "b"], ["c", "A", 1, None]),
    ("each > 0", "a list of items each a finite number > 0", [[], [1, 2], {"x": 1}], [[0], [math.nan], 1]),
])
def test_domain_specs(spec, describe, inside, outside):
    dom = Domain.parse(spec)
    assert dom.describe() == describe
    assert all(dom.contains(v) for v in inside)
    assert not any(dom.contains(v) for v in outside)
    assert dom.problem(inside[0]) is None and "must be" in dom.problem(outside[0])


def test_a_bad_spec_fails_loudly():
    with pytest.raises(ValueError, match="not a domain spec"):
        Domain.parse("positive")


def test_rl_resolution_checks_domains_of_configs_built_in_code():
    from rlhflab.algos.rl_config import resolve_rl_config
    from rlhflab.registry import KL_CONTROLLERS, KL_ESTIMATORS, LOSS_AGGREGATIONS, ONLINE_ALGORITHMS

    for bad, name in [(dict(beta=math.nan), "rl.beta"), (dict(gamma=2.0), "rl.gamma"),
                      (dict(lr=-1.0), "rl.lr"), (dict(kl_estimator="k4"), "rl.kl_estimator")]:
        with pytest.raises(InputError, match=f"field '{name}'"):
            resolve_rl_config(RLConfig(**bad), "ppo")
    with pytest.raises(InputError, match="field 'rl.kl_caution'"):  # and the checks across fields
        resolve_rl_config(RLConfig(kl_caution=20.0, kl_warning=10.0), "ppo")
    # Every algorithm's defaults are in the domains; the choices are the registered names.
    for algo in ONLINE_ALGORITHMS:
        resolve_rl_config(RLConfig(batch_size=64), algo)
    domains = {f.name: field_domain(f) for f in dataclasses.fields(RLConfig)}
    assert domains["kl_estimator"].choices == KL_ESTIMATORS.names()
    assert domains["kl_controller"].choices == KL_CONTROLLERS.names()
    assert domains["loss_agg"].choices == LOSS_AGGREGATIONS.names()


def test_dpo_loss_choices_match_the_command():
    import argparse

    from rlhflab.commands.dpo import add_arguments
    from rlhflab.config import DPOConfig
    from rlhflab.registry import PREFERENCE_LOSSES

    f = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "loss")
    assert field_domain(f).choices == tuple(choices) == PREFERENCE_LOSSES.names()


def test_a_resolved_config_loads_back(tmp_path):
    from rlhflab.algos.rl_config import resolve_rl_config

    cfg = load_config(TINY)
    for algo in ("ppo", "grpo"):
        cfg.rl = resolve_rl_config(load_config(TINY).rl, algo)
        save_config(cfg, tmp_path / f"{algo}.yaml")
        assert load_config(tmp_path / f"{algo}.yaml").rl == cfg.rl


# ---------------------------------------------------------------------------------------
# YAML files: duplicates, syntax, unknown keys


@pytest.mark.parametrize("text,expect", [
    ("sft:\n  lr: 1.0e-3\nrm:\n  lr: 1.0e-3\nsft:\n  epochs: 1\n", "c.yaml:5: field 'sft': duplicate key (first at line 1)"),
    ("sft:\n  lr: 1.0e-3\n  epochs: 1\n  lr: 2.0e-3\n", "c.yaml:4: field 'sft.lr': duplicate key (first at line 2)"),
    ("world:\n  rater:\n    noise: 1\n    noise: 2\n", "c.yaml:4: field 'world.rater.noise': duplicate key"),
    ("world:\n  family_weights:\n    open: 1\n    open: 2\n", "c.yaml:4: field 'world.family_weights.open': duplicate"),
    ("sft: [\n", "c.yaml:2: not valid YAML"),
    ("sft:\n\tlr: 1\n", "c.yaml:2: not valid YAML"),
    ("sft:\n  lr: 1\n---\nrm: {}\n", "c.yaml:3: not valid YAML"),
    ("sft:\n  lrr: 1\n", "c.yaml:2: field 'sft.lrr': unknown key"),
    ("sfx:\n  lr: 1\n", "c.yaml:1: field 'sfx': unknown key"),
    ("- sft\n", "c.yaml: expected a mapping of sections"),
    ("sft: 3\n", "c.yaml:1: field 'sft': expected a mapping"),
    ("a: &x {b: *x}\n", "c.yaml:1: field 'a': unknown key"),  # an alias loop ends, it does not hang
])
def test_yaml_file_errors(tmp_path, text, expect):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_config(path)
    assert expect in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_merge_key_is_not_a_duplicate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft: &s\n  lr: 1.0e-3\n  epochs: 1\ndpo:\n  <<: {lr: 2.0e-4}\n  lr: 3.0e-4\n")
    assert load_config(path).dpo.lr == 3.0e-4


def test_a_duplicate_key_in_a_set_value():
    with pytest.raises(InputError, match=r"^--set world\.family_weights=\{open: 1, open: 2\}: field "
                                         r"'world\.family_weights\.open': duplicate key$"):
        load_config(None, ["world.family_weights={open: 1, open: 2}"])


def test_an_integer_too_large_for_a_float_is_a_plain_value():
    assert load_config(None, ["rl.kl_horizon=1" + "0" * 400]).rl.kl_horizon == 10**400
    with pytest.raises(InputError, match="field 'sft.seed': must be an integer in"):
        load_config(None, ["sft.seed=1" + "0" * 400])


def test_a_long_set_item_is_shortened_in_the_message():
    with pytest.raises(InputError) as err:
        load_config(None, ["sft.lr=1" + "0" * 400])
    assert len(str(err.value)) < 200 and "field 'sft.lr': must be a finite number > 0, got inf" in str(err.value)


# ---------------------------------------------------------------------------------------
# Through the real CLI: exit 2, one line on stderr, no traceback, nothing written

CLI_CASES = [
    (["sft"], "sft.lr=nan", "sft.lr"),
    (["sft"], "sft.warmup_ratio=5", "sft.warmup_ratio"),
    (["sft"], "model.n_heads=3", "model.n_heads"),
    (["sft"], "sft.epochs=0", "sft.epochs"),
    (["rm"], "rm.max_steps=-3", "rm.max_steps"),
    (["dpo", "--sft", "nowhere"], "dpo.beta=.inf", "dpo.beta"),
    (["ppo", "--sft", "nowhere"], "rl.beta=nan", "rl.beta"),
    (["ppo", "--sft", "nowhere"], "rl.gamma=-1", "rl.gamma"),
    (["world"], "world.demonstrator.p_wrong=1.5", "world.demonstrator.p_wrong"),
    (["run"], "world.rater.noise=0", "world.rater.noise"),
]


@pytest.mark.parametrize("command,item,name", CLI_CASES, ids=[c[1] for c in CLI_CASES])
def test_cli_bad_value_exits_2_before_writing(tmp_path, capsys, command, item, name):
    out = tmp_path / "out"
    rc = main([*command, "--config", str(TINY), "--out", str(out), "--set", item])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"--set {item}: field '{name}'" in lines[0]
    assert not out.exists()


def test_cli_duplicate_section_exits_2_before_writing(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text(TINY.read_text() + "sft:\n  lr: 1.0e-2\n")
    out = tmp_path / "out"
    rc = main(["sft", "--config", str(preset), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    n = len(TINY.read_text().splitlines()) + 1
    assert rc == 2 and len(lines) == 1 and f"{preset}:{n}: field 'sft': duplicate key" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_cli_rl_layout_error_exits_2_before_writing(tmp_path, capsys):
    """A check that depends on the algorithm (GRPO groups of 8 do not fill 10 rows) fails in
    resolve_rl_config, before any output directory exists."""
    out = tmp_path / "out"
    rc = main(["grpo", "--config", str(TINY), "--sft", str(tmp_path / "nowhere"), "--out", str(out),
               "--set", "rl.batch_size=10"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "field 'rl.batch_size'" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_the_installed_command_exits_2_with_one_line(tmp_path):
    """The real process: exit status 2, one line on stderr, nothing on stdout, no directory."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "sft", "--config", str(TINY), "--out", str(out),
                           "--set", "sft.lr=nan"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == [
        "rlhflab sft: error: --set sft.lr=nan: field 'sft.lr': must be a finite number > 0, got nan"]
    assert not out.exists()


def test_offline_stages_share_their_training_fields():
    """SFT, the reward model and DPO inherit TrainConfig's fields: one domain each, a default
    per stage, and the keys stay flat in their sections."""
    from rlhflab.config import DPOConfig, RMConfig, SFTConfig, TrainConfig

    shared = {f.name: f.metadata["domain"] for f in dataclasses.fields(TrainConfig)}
    for cls in (SFTConfig, RMConfig, DPOConfig):
        assert {f.name: f.metadata["domain"] for f in dataclasses.fields(cls) if f.name in shared} == shared
    assert (SFTConfig().lr, RMConfig().lr, DPOConfig().lr) == (1e-3, 5e-4, 1e-4)
    assert (SFTConfig().warmup_ratio, DPOConfig().warmup_ratio) == (0.05, 0.1)
    cfg = load_config(TINY, ["dpo.lr=3e-4", "rm.warmup_ratio=0.2"])
    assert cfg.dpo.lr == 3e-4 and cfg.rm.warmup_ratio == 0.2 and cfg.sft.lr != 3e-4
