"""The layers of the package (docs/architecture.md) and what may import what.

Every module of ``src/rlhflab`` is parsed with ``ast``; each import it makes, at module
level or inside a function, is checked against ``LAYERS``: a module may import its own
layer and the layers below it, never one above. The registry's targets and the bandit's
trainers are named as strings and imported on first use (``rlhflab.registry``,
``rlhflab.bandit.algorithms``); they are no import statement and are not checked here
(``test_registry.py`` resolves every target).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# layer -> (name, the modules in it: a package name stands for the package and all below it)
LAYERS: dict[int, tuple[str, tuple[str, ...]]] = {
    0: ("foundation", ("rlhflab", "rlhflab.errors", "rlhflab.registry", "rlhflab.seeds", "rlhflab.artifacts",
                       "rlhflab.progress", "rlhflab.tracking", "rlhflab.checkpoint", "rlhflab.threads")),
    1: ("math", ("rlhflab.logprobs", "rlhflab.losses", "rlhflab.advantages", "rlhflab.kl", "rlhflab.optimal",
                 "rlhflab.bandit")),
    2: ("world", ("rlhflab.world",)),
    3: ("config", ("rlhflab.config", "rlhflab.constitution")),
    4: ("models, data and engine", ("rlhflab.data", "rlhflab.readers", "rlhflab.models", "rlhflab.reward_model",
                                    "rlhflab.lora", "rlhflab.training", "rlhflab.forward", "rlhflab.packing",
                                    "rlhflab.generation", "rlhflab.sampling", "rlhflab.samplers", "rlhflab.rollout",
                                    "rlhflab.rewards", "rlhflab.distributed")),
    5: ("instruments", ("rlhflab.instruments", "rlhflab.diagnose", "rlhflab.report")),
    6: ("training loops", ("rlhflab.algos",)),
    7: ("labeling server", ("rlhflab.labeling",)),
    8: ("commands", ("rlhflab.commands", "rlhflab.cli", "rlhflab.api")),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "rlhflab").rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer of ``module``: the longest entry of ``LAYERS`` that is it or a package above it
    (the root package ``rlhflab`` counts only for itself)."""
    best, best_len = None, -1
    for layer, (_, names) in LAYERS.items():
        for name in names:
            covers = module == name or (name != "rlhflab" and module.startswith(name + "."))
            if covers and len(name) > best_len:
                best, best_len = layer, len(name)
    return best


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The rlhflab modules ``module`` imports anywhere in its file (module level, functions,
    classes); ``from package import submodule`` counts as importing the submodule."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "rlhflab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, or the package itself
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "rlhflab":
                continue
            for a in node.names:
                found.add(f"{source}.{a.name}" if f"{source}.{a.name}" in known else source)
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_every_listed_module_exists():
    known = modules()
    missing = [name for _, names in LAYERS.values() for name in names
               if name not in known and not any(m.startswith(name + ".") for m in known)]
    assert missing == []


def test_a_module_imports_only_its_own_layer_and_lower_ones():
    violations = []
    for module, deps in sorted(graph().items()):
        mine = layer_of(module)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if theirs is not None and mine is not None and theirs > mine:
                violations.append(f"{module} -> {dep} (layer {mine} imports layer {theirs})")
    print("\n".join(violations))
    assert violations == []


def test_the_imports_have_no_cycle():
    """No two modules import each other, directly or through others (function-level
    imports count: a cycle hidden inside a function is still a knot for the reader)."""
    g = graph()
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    print("\n".join(cycles))
    assert cycles == []


def test_architecture_md_names_every_module():
    """docs/architecture.md names every module by its path under ``src/rlhflab/``."""
    doc = (SRC.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    paths = [p.relative_to(SRC / "rlhflab").as_posix() for p in modules().values() if p.name != "__init__.py"]
    assert [p for p in paths if f"`{p}`" not in doc] == []
