"""Helpers shared by every benchmark child process, in either virtual environment.

A child is started by ``bench/run.py`` with one argument, a JSON *spec* (the settings
both libraries must use), and prints one JSON line starting with ``RESULT `` on stdout.
This module imports neither rlhflab nor TRL, so the project's and the peer's children
measure with exactly the same code: threads, the clock, peak RSS and token counts.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from pathlib import Path


def setup(threads: int) -> None:
    """Pin the thread count before torch does any work (OMP_NUM_THREADS is also set by
    the parent, so the intra-op pool starts at the right size)."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def read_spec() -> dict:
    if len(sys.argv) != 2:
        sys.exit("usage: child.py SPEC_JSON")
    return json.loads(Path(sys.argv[1]).read_text())


def rss_mb() -> float:
    """Current resident set size in MiB (from /proc)."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (getrusage, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far. Unlike wall time it
    does not grow when other processes take the cores, so on a shared machine it is the
    steadier measure of the work a library does per sample."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def emit(result: dict, spec: dict) -> None:
    """Print the result line the parent parses; adds tokens/s (from the data's token count,
    the same for both libraries), peak RSS and the library versions."""
    import torch
    import transformers

    if result.get("cpu_seconds"):
        result["samples_per_cpu_s"] = result["samples"] / result["cpu_seconds"]
    if "data_tokens" in spec and "tokens_per_s" not in result:
        result["tokens_per_s"] = spec["data_tokens"] / result["train_seconds"]
    result.setdefault("peak_rss_mb", peak_rss_mb())
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        result["versions"]["trl"] = trl.__version__
    except ImportError:
        pass
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


class Clock:
    """Wall-clock sections: ``with clock("generate"): ...``; totals in seconds."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Section:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.totals[name] = clock.totals.get(name, 0.0) + time.perf_counter() - self.t0

        return _Section()


class Instrument:
    """Where the time of an online loop goes, the same way for both libraries.

    Patches, for the lifetime of the object, the ``forward`` and ``generate`` of the given
    models and ``torch.Tensor.backward`` (which ``accelerator.backward`` calls) and
    ``torch.optim.Optimizer`` steps, and sums wall time per kind:

    - ``generate``: sampling (HF ``generate``, its own forward passes included);
    - ``forward``: model forward passes outside ``generate`` (policy, reference, critic,
      reward model; logits only, not the log-softmax or loss built on them);
    - ``backward`` and ``optimizer``.

    ``overhead_share`` = 1 - (generate + forward + backward) / loop time: the share of the
    step spent outside model forward, backward and generation (the optimizer step counts
    as overhead here, and is reported separately). CPU execution is synchronous, so wall
    time around a call is the time of its work.
    """

    def __init__(self, models, eos_id: int) -> None:
        import torch

        self.eos_id = eos_id
        self.totals = {"generate": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self.generated_tokens = 0
        self._depth = 0  # > 0 inside generate or a forward: nested calls are not counted again
        self._undo = []
        seen = set()
        for model in models:
            if model is None:
                continue
            # the model, its backbone and heads: trainers call backbone and head directly
            # (a reward or value read from hidden states); only the outermost call counts
            parts = [model, getattr(model, "base_model", None),
                     *(getattr(model, h, None) for h in ("score", "lm_head", "head", "v_head"))]
            for m in parts:
                if isinstance(m, torch.nn.Module) and id(m) not in seen:
                    seen.add(id(m))
                    self._wrap_forward(m)
            if hasattr(model, "generate") and id(model.generate) not in seen:
                seen.add(id(model.generate))
                self._wrap_generate(model)
        inst = self
        orig_backward = torch.Tensor.backward

        def backward(t, *a, **kw):
            t0 = time.perf_counter()
            try:
                return orig_backward(t, *a, **kw)
            finally:
                inst.totals["backward"] += time.perf_counter() - t0

        torch.Tensor.backward = backward
        self._undo.append(lambda: setattr(torch.Tensor, "backward", orig_backward))
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        hook = register_optimizer_step_pre_hook(lambda *a: self._opt_start())
        post = register_optimizer_step_post_hook(lambda *a: self._opt_end())
        self._undo += [hook.remove, post.remove]

    def _opt_start(self) -> None:
        self._t_opt = time.perf_counter()

    def _opt_end(self) -> None:
        self.totals["optimizer"] += time.perf_counter() - self._t_opt

    def _wrap_forward(self, m) -> None:
        inst = self
        orig = m.forward

        # wraps: HF generate reads forward's signature to decide whether to pass
        # position_ids; a bare (*a, **kw) wrapper would make it sample left-padded prompts
        # with shifted positions.
        @functools.wraps(orig)
        def forward(*a, **kw):
            if inst._depth:  # inside generate or another instrumented forward
                return orig(*a, **kw)
            t0 = time.perf_counter()
            inst._depth += 1
            try:
                return orig(*a, **kw)
            finally:
                inst._depth -= 1
                inst.totals["forward"] += time.perf_counter() - t0

        m.forward = forward
        self._undo.append(lambda: delattr(m, "forward"))

    def _timed(self, orig, count):
        """``orig`` counted as generation: its wall time to ``generate``, the model forwards inside
        it not counted again, and ``count(args, kwargs, result)`` tokens added to ``generated_tokens``."""
        inst = self

        @functools.wraps(orig)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            inst._depth += 1
            try:
                out = orig(*a, **kw)
            finally:
                inst._depth -= 1
                inst.totals["generate"] += time.perf_counter() - t0
            inst.generated_tokens += count(a, kw, out)
            return out

        return timed

    def _wrap_generate(self, m) -> None:
        def count(a, kw, out) -> int:
            ids = kw.get("input_ids", a[0] if a else None)
            seqs = out.sequences if hasattr(out, "sequences") else out
            if ids is not None and hasattr(seqs, "shape"):
                return real_tokens(seqs[:, ids.shape[1]:], self.eos_id)
            return 0

        m.generate = self._timed(m.generate, count)
        self._undo.append(lambda: delattr(m, "generate"))

    def wrap_decoder(self, owner, name: str, tokens) -> None:
        """Count the function ``owner.<name>`` as generation, as ``generate`` is counted on a
        model: for a library that decodes with its own engine instead of HF ``generate``
        (rlhflab: ``rlhflab.rollout.generate``, the engine's entry point the rollout calls).
        Its wall time goes to ``generate``, the model forwards inside it are not counted
        again, and ``tokens(result)`` (generated tokens up to and including each row's first
        EOS) is added to ``generated_tokens``."""
        orig = getattr(owner, name)
        setattr(owner, name, self._timed(orig, lambda a, kw, out: int(tokens(out))))
        self._undo.append(lambda: setattr(owner, name, orig))

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def report(self, loop_seconds: float) -> dict:
        model_time = self.totals["generate"] + self.totals["forward"] + self.totals["backward"]
        return {
            "time/" + k: v for k, v in self.totals.items()
        } | {"time/loop": loop_seconds, "overhead_share": 1.0 - model_time / loop_seconds,
             "generated_tokens": self.generated_tokens}


def real_tokens(response_ids, eos_id: int) -> int:
    """Generated tokens up to and including each row's first EOS (all, if none): (B, R) -> int."""
    import torch

    is_eos = response_ids == eos_id
    first = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, torch.full_like(is_eos[:, 0], response_ids.shape[1], dtype=torch.long))
    return int(first.sum())


