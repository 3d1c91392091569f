"""A constitution: the written principles an AI labeller and a reviser follow (Bai et al.
2022, "Constitutional AI").

A YAML file with a list ``principles``; each principle has

| field        | what                                                                      |
|--------------|---------------------------------------------------------------------------|
| ``id``       | a unique name (letters, digits, ``-``, ``_``)                             |
| ``critique`` | the critique request (CAI section 3): "Identify specific ways in which ..." |
| ``revision`` | the revision request: "Please rewrite the assistant response to ..."      |
| ``comparison`` | the multiple-choice question (CAI section 4.1): "Which response is less harmful?" |
| ``aspect``   | optional: ``harmlessness``, ``honesty``, ``helpfulness`` or ``concision``; what the world's labeller and reviser read the principle as (a local LM reads the text) |
| ``weight``   | optional: how often the principle is sampled, relative to the others (1) |

A principle is sampled per comparison and per revision round (``Constitution.sample``),
as in CAI. ``configs/constitution.yaml`` is the default for the world; ``docs/rlaif.md``
documents the format with an example. A malformed file is one ``InputError`` naming the
file, the line and the field.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from rlhflab.errors import InputError

ASPECTS = ("harmlessness", "honesty", "helpfulness", "concision")
TEXT_FIELDS = ("critique", "revision", "comparison")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "configs" / "constitution.yaml"


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution (see the module docstring)."""

    id: str
    critique: str
    revision: str
    comparison: str
    aspect: str | None = None
    weight: float = 1.0

    def text(self) -> str:
        """Everything the principle says, as a model given it would read it."""
        return " ".join((self.critique, self.revision, self.comparison))


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.principles:
            raise InputError("a constitution needs at least one principle", file=self.source, field="principles")

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def get(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise KeyError(pid)

    def sample(self, rng: random.Random) -> Principle:
        """One principle, drawn in proportion to the weights."""
        return rng.choices(self.principles, [p.weight for p in self.principles])[0]

    def require_aspects(self) -> None:
        """The world's labeller and reviser read each principle's aspect: all must have one."""
        for p in self.principles:
            if p.aspect is None:
                raise InputError(f"principle {p.id!r} has no aspect; the world's labeller reads one of "
                                 f"{', '.join(ASPECTS)}", file=self.source, field="aspect")

    def to_json(self) -> list[dict]:
        return [{k: v for k, v in vars(p).items() if v is not None} for p in self.principles]


def _line(node) -> int:
    return node.start_mark.line + 1


def load_constitution(path: str | Path | None = None) -> Constitution:
    """A constitution file (default ``configs/constitution.yaml``), checked field by field."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_PATH
    where = {"file": str(path)}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("cannot open: No such file or directory", **where) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read: {err}", **where) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise InputError(f"not valid YAML: {getattr(err, 'problem', err)}",
                         line=mark.line + 1 if mark else None, **where) from None
    if not isinstance(root, yaml.MappingNode):
        raise InputError("expected a mapping with a list 'principles'", line=_line(root) if root else None,
                         field="principles", **where)
    top = {k.value: v for k, v in root.value}
    unknown = set(top) - {"principles"}
    if unknown:
        raise InputError(f"unknown key {sorted(unknown)[0]!r}; expected 'principles'", line=_line(root), **where)
    node = top.get("principles")
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise InputError("expected a non-empty list of principles", line=_line(node or root), field="principles",
                         **where)
    principles, seen = [], set()
    for item in node.value:
        line = _line(item)
        if not isinstance(item, yaml.MappingNode):
            raise InputError("expected a principle: a mapping with id, critique, revision, comparison",
                             line=line, field="principles", **where)
        fields = {k.value: v for k, v in item.value}
        for name, v in fields.items():
            if name not in ("id", "aspect", "weight", *TEXT_FIELDS):
                raise InputError(f"unknown field {name!r}", line=_line(v), field=name, **where)
        values: dict = {}
        for name in ("id", *TEXT_FIELDS):
            v = fields.get(name)
            if v is None:
                raise InputError("missing", line=line, field=name, **where)
            if not isinstance(v, yaml.ScalarNode) or not str(v.value).strip() or v.tag != "tag:yaml.org,2002:str":
                raise InputError("expected a non-empty string", line=_line(v), field=name, **where)
            values[name] = " ".join(str(v.value).split())
        if not _ID_RE.match(values["id"]):
            raise InputError(f"expected letters, digits, '-' or '_', got {values['id']!r}", line=line, field="id",
                             **where)
        if values["id"] in seen:
            raise InputError(f"principle {values['id']!r} appears twice", line=line, field="id", **where)
        seen.add(values["id"])
        if "aspect" in fields:
            v = fields["aspect"]
            if not isinstance(v, yaml.ScalarNode) or v.value not in ASPECTS:
                raise InputError(f"expected one of {', '.join(ASPECTS)}", line=_line(v), field="aspect", **where)
            values["aspect"] = v.value
        if "weight" in fields:
            v = fields["weight"]
            try:
                w = float(v.value) if isinstance(v, yaml.ScalarNode) else float("nan")
            except ValueError:
                w = float("nan")
            if not (w > 0 and w < float("inf")):
                raise InputError("expected a positive number", line=_line(v), field="weight", **where)
            values["weight"] = w
        principles.append(Principle(**values))
    return Constitution(tuple(principles), source=str(path))
