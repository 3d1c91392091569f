"""Capability through EleutherAI's lm-evaluation-harness (Gao et al. 2023): the policy and
its base on the same lm-eval tasks, in-process, and the difference per item.

``rlhflab eval --capability TASKS`` names tasks, comma-separated: names lm-eval registers
(``mmlu``, ``gsm8k``: their data must already be in the local datasets cache, nothing is
downloaded), the tasks shipped here (``SHIPPED``), a task YAML file, or a directory of them
(lm-eval's ``include_path``). A YAML file's relative ``data_files`` are read from beside
it. lm-eval is an optional extra (``pip install 'rlhflab[eval]'``), imported only here.

Each model is wrapped in lm-eval's ``HFLM`` as it is (no reload), run with
``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``, greedy where a task generates, and
through the tokenizer's chat template when it has one (lm-eval's ``apply_chat_template``,
as everywhere else in rlhflab). Readings (``<m>`` is lm-eval's metric name, with its filter
after an underscore unless the filter is ``none``: ``exact_match_strict-match``):

| key | meaning |
|---|---|
| ``capability/<task>/<m>``, ``base/capability/<task>/<m>`` | the task's metric for policy and base |
| ``capability/<task>/n`` | items evaluated (after ``--capability-limit``) |
| ``capability/<task>/<m>_diff`` | policy minus base (metrics where higher is better) |
| ``capability/<task>/<m>_diff_stderr``, ``_diff_ci_low``, ``_diff_ci_high`` | its standard error and 95% interval |
| ``capability/<task>/<m>_diff_n`` | items paired, where the interval is paired |

The interval is paired over items where the metric is a mean of per-item scores (``acc``,
``exact_match``: lm-eval's per-sample log): d_i = policy_i - base_i, SE = sd(d) / sqrt(n)
(Miller 2024, "Adding error bars to evals", section 4: the same questions asked of both
models, so their shared difficulty cancels). Elsewhere (a group's aggregate, a corpus-level
metric) it is unpaired, from lm-eval's own standard errors: sqrt(se_p^2 + se_b^2), and
``_diff_n`` is absent. ``diagnose``'s ``capability_regression`` rule reads the differences.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rlhflab.errors import InputError

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
# The tasks shipped with rlhflab (``TASKS_DIR``): an MMLU-style multiple-choice task, the same
# questions in cloze form (what ``--mc`` scores), a GSM8K-style generate-until task and the
# world's arithmetic probes.
SHIPPED = ("rlhflab_mc", "rlhflab_mc_cloze", "rlhflab_gsm", "rlhflab_arithmetic")
INSTALL = "--capability needs lm-evaluation-harness: pip install 'rlhflab[eval]'"
Z95 = 1.959963984540054


def require_lm_eval():
    """lm-eval's module, or the one-line InputError that says how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise InputError(INSTALL, field="--capability") from None
    return lm_eval


@dataclass
class TaskSpec:
    """What ``--capability`` names, resolved: lm-eval task names, inline task configs (YAML
    files read here) and directories for lm-eval's ``include_path``."""

    names: list[str] = field(default_factory=list)
    configs: list[dict] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    manager: object = None  # lm_eval.tasks.TaskManager

    @property
    def tasks(self) -> list:
        return [*self.names, *self.configs]


