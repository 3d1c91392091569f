"""Threads on a shared CPU: torch's intra-op thread count and libgomp's wait policy, chosen
from the machine's state before torch loads.

PyTorch's CPU kernels run on an OpenMP team (libgomp) of ``torch.get_num_threads()``
threads. Between two parallel regions libgomp's threads spin (about 300,000 iterations,
then sleep). On an idle machine that is what makes a small model fast; when another
process holds a core, a spinning thread takes the core the thread it waits for needs, and
the same SFT run on 2 threads took 8-20x longer than on one (docs/benchmarks.md, "Threads
on a busy machine"). libgomp reads ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when it
loads with torch, so the choice has to be made before ``import torch``:

- the CPUs this process may use: ``os.sched_getaffinity``, capped by a cgroup CPU quota;
- how many of them other work keeps busy now: the idle time of those CPUs in
  ``/proc/stat`` over at least :data:`SAMPLE_S`, less this process's own CPU time (the
  1-minute load average where ``/proc/stat`` cannot be read);
- threads = the idle cores (at least 1), divided among the processes of a launch on this
  machine (``LOCAL_WORLD_SIZE``); when at least :data:`BUSY_CORES` of other work runs,
  ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep at once), else libgomp's default.

The user's environment wins and is never changed: ``OMP_NUM_THREADS`` fixes the count,
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` the policy; ``RLHFLAB_THREADS=N`` sets the count
(exported as ``OMP_NUM_THREADS``, so a launch's children inherit it) and
``RLHFLAB_THREADS=off`` leaves everything to torch. Where nothing is left to choose (the
count fixed at 1, or count and policy both given) nothing is measured or said.

The CLI applies :func:`choose_when_torch_loads` in a process it starts; the Python API
leaves its host's threads alone, and a script calls :func:`configure` before importing
torch. This module imports neither torch nor anything of rlhflab's but ``errors``.
"""

from __future__ import annotations

import importlib.abc
import math
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, replace

from rlhflab.errors import InputError

ENV = "RLHFLAB_THREADS"
# Seconds over which /proc/stat is sampled: 10 clock ticks per CPU at USER_HZ=100, so a busy
# core reads as 1.0 +- 0.1. Started when the CLI starts, so its own start-up overlaps it.
SAMPLE_S = 0.1
# Cores' worth of other work from which the machine counts as shared: half a core.
BUSY_CORES = 0.5


@dataclass(frozen=True)
class Choice:
    """What to use: ``threads`` (None = torch's own default), the environment variables to
    set (only ones the user did not set), and the line that says so (None = nothing chosen)."""

    threads: int | None
    env: dict[str, str] = field(default_factory=dict)
    line: str | None = None


def _count(name: str, value: str) -> int:
    # OMP_NUM_THREADS may be a list for nested levels ("4,2"): the first is the team's size
    head = value.split(",")[0].strip()
    if not head.isdigit() or int(head) < 1:
        raise InputError(f"{name}={value!r}: expected a whole number >= 1"
                         + (", auto or off" if name == ENV else ""))
    return int(head)


def fixed(env: Mapping[str, str]) -> bool:
    """True when the environment leaves nothing to choose, so the machine need not be
    measured: ``RLHFLAB_THREADS=off``, the count fixed at 1 (one thread never waits for
    another), or the count and the wait policy both given."""
    setting = env.get(ENV, "auto").strip().lower()
    if setting == "off":
        return True
    count = env.get("OMP_NUM_THREADS") or (setting if setting != "auto" else None)
    policy = env.get("OMP_WAIT_POLICY") or env.get("GOMP_SPINCOUNT")
    return count is not None and (count.split(",")[0].strip() == "1" or policy is not None)


