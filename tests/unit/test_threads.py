"""Threads on a shared CPU (``rlhflab.threads``): the choice as a pure function of the
machine's state and the user's environment, the sample of /proc/stat, and the CLI applying
it before torch loads (the line on stderr, the count torch uses, the policy libgomp reads)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlhflab import threads
from rlhflab.errors import InputError
from rlhflab.threads import Choice, choose, fixed

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
OURS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "RLHFLAB_THREADS", "LOCAL_WORLD_SIZE")


@pytest.mark.parametrize(("cpus", "busy", "threads_", "passive"), [
    (2, 0.0, 2, False),   # idle: both cores, libgomp's spinning default (fastest there)
    (2, 0.4, 2, False),   # less than half a core of other work: still idle
    (2, 0.5, 1, True),    # half a core: shared; one thread, waits asleep
    (2, 1.0, 1, True),    # one core taken (the issue's case: 8-20x slower on 2 spinning threads)
    (2, 2.0, 1, True),    # both taken: at least one thread
    (2, 7.0, 1, True),    # a load average above the cores (the fallback reading) is capped
    (16, 0.3, 16, False),
    (16, 4.2, 12, True),  # the idle cores, rounded
    (1, 0.0, 1, False),
])
def test_the_choice_from_the_machines_state(cpus, busy, threads_, passive):
    c = choose(cpus, busy, {})
    assert c.threads == threads_ and c.env["OMP_NUM_THREADS"] == str(threads_)
    assert (c.env.get("OMP_WAIT_POLICY") == "PASSIVE") is passive
    assert c.line.startswith(f"rlhflab: {threads_} thread") and f"{min(busy, cpus):.1f} of {cpus} cores busy" in c.line
    assert ("OMP_WAIT_POLICY=PASSIVE" in c.line) is passive and "RLHFLAB_THREADS" in c.line


def test_the_processes_of_a_launch_share_the_idle_cores():
    """torchrun / accelerate launch set LOCAL_WORLD_SIZE: 2 processes on 2 idle cores get one
    thread each, on 16 cores with 4 busy 6 each."""
    assert choose(2, 0.0, {"LOCAL_WORLD_SIZE": "2"}).threads == 1
    assert choose(16, 4.0, {"LOCAL_WORLD_SIZE": "2"}).threads == 6
    assert "2 processes here" in choose(2, 0.0, {"LOCAL_WORLD_SIZE": "2"}).line


def test_unmeasured_machine_keeps_torchs_defaults_and_says_so():
    c = choose(2, None, {})
    assert c.threads is None and c.env == {} and "could not be read" in c.line


@pytest.mark.parametrize("env", [
    {"OMP_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "3,1"},
    {"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}, {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "active"},
    {"RLHFLAB_THREADS": "3"}, {"RLHFLAB_THREADS": "off"}, {"RLHFLAB_THREADS": "2", "OMP_NUM_THREADS": "2"},
])
@pytest.mark.parametrize("busy", [0.0, 1.0, None])
def test_the_users_environment_is_respected_and_never_changed(env, busy):
    c = choose(2, busy, env)
    assert not set(c.env) & set(env), c.env  # nothing the user set is set again
    count = env.get("OMP_NUM_THREADS", env.get("RLHFLAB_THREADS", "auto")).split(",")[0]
    if count.isdigit():
        assert c.threads == int(count)


def test_what_each_setting_means():
    assert choose(2, 1.0, {"OMP_NUM_THREADS": "2"}) == Choice(
        2, {"OMP_WAIT_POLICY": "PASSIVE"},
        "rlhflab: 2 threads, OMP_WAIT_POLICY=PASSIVE (OMP_NUM_THREADS; 1.0 of 2 cores busy; "
        "RLHFLAB_THREADS=N or off, or OMP_NUM_THREADS, overrides)")
    assert choose(2, 1.0, {"OMP_WAIT_POLICY": "ACTIVE"}).threads == 1  # the count is still chosen
    # RLHFLAB_THREADS=N is OMP_NUM_THREADS=N, exported (a launch's children and torch read it)
    assert choose(2, 1.0, {"RLHFLAB_THREADS": "3"}).env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}
    assert choose(2, 1.0, {"RLHFLAB_THREADS": "1"}) == Choice(1, {"OMP_NUM_THREADS": "1"})
    assert choose(2, 1.0, {"RLHFLAB_THREADS": "off"}) == Choice(None)
    assert choose(2, 1.0, {"OMP_NUM_THREADS": "1"}) == Choice(1)  # one thread never waits
    assert choose(2, 1.0, {"RLHFLAB_THREADS": " Auto "}).threads == 1


@pytest.mark.parametrize(("env", "fixed_"), [
    ({}, False), ({"OMP_NUM_THREADS": "2"}, False), ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
    ({"OMP_NUM_THREADS": "1"}, True), ({"RLHFLAB_THREADS": "1"}, True), ({"RLHFLAB_THREADS": "off"}, True),
    ({"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "1000"}, True), ({"RLHFLAB_THREADS": "auto"}, False),
])
def test_the_machine_is_measured_only_when_something_is_left_to_choose(env, fixed_):
    assert fixed(env) is fixed_


@pytest.mark.parametrize(("env", "needle"), [
    ({"RLHFLAB_THREADS": "0"}, "RLHFLAB_THREADS='0': expected a whole number >= 1, auto or off"),
    ({"RLHFLAB_THREADS": "many"}, "RLHFLAB_THREADS='many'"),
    ({"OMP_NUM_THREADS": "two"}, "OMP_NUM_THREADS='two': expected a whole number >= 1"),
    ({"RLHFLAB_THREADS": "3", "OMP_NUM_THREADS": "2"}, "RLHFLAB_THREADS=3 and OMP_NUM_THREADS=2 disagree"),
])
def test_a_malformed_setting_is_one_line(env, needle):
    with pytest.raises(InputError, match=re.escape(needle)):
        choose(2, 0.0, env)


def test_the_sample_subtracts_this_process_and_reads_cores(monkeypatch):
    """/proc/stat over 1 s on 2 CPUs at 100 ticks/s: 200 ticks, 100 idle, so 1.0 core busy;
    0.5 s of it was this process's own CPU time, so 0.5 cores of other work."""
    ticks = iter([(1000, 600), (1200, 700)])
    clock = iter([0.0, 0.5])
    monkeypatch.setattr(threads, "usable_cpus", lambda: (2, [0, 1]))
    monkeypatch.setattr(threads, "_cpu_ticks", lambda ids: next(ticks))
    monkeypatch.setattr(threads.time, "process_time", lambda: next(clock))
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(threads, "SAMPLE_S", 0.0)
    assert threads.Sample().busy() == pytest.approx(0.5)