def _yaml_config(path: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "not YAML"
        raise InputError(f"cannot read the task YAML ({first}); a task using lm-eval's !function tags: give "
                         "its directory instead", file=str(path), field="--capability") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        raise InputError("expected an lm-eval task config with a 'task' name", file=str(path), field="task")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:  # relative data files are read from beside the YAML
        def resolve(f):
            return f if not isinstance(f, str) or Path(f).is_absolute() else str(path.parent / f)

        if isinstance(files, dict):
            files = {k: [resolve(x) for x in v] if isinstance(v, list) else resolve(v) for k, v in files.items()}
        else:
            files = [resolve(x) for x in files] if isinstance(files, list) else resolve(files)
        for f in (files.values() if isinstance(files, dict) else [files]):
            for one in (f if isinstance(f, list) else [f]):
                if isinstance(one, str) and not any(c in one for c in "*?[") and not Path(one).is_file():
                    raise InputError(f"data file {one} not found", file=str(path), field="dataset_kwargs.data_files")
        cfg = {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_files": files}}
    return cfg


def parse_tasks(spec: str) -> TaskSpec:
    """``--capability``'s items, before lm-eval is asked: shipped names and YAML files become
    inline configs, directories include paths, anything else a name lm-eval must know."""
    out = TaskSpec()
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or not all(items):
        raise InputError(f"expected task names, YAML files or directories, comma-separated, got {spec!r}",
                         field="--capability")
    for item in items:
        path = Path(item)
        if item in SHIPPED:
            out.configs.append(_yaml_config(TASKS_DIR / f"{item}.yaml"))
        elif item.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise InputError("task YAML not found", file=item, field="--capability")
            out.configs.append(_yaml_config(path))
        elif path.is_dir():
            out.dirs.append(str(path))
        else:
            out.names.append(item)
    return out


@contextmanager
def _offline_and_quiet():
    """lm-eval offline (nothing downloads), its INFO logging and warnings about being given a
    model object (which is how it is meant to be called here) out of the way."""
    import sys

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    # huggingface_hub and datasets read the variables once, when they are imported: where they
    # already are (a notebook that loaded a model first), their offline switches are set too,
    # or a task lm-eval registers would be downloaded.
    switches = [(sys.modules.get(mod), name) for mod, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))) for name in names]
    switches = [(mod, name, getattr(mod, name)) for mod, name in switches if mod is not None and hasattr(mod, name)]
    for mod, name, _ in switches:
        setattr(mod, name, True)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        for mod, name, value in switches:
            setattr(mod, name, value)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def prepare_tasks(spec: str) -> TaskSpec:
    """``parse_tasks`` and lm-eval's task index: every name must be a task or group lm-eval
    knows (its built-in index is read only when a name is not in the user's directories,
    since reading it takes seconds), and a directory adds every task it holds. Call before
    loading models: a bad name fails first."""
    tasks = parse_tasks(spec)
    require_lm_eval()
    with _offline_and_quiet():
        from lm_eval.tasks import TaskManager

        for d in tasks.dirs:  # a directory runs every task it holds, each on its own
            found = TaskManager(include_path=d, include_defaults=False).all_subtasks
            if not found:
                raise InputError("no lm-eval task YAML in this directory", file=d, field="--capability")
            tasks.names += [n for n in found if n not in tasks.names]
        tm = TaskManager(include_path=tasks.dirs or None, include_defaults=False)
        known = set(tm.all_tasks)
        if any(n not in known for n in tasks.names):
            tm = TaskManager(include_path=tasks.dirs or None, include_defaults=True)
            known = set(tm.all_tasks)
    unknown = [n for n in tasks.names if n not in known]
    if unknown:
        raise InputError(f"unknown lm-eval task {', '.join(map(repr, unknown))}: not shipped with rlhflab "
                         f"({', '.join(SHIPPED)}), not registered with lm-eval, not a YAML file or a directory",
                         field="--capability")
    tasks.manager = tm
    with _offline_and_quiet():
        try:  # the tasks' data, read once here so that a task without it fails before any model loads
            if hasattr(tm, "load"):  # newer lm-eval; get_task_dict is deprecated there
                tm.load(tasks.tasks)
            else:
                from lm_eval.tasks import get_task_dict

                get_task_dict(tasks.tasks, tm)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - lm-eval and datasets raise many kinds; each is one line here
            said = (str(err).strip().splitlines() or [""])[0][:300]
            raise InputError(f"lm-eval could not load the tasks ({type(err).__name__}: {said}); nothing is "
                             "downloaded (HF_DATASETS_OFFLINE=1): a task lm-eval registers needs its data in the "
                             "local datasets cache, a YAML task its data files", field="--capability") from None
    return tasks


