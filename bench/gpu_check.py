"""The GPU check: SFT -> RM -> PPO and DPO on a ~100M-parameter Llama created from a config,
in bf16 with sdpa attention, with full fine-tuning and with LoRA, on the built-in world
(so every arm has a gold reading). One JSON document on stdout, the stages' own output on
stderr, and the same JSON in OUT/gpu_check.json:
per stage the wall time, the throughput, the peak GPU memory, and for PPO the
sampler/trainer mismatch readings; per arm the gold of SFT, DPO and PPO; SFT's model FLOPs
utilization (a lower bound: the responses' tokens only); the decoding engine's response
tokens/s against HF ``generate`` on the SFT model.

    python bench/gpu_check.py --out /tmp/gpu_check                 # one GPU, under 10 minutes
    python bench/gpu_check.py --tiny --device cpu --out /tmp/gc    # the same path, shrunk, on a CPU
    python bench/gpu_check.py --sharded 2 --out /tmp/gc            # and the sharded arm, on 2 GPUs

Arms: ``full`` trains every weight; ``lora`` puts rank-16 adapters on the reward model's
backbone, the DPO policy, PPO's policy and critic (the references are the base with the
adapters off), with 10x the full arm's learning rates, LoRA's usual ratio. SFT is shared:
a model created from a config has no features for adapters to adapt, so both arms start
from one fully fine-tuned SFT policy. Decoding stays in float32 (docs/scaling.md), so the
bf16 trainer differs from the sampler: PPO runs with the mismatch guard opened
(``rl.mismatch_tolerance=100``) to record the gap, and ``ppo/guard_would_stop`` says
whether rlhflab's bf16 default (0.5 nats) would have stopped the run.

The sharded arm (``--sharded N``, off by default): SFT, then the reward model, GRPO against it
and DPO from that SFT policy, each ``<stage>.sharding=fsdp2`` (torch's FSDP2, docs/scaling.md) on N
processes, one GPU each (``torch.distributed.run`` of the CLI; gloo processes with ``--device
cpu``), with the full arm's settings; per stage the launch's wall time and the stage's own
readings, beside the one-GPU full arm's. Skipped, and said so, with fewer than N GPUs.

A stage that fails is recorded (``error``, one line) and the check goes on to the next; a
stage that would start past ``--budget-s`` (540 s) is recorded as skipped; the JSON file is
rewritten after every stage, so a run the wrapper's timeout cuts short keeps what it measured.
Peak GPU memory is ``torch.cuda.max_memory_allocated`` since the stage began (reset before
each); on a CPU it is null and ``peak_rss_mb`` (the process's peak so far) is the reading.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The check's sizes. Full: Llama d_model 768, 12 layers, 12 heads (113M parameters with the
# world's 241-token vocabulary), about 10 minutes on one GPU at these step counts.
FULL = ["model.arch=llama", "model.d_model=768", "model.n_layers=12", "model.n_heads=12",
        "model.max_positions=128", "sft.epochs=2", "sft.lr=3e-4", "sft.n_samples=128", "rm.epochs=1",
        "rm.lr=1e-4", "rm.n_prompts=1024", "dpo.epochs=1", "dpo.lr=1e-5", "dpo.n_world_eval=128",
        "rl.steps=30", "rl.batch_size=64", "rl.lr=3e-6", "rl.eval_every=10", "rl.n_eval=128"]
TINY = ["model.arch=llama", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "sft.max_steps=4",
        "rm.max_steps=2", "rm.n_prompts=32", "rm.n_eval_prompts=16", "rm.n_reference=16", "dpo.max_steps=2",
        "dpo.n_world_eval=16", "rl.steps=2", "rl.batch_size=8", "rl.n_eval=8", "rl.eval_every=2",
        "generation.max_new_tokens=8", "sft.n_samples=16"]
COMMON = ["model.attn_implementation=sdpa", "sft.mixed_precision=bf16", "rm.mixed_precision=bf16",
          "dpo.mixed_precision=bf16", "rl.mixed_precision=bf16", "rl.mismatch_tolerance=100"]
LORA = ["lora.r=16", "lora.alpha=32", "lora.dropout=0.0"]
LORA_LR_SCALE = 10.0
BF16_GUARD_NATS = 0.5  # rlhflab.distributed.MIXED_PRECISION_MISMATCH_NATS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for the runs and gpu_check.json")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="shrink everything (configs/tiny.yaml sizes): the CPU test")
    p.add_argument("--arms", default="full,lora", help="comma-separated: full, lora")
    p.add_argument("--set", action="append", default=[], help="extra config overrides, key=value")
    p.add_argument("--sharded", type=int, default=0, metavar="N",
                   help="also run SFT, RM and DPO with fsdp2 on N processes (one GPU each); 0 = off")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds after which a stage that has not started is skipped; default 540 (none with --tiny)")
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stage:
    """Times one stage and reads the peak GPU memory it allocated."""

    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.peak_gpu_mb = self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None
        return False

    def reading(self) -> dict:
        return {"seconds": self.seconds, "peak_gpu_memory_mb": self.peak_gpu_mb, "peak_rss_mb": peak_rss_mb()}


def _per_second(n: float, seconds: float | None) -> float | None:
    return n / seconds if seconds else None


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lr_scaled(cfg, scale: float, sections=("rm", "dpo", "rl")) -> None:
    for name in sections:
        section = getattr(cfg, name)
        section.lr *= scale
        if name == "rl" and section.value_lr is not None:
            section.value_lr *= scale


class Check:
    """The check's state: its JSON so far, rewritten to ``path`` after every stage (a run cut
    short by the wrapper's timeout still leaves what it measured), and its time budget: a
    stage that would start past ``deadline`` is recorded as skipped."""

    def __init__(self, torch, cuda: bool, path: Path, budget_s: float | None):
        self.torch, self.cuda, self.path, self.result = torch, cuda, path, {}
        self.deadline = None if budget_s is None else time.perf_counter() + budget_s

    def save(self) -> None:
        self.path.write_text(json.dumps(self.result, indent=1) + "\n")

    def stage(self, name: str, fn, readings: dict) -> dict | None:
        """``fn()`` -> summary, timed; its readings (or its error, one line) under ``name``."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            readings[name] = {"error": "skipped: past --budget-s"}
            return None
        try:
            with Stage(self.torch, self.cuda) as st, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON
                summary = fn()
        except Exception as err:  # a GPU check reports what failed and goes on
            readings[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            print(f"gpu_check: {name} failed: {readings[name]['error']}", file=sys.stderr)
            return None
        finally:
            self.save()
        readings[name] = st.reading()
        return summary


# Dense bf16 peak FLOP/s by device name (the vendors' data sheets, without sparsity): the
# denominator of ``mfu``. A device not listed gets mfu null.
PEAK_BF16_FLOPS = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
                   "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def mfu(parameters: int, tokens: float, seconds: float | None, device_name: str) -> float | None:
    """Model FLOPs utilization of a training stage: 6 N T (a forward and a backward pass over T
    tokens of an N-parameter model, Kaplan et al. 2020; attention's share left out, small at
    these lengths) per second over the device's dense bf16 peak."""
    peak = peak_flops(device_name)
    if not peak or not seconds:
        return None
    return 6.0 * parameters * tokens / seconds / peak


def engine_readings(torch, sft: Path, cfg, device: str, n_prompts: int) -> dict:
    """Response tokens per second of the decoding engine (``rlhflab.generation``) against HF
    ``generate`` on the same model, prompts, batch size and sampling settings (float32, as
    the engine decodes; HF with its own sampler, so the samples differ but not the work per
    token), each timed after one warm-up batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhflab.data import prompt_ids, prompt_text
    from rlhflab.generation import generate, left_pad, row_seed
    from rlhflab.world import World

    tok = AutoTokenizer.from_pretrained(str(sft / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(sft / "model")).to(device).eval()
    prompts = [prompt_ids(prompt_text(p.text, tok), tok) for p in World(cfg.world).prompts(n_prompts, "rl")]
    bs, new = cfg.rl.batch_size, cfg.generation.max_new_tokens
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def engine(rows):
        g = generate(model, rows, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     seeds=[row_seed(0, 0, i) for i in range(len(rows))], max_new_tokens=new, batch_size=bs)
        return int(g.response_mask.sum())

    def hf(rows):
        n = 0
        for i in range(0, len(rows), bs):
            ids, mask = left_pad(rows[i:i + bs], tok.pad_token_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                 top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=new,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            resp = out[:, ids.shape[1]:]
            ended = (resp == tok.eos_token_id).long().cumsum(-1)
            n += int(((ended - (resp == tok.eos_token_id).long()) == 0).sum())  # up to and with the end token
        return n

    result = {"prompts": len(prompts), "batch_size": bs, "max_new_tokens": new}
    for name, fn in (("engine", engine), ("hf_generate", hf)):
        fn(prompts[:bs])  # warm-up
        sync()
        t = time.perf_counter()
        tokens = fn(prompts)
        sync()
        seconds = time.perf_counter() - t
        result[name] = {"response_tokens": tokens, "seconds": seconds, "tokens_per_s": _per_second(tokens, seconds)}
    e, h = result["engine"]["tokens_per_s"], result["hf_generate"]["tokens_per_s"]
    result["engine_over_hf"] = e / h if e and h else None
    return result


def sft_readings(s: dict) -> dict:
    return {"examples_per_s": _per_second(s["train/examples"], s["train/seconds"]), "gold": s.get("gold/mean"),
            "eval_loss": s["eval/loss"], "parameters": s["model/parameters"]}


def rm_readings(s: dict, cfg) -> dict:
    steps = s["members"][0]["train/steps"]
    return {"groups_per_s": _per_second(steps * cfg.rm.batch_size, s["train/seconds"]),
            "eval_accuracy": s["eval/accuracy"]}


def dpo_readings(s: dict) -> dict:
    return {"pairs_per_s": _per_second(s["train/examples"], s["train/seconds"]), "gold": s.get("gold/mean"),
            "kl": s.get("kl/sequence_mean"), "win_rate_gold": s.get("win_rate/gold"), "eval_loss": s["eval/loss"]}


def ppo_readings(s: dict, out: Path, cfg, fp32_tolerance: float) -> dict:
    rows = [r for r in _read_jsonl(out / "metrics.jsonl") if "rollout/logprob_diff_max" in r]
    diff_max = max(r["rollout/logprob_diff_max"] for r in rows)
    timed = s["time/rollout"] + s["time/update"]
    samples = s["steps"] * cfg.rl.batch_size
    tokens = sum(r["rollout/length_mean"] for r in rows) * cfg.rl.batch_size
    return {"samples_per_s": _per_second(samples, timed), "response_tokens_per_s": _per_second(tokens, timed),
            "rollout_share": s["time/rollout_share"], "gold_initial": s["gold/initial"], "gold": s["gold/final"],
            "kl": s["objective/kl"], "rollout/logprob_diff_max": diff_max,
            "rollout/logprob_diff_mean": sum(r["rollout/logprob_diff_mean"] for r in rows) / len(rows),
            "rollout/first_ratio_mean_min": min(r["rollout/first_ratio_mean"] for r in rows),
            "guard_would_stop": diff_max > max(fp32_tolerance, BF16_GUARD_NATS)}


def run_arm(check: Check, api, cfg, sft: Path, d: Path, fp32_tolerance: float) -> dict:
    """RM -> PPO, and DPO, from the SFT policy at ``sft``, under ``d``; ``r`` is filled in
    place (it is already in the check's JSON)."""
    r: dict = {}
    check.result["arms"][d.name] = r
    rm = check.stage("rm", lambda: api.reward_model(cfg, out=d / "rm", sft=sft, overwrite=True), r)
    if rm is not None:
        r["rm"].update(rm_readings(rm, cfg))
    dpo = check.stage("dpo", lambda: api.dpo(cfg, out=d / "dpo", sft=sft, overwrite=True), r)
    if dpo is not None:
        r["dpo"].update(dpo_readings(dpo))
    if rm is not None:
        ppo = check.stage("ppo", lambda: api.rl(cfg, "ppo", out=d / "ppo", sft=sft, rm=d / "rm", overwrite=True), r)
        if ppo is not None:
            r["ppo"].update(ppo_readings(ppo, d / "ppo", cfg, fp32_tolerance))
    r["gold"] = {"dpo": r.get("dpo", {}).get("gold"), "ppo": r.get("ppo", {}).get("gold")}
    check.save()
    return r


def run_sharded(check: Check, torch, preset: Path, overrides: list[str], d: Path, processes: int,
                cuda: bool) -> dict:
    """SFT -> RM -> GRPO, and DPO, with ``<stage>.sharding=fsdp2`` on ``processes`` processes, each
    stage its own ``torch.distributed.run`` of the CLI under ``d``; ``r`` is filled in place.
    The launched processes' memory is theirs: the readings are the launch's wall time and the
    stage's metrics.json."""
    import socket
    import subprocess

    r: dict = {"processes": processes}
    check.result["arms"]["sharded"] = r
    if cuda and torch.cuda.device_count() < processes:
        r["error"] = f"skipped: {processes} processes need as many GPUs, {torch.cuda.device_count()} seen"
        check.save()
        return r
    sets = [*overrides, "sft.sharding=fsdp2", "rm.sharding=fsdp2", "dpo.sharding=fsdp2", "rl.sharding=fsdp2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def launch(stage: str, *extra: str, more: tuple[str, ...] = ()):
        def run() -> dict:
            with socket.socket() as sock:  # a free port for the launch's rendezvous
                sock.bind(("127.0.0.1", 0))
                port = str(sock.getsockname()[1])
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", port, "-m", "rlhflab.cli", stage, "--config", str(preset), *extra,
                   "--out", str(d / stage), "--overwrite"]
            for item in [*sets, *more]:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:  # the command's own one line, not the launcher's summary after it
                lines = [x for x in proc.stderr.splitlines() if x.strip()]
                said = [x for x in lines if x.startswith(f"rlhflab {stage}: ")]
                raise RuntimeError(f"exit {proc.returncode}: {(said or lines or [''])[-1]}")
            return json.loads((d / stage / "metrics.json").read_text())
        summary = check.stage(stage, run, r)
        if summary is not None:
            for key in ("peak_gpu_memory_mb", "peak_rss_mb"):  # this process's, not the launched ones'
                r[stage].pop(key, None)
        return summary

    cfg = _load_config(preset, sets)
    sft = launch("sft")
    if sft is not None:
        r["sft"].update(sft_readings(sft))
        rm = launch("rm", "--sft", str(d / "sft"))
        if rm is not None:
            r["rm"].update(rm_readings(rm, cfg))
            from rlhflab.algos.rl_config import resolve_rl_config

            group = resolve_rl_config(cfg.rl, "grpo").samples_per_prompt  # each process takes whole prompts
            grpo = launch("grpo", "--sft", str(d / "sft"), "--rm", str(d / "rm"),
                          more=(f"rl.batch_size={max(cfg.rl.batch_size, group * processes)}",))
            if grpo is not None:  # online RL sharded: each rollout decodes from the gathered weights
                r["grpo"].update({k: grpo.get(k) for k in ("steps", "gold/initial", "gold/final", "objective/kl",
                                                           "time/rollout", "time/update", "time/rollout_share")})
        dpo = launch("dpo", "--sft", str(d / "sft"))
        if dpo is not None:
            r["dpo"].update(dpo_readings(dpo))
    check.save()
    return r


def _load_config(preset: Path, overrides: list[str]):
    from rlhflab import api

    return api.load_config(str(preset), overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: accelerate then picks the CPU
    import torch

    from rlhflab import api

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (use --device cpu for the CPU path)",
              file=sys.stderr)
        return 2
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - {"full", "lora"}:
        print(f"gpu_check: --arms must name full and/or lora, got {args.arms!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = ROOT / "configs" / ("tiny.yaml" if args.tiny else "demo.yaml")
    overrides = (TINY if args.tiny else FULL) + COMMON + list(args.set)
    from rlhflab.errors import InputError

    try:
        cfg = api.load_config(str(preset), overrides)
    except InputError as err:
        print(f"gpu_check: {err}", file=sys.stderr)
        return 2
    fp32_tolerance = api.load_config().rl.mismatch_tolerance  # the guard's default, for guard_would_stop

    t0 = time.perf_counter()
    check = Check(torch, cuda, out / "gpu_check.json", args.budget_s if args.budget_s is not None or args.tiny else 540.0)
    check.result.update({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                         "tiny": args.tiny, "preset": str(preset.relative_to(ROOT)), "overrides": overrides,
                         "lora": LORA, "lora_lr_scale": LORA_LR_SCALE, "arms": {}})
    result, shared = check.result, {}
    sft = check.stage("sft", lambda: api.sft(cfg, out=out / "sft", overwrite=True), shared)
    if sft is not None:
        shared["sft"].update(sft_readings(sft))
        # the loss's tokens per step (logged every log_every steps) times the steps: the responses'
        # tokens only, while the prompts' go through the passes too, so the mfu is a lower bound
        logged = [r for r in _read_jsonl(out / "sft" / "metrics.jsonl") if "train/tokens" in r]
        tokens = sum(r["train/tokens"] for r in logged) / max(1, len(logged)) * max((r["step"] for r in logged), default=0)
        shared["sft"]["response_tokens"] = tokens
        shared["sft"]["mfu_lower_bound"] = mfu(sft["model/parameters"], tokens, sft.get("train/seconds"),
                                               result["device"])
        engine = check.stage("engine", lambda: engine_readings(torch, out / "sft", cfg, "cuda" if cuda else "cpu",
                                                               16 if args.tiny else 1024), shared)
        if engine is not None:
            shared["engine"].update(engine)
        result["engine"] = shared["engine"]
    result["sft"] = shared["sft"]
    for arm in arms if sft is not None else []:
        acfg = api.load_config(str(preset), overrides + (LORA if arm == "lora" else []))
        if arm == "lora":
            lr_scaled(acfg, LORA_LR_SCALE)
        run_arm(check, api, acfg, out / "sft", out / arm, fp32_tolerance)["gold"]["sft"] = shared["sft"].get("gold")
    if args.sharded:
        run_sharded(check, torch, preset, overrides, out / "sharded", args.sharded, cuda)
    result["total_seconds"] = time.perf_counter() - t0
    result["ok"] = "error" not in result["sft"] and "error" not in result.get("engine", {"error": "not run"}) and all(
        "error" not in r.get(s, {"error": "not run"}) for a, r in result["arms"].items() for s in ("rm", "dpo", "ppo")
        if a != "sharded") and ("error" not in result["arms"].get("sharded", {}) and all(
            "error" not in result["arms"]["sharded"].get(s, {"error": "not run"}) for s in ("sft", "rm", "grpo", "dpo"))
                                if args.sharded else True)
    check.save()
    print(json.dumps(result, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
