"""Faults at run time and the output directory.

- Every training loop (SFT, reward model, DPO family, online RL) stops at the first
  non-finite loss or gradient norm with one line (the step, what, the likely cause) and
  exit code 2, before the optimizer step; nothing NaN is ever saved as a model.
- ``--overwrite`` keeps the earlier run until the new one is complete; a failed
  replacement leaves it as it was and nothing beside it; a first run is written beside its
  place as well, so a failed or killed one leaves nothing at ``--out``.
- ``--out`` under a regular file or in an unwritable place fails before any data is loaded.
- What a killed run or save leaves behind is swept by the next one (a kill between the
  two renames of a replacement is finished); directories get the umask's modes.
- Slow: SIGKILL of real CLI runs mid-training, mid-save and mid-overwrite.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhflab.cli import main
from tests.component.test_rl_rollout import tiny_policy_dir
from tests.conftest import ROOT, subprocess_env

TINY = str(ROOT / "configs" / "tiny.yaml")
SFT_FAST = ["--set", "sft.max_steps=3", "--set", "sft.n_show=0", "--set", "sft.n_samples=4",
            "--set", "sft.eval_every=100", "--set", "world.n_sft=96", "--set", "world.n_sft_eval=8"]
RL_FAST = ["--set", "rl.steps=3", "--set", "rl.batch_size=8", "--set", "generation.max_new_tokens=6",
           "--set", "rl.eval_every=0", "--set", "rl.samples_per_prompt=4"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> str:
    return str(tiny_policy_dir(tmp_path_factory.getbasetemp()))


def _snapshot(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (the earlier run, byte for byte)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _earlier_run(out: Path) -> dict[str, str]:
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"earlier weights")
    (out / "metrics.json").write_text('{"earlier": true}\n')
    return _snapshot(out)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.rglob(".*"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _nan_after(calls: int):
    """A wrapper factory: the wrapped function's first tensor result turns NaN from call
    ``calls`` + 1 on."""
    count = {"n": 0}

    def wrap(original):
        def f(*args, **kwargs):
            out = original(*args, **kwargs)
            count["n"] += 1
            if count["n"] > calls:
                if isinstance(out, tuple):
                    return (out[0] * float("nan"), *out[1:])
                return out * float("nan")
            return out

        return f

    return wrap


# ---------------------------------------------------------------------------------------
# The non-finite stop, one case per loop family


def test_sft_stops_at_a_nan_loss_and_a_fresh_run_leaves_nothing(tmp_path, monkeypatch, capsys):
    import rlhflab.algos.sft as sft

    # The second training pass (the first is step 0's held-out evaluation) goes NaN.
    monkeypatch.setattr(sft, "response_logp_sums", _nan_after(2)(sft.response_logp_sums))
    out = tmp_path / "sft"
    assert main(["sft", "--config", TINY, "--out", str(out), *SFT_FAST]) == 2
    line = _one_error_line(capsys)
    assert "sft step 2" in line and "loss is nan" in line and "sft.lr=0.003" in line
    assert "non-finite input" in line and "no model was saved" in line
    assert not out.exists() and _hidden(tmp_path) == []


def test_sft_nan_during_overwrite_keeps_the_earlier_run(tmp_path, monkeypatch, capsys):
    import rlhflab.algos.sft as sft

    out = tmp_path / "sft"
    before = _earlier_run(out)
    monkeypatch.setattr(sft, "response_logp_sums", _nan_after(1)(sft.response_logp_sums))
    assert main(["sft", "--config", TINY, "--out", str(out), "--overwrite", *SFT_FAST]) == 2
    assert "sft step 1" in _one_error_line(capsys)
    assert _snapshot(out) == before
    assert _hidden(tmp_path) == []  # the unfinished replacement is gone


def test_sft_stops_at_an_infinite_gradient_without_clipping(tmp_path, monkeypatch, capsys):
    """With sft.max_grad_norm=0 nothing clips; the norm is still measured and checked."""
    import rlhflab.training as training

    real = training.grad_norm_of
    monkeypatch.setattr(training, "grad_norm_of", lambda params: real(params) * float("inf"))
    out = tmp_path / "sft"
    assert main(["sft", "--config", TINY, "--out", str(out), *SFT_FAST, "--set", "sft.max_grad_norm=0"]) == 2
    line = _one_error_line(capsys)
    assert "sft step 1" in line and "gradient norm is inf" in line
    assert not out.exists()


def test_reward_model_stops_at_a_nan_loss(tmp_path, monkeypatch, capsys, policy):
    import rlhflab.algos.reward_model as rm

    monkeypatch.setitem(rm.OBJECTIVES, "bradley_terry", _nan_after(1)(rm.OBJECTIVES["bradley_terry"]))
    out = tmp_path / "rm"
    assert main(["rm", "--config", TINY, "--backbone", policy, "--world-pairs", "--out", str(out),
                 "--set", "rm.max_steps=3", "--set", "world.n_preferences=64", "--set", "rm.eval_every=100"]) == 2
    line = _one_error_line(capsys)
    assert "rm step 2" in line and "loss is nan" in line and "rm.lr=" in line
    assert not out.exists()


def test_reward_model_stops_at_a_nan_margin_in_the_data(tmp_path, capsys, policy):
    """A NaN margin reaches the loss unless the loader refuses it; either way: exit 2, one
    line naming the cause, nothing written."""
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "a good answer", "rejected": "bad", "margin": float("nan") if i == 3 else 1.0}
            for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN as a bare literal
    out = tmp_path / "rm"
    assert main(["rm", "--config", TINY, "--backbone", policy, "--data", str(data), "--out", str(out),
                 "--set", "rm.max_steps=3", "--set", "rm.batch_size=8", "--set", "rm.margin_scale=1.0"]) == 2
    line = _one_error_line(capsys)
    assert "margin" in line or "non-finite" in line
    assert not out.exists()


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_dpo_family_stops_at_a_nan_loss(tmp_path, monkeypatch, capsys, policy, loss):
    import rlhflab.algos.dpo as dpo

    # The registry resolves a name once and keeps the function: replace the kept one.
    monkeypatch.setitem(dpo.PREFERENCE_LOSSES._resolved, loss, _nan_after(1)(dpo.PREFERENCE_LOSSES[loss]))
    out = tmp_path / loss
    extra = ["--unpaired-from-pairs"] if loss == "kto" else []
    assert main(["dpo", "--loss", loss, *extra, "--config", TINY, "--sft", policy, "--out", str(out),
                 "--set", "dpo.max_steps=3", "--set", "dpo.world_eval_every=-1", "--set", "world.n_preferences=64",
                 "--set", "dpo.batch_size=8", "--set", "dpo.eval_every=100"]) == 2
    line = _one_error_line(capsys)
    assert "step 1" in line and "non-finite" in line and "dpo.lr=" in line
    assert not out.exists()


def test_online_rl_stops_at_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, policy):
    import rlhflab.algos.update as update

    # rl.epochs=1 x 1 minibatch: one policy-loss call per step; step 3's goes NaN.
    monkeypatch.setattr(update, "policy_gradient_loss", _nan_after(2)(update.policy_gradient_loss))
    out = tmp_path / "grpo"
    assert main(["grpo", "--config", TINY, "--sft", policy, "--reward-fn", "length", "--out", str(out), *RL_FAST,
                 "--set", "rl.save_every=1", "--set", "rl.epochs=1", "--set", "rl.num_minibatches=1"]) == 2
    line = _one_error_line(capsys)
    assert "grpo step 3" in line and "gradient norm is nan" in line and "rl.lr=" in line
    assert f"kept in {out / 'checkpoint'}" in line
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not (out / "model").exists()
    from safetensors.torch import load_file

    weights = load_file(str(out / "checkpoint" / "policy.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_online_rl_nan_without_a_checkpoint_leaves_nothing(tmp_path, monkeypatch, capsys, policy):
    import rlhflab.algos.update as update

    monkeypatch.setattr(update, "policy_gradient_loss", _nan_after(0)(update.policy_gradient_loss))
    out = tmp_path / "ppo"
    assert main(["ppo", "--config", TINY, "--sft", policy, "--reward-fn", "length", "--out", str(out), *RL_FAST]) == 2
    line = _one_error_line(capsys)
    assert "ppo step 1" in line and "no model was saved" in line
    assert not out.exists()


def test_nan_weights_are_never_saved(tmp_path):
    from rlhflab.checkpoint import save_checkpoint
    from rlhflab.errors import InputError
    from rlhflab.models import load_causal_lm, load_tokenizer, save_pretrained_atomic

    src = tiny_policy_dir(tmp_path)
    tok = load_tokenizer(src)
    model = load_causal_lm(src, tok)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        save_pretrained_atomic(model, tok, tmp_path / "model")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(InputError, match="non-finite"):
        save_checkpoint(tmp_path / "ckpt", policy=model, optimizer=opt, scheduler=sched, state={"step": 1})
    assert not (tmp_path / "model").exists() and not (tmp_path / "ckpt").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------
# The output directory


def test_a_completed_overwrite_replaces_the_run_and_leaves_nothing_beside_it(tmp_path, capsys):
    out = tmp_path / "sft"
    _earlier_run(out)
    assert main(["sft", "--config", TINY, "--out", str(out), "--overwrite", *SFT_FAST]) == 0
    assert (out / "model" / "model.safetensors").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text()).get("earlier") is None
    assert _hidden(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    for d in (out, out / "model"):  # mkdir's modes under the umask, not mkdtemp's 0700
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((out / "model" / "model.safetensors").stat().st_mode) == 0o666 & ~mask


def test_world_export_overwrite_keeps_the_earlier_export_until_the_new_one_is_written(tmp_path, monkeypatch, capsys):
    """``rlhflab world --overwrite`` that fails half-way (a write raising after the first
    file) leaves the earlier export exactly as it was, and nothing beside it."""
    import rlhflab.data as data

    out = tmp_path / "world"
    assert main(["world", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    calls = []
    original = data.write_jsonl

    def failing(path, rows):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(path, rows)

    monkeypatch.setattr(data, "write_jsonl", failing)
    assert main(["world", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--overwrite",
                 "--set", "world.seed=1"]) == 2
    line = _one_error_line(capsys)  # a full disk: one line naming the place, the space left and the earlier run
    assert f"{out}: no space left on device" in line and "free of" in line and "earlier run is as it was" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo", "eval", "eval-rm", "collect"])
def test_out_under_a_regular_file_fails_before_any_data_is_loaded(tmp_path, monkeypatch, capsys, policy, command):
    import rlhflab.data
    import rlhflab.models
    import rlhflab.readers

    def loaded(*a, **k):
        raise AssertionError("data or a model was loaded before --out was checked")

    for mod, name in ((rlhflab.data, "load_rows"), (rlhflab.models, "load_causal_lm"),
                      (rlhflab.models, "load_tokenizer"), (rlhflab.readers, "iter_jsonl")):
        monkeypatch.setattr(mod, name, loaded)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = str(blocker / "run")
    data = str(tmp_path / "d.jsonl")
    argv = {"sft": ["sft", "--data", data],
            "rm": ["rm", "--backbone", policy, "--data", data],
            "dpo": ["dpo", "--sft", policy, "--data", data],
            "ppo": ["ppo", "--sft", policy, "--reward-fn", "length"],
            "eval": ["eval", "--policy", policy, "--base", policy],
            "eval-rm": ["eval-rm", "--rm", policy, "--data", data],
            "collect": ["collect", "--policy", policy, "-n", "2"]}[command]
    assert main([*argv, "--config", TINY, "--out", out]) == 2
    line = _one_error_line(capsys)
    assert str(blocker) in line and "not a directory" in line
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_out_in_an_unwritable_place_fails_with_one_line(tmp_path, capsys):
    if os.geteuid() == 0:
        place = Path("/proc/rlhflab-fault-test/run")  # even root cannot create directories in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        place = locked / "run"
    try:
        assert main(["sft", "--config", TINY, "--out", str(place), *SFT_FAST]) == 2
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)
    line = _one_error_line(capsys)
    assert "cannot write the output directory" in line and str(place) in line
    assert not place.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_replacement_are_swept_or_finished(tmp_path):
    from rlhflab.artifacts import begin_run, finish_run, sweep_leftovers

    out = tmp_path / "run"
    dead = _dead_pid()
    # Killed while writing the replacement: the half-written one goes, the earlier run stays.
    before = _earlier_run(out)
    (tmp_path / f".run.new-{dead}").mkdir()
    (tmp_path / f".run.new-{dead}" / "half.txt").write_text("x")
    sweep_leftovers(out)
    assert _snapshot(out) == before and _hidden(tmp_path) == []
    # Killed between the two renames: the earlier run aside, the complete new one beside.
    new = tmp_path / f".run.new-{dead}"
    new.mkdir()
    (new / "metrics.json").write_text('{"new": true}\n')
    out.rename(tmp_path / f".run.old-{dead}")
    sweep_leftovers(out)
    assert json.loads((out / "metrics.json").read_text()) == {"new": True} and _hidden(tmp_path) == []
    # Killed after setting the earlier run aside with no new one: it is put back.
    out.rename(tmp_path / f".run.old-{dead}")
    sweep_leftovers(out)
    assert json.loads((out / "metrics.json").read_text()) == {"new": True} and _hidden(tmp_path) == []
    # A live run's staging directory is left alone; begin/finish replace in renames.
    live = tmp_path / f".run.new-{os.getppid()}"
    live.mkdir()
    work = begin_run(out, overwrite=True)
    assert work.name == f".run.new-{os.getpid()}" and live.is_dir()
    (work / "metrics.json").write_text('{"third": true}\n')
    finish_run(work, out)
    assert json.loads((out / "metrics.json").read_text()) == {"third": True}
    assert _hidden(tmp_path) == [live.name]


def test_a_killed_save_leaves_no_temp_directory_after_the_next_save(tmp_path):
    from rlhflab.models import load_causal_lm, load_tokenizer, save_pretrained_atomic

    src = tiny_policy_dir(tmp_path / "src")
    tok = load_tokenizer(src)
    model = load_causal_lm(src, tok)
    dead = _dead_pid()
    (tmp_path / f".model.tmp-{dead}-abcd1234").mkdir()
    (tmp_path / f".model.tmp-{dead}-abcd1234" / "config.json").write_text("{")
    save_pretrained_atomic(model, tok, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "src"]
    # Killed between setting the earlier model aside and renaming the new one in.
    (tmp_path / "model").rename(tmp_path / f".model.aside-{dead}")
    new = tmp_path / f".model.tmp-{dead}-0123abcd"
    new.mkdir()
    (new / "marker").write_text("new")
    save_pretrained_atomic(model, tok, tmp_path / "other")  # a save elsewhere touches nothing here
    assert (tmp_path / f".model.aside-{dead}").is_dir()
    save_pretrained_atomic(model, tok, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "other", "src"]


# ---------------------------------------------------------------------------------------
# kill -9 of real runs (slow)


def _start(args: list[str], cwd: Path, code: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "rlhflab.cli"]
    return subprocess.Popen([*cmd, *args], cwd=cwd, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached the point to kill it at")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


LONG_SFT = ["--set", "sft.max_steps=400", "--set", "sft.n_show=0", "--set", "sft.log_every=1",
            "--set", "world.n_sft=96", "--set", "world.n_sft_eval=8", "--set", "sft.eval_every=1000"]


@pytest.mark.slow
def test_kill_mid_overwrite_keeps_the_earlier_run_and_the_next_run_works(tmp_path):
    out = tmp_path / "sft"
    before = _earlier_run(out)
    proc = _start(["sft", "--config", TINY, "--out", str(out), "--overwrite", *LONG_SFT], tmp_path)
    staged = lambda: [p for p in tmp_path.glob(".sft.new-*") if (p / "metrics.jsonl").is_file()  # noqa: E731
                      and (p / "metrics.jsonl").read_text().count("\n") >= 3]
    _kill_when(proc, lambda: bool(staged()))
    assert _snapshot(out) == before  # mid-training of the replacement: the earlier run as it was
    assert [p.name for p in tmp_path.glob(".sft.new-*")] == [f".sft.new-{proc.pid}"]
    assert main(["sft", "--config", TINY, "--out", str(out), "--overwrite", *SFT_FAST]) == 0
    assert _hidden(tmp_path) == [] and (out / "model" / "config.json").is_file()


@pytest.mark.slow
def test_kill_mid_training_of_a_first_run_leaves_nothing_in_the_way(tmp_path):
    """A first run is written beside its place too: killed, nothing is at --out, and the
    same command runs again without --overwrite (what the kill left is swept)."""
    out = tmp_path / "sft"
    proc = _start(["sft", "--config", TINY, "--out", str(out), *LONG_SFT], tmp_path)
    staged = lambda: [p for p in tmp_path.glob(".sft.new-*") if (p / "metrics.jsonl").is_file()  # noqa: E731
                      and (p / "metrics.jsonl").read_text().count("\n") >= 3]
    _kill_when(proc, lambda: bool(staged()))
    assert not out.exists()  # a half-trained run is never at --out
    assert main(["sft", "--config", TINY, "--out", str(out), *SFT_FAST]) == 0
    assert _hidden(tmp_path) == [] and (out / "model" / "config.json").is_file()


# Run the CLI with a model save that stalls once its weights are written (so the kill lands
# inside save_pretrained_atomic's temp directory).
STALLED_SAVE = """
import sys, time
from pathlib import Path
import transformers
original = transformers.PreTrainedModel.save_pretrained
def stalled(self, path, *a, **k):
    original(self, path, *a, **k)
    Path(path).parent.joinpath("SAVE_STARTED").write_text(path)
    time.sleep(120)