def run_tasks(model, tokenizer, tasks: TaskSpec, *, limit: int | None = None, batch_size: int = 16) -> dict:
    """lm-eval's ``simple_evaluate`` on one model with per-sample logs; its result dict."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from rlhflab.data import has_chat_template

    device = next(model.parameters()).device
    with _offline_and_quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks.tasks, task_manager=tasks.manager, limit=limit,
                                      log_samples=True, apply_chat_template=has_chat_template(tokenizer),
                                      bootstrap_iters=1000)
    if res is None:
        raise RuntimeError("lm-eval returned no result")
    return res


def _metric_name(key: str) -> tuple[str, str, str] | None:
    """lm-eval's result key ``acc,none`` -> (reading name, metric, filter); None for its
    standard errors and non-metric entries (``alias``)."""
    metric, sep, filt = key.partition(",")
    if not sep or metric.endswith("_stderr"):
        return None
    return (metric if filt == "none" else f"{metric}_{filt}"), metric, filt


def _number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _per_item(samples: list[dict], metric: str, filt: str) -> dict[int, float] | None:
    """doc_id -> the item's score, where every sample of the filter has a number."""
    out = {}
    for s in samples:
        if s.get("filter", "none") != filt:
            continue
        x = _number(s.get(metric))
        if x is None:
            return None
        out[s["doc_id"]] = x
    return out or None


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of d_i = a_i - b_i, its standard error sd(d) / sqrt(n) (sd with n - 1) and the
    normal 95% interval."""
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else float("nan")
    se = math.sqrt(var / n) if n > 1 else float("nan")
    return {"diff": mean, "stderr": se, "ci_low": mean - Z95 * se, "ci_high": mean + Z95 * se, "n": float(n)}


def capability_readings(policy: dict, base: dict) -> dict[str, float]:
    """The module table's readings from lm-eval's results of the policy and of the base."""
    out: dict[str, float] = {}
    for task, row in policy["results"].items():
        brow = base["results"].get(task, {})
        higher = policy.get("higher_is_better", {}).get(task, {})
        samples_p = policy.get("samples", {}).get(task)
        samples_b = base.get("samples", {}).get(task)
        n = policy.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            out[f"capability/{task}/n"] = float(n)
        for key, value in row.items():
            named = _metric_name(key)
            p, b = _number(value), _number(brow.get(key))
            if named is None or p is None:
                continue
            name, metric, filt = named
            out[f"capability/{task}/{name}"] = p
            if b is None:
                continue
            out[f"base/capability/{task}/{name}"] = b
            if higher.get(metric) is not True:
                continue  # a difference is read as better-or-worse: only where higher is better
            stem = f"capability/{task}/{name}_diff"
            items_p = _per_item(samples_p, metric, filt) if samples_p else None
            items_b = _per_item(samples_b, metric, filt) if samples_b else None
            paired = items_p is not None and items_b is not None and items_p.keys() == items_b.keys() \
                and len(items_p) > 1 and abs(sum(items_p.values()) / len(items_p) - p) < 1e-9
            if paired:
                ids = sorted(items_p)
                d = paired_difference([items_p[i] for i in ids], [items_b[i] for i in ids])
                out.update({stem: d["diff"], f"{stem}_stderr": d["stderr"], f"{stem}_ci_low": d["ci_low"],
                            f"{stem}_ci_high": d["ci_high"], f"{stem}_n": d["n"]})
                continue
            out[stem] = p - b
            se_p = _number(row.get(f"{metric}_stderr,{filt}"))
            se_b = _number(brow.get(f"{metric}_stderr,{filt}"))
            if se_p is not None and se_b is not None:
                se = math.sqrt(se_p ** 2 + se_b ** 2)
                out.update({f"{stem}_stderr": se, f"{stem}_ci_low": p - b - Z95 * se,
                            f"{stem}_ci_high": p - b + Z95 * se})
    return out


def item_scores(res: dict) -> dict:
    """Per task, each item's metrics and (for generated answers) the filtered response, for
    ``samples.json``."""
    out = {}
    for task, samples in (res.get("samples") or {}).items():
        rows = []
        for s in samples:
            row = {"doc_id": s["doc_id"], "filter": s.get("filter", "none")}
            for m in s.get("metrics", []):
                x = _number(s.get(m))
                if x is not None:
                    row[m] = x
            resp = s.get("filtered_resps")
            if isinstance(resp, list) and resp and isinstance(resp[0], str):
                row["response"] = resp[0]
            rows.append(row)
        out[task] = rows
    return out


def evaluate_capability(models: dict, tokenizer, tasks: TaskSpec, *, limit: int | None = None,
                        batch_size: int = 16) -> tuple[dict[str, float], dict]:
    """(readings, samples) of ``models`` = {"": policy, "base/": base} on ``tasks``."""
    res = {prefix: run_tasks(m, tokenizer, tasks, limit=limit, batch_size=batch_size) for prefix, m in models.items()}
    readings = capability_readings(res[""], res["base/"])
    return readings, {"policy": item_scores(res[""]), "base": item_scores(res["base/"])}
