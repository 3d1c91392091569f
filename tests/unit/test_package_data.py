"""Every file the package reads at run time that is not Python ships in its wheel: each matches
a glob of pyproject.toml's ``[tool.setuptools.package-data]`` (an editable install finds any
file; a wheel holds only what those globs name)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads TOML")

ROOT = Path(__file__).resolve().parents[2]


def test_every_data_file_of_the_package_is_declared():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["rlhflab"]
    pkg = ROOT / "src" / "rlhflab"
    data = [p.relative_to(pkg).as_posix() for p in pkg.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert data, "the package has data files (py.typed at least)"
    missing = [f for f in data if not any(fnmatch.fnmatchcase(f, g) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
