"""Resume, concurrent writers, killed first runs and a full disk, fuzzed through the real CLI.

- ``--resume`` reads and checks every file of the checkpoint (safetensors headers, sizes,
  names, shapes and dtypes against the model; the JSON files' shapes; ``metrics.jsonl``)
  before it changes anything: each checkpoint file missing, cut short, with a broken
  header, of the wrong JSON shape or of the wrong tensors, a step at or beyond the run's
  end, and every setting a resume may not change is exit code 2, one line naming the file
  or the setting, and the run directory byte for byte as it was (its metric lines kept).
- A resume may change the steps (and the eval, logging and checkpoint cadence); it is
  applied to ``config.yaml`` and recorded in ``run.json``; paths in ``run.json`` are
  absolute, so a resume works from another working directory.
- A second writer into an output directory that another process is writing is refused in
  one line naming the holder's pid, for every command that writes a run directory.
- A first run killed with SIGKILL leaves nothing where the run should be (and nothing that
  blocks the next run); an online run is resumable instead, even before its first
  checkpoint.
- A full disk (ENOSPC, as the OS or safetensors reports it) is one line naming the path
  and the free space, exit code 2, nothing half-written, an earlier run intact.

Every case shares one 4-step PPO run (module fixture) copied per case; the kills fork the
test process (no fresh interpreter) and SIGKILL the child at a chosen call.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rlhflab.cli import main
from tests.component.test_rl_rollout import tiny_policy_dir
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")
RUN = ["--set", "rl.steps=4", "--set", "rl.batch_size=8", "--set", "rl.samples_per_prompt=4",
       "--set", "generation.max_new_tokens=6", "--set", "rl.eval_every=0", "--set", "rl.save_every=2"]
REWARDS = "def short(prompts, completions, **kw):\n    return [-len(c.split()) / 10 for c in completions]\n"
DPO_SMALL = ["--set", "world.n_preferences=32", "--set", "dpo.batch_size=8", "--set", "dpo.max_steps=2",
             "--set", "dpo.world_eval_every=-1", "--set", "dpo.eval_every=100"]
SFT_FAST = ["--set", "sft.max_steps=3", "--set", "sft.n_show=0", "--set", "sft.n_samples=4",
            "--set", "sft.eval_every=100", "--set", "world.n_sft=96", "--set", "world.n_sft_eval=8"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return tiny_policy_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, policy) -> Path:
    """A 4-step PPO run with a checkpoint at step 2, started from its own working directory
    with a reward function named by a relative path (``rewards.py:short``)."""
    base = tmp_path_factory.mktemp("resume")
    (base / "rewards.py").write_text(REWARDS)
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main(["ppo", "--config", TINY, "--sft", str(policy), "--reward-fn", "rewards.py:short",
                     "--out", "run", *RUN]) == 0
    finally:
        os.chdir(cwd)
    run = base / "run"
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    return run


def _copy(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included) -> sha256 of a file, or "dir"."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _refused(argv: list[str], root: Path, capsys, *names: str) -> str:
    """``main(argv)`` exits 2 with one line naming each of ``names``, and nothing under
    ``root`` changed."""
    before = _tree(root)
    assert main(argv) == 2
    line = _one_error_line(capsys)
    for name in names:
        assert name in line, (name, line)
    assert _tree(root) == before
    return line


# ---------------------------------------------------------------------------------------
# The checkpoint's files, broken one at a time

CKPT_FILES = ("policy.safetensors", "value.safetensors", "optimizer.safetensors", "optimizer.json",
              "scheduler.json", "rng.safetensors", "state.json")
SAFETENSORS = tuple(f for f in CKPT_FILES if f.endswith(".safetensors"))
JSONS = tuple(f for f in CKPT_FILES if f.endswith(".json"))


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _cut(at):
    def f(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:at(data, _header_len(path)) if len(data) >= 8 else 0])
    return f


def _tensors(edit):
    def f(path: Path) -> None:
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
    return f


def _first_key(tensors: dict, dims: int | None = None) -> str:
    return next(k for k in sorted(tensors) if dims is None or tensors[k].dim() == dims)


def _drop(dims=None):
    return _tensors(lambda t: t.pop(_first_key(t, dims)))


def _reshape(t: dict) -> None:
    k = _first_key(t, 2)
    t[k] = t[k].reshape(-1).contiguous()


def _retype(t: dict) -> None:
    k = _first_key(t, 2)
    t[k] = t[k].to(torch.float64)


SAFETENSORS_FLAWS = {
    "empty": _cut(lambda d, n: 0),
    "cut_in_length": _cut(lambda d, n: 5),
    "cut_in_header": _cut(lambda d, n: 8 + n // 2),
    "cut_after_header": _cut(lambda d, n: 8 + n),
    "cut_in_data": _cut(lambda d, n: 8 + n + (len(d) - 8 - n) // 2),
    "last_byte_cut": _cut(lambda d, n: len(d) - 1),
    "extra_bytes": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16),
    "huge_header_length": lambda p: p.write_bytes(struct.pack("<Q", 2 ** 40) + p.read_bytes()[8:]),
    "header_not_json": lambda p: p.write_bytes(p.read_bytes()[:8] + b"{" * _header_len(p) + p.read_bytes()[8 + _header_len(p):]),
}
TENSOR_FLAWS = {  # a well-formed file with the wrong tensors
    "policy.safetensors": {"key_missing": _drop(), "shape": _tensors(_reshape), "dtype": _tensors(_retype)},
    "value.safetensors": {"key_missing": _drop(), "shape": _tensors(_reshape)},
    "optimizer.safetensors": {"key_missing": _drop(), "shape": _tensors(_reshape),
                              "unknown_key": _tensors(lambda t: t.update({"state.999.exp_avg": torch.zeros(2)})),
                              "bad_key": _tensors(lambda t: t.update({"moments": torch.zeros(2)}))},
    "rng.safetensors": {"key_missing": _tensors(lambda t: t.clear() or t.update({"other": torch.zeros(2)})),
                        "short_state": _tensors(lambda t: t.update({"torch_cpu": t["torch_cpu"][:100].clone()})),
                        "dtype": _tensors(lambda t: t.update({"torch_cpu": t["torch_cpu"].float()}))},
}


def _json_edit(edit):
    def f(path: Path) -> None:
        obj = json.loads(path.read_text())
        obj = edit(obj)
        path.write_text(json.dumps(obj))
    return f


def _set(key, value):
    def edit(obj):
        node = obj
        *parents, last = key.split(".")
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
        return obj
    return _json_edit(edit)


_DELETE = object()
WHOLE_JSON = {"half": lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),
              "list": lambda p: p.write_text("[1, 2]"), "empty_object": lambda p: p.write_text("{}"),
              "string": lambda p: p.write_text('"step"'), "null": lambda p: p.write_text("null"),
              "not_utf8": lambda p: p.write_bytes(b"\xff\xfe{"), "empty": lambda p: p.write_text("")}
JSON_FIELDS = {  # file -> case -> (edit, the field the line must name)
    "state.json": {
        "step_string": (_set("step", "2"), "step"), "step_negative": (_set("step", -1), "step"),
        "step_fraction": (_set("step", 2.5), "step"), "step_bool": (_set("step", True), "step"),
        "step_null": (_set("step", None), "step"), "step_missing": (_set("step", _DELETE), "step"),
        "kl_controller_list": (_set("kl_controller", []), "kl_controller"),
        "kl_controller_value": (_set("kl_controller.value", "x"), "kl_controller"),
        "kl_controller_missing": (_set("kl_controller", _DELETE), "kl_controller"),
        "rng_missing": (_set("rng", _DELETE), "rng"), "rng_empty": (_set("rng", {}), "rng"),
        "rng_python_short": (_set("rng.python", [3, [1, 2], None]), "rng"),
        "evals": (_set("evals", "x"), "evals"), "stopped_early": (_set("stopped_early", "no"), "stopped_early"),
        "kl_status_steps": (_set("kl_status_steps", []), "kl_status_steps"),
        "best_eval": (_set("best_eval", "x"), "best_eval"), "time_rollout": (_set("time_rollout", "x"), "time_rollout"),
        "last_status": (_set("last_status", "bogus"), "last_status"), "bad_evals": (_set("bad_evals", -1), "bad_evals"),
        "algo": (_set("algo", "grpo"), "algo"),
    },
    "optimizer.json": {
        "groups_missing": (_set("param_groups", []), "param_groups"),
        "group_params_short": (_json_edit(lambda o: o["param_groups"][0]["params"].pop() and o), "param_groups"),
        "group_not_object": (_set("param_groups", [1, 2]), "param_groups"),
        "lr_string": (_set("param_groups.0.lr", "x"), "lr"),
        "indices_unknown": (_set("indices", ["999"]), "indices"),
        "scalars_list": (_set("scalars", []), "scalars"),
    },
    "scheduler.json": {
        "last_epoch_string": (_set("last_epoch", "x"), "last_epoch"),
        "last_epoch_missing": (_set("last_epoch", _DELETE), "last_epoch"),
        "base_lrs_short": (_set("base_lrs", [0.1]), "base_lrs"),
    },
}


def _ckpt_cases():
    for name in CKPT_FILES:
        yield pytest.param(name, lambda p: p.unlink(), None, id=f"{name}-missing")
    for name in SAFETENSORS:
        for case, flaw in {**SAFETENSORS_FLAWS, **TENSOR_FLAWS[name]}.items():
            yield pytest.param(name, flaw, None, id=f"{name}-{case}")
    for name in JSONS:
        for case, flaw in WHOLE_JSON.items():
            yield pytest.param(name, flaw, None, id=f"{name}-{case}")
        for case, (flaw, field) in JSON_FIELDS[name].items():
            yield pytest.param(name, flaw, field, id=f"{name}-{case}")


@pytest.mark.parametrize("name, flaw, field", list(_ckpt_cases()))
def test_a_broken_checkpoint_is_refused_and_the_run_kept(trained, tmp_path, capsys, name, flaw, field):
    run = _copy(trained, tmp_path)
    flaw(run / "checkpoint" / name)
    _refused(["ppo", "--resume", str(run)], tmp_path, capsys, name, *([field] if field else []))


@pytest.mark.parametrize("step", [4, 5, 99, 10 ** 9])
def test_a_checkpoint_at_or_beyond_the_runs_end_is_refused(trained, tmp_path, capsys, step):
    run = _copy(trained, tmp_path)
    _set("step", step)(run / "checkpoint" / "state.json")
    _refused(["ppo", "--resume", str(run)], tmp_path, capsys, "state.json", "rl.steps", str(step))


@pytest.mark.parametrize("line, number", [("{", 2), ("[1]", 2), ('{"loss": 1}', 2), ('{"step": "x"}', 2)])
def test_a_broken_metrics_line_is_refused(trained, tmp_path, capsys, line, number):
    run = _copy(trained, tmp_path)
    rows = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    rows.insert(number - 1, line + "\n")
    (run / "metrics.jsonl").write_text("".join(rows))
    _refused(["ppo", "--resume", str(run)], tmp_path, capsys, f"metrics.jsonl:{number}")


# ---------------------------------------------------------------------------------------
# What a resume may change


ALLOWED = {"rl.steps", "rl.eval_every", "rl.log_every", "rl.save_every", "rl.report_to"}


def _refused_overrides() -> list[str]:
    """For every field of the run's config that a resume may not change, a different value
    the config accepts (generated from the field's current value and type)."""
    from rlhflab.config import load_config, to_dict
    from rlhflab.errors import InputError

    base = to_dict(load_config(TINY, [item for item in RUN[1::2]]))
    out = []
    for section, fields in base.items():
        for name, value in fields.items():
            key = f"{section}.{name}"
            if key in ALLOWED or name == "report_to":
                continue
            if isinstance(value, bool):
                cand = str(not value).lower()
            elif isinstance(value, int):
                cand = str(value + 1)
            elif isinstance(value, float):
                cand = repr(value * 2 if value else 0.5)
            else:
                continue
            try:  # a value the config accepts (each field's domain and the checks across fields)
                load_config(None, [f"{key}={cand}"])
            except InputError:
                continue
            out.append(f"{key}={cand}")
    return out


REFUSED = _refused_overrides()


def test_the_generated_overrides_cover_every_section():
    assert {o.split(".")[0] for o in REFUSED} >= {"model", "generation", "world", "sft", "rm", "dpo", "rl"}
    assert {"rl.lr=0.0002", "rl.batch_size=9", "rl.beta=0.1", "rl.n_eval=17", "generation.max_new_tokens=7"} <= set(REFUSED)


def test_every_setting_a_resume_may_not_change_is_refused(trained):
    """Each generated override against the run's config.yaml: the check the CLI makes first,
    called directly (the config parsed once, each override set on a copy)."""
    import copy

    from rlhflab.commands.rl import resume_settings
    from rlhflab.config import load_config
    from rlhflab.errors import InputError

    where = trained / "config.yaml"
    saved = load_config(where)
    for override in REFUSED:
        key, value = override.split("=")
        section, name = key.split(".")
        cfg = copy.deepcopy(saved)
        setattr(getattr(cfg, section), name, yaml.safe_load(value))
        with pytest.raises(InputError, match=rf"config.yaml: field '{key}': a resumed run keeps the settings"):
            resume_settings(cfg, copy.deepcopy(saved), where)


@pytest.mark.parametrize("override", [next(o for o in REFUSED if o.startswith(f"{section}."))
                                      for section in ("model", "generation", "world", "sft", "rm", "dpo", "rl",
                                                      "lora")] + ["rl.lr=0.5", "rl.batch_size=16"])
def test_a_setting_a_resume_may_not_change_is_refused(trained, tmp_path, capsys, override):
    """Through the CLI, one setting of every section: refused, and the run as it was."""
    run = _copy(trained, tmp_path)
    _refused(["ppo", "--resume", str(run), "--set", override], tmp_path, capsys, override.split("=")[0])


def test_what_a_resume_may_change_is_applied(trained):
    from rlhflab.commands.rl import resume_settings
    from rlhflab.config import load_config

    where = trained / "config.yaml"
    cfg, changes = resume_settings(load_config(where, ["rl.steps=9", "rl.eval_every=3", "rl.log_every=2",
                                                       "rl.save_every=1", "rl.report_to=[tensorboard]"]),
                                   load_config(where), where)
    assert changes == {"rl.steps": [4, 9], "rl.eval_every": [0, 3], "rl.log_every": [1, 2], "rl.save_every": [2, 1],
                       "rl.report_to": [[], ["tensorboard"]]}
    assert (cfg.rl.steps, cfg.rl.eval_every, cfg.rl.lr) == (9, 3, load_config(where).rl.lr)


@pytest.mark.parametrize("flag", ["--config", "--sft", "--rm", "--reward-fn", "--prompts", "--eval-prompts", "--judge",
                                  "--out"])
def test_an_input_flag_with_resume_is_refused(trained, tmp_path, capsys, policy, flag):
    """Each input the run already has, given again (and valid): refused, not silently ignored."""
    run = _copy(trained, tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "what is 1 plus 2 ?"}\n')
    value = {"--config": TINY, "--sft": str(policy), "--rm": str(policy), "--reward-fn": "gold",
             "--prompts": str(tmp_path / "p.jsonl"), "--eval-prompts": str(tmp_path / "p.jsonl"),
             "--judge": f"rm:{policy}", "--out": str(run)}[flag]
    _refused(["ppo", "--resume", str(run), flag, value], tmp_path, capsys, flag)


@pytest.mark.parametrize("steps", [1, 2])
def test_steps_that_leave_nothing_to_train_are_refused(trained, tmp_path, capsys, steps):
    run = _copy(trained, tmp_path)
    _refused(["ppo", "--resume", str(run), "--set", f"rl.steps={steps}"], tmp_path, capsys, "rl.steps")


@pytest.mark.parametrize("setting", ["lr_schedule: cosine", "warmup_ratio: 0.5", "kl_controller: linear"])
def test_steps_cannot_change_where_the_schedule_depends_on_them(trained, tmp_path, capsys, setting):
    run = _copy(trained, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    key, value = setting.split(": ")
    cfg["rl"][key] = yaml.safe_load(value)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    _refused(["ppo", "--resume", str(run), "--set", "rl.steps=6"], tmp_path, capsys, "rl.steps", f"rl.{key}")


def test_a_resume_from_another_directory_extends_the_run_and_records_it(trained, tmp_path, monkeypatch, capsys):
    """From a directory without rewards.py, after a kill mid-write of a metric line: the
    run extended to 6 steps, config.yaml saying so, run.json recording the resume."""
    run = _copy(trained, tmp_path)
    spec = json.loads((run / "run.json").read_text())["reward_fns"][0]
    assert Path(spec.rpartition(":")[0]).is_absolute(), spec
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "objective/kl": 0.1')  # a line the kill cut short
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["ppo", "--resume", str(run), "--set", "rl.steps=6", "--set", "rl.log_every=1"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["rl"]["steps"] == 6
    record = json.loads((run / "run.json").read_text())
    assert [(r["step"], r["overrides"]) for r in record["resumes"]] == [(2, {"rl.steps": [4, 6]})]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_stored_specs_are_absolute(tmp_path, monkeypatch):
    from rlhflab.commands.rl import absolute_spec

    tmp_path = tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.py").write_text("")
    (tmp_path / "rm").mkdir()
    assert absolute_spec("r.py:f") == f"{tmp_path}/r.py:f"
    assert absolute_spec("r.py:f=0.5") == f"{tmp_path}/r.py:f=0.5"
    assert absolute_spec("gold") == "gold" and absolute_spec("mod:f=2") == "mod:f=2"
    assert absolute_spec("rm:rm", judge=True) == f"rm:{tmp_path}/rm"
    assert absolute_spec("py:r.py:f", judge=True) == f"py:{tmp_path}/r.py:f"
    assert absolute_spec("py:mod:f", judge=True) == "py:mod:f" and absolute_spec("world:ai", judge=True) == "world:ai"


# ---------------------------------------------------------------------------------------
# One writer at a time


HOLD = ("import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding ``out``'s lock (``.<name>.lock`` beside it), as a live run does."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out.parent / f".{out.name}.lock")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _argv(command: str, policy: Path, out: Path) -> list[str]:
    p = str(policy)
    return {"sft": ["sft", "--config", TINY, *SFT_FAST],
            "rm": ["rm", "--config", TINY, "--backbone", p, "--world-pairs"],
            "dpo": ["dpo", "--config", TINY, "--sft", p],
            "ppo": ["ppo", "--config", TINY, "--sft", p, "--reward-fn", "length"],
            "grpo": ["grpo", "--config", TINY, "--sft", p, "--reward-fn", "length"],
            "eval": ["eval", "--config", TINY, "--policy", p, "--base", p],
            "eval-rm": ["eval-rm", "--config", TINY, "--rm", p, "--data", TINY],
            "bon": ["bon", "--config", TINY, "--policy", p, "--rm", p, "--n", "1,2"],
            "rs": ["rs", "--config", TINY, "--sft", p, "--rm", p],
            "iterate": ["iterate", "--config", TINY, "--sft", p, "--rounds", "1"],
            "rlaif": ["rlaif", "--config", TINY, "--policy", p],
            "cai-sl": ["cai-sl", "--config", TINY, "--policy", p],
            "world": ["world", "--config", TINY],
            "sweep": ["sweep", "--config", TINY, "--bandit", "--algo", "ppo", "--beta", "0.1"],
            "run": ["run", "--config", TINY],
            "collect": ["collect", "--config", TINY, "--policy", p, "-n", "2"],
            }[command] + ["--out", str(out), "--overwrite"]


LOCKED = ["sft", "rm", "dpo", "ppo", "grpo", "eval", "eval-rm", "bon", "rs", "iterate", "rlaif", "cai-sl", "world",
          "sweep", "run", "collect"]


@pytest.mark.parametrize("command", LOCKED)
def test_a_second_writer_is_refused_naming_the_first(tmp_path, capsys, policy, command):
    out = tmp_path / ("out.jsonl" if command == "collect" else "out")
    holder = _holder(out)
    try:
        line = _refused(_argv(command, policy, out), tmp_path, capsys, str(out), f"pid {holder.pid}")
        assert "another" in line
    finally:
        holder.kill()
        holder.wait()


def test_a_resume_while_the_run_is_written_is_refused(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path)
    holder = _holder(run)
    try:
        _refused(["ppo", "--resume", str(run)], tmp_path, capsys, str(run), f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()


def _fork(argv: list[str], patches: dict, cwd: Path | None = None) -> int:
    """Run ``main(argv)`` in a forked child with ``patches`` (``module:attr`` -> a wrapper
    factory of the original) applied; returns the child's pid."""
    import importlib

    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        if cwd is not None:
            os.chdir(cwd)
        for target, wrap in patches.items():
            mod, _, attr = target.partition(":")
            owner = importlib.import_module(mod)
            *path, last = attr.split(".")
            for p in path:
                owner = getattr(owner, p)
            setattr(owner, last, wrap(getattr(owner, last)))
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the child's own)
        code = main(argv)
    finally:
        os._exit(code)


def _kill_at(n: int = 1):
    """A wrapper factory: SIGKILL the process at the ``n``-th call."""
    count = [0]

    def wrap(original):
        def f(*a, **k):
            count[0] += 1
            if count[0] >= n:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **k)
        return f
    return wrap


def _wait(pid: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the child did not finish")


def test_two_overwrites_at_once_the_second_is_refused_and_the_first_kept(tmp_path, capsys):
    out = tmp_path / "sft"
    started = tmp_path / "started"
    go = tmp_path / "go"

    def pause(original):  # the first writer stops at its first metric line until told to go on
        def f(self, *a, **k):
            started.touch()
            while not go.exists():
                time.sleep(0.01)
            return original(self, *a, **k)
        return f

    first = _fork(["sft", "--config", TINY, "--out", str(out), "--overwrite", *SFT_FAST],
                  {"rlhflab.tracking:MetricsLog.log": pause})
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists()
        assert main(["sft", "--config", TINY, "--out", str(out), "--overwrite", *SFT_FAST]) == 2
        line = _one_error_line(capsys)
        assert f"pid {first}" in line and str(out) in line
    finally:
        go.touch()
        code = _wait(first)
    assert code == 0 and (out / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "sft", "started"]


# ---------------------------------------------------------------------------------------
# kill -9 of a first run


KILLS = {  # command -> (the call to kill at, its n-th call)
    "sft": ("rlhflab.tracking:MetricsLog.log", 2),
    "rm": ("rlhflab.tracking:MetricsLog.log", 2),
    "dpo": ("rlhflab.tracking:MetricsLog.log", 2),
    "iterate": ("rlhflab.tracking:MetricsLog.log", 2),  # in round 1's reward model
    "world": ("rlhflab.data:write_jsonl", 2),
    "eval": ("rlhflab.artifacts:write_json", 1),
}


@pytest.mark.parametrize("command", list(KILLS))
def test_a_killed_first_run_leaves_nothing_in_the_way(tmp_path, policy, command):
    out = tmp_path / "out"
    target, n = KILLS[command]
    argv = [a for a in _argv(command, policy, out) if a != "--overwrite"]
    argv += {"rm": ["--set", "world.n_preferences=64"], "dpo": DPO_SMALL,
             "iterate": ["--set", "rl.steps=1", "--set", "rm.n_prompts=24"]}.get(command, [])
    assert _wait(_fork(argv, {target: _kill_at(n)})) == -signal.SIGKILL
    assert not out.exists()  # nothing half-written where the run should be
    from rlhflab.artifacts import check_out_dir

    check_out_dir(out, overwrite=False)  # and nothing that blocks the next run


def test_a_killed_first_sft_run_then_the_same_command_works(tmp_path):
    out = tmp_path / "sft"
    argv = ["sft", "--config", TINY, "--out", str(out), *SFT_FAST]
    assert _wait(_fork(argv, {"rlhflab.tracking:MetricsLog.log": _kill_at(2)})) == -signal.SIGKILL
    assert main(argv) == 0
    assert (out / "model" / "config.json").is_file() and [p.name for p in tmp_path.rglob(".*")] == []


def test_an_online_run_killed_before_its_first_checkpoint_is_resumable(tmp_path, policy, capsys):
    out = tmp_path / "ppo"
    argv = ["ppo", "--config", TINY, "--sft", str(policy), "--reward-fn", "length", "--out", str(out), *RUN]
    assert _wait(_fork(argv, {"rlhflab.tracking:MetricsLog.log": _kill_at(1)})) == -signal.SIGKILL
    assert (out / "run.json").is_file() and not (out / "checkpoint").exists()
    line = _refused(argv, tmp_path, capsys, str(out), "--resume")
    assert "--overwrite" in line
    assert main(["ppo", "--resume", str(out)]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "model" / "config.json").is_file()


# ---------------------------------------------------------------------------------------
# A full disk


def _full(kind: str, n: int = 1):
    """A wrapper factory: the ``n``-th call fails as a full disk does, as an OSError
    (Python's writes) or a SafetensorError (safetensors' and tokenizers' Rust writers)."""
    count = [0]

    def wrap(original):
        def f(*a, **k):
            count[0] += 1
            if count[0] >= n:
                if kind == "oserror":
                    path = next((str(x) for x in a if isinstance(x, (str, Path))), None)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
                from safetensors import SafetensorError

                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                      'message: "No space left on device" })')
            return original(*a, **k)
        return f
    return wrap


FULL = [  # (command, extra argv, where the disk fills, its n-th call, how it is reported)
    ("sft", [], "rlhflab.artifacts:write_json", 1, "oserror"),
    ("sft", [], "rlhflab.models:save_pretrained_atomic", 1, "safetensors"),
    ("rm", ["--set", "world.n_preferences=64"], "rlhflab.tracking:MetricsLog.log", 2, "oserror"),
    ("dpo", DPO_SMALL, "rlhflab.artifacts:write_json", 1, "safetensors"),
    ("ppo", RUN, "rlhflab.tracking:MetricsLog.log", 1, "oserror"),
    ("eval", [], "rlhflab.artifacts:write_json", 1, "oserror"),
    ("world", [], "rlhflab.data:write_jsonl", 2, "oserror"),
    ("collect", [], "rlhflab.data:write_jsonl", 1, "oserror"),
]


def _full_disk_line(line: str) -> None:
    assert "no space left on device" in line.lower() and "free" in line, line


@pytest.mark.parametrize("command, extra, target, n, kind, overwrite",
                         [(*c, False) for c in FULL] + [(*c, True) for c in FULL if c[0] in ("sft", "ppo", "world", "collect")],
                         ids=[f"{c[0]}-{c[2].split(':')[1]}-{mode}" for mode, cases in
                              (("first", FULL), ("overwrite", [c for c in FULL if c[0] in ("sft", "ppo", "world",
                                                                                               "collect")]))
                              for c in cases])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys, policy,
                                                                  command, extra, target, n, kind, overwrite):
    import importlib

    out = tmp_path / ("out.jsonl" if command == "collect" else "out")
    if overwrite:
        if command == "collect":
            out.write_text('{"earlier": true}\n')
        else:
            (out / "model").mkdir(parents=True)
            (out / "metrics.json").write_text('{"earlier": true}\n')
    argv = _argv(command, policy, out) + extra
    if not overwrite:
        argv.remove("--overwrite")
    mod, _, attr = target.partition(":")
    owner = importlib.import_module(mod)
    *path, last = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    monkeypatch.setattr(owner, last, _full(kind, n)(getattr(owner, last)))
    before = _tree(tmp_path)
    assert main(argv) == 2
    line = _one_error_line(capsys)
    _full_disk_line(line)
    assert str(tmp_path) in line
    assert _tree(tmp_path) == before  # the earlier run intact, nothing beside it


def test_a_full_disk_during_a_resume_keeps_the_checkpoint(trained, tmp_path, monkeypatch, capsys):
    import rlhflab.tracking

    run = _copy(trained, tmp_path)
    ckpt = _tree(run / "checkpoint")
    monkeypatch.setattr(rlhflab.tracking.MetricsLog, "log", _full("oserror")(rlhflab.tracking.MetricsLog.log))
    assert main(["ppo", "--resume", str(run)]) == 2
    _full_disk_line(_one_error_line(capsys))
    assert _tree(run / "checkpoint") == ckpt
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_a_checkpoint_set_aside_by_a_kill_mid_save_is_found(trained, tmp_path):
    """Killed between the two renames of a checkpoint save: the complete checkpoint lies
    aside (``.checkpoint.aside-PID``); the resume puts it back and continues from it."""
    run = _copy(trained, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (run / "checkpoint").rename(run / f".checkpoint.aside-{dead}")
    assert main(["ppo", "--resume", str(run)]) == 0
    record = json.loads((run / "run.json").read_text())
    assert [r["step"] for r in record["resumes"]] == [2]
    assert [p.name for p in tmp_path.rglob(".*")] == []