def token_rates(out: dict) -> dict:
    """The online token figures of a result holding ``train_seconds`` (the loop),
    ``time/generate`` and ``generated_tokens`` (``Instrument.report``), the same arithmetic for
    both libraries: ``tokens_per_s`` over the loop, ``gen_tokens_per_s`` over the time inside
    generation (None when none was measured), ``train_tokens_per_s`` over the rest."""
    loop, gen, n = out["train_seconds"], out["time/generate"], out["generated_tokens"]
    out["gen_tokens_per_s"] = n / gen if gen else None
    out["train_tokens_per_s"] = n / (loop - gen) if loop > gen else None
    out["tokens_per_s"] = n / loop
    return out


def loop_parts(loop: float, rollout: float, update: float, generate: float, *, slack: float = 1e-3) -> dict:
    """An online loop's wall time cut into parts that add up to it: ``time/generate`` (inside
    the decoding engine), ``time/scoring`` (the rest of the rollout: reference and critic
    passes, decoding to text, the reward), ``time/update`` (the optimizer's epochs over the
    rollout: forward, backward, steps) and ``time/rest`` (advantages, KL control, metrics,
    the loop's own bookkeeping), each with its ``share/...`` of the loop. Seconds in;
    a part below -``slack`` seconds means the timers do not nest as claimed (ValueError)."""
    parts = {"generate": generate, "scoring": rollout - generate, "update": update,
             "rest": loop - rollout - update}
    bad = {k: v for k, v in parts.items() if v < -slack}
    if bad or loop <= 0:
        raise ValueError(f"loop {loop:.4f} s, rollout {rollout:.4f} s, update {update:.4f} s, generate "
                         f"{generate:.4f} s do not nest: negative {bad}")
    out = {f"time/{k}": max(v, 0.0) for k, v in parts.items()}
    out.update({f"share/{k}": max(v, 0.0) / loop for k, v in parts.items()})
    return out
