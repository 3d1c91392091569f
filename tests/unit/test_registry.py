"""rlhflab.registry: every registered name resolves to its implementation, once.

Each family is a lazy ``Registry`` (name -> "module:attribute", imported on first use);
these tests import every target, check the tables the CLI and the config read, and that
reading a name costs no torch import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhflab import registry
from rlhflab.registry import (
    ONLINE_ALGORITHMS,
    PREFERENCE_LOSSES,
    Entry,
    Registry,
    loss_hparams,
    online_commands,
)

FAMILIES = {name: value for name, value in vars(registry).items() if isinstance(value, Registry)}


def _entries():
    return [pytest.param(reg, name, id=f"{family}:{name}") for family, reg in FAMILIES.items() for name in reg]


def test_the_families_are_there():
    assert {"ONLINE_ALGORITHMS", "PREFERENCE_LOSSES", "LOSS_AGGREGATIONS", "KL_ESTIMATORS", "KL_CONTROLLERS",
            "SEQUENCE_BASELINES", "LR_SCHEDULES"} <= set(FAMILIES)
    assert all(len(reg) > 0 for reg in FAMILIES.values())


@pytest.mark.parametrize("reg,name", _entries())
def test_every_target_resolves(reg, name):
    target = reg[name]
    module, _, attribute = reg.entry(name).target.partition(":")
    assert module.startswith("rlhflab.") and attribute
    assert callable(target), f"{reg.family} {name}: {reg.entry(name).target} is not callable"
    assert reg[name] is target  # resolved once, then kept


@pytest.mark.parametrize("reg,name", _entries())
def test_every_entry_says_what_it_is(reg, name):
    e = reg.entry(name)
    assert isinstance(e, Entry) and e.name == name
    assert e.doc and "\n" not in e.doc


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        Registry("thing", [Entry("a", "m:a", "one"), Entry("a", "m:b", "two")])
    for reg in FAMILIES.values():
        assert len(set(reg.names())) == len(reg.names())


def test_an_unknown_name_is_a_key_error_naming_the_choices():
    with pytest.raises(KeyError, match="unknown preference loss 'nope'; expected one of dpo, cdpo"):
        PREFERENCE_LOSSES.entry("nope")
    assert "nope" not in PREFERENCE_LOSSES


def test_domain_strings_list_the_names_in_order():
    for reg in FAMILIES.values():
        assert reg.domain() == "one of " + ", ".join(reg.names())
    assert ONLINE_ALGORITHMS.domain() == "one of ppo, reinforce, rloo, reinforce++, reinforce++-baseline, grpo, dr-grpo"


def test_where_selects_by_option():
    assert PREFERENCE_LOSSES.where(reference_free=True) == ("simpo", "orpo")
    assert PREFERENCE_LOSSES.where(unpaired=True) == ("kto",)


def test_online_commands_map_each_command_to_its_variants():
    commands = online_commands()
    assert list(commands) == ["ppo", "reinforce", "rloo", "grpo"]
    assert commands["ppo"] == {"ppo": "ppo"}
    assert commands["reinforce"] == {"baseline": "reinforce", "reinforce++": "reinforce++",
                                     "reinforce++-baseline": "reinforce++-baseline"}
    assert commands["rloo"] == {"rloo": "rloo"}
    assert commands["grpo"] == {"grpo": "grpo", "dr-grpo": "dr-grpo"}
    assert sorted(a for variants in commands.values() for a in variants.values()) == sorted(ONLINE_ALGORITHMS)


def test_every_online_algorithm_says_its_defaults():
    for name in ONLINE_ALGORITHMS:
        options = ONLINE_ALGORITHMS.entry(name).options
        assert options["defaults"]["samples_per_prompt"] >= options["min_samples_per_prompt"] >= 1
        assert options["defaults"]["loss_agg"] in registry.LOSS_AGGREGATIONS
        assert options["defaults"]["kl_estimator"] in registry.KL_ESTIMATORS


def test_loss_hparams_read_a_dpo_config():
    from rlhflab.config import DPOConfig

    cfg = DPOConfig(beta=0.2, label_smoothing=0.05, simpo_gamma=0.7, kto_desirable_weight=1.5,
                    kto_undesirable_weight=0.5)
    assert loss_hparams("dpo", cfg) == {"beta": 0.2}
    assert loss_hparams("cdpo", cfg) == {"beta": 0.2, "label_smoothing": 0.05}
    assert loss_hparams("ipo", cfg) == {"tau": 0.2, "normalize": False}
    assert loss_hparams("simpo", cfg) == {"beta": 0.2, "gamma": 0.7, "nll_coef": 0.0}
    assert loss_hparams("orpo", cfg) == {"lam": 0.2, "nll": "sequence"}
    assert loss_hparams("kto", cfg) == {"beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.5}
    assert loss_hparams("hinge", {"beta": 0.3}) == {"beta": 0.3}  # a mapping works too
    for name in PREFERENCE_LOSSES:  # every hparam names a DPOConfig field
        assert set(loss_hparams(name, cfg)) == set(PREFERENCE_LOSSES.entry(name).options["hparams"])


def test_the_kl_levels_are_ordered():
    assert 0 < registry.KL_CAUTION_NATS < registry.KL_WARNING_NATS


@pytest.mark.parametrize("module", ["rlhflab.registry", "rlhflab.config", "rlhflab.diagnose"])
def test_reading_names_imports_no_torch(module):
    code = (f"import sys, {module}\n"
            "from rlhflab.registry import ONLINE_ALGORITHMS, PREFERENCE_LOSSES\n"
            "ONLINE_ALGORITHMS.domain(); PREFERENCE_LOSSES.entry('dpo').options\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"importing {module} imported torch"