def choose(cpus: int, busy: float | None, env: Mapping[str, str]) -> Choice:
    """The thread count and wait policy for ``cpus`` usable CPUs of which ``busy`` cores'
    worth run other work now (None: not measured), under the user's environment ``env``.
    Pure: the state in, the choice out. A malformed setting raises ``InputError``."""
    setting = env.get(ENV, "auto").strip().lower() or "auto"
    if setting == "off":
        return Choice(None)
    mine = None if setting == "auto" else _count(ENV, setting)
    theirs = _count("OMP_NUM_THREADS", env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS") else None
    if mine is not None and theirs is not None and mine != theirs:
        raise InputError(f"{ENV}={mine} and OMP_NUM_THREADS={theirs} disagree: set one of them")
    policy_given = bool(env.get("OMP_WAIT_POLICY") or env.get("GOMP_SPINCOUNT"))
    out: dict[str, str] = {}
    if theirs is not None:
        threads, why = theirs, "OMP_NUM_THREADS"
    elif mine is not None:
        threads, why = mine, ENV
        out["OMP_NUM_THREADS"] = str(mine)
    else:
        threads, why = None, None
    if threads is not None and (threads == 1 or policy_given):
        return Choice(threads, out)  # nothing left to choose, nothing to say
    hint = f"{ENV}=N or off, or OMP_NUM_THREADS, overrides"
    if busy is None:
        # no reading of the machine: torch's defaults, and the line says why
        if threads is None:
            return Choice(None, out, f"rlhflab: torch's default threads (how busy the CPUs are could not be read; "
                                     f"{hint})")
        return Choice(threads, out, f"rlhflab: {_threads(threads)} ({why}), libgomp's default wait policy "
                                    f"(how busy the CPUs are could not be read)")
    busy = min(max(busy, 0.0), float(cpus))
    if threads is None:
        processes = _local_processes(env)
        # the idle cores, rounded half down: half a core of other work takes a thread away
        threads = max(1, math.ceil(cpus - busy - 0.5) // processes)
        out["OMP_NUM_THREADS"] = str(threads)
        why = f"{busy:.1f} of {cpus} cores busy" + (f", {processes} processes here" if processes > 1 else "")
    else:
        why = f"{why}; {busy:.1f} of {cpus} cores busy"
    if policy_given:
        policy = "the wait policy you set"
    elif busy >= BUSY_CORES:
        # with one thread nothing waits, but a launch's children and the decode rule
        # (generation.decode_threads) read it too
        out["OMP_WAIT_POLICY"] = "PASSIVE"
        policy = "OMP_WAIT_POLICY=PASSIVE"
    else:
        policy = "libgomp's default wait policy"
    return Choice(threads, out, f"rlhflab: {_threads(threads)}, {policy} ({why}; {hint})")


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _local_processes(env: Mapping[str, str]) -> int:
    """Processes of one launch on this machine (torchrun and accelerate set LOCAL_WORLD_SIZE)."""
    for name in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def usable_cpus() -> tuple[int, list[int]]:
    """The number of CPUs this process may use and their ids: the affinity mask, capped by a
    cgroup CPU quota (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``) where one is set."""
    try:
        ids = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        ids = list(range(os.cpu_count() or 1))
    n = len(ids)
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as fh:
                parts = fh.read().split()
            if period_file:
                with open(period_file) as fh:
                    parts = parts[:1] + fh.read().split()[:1]
            quota, period = int(parts[0]), int(parts[1])
        except (OSError, ValueError, IndexError):
            continue
        if quota > 0 and period > 0:
            n = min(n, max(1, math.ceil(quota / period)))
    return n, ids


def _cpu_ticks(ids: list[int]) -> tuple[int, int] | None:
    """(all, idle) clock ticks of the CPUs ``ids`` from /proc/stat; None if unreadable.
    Fields: user nice system idle iowait irq softirq steal (guest time is inside user);
    idle and iowait count as idle, time stolen by a hypervisor as busy."""
    wanted = {f"cpu{i}" for i in ids}
    total = idle = 0
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                name, *values = line.split()
                if name in wanted:
                    v = [int(x) for x in values[:8]]
                    total += sum(v)
                    idle += v[3] + v[4]
    except (OSError, ValueError):
        return None
    return (total, idle) if total else None


class Sample:
    """How busy the usable CPUs are, from now until :meth:`busy` (at least ``SAMPLE_S``
    later): busy clock ticks of those CPUs minus this process's own CPU time, in cores."""

    def __init__(self) -> None:
        self.cpus, self.ids = usable_cpus()
        self.start = (time.monotonic(), time.process_time(), _cpu_ticks(self.ids))

    def busy(self, seconds: float | None = None) -> float | None:
        """Cores' worth of other work since the start, waiting until ``seconds`` (default
        ``SAMPLE_S``) have passed; None if neither /proc/stat nor the load average is readable."""
        t0, own0, ticks0 = self.start
        wait = (SAMPLE_S if seconds is None else seconds) - (time.monotonic() - t0)
        if wait > 0:
            time.sleep(wait)
        ticks1 = _cpu_ticks(self.ids)
        if ticks0 is None or ticks1 is None:
            try:
                return os.getloadavg()[0]  # the fallback: a 1-minute average of runnable tasks
            except (AttributeError, OSError):
                return None
        all_ticks = ticks1[0] - ticks0[0]
        if all_ticks <= 0:
            return None
        busy_share = (all_ticks - (ticks1[1] - ticks0[1])) / all_ticks  # of the CPUs' time
        span = all_ticks / len(self.ids) / os.sysconf("SC_CLK_TCK")  # seconds the ticks cover
        own = (time.process_time() - own0) / span if span > 0 else 0.0  # cores' worth of ours
        others = max(0.0, busy_share * len(self.ids) - own)
        # under a CPU quota smaller than the affinity mask, others' work fills the cores
        # beyond the quota first
        return max(0.0, others - (len(self.ids) - self.cpus))


def configure(env: MutableMapping[str, str] | None = None, sample: Sample | None = None) -> Choice:
    """Choose (measuring the machine only if the environment leaves something to choose)
    and apply: set the chosen variables in ``env`` (default ``os.environ``) and, if torch is
    already imported, its thread count (its wait policy is fixed by then). Returns the
    choice; print ``choice.line`` to say it. Call it before ``import torch``."""
    env = os.environ if env is None else env
    if fixed(env):
        choice = choose(1, 0.0, env)
    else:
        sample = sample or Sample()
        choice = choose(sample.cpus, sample.busy(), env)
    env.update(choice.env)
    # torch imported already (or, from the CLI's hook, still loading: not yet, the env does it)
    set_num_threads = getattr(sys.modules.get("torch"), "set_num_threads", None)
    if set_num_threads is not None:
        if choice.threads is not None:
            set_num_threads(choice.threads)
        if "OMP_WAIT_POLICY" in choice.env and choice.line:  # libgomp read its policy when torch loaded
            choice = replace(choice, line=choice.line.replace(
                "OMP_WAIT_POLICY=PASSIVE", "OMP_WAIT_POLICY=PASSIVE for the processes it starts (torch was "
                "imported first, so this one keeps its policy)"))
    return choice


class choose_when_torch_loads(importlib.abc.MetaPathFinder):
    """The CLI's hook: from now on (start-up overlaps the sample), the moment torch's code is
    about to run, choose and apply (:func:`configure`), so a command that never imports
    torch pays nothing and says nothing (a library asking whether torch is installed,
    ``importlib.util.find_spec("torch")``, does not count). The line goes to stderr once
    :meth:`speak` has been called (after the arguments parsed: ``--help`` and usage errors
    say nothing)."""

    def __init__(self) -> None:
        choose(1, 0.0, os.environ)  # a malformed setting fails now, as one line, not inside an import
        self.sample = Sample()
        self.choice: Choice | None = None
        self.spoken = self.may_speak = False
        sys.meta_path.insert(0, self)

    def find_spec(self, name, path=None, target=None):
        if name != "torch" or self.choice is not None or self not in sys.meta_path:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:  # the finder that would find it
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ChooseFirst(self, spec.loader)
                return spec
        return None

    def choose_now(self) -> None:
        if self.choice is None:
            sys.meta_path.remove(self)
            self.choice = configure(sample=self.sample)
            self._say()

    def speak(self) -> None:
        self.may_speak = True
        self._say()

    def _say(self) -> None:
        if self.may_speak and not self.spoken and self.choice is not None and self.choice.line:
            self.spoken = True
            print(self.choice.line, file=sys.stderr, flush=True)


class _ChooseFirst(importlib.abc.Loader):
    """torch's own loader, with the choice made just before torch's code runs (libgomp
    loads with it and reads OMP_* then); the module keeps the real loader."""

    def __init__(self, hook: choose_when_torch_loads, real) -> None:
        self.hook, self.real = hook, real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.real
        self.hook.choose_now()
        self.real.exec_module(module)