transformers.PreTrainedModel.save_pretrained = stalled
from rlhflab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_mid_save_leaves_no_temp_directory_after_the_next_run(tmp_path):
    out = tmp_path / "sft"
    before = _earlier_run(out)
    proc = _start(["sft", "--config", TINY, "--out", str(out), "--overwrite", *SFT_FAST], tmp_path, STALLED_SAVE)
    _kill_when(proc, lambda: bool(list(tmp_path.glob(".sft.new-*/SAVE_STARTED"))))
    staged = tmp_path / f".sft.new-{proc.pid}"
    assert [p.name for p in staged.glob(".model.tmp-*")] and not (staged / "model").exists()
    assert _snapshot(out) == before
    assert main(["sft", "--config", TINY, "--out", str(out), "--overwrite", *SFT_FAST]) == 0
    assert _hidden(tmp_path) == []


def test_a_replaced_main_job_records_its_final_paths(tmp_path):
    """``rlhflab run --overwrite`` is written beside the earlier job; the paths its stages
    recorded (an arm's run.json, the report's title) name the final directory."""
    from rlhflab.commands.arms import retarget_paths

    work, final = tmp_path / ".job.new-1", tmp_path / "job"
    (work / "ppo").mkdir(parents=True)
    (work / "ppo" / "run.json").write_text(json.dumps({"sft": str((work / "sft").resolve()), "rm": None}))
    (work / "report.html").write_text(f"<h2>{work.resolve()}</h2>")
    (work / "ppo" / "weights.bin").write_bytes(str(work).encode())  # not a record: left alone
    retarget_paths(work, final)
    assert json.loads((work / "ppo" / "run.json").read_text())["sft"] == str((final / "sft").resolve())
    assert str(final.resolve()) in (work / "report.html").read_text()
    assert (work / "ppo" / "weights.bin").read_bytes() == str(work).encode()
