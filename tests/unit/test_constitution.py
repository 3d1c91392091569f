"""The constitution file: the default loads; every malformed principle is one line naming
the file, the line and the field."""

from __future__ import annotations

import random

import pytest

from rlhflab.constitution import ASPECTS, load_constitution
from rlhflab.errors import InputError

GOOD = """principles:
  - id: harmless
    aspect: harmlessness
    critique: Identify harm.
    revision: Remove harm.
    comparison: Which is less harmful?
  - id: helpful
    weight: 3
    critique: Identify unhelpfulness.
    revision: Help.
    comparison: Which is more helpful?
"""


def test_default_constitution_covers_the_four_aspects():
    c = load_constitution()
    assert sorted(p.aspect for p in c.principles) == sorted(ASPECTS)
    c.require_aspects()
    assert all(p.critique and p.revision and "?" in p.comparison for p in c.principles)


def test_sampling_follows_the_weights(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    c = load_constitution(path)
    rng = random.Random(0)
    draws = [c.sample(rng).id for _ in range(4000)]
    # weights 1 : 3 -> 3/4 "helpful"; 4000 draws: sd sqrt(0.75 * 0.25 / 4000) = 0.007
    assert abs(draws.count("helpful") / 4000 - 0.75) < 0.03
    with pytest.raises(InputError, match=r"c\.yaml: field 'aspect': principle 'helpful' has no aspect"):
        c.require_aspects()


@pytest.mark.parametrize("edit, where", [
    (("    comparison: Which is less harmful?\n", ""), ":2: field 'comparison': missing"),
    (("aspect: harmlessness", "aspect: kindness"), ":3: field 'aspect': expected one of"),
    (("id: helpful", "id: harmless"), ":7: field 'id': principle 'harmless' appears twice"),
    (("weight: 3", "weight: -1"), ":8: field 'weight': expected a positive number"),
    (("    revision: Help.", "    revision: 3"), ":10: field 'revision': expected a non-empty string"),
    (("    revision: Help.", "    revison: Help."), ":10: field 'revison': unknown field"),
    (("principles:", "rules:"), ":1: unknown key 'rules'"),
    (("- id: harmless", "- id: [x"), ":3: not valid YAML"),
])
def test_malformed_constitution_is_one_line(tmp_path, edit, where):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD.replace(*edit, 1))
    with pytest.raises(InputError) as err:
        load_constitution(path)
    assert str(err.value).startswith(f"{path}{where}") and "\n" not in str(err.value)


def test_missing_constitution_file(tmp_path):
    with pytest.raises(InputError, match="No such file"):
        load_constitution(tmp_path / "none.yaml")
