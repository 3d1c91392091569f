import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def load_bench(name: str):
    """``bench/<name>.py`` as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# Tests never touch a hub and stay on a predictable number of threads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and subprocesses (2-process runs) then share the
# two cores instead of oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return ROOT / "configs" / "tiny.yaml"


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> str:
    """A TCP port free on loopback right now, for a 2-process run's rendezvous (a fixed port
    could clash with another run on the same machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def save_tiny_backbone(cfg, out: Path) -> Path:
    """An untrained tiny causal LM of ``cfg.model`` with the world tokenizer, saved at
    ``out`` like an SFT policy (a reward-model backbone for tests)."""
    from rlhflab.models import create_causal_lm, save_pretrained_atomic
    from rlhflab.world import World

    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, out)
    return out


@pytest.fixture(scope="session")
def main_job_dir(tmp_path_factory) -> Path:
    """The main job on the tiny preset (``run_main_job``), run once per session: the smoke
    tests read it, and the docs' tests take it wherever a document runs ``make demo``
    (``rlhflab run --config configs/demo.yaml --out runs/demo``, demo.yaml being the tiny
    preset there). Read it; copy it to change it.

    Under pytest-xdist (``make test`` runs one worker per core) the workers share one run: the
    first to get here runs it under a file lock in the session's common temp directory, the
    others wait for it and read the same directory."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return run_main_job("tiny", tmp_path_factory.mktemp("main_job") / "run", timeout=900)
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the same for every worker of this session
    out = shared / "main_job" / "run"
    with FileLock(str(shared / "main_job.lock")):
        if not (out / "summary.json").is_file():
            run_main_job("tiny", out, timeout=900)
    return out


def run_main_job(preset: str, out: Path, timeout: int) -> Path:
    """``rlhflab run --config configs/<preset>.yaml --out OUT`` in a fresh process, as a user
    runs it, with no overrides; fails the test with the job's stderr if it does not exit 0."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "rlhflab.cli", "run", "--config", str(ROOT / "configs" / f"{preset}.yaml"),
                           "--out", str(out)], env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out