class _Machine:
    """A Sample's stand-in: 2 CPUs, one of them busy."""

    cpus, ids = 2, [0, 1]

    def busy(self, seconds=None):
        return 1.0


def test_configure_in_a_process_that_imported_torch_first():
    """The Python API's way (rlhflab.threads.configure): the env it is given gets the choice,
    torch (imported by conftest) gets the count, and the line does not claim a policy this
    process can no longer take."""
    import torch

    env: dict[str, str] = {}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        choice = threads.configure(env, sample=_Machine())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert "torch was imported first" in choice.line
    untouched = {"OMP_NUM_THREADS": "1"}
    assert threads.configure(untouched, sample=None) == Choice(1) and untouched == {"OMP_NUM_THREADS": "1"}


def test_the_sample_sees_a_busy_core():
    """A process spinning on CPU 0 reads as (at least most of) a busy core; the rest of the
    machine may be busy too (other work), so only the lower bound is asserted."""
    cpus, ids = threads.usable_cpus()
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{ids[0]}}})\nwhile True: pass"])
    try:
        import time

        time.sleep(0.3)  # started and spinning
        busy = threads.Sample().busy()
    finally:
        spin.kill()
        spin.wait()
    assert 0.8 <= busy <= cpus


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env | extra


def test_the_cli_says_nothing_for_help_or_a_command_without_torch():
    for argv in (["sft", "--help"], ["optimal", "--pi-ref", "0.5,0.5", "--reward", "1,0", "--beta", "1"]):
        proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", *argv], env=_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "thread" not in proc.stderr, proc.stderr


PROBE = """
import os, sys
from rlhflab.cli import main
sys.argv = ["rlhflab", *sys.argv[1:]]
rc = main()
import torch
print(rc, torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY", "-"))
"""


def test_the_cli_chooses_before_torch_loads_and_says_it_once(tmp_path):
    """A real command that loads torch (``rlhflab world``): one line on stderr, and the count
    it names is torch's, the policy it names is the one libgomp read when it loaded
    (``OMP_DISPLAY_ENV`` makes libgomp print its settings: its spin count is 0 under
    PASSIVE, 300000 under its default, which it also prints as 'PASSIVE')."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "world", "--config", TINY, "--out", str(tmp_path / "w")],
                          env=_env(OMP_DISPLAY_ENV="VERBOSE"), capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("rlhflab: ")]
    assert len(lines) == 1, proc.stderr
    rc, torch_threads, policy = proc.stdout.split()[-3:]
    said = int(re.match(r"rlhflab: (\d+) threads?, ", lines[0]).group(1))
    assert rc == "0" and int(torch_threads) == said
    assert f"OMP_NUM_THREADS = '{said}'" in proc.stderr
    if "OMP_WAIT_POLICY=PASSIVE" in lines[0]:
        assert policy == "PASSIVE" and "GOMP_SPINCOUNT = '0'" in proc.stderr
    else:
        assert policy == "-" and "GOMP_SPINCOUNT = '300000'" in proc.stderr


def test_the_cli_rejects_a_bad_setting_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "world", "--config", TINY, "--out", str(tmp_path / "x")],
                          env=_env(RLHFLAB_THREADS="0"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "rlhflab: error: RLHFLAB_THREADS='0': expected a whole number >= 1, auto or off"]
    assert not (tmp_path / "x").exists()
