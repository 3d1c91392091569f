"""``rlhflab ppo | reinforce | rloo | grpo``: online RL from an SFT policy.

    rlhflab ppo --config configs/demo.yaml --sft runs/sft --rm runs/rm --out runs/ppo
    rlhflab reinforce --variant reinforce++ --sft runs/sft --reward-fn gold --out runs/rpp
    rlhflab grpo --variant dr-grpo --sft runs/sft --rm runs/rm --out runs/drgrpo
    rlhflab ppo --resume runs/ppo            # continue from the last checkpoint
    rlhflab ppo --resume runs/ppo --set rl.steps=200   # ... and extend the run

The SFT policy is both the starting point and the frozen reference. The reward is the
reward model (``--rm``), Python reward functions (``--reward-fn``) or their weighted sum.
Prompts are the world's RL split unless ``--prompts FILE`` (prompt JSONL) is given; on
world prompts the run also measures the gold utility of held-out samples every
``rl.eval_every`` steps.

Writes ``OUT/metrics.jsonl`` (per step), ``OUT/metrics.json`` (summary), ``OUT/model/``
(the trained policy, safetensors), ``OUT/value.safetensors`` (PPO critic),
``OUT/checkpoint/`` (every ``rl.save_every`` steps), ``OUT/best/`` (with early stopping),
``OUT/config.yaml`` (resolved) and ``OUT/run.json`` (the inputs, for ``--resume``: every path
absolute, and the working directory the run started in, so a resume works from anywhere).

A first run is renamed into ``OUT`` as soon as ``config.yaml`` and ``run.json`` are written
(``artifacts.publish_run``), so a run that is killed can be resumed: from its last checkpoint,
or from the start when it had none. ``--resume`` reads and checks everything first (the
checkpoint's every file against the model and optimizer, ``metrics.jsonl``, the settings)
and changes nothing in ``OUT`` until all of it loads; then it drops the metric lines written
after the checkpoint, applies the settings it was given to ``config.yaml`` and records the
resume in ``run.json`` (``resumes``: step, time, what changed). What a resume may change is
``RESUMABLE``; every other setting is the run's own and is refused.
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args, load_config, save_config
from rlhflab.errors import InputError
from rlhflab.registry import ONLINE_ALGORITHMS, online_commands

VARIANTS: dict[str, dict[str, str]] = online_commands()
"""command -> variant -> algorithm (``registry.ONLINE_ALGORITHMS``); the first variant is the default."""

RESUMABLE: dict[str, str] = {
    "rl.steps": "to extend (or end sooner) a run: every step's prompts and samples are seeded by the step, not "
                "by the total, so the steps already taken do not depend on it, provided nothing is scheduled over "
                "rl.steps (a constant rl.lr_schedule, no rl.warmup_ratio, an rl.kl_controller other than linear)",
    "rl.eval_every": "held-out evaluations sample from seeds of their own, so when they happen does not change "
                     "training (early stopping's patience counts evaluations at the new cadence)",
    "rl.log_every": "which steps write a metrics line",
    "rl.save_every": "when checkpoints are written",
}
"""The settings a resumed run may change (``--resume --set``), and why each cannot change what
was trained; so may every section's ``report_to`` (where the metrics are also sent). Any other
setting is the run's own (a learning rate, a batch size, a seed, ... would make the resumed
run another run than the one its checkpoint belongs to) and is refused, naming it."""

_RESUME_INPUTS = (("--config", "config"), ("--out", "out"), ("--overwrite", "overwrite"), ("--sft", "sft"),
                  ("--rm", "rm"), ("--reward-fn", "reward_fn"), ("--prompts", "prompts"),
                  ("--eval-prompts", "eval_prompts"), ("--judge", "judge"))


def add_arguments(p) -> None:
    command = p.prog.split()[-1]
    add_config_arguments(p, out=False)
    p.add_argument("--out", help="output directory (required unless --resume)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--sft", help="SFT run or model directory: the initial policy and the frozen reference")
    p.add_argument("--rm", help="reward model directory written by `rlhflab rm`")
    p.add_argument("--reward-fn", action="append", default=[], metavar="SPEC",
                   help="reward function: gold, length, module:function or file.py:function, "
                        "optionally =WEIGHT (repeatable; summed with the RM)")
    p.add_argument("--prompts", help="prompt file (JSONL, JSON, Parquet, Arrow or a datasets directory; field "
                                     "'prompt', other columns reach the reward functions); default: the world's")
    p.add_argument("--eval-prompts", help="held-out prompt file: every rl.eval_every steps the run's reward, the KL "
                                          "and (with --judge) the judge's win-rate over the reference on them; "
                                          "early stopping (rl.early_stop_patience) selects on them")
    p.add_argument("--judge", help="judge of the held-out win-rate: rm:DIR, lm:DIR or py:module:function")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    variants = list(VARIANTS.get(command, {}))
    if len(variants) > 1:
        p.add_argument("--variant", choices=variants, default=variants[0],
                       help=f"which algorithm (default {variants[0]})")


def _load_prompts(path: str, tokenizer) -> tuple[list[str], list[dict]]:
    """The prompts as the policy sees them (through the chat template when the prompt is
    conversational or the tokenizer has one: ``data.prompt_text``), and their rows, whose
    prompts and other columns the reward functions receive."""
    from rlhflab.data import load_rows, prompt_text

    rows = load_rows(path, "prompt")
    return [prompt_text(row["prompt"], tokenizer) for row in rows], rows


def run(args) -> int:
    command = args.command
    if args.resume:
        return _resume(args, command)
    if not args.out:
        raise InputError("--out is required (or --resume DIR)")
    if not args.sft:
        raise InputError("--sft is required: the SFT policy to start from (and the reference)")
    algo = VARIANTS[command][getattr(args, "variant", None) or next(iter(VARIANTS[command]))]
    cfg = config_from_args(args)
    if args.judge and not args.eval_prompts:
        raise InputError("--judge compares answers on --eval-prompts: give a held-out prompt file", field="--judge")
    run_rl(cfg, algo, Path(args.out), sft=args.sft, rm=args.rm, reward_fns=args.reward_fn, prompts=args.prompts,
           eval_prompts=args.eval_prompts, judge=args.judge,
           overwrite=args.overwrite)
    return 0


def _resume(args, command: str) -> int:
    """``--resume DIR``: the run's inputs from ``run.json``, its settings from ``config.yaml``
    with the ``--set`` items (``RESUMABLE`` only: ``run_rl`` refuses the rest)."""
    import sys

    from rlhflab.artifacts import read_json
    from rlhflab.config import report_to_overrides

    for flag, dest in _RESUME_INPUTS:
        if getattr(args, dest, None):
            raise InputError(f"not taken with --resume: a resumed run reads its inputs from run.json and its "
                             f"settings from config.yaml (--set may change {', '.join(RESUMABLE)} and report_to)",
                             field=flag)
    out = Path(args.resume)
    if not (out / "run.json").is_file() or not (out / "config.yaml").is_file():
        raise InputError("not an RL run directory (no run.json / config.yaml)", file=str(out))
    inputs = _check_run_json(read_json(out / "run.json"), out / "run.json")
    if inputs["algo"] not in VARIANTS.get(command, {}).values():
        raise InputError(f"this is a {inputs['algo']} run; resume it with the matching command",
                         file=str(out / "run.json"))
    fns = inputs.get("reward_fns") or []
    python = [f for f in [*fns, inputs.get("judge") or ""] if f.startswith("<python ")]
    if python:
        raise InputError(f"the run was given Python functions ({', '.join(python)}); resume it from Python "
                         "with api.rl(..., reward_fns=[...], judge=..., resume=True)", file=str(out / "run.json"))
    if inputs.get("cwd") and inputs["cwd"] not in sys.path:  # module:function specs importable as they were
        sys.path.append(inputs["cwd"])
    cfg = load_config(out / "config.yaml", [*args.overrides, *report_to_overrides(getattr(args, "report_to", None))])
    run_rl(cfg, inputs["algo"], out, sft=inputs["sft"], rm=inputs.get("rm"),
           reward_fns=fns, prompts=inputs.get("prompts"), resume=True,
           eval_prompts=inputs.get("eval_prompts"), judge=inputs.get("judge"), reference=inputs.get("reference"))
    return 0


def _check_run_json(inputs, path: Path) -> dict:
    """``run.json`` as ``run_rl`` writes it; a field of another shape is named."""
    if not isinstance(inputs, dict):
        raise InputError("expected a JSON object (the run's inputs)", file=str(path))
    shapes = {"algo": (str,), "sft": (str,), "rm": (str, type(None)), "prompts": (str, type(None)),
              "eval_prompts": (str, type(None)), "judge": (str, type(None)), "reference": (str, type(None)),
              "cwd": (str, type(None)), "resumes": (list,)}
    for key, types in shapes.items():
        if key in ("algo", "sft") and key not in inputs:
            raise InputError("missing", file=str(path), field=key)
        if key in inputs and not isinstance(inputs[key], types):
            raise InputError(f"expected {' or '.join('null' if t is type(None) else t.__name__ for t in types)}",
                             file=str(path), field=key)
    fns = inputs.get("reward_fns", [])
    if not isinstance(fns, list) or not all(isinstance(f, str) for f in fns):
        raise InputError("expected a list of reward-function specs", file=str(path), field="reward_fns")
    return inputs


def absolute_spec(spec: str, *, judge: bool = False) -> str:
    """A reward-function spec (``file.py:fn``, with an optional ``=WEIGHT``) or a judge spec
    (``rm:DIR``, ``lm:DIR``, ``py:file.py:fn``) with the file or directory it names made
    absolute, as ``run.json`` stores it; names, ``module:function`` and ``world:ai`` as given."""
    if judge:
        kind, sep, rest = spec.partition(":")
        if sep and kind in ("rm", "lm"):
            return f"{kind}:{Path(rest).resolve()}"
        return f"py:{absolute_spec(rest)}" if sep and kind == "py" else spec
    target, weight = spec, ""
    head, sep, tail = spec.rpartition("=")
    if sep:
        try:
            float(tail)
            target, weight = head, f"={tail}"
        except ValueError:
            pass
    where, sep, attr = target.rpartition(":")
    if sep and where.endswith(".py"):
        return f"{Path(where).resolve()}:{attr}{weight}"
    return spec


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_settings(cfg, saved, where: Path):
    """The run's own settings (``saved``, read from ``where``, its ``config.yaml``) with what
    ``cfg`` changes of ``RESUMABLE`` (and ``report_to``), and those changes (key -> [before,
    after]); any other change is an InputError naming the setting. A field ``cfg`` leaves empty
    keeps the run's value. ``saved`` is changed in place."""
    from rlhflab.config import to_dict

    before, after = _flat(to_dict(saved)), _flat(to_dict(cfg))
    changes = {}
    for key, value in after.items():
        if value is None or value == before.get(key):
            continue
        if key not in RESUMABLE and not key.endswith(".report_to"):
            raise InputError(f"a resumed run keeps the settings it was trained with (config.yaml: {before.get(key)!r}, "
                             f"given: {value!r}); on --resume only {', '.join(RESUMABLE)} and report_to may change",
                             file=str(where), field=key)
        changes[key] = [before.get(key), value]
    for key, (_, value) in changes.items():
        *path, name = key.split(".")
        node = saved
        for part in path:
            node = getattr(node, part)
        setattr(node, name, value)
    rl = saved.rl
    if "rl.steps" in changes:
        for scheduled, setting, what in ((rl.lr_schedule != "constant", f"rl.lr_schedule={rl.lr_schedule}", "learning rate"),
                                         (rl.warmup_ratio > 0, f"rl.warmup_ratio={rl.warmup_ratio:g}", "learning rate"),
                                         (rl.kl_controller == "linear", "rl.kl_controller=linear", "KL coefficient")):
            if scheduled:
                raise InputError(f"cannot change on --resume with {setting}: that schedule spans rl.steps, so the "
                                 f"{what} would jump at the resumed step", file=str(where), field="rl.steps")
    return saved, changes


def _metrics_cut(path: Path, step: int) -> int | None:
    """Where ``metrics.jsonl``'s lines after ``step`` begin (a last line cut short by a kill
    counts as after it), as a byte offset; each line before it is checked (a JSON object with
    a whole-number ``step``). None when there is no file."""
    import json

    if not path.is_file():
        return None
    offset = 0
    for number, line in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            return offset  # written by a process killed mid-line
        if line.strip():
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise InputError("not valid JSON", file=str(path), line=number) from None
            at = row.get("step") if isinstance(row, dict) else None
            if not (isinstance(at, int) and not isinstance(at, bool) and at >= 0):
                raise InputError("expected a JSON object with a whole-number 'step'", file=str(path), line=number)
            if at > step:
                return offset
        offset += len(line)
    return offset


def _check_resume(cfg, algo: str, out: Path, changes: dict, critic: bool) -> dict:
    """What the resume of ``out`` starts from, every file read and checked, nothing changed:
    the checkpoint's step (0 for a run killed before its first checkpoint) and where to cut
    ``metrics.jsonl``."""
    from rlhflab.checkpoint import check_checkpoint

    ckpt = out / "checkpoint"
    if ckpt.exists():
        kl_keys = ("value", "steps") if cfg.rl.kl_controller == "linear" else ("value",)
        step = check_checkpoint(ckpt, value=critic, online=True, algo=algo, kl_keys=kl_keys)["step"]
        if step >= cfg.rl.steps:
            if "rl.steps" in changes:
                raise InputError(f"the checkpoint is at step {step}: a resumed run needs steps left "
                                 f"(rl.steps > {step})", file=str(out / "config.yaml"), field="rl.steps")
            raise InputError(f"step {step} is not before the run's end (rl.steps = {cfg.rl.steps}): "
                             "nothing to resume", file=str(ckpt / "state.json"), field="step")
    elif (out / "metrics.json").is_file():
        raise InputError("no checkpoint to resume from (set rl.save_every)", file=str(ckpt))
    else:
        step = 0  # killed before its first checkpoint: it starts again
    return {"step": step, "checkpoint": ckpt.exists(), "changes": changes,
            "cut": _metrics_cut(out / "metrics.jsonl", step)}


def _commit_resume(cfg, out: Path, resumed: dict) -> None:
    """Once the checkpoint has loaded: the settings as resumed in ``config.yaml``, the resume
    recorded in ``run.json``, the metric lines after the checkpoint dropped."""
    import os
    from datetime import datetime, timezone

    from rlhflab.artifacts import read_json, write_json

    if resumed["changes"]:
        tmp = out / ".config.yaml.tmp"
        save_config(cfg, tmp)
        os.replace(tmp, out / "config.yaml")
    inputs = read_json(out / "run.json")
    inputs.setdefault("resumes", []).append({
        "step": resumed["step"], "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "overrides": resumed["changes"]})
    write_json(out / "run.json", inputs)
    if resumed["cut"] is not None:
        os.truncate(out / "metrics.jsonl", resumed["cut"])  # in place: the metrics log appends to this file


def run_rl(cfg, algo: str, out: Path, *, sft: str, rm: str | None = None, reward_fns=(), prompts: str | None = None,
           overwrite: bool = False, resume: bool = False, eval_prompts: str | None = None,
           judge: str | None = None, reference: str | None = None) -> dict:
    """One online RL run end to end; returns the summary (also ``out/metrics.json``).
    ``reference``: the frozen policy the KL is taken to (a run or model directory), when it
    is not ``sft`` (``rlhflab iterate`` anchors every round to the SFT policy); default ``sft``.

    ``resume``: continue the run in ``out`` (module docstring) under its lock; ``cfg`` may
    differ from the run's ``config.yaml`` only in ``RESUMABLE``. A full disk while it trains is
    one line (the run stays resumable from its checkpoint)."""
    if not resume:
        return _run_rl(cfg, algo, out, sft=sft, rm=rm, reward_fns=reward_fns, prompts=prompts, overwrite=overwrite,
                       eval_prompts=eval_prompts, judge=judge, reference=reference)
    import contextlib

    from rlhflab.artifacts import main_process, writer_lock
    from rlhflab.errors import disk_full_error, is_disk_full

    with writer_lock(out) if main_process() else contextlib.nullcontext():
        try:
            return _run_rl(cfg, algo, out, sft=sft, rm=rm, reward_fns=reward_fns, prompts=prompts, resume=True,
                           eval_prompts=eval_prompts, judge=judge, reference=reference)
        except Exception as err:
            if is_disk_full(err):
                raise disk_full_error(err, out, kept=out) from None
            raise


def _run_rl(cfg, algo: str, out: Path, *, sft: str, rm: str | None = None, reward_fns=(), prompts: str | None = None,
            overwrite: bool = False, resume: bool = False, eval_prompts: str | None = None,
            judge: str | None = None, reference: str | None = None) -> dict:
    from accelerate.utils import set_seed

    from rlhflab.algos.rl_config import check_layout, resolve_rl_config
    from rlhflab.artifacts import check_out_dir, publish_run, run_directory, write_json
    from rlhflab.distributed import check_strategy, make_accelerator
    from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir
    from rlhflab.rewards import build_reward
    from rlhflab.world import World

    changes: dict = {}
    if resume:  # the run's own settings, but for what a resume may change: refused before anything loads
        cfg, changes = resume_settings(cfg, load_config(out / "config.yaml"), out / "config.yaml")
    accelerator = make_accelerator(cfg.rl.mixed_precision, cfg.rl.report_to, "rl")
    check_strategy(cfg.rl, "rl", accelerator, cfg.lora.r)
    cfg.rl = resolve_rl_config(cfg.rl, algo)
    check_layout(cfg.rl, accelerator.num_processes)
    critic = ONLINE_ALGORITHMS.entry(algo).options["critic"]
    resumed = None
    if resume:  # every file read and checked; nothing in out changes until the checkpoint has loaded
        if accelerator.is_main_process:
            from rlhflab.artifacts import recover_save

            recover_save(out / "checkpoint")  # a run killed between the two renames of a save has it aside
        accelerator.wait_for_everyone()
        resumed = _check_resume(cfg, algo, out, changes, critic)
    else:
        check_out_dir(out, overwrite)  # on every process, before anything is written
    # Validate every input before writing anything.
    sft_dir = resolve_model_dir(sft, "--sft")
    ref_dir = resolve_model_dir(reference, "reference") if reference is not None else sft_dir
    if cfg.lora.r and ref_dir != sft_dir:
        raise InputError("with LoRA the reference is the policy's base model: a separate reference needs lora.r=0",
                         field="lora.r")
    if rm is not None and not Path(rm).is_dir():
        raise InputError("reward model directory not found", file=rm)
    reward = build_reward(rm, reward_fns, rm_weight=cfg.rl.rm_weight, device=accelerator.device,
                          rm_reduce=cfg.rl.rm_reduce, rm_reduce_k=cfg.rl.rm_reduce_k)
    for _, source in reward.terms:  # load the reward model now: a bad --rm fails before any write
        getattr(source, "model", None)
    tok = load_tokenizer(sft_dir, cfg.model.trust_remote_code)
    world = World(cfg.world)
    prompt_rows, held_out = None, None
    if judge is not None:
        from rlhflab.instruments.judges import parse_judge

        parse_judge(judge)
    if prompts is not None:
        prompt_pool, prompt_rows = _load_prompts(prompts, tok)
        world_eval = None
    else:
        prompt_pool = [p.text for p in world.prompts(cfg.world.n_prompts, "rl")]
        world_eval = world.prompts(cfg.rl.n_eval, "eval")
    if eval_prompts is not None:
        from rlhflab.algos.online import HeldOut
        from rlhflab.instruments.judges import load_judge

        texts, rows = _load_prompts(eval_prompts, tok)
        held_out = HeldOut(texts, rows, load_judge(judge, trust_remote_code=cfg.model.trust_remote_code)
                           if judge else None)
        world_eval = None  # the user's held-out prompts replace the world's
    if cfg.rl.value_init == "rm" and critic and rm is None:
        raise InputError("value_init rm needs --rm DIR", field="rl.value_init")

    set_seed(cfg.rl.seed)
    policy = load_causal_lm(sft_dir, tok, cfg.model.trust_remote_code, cfg.model.attn_implementation)
    reference = None if cfg.lora.r else load_causal_lm(ref_dir, tok, cfg.model.trust_remote_code,
                                                        cfg.model.attn_implementation)
    value = _make_value_model(cfg, policy, tok, rm) if critic else None
    if cfg.lora.r:  # adapters on the policy and the critic; the reference is the policy's base
        from rlhflab import lora

        reference = lora.adapt_online(policy, value, cfg.lora)
    if cfg.model.gradient_checkpointing:  # the update runs in train mode then: dropout off in both modes
        from rlhflab.models import enable_gradient_checkpointing
        from rlhflab.training import disable_dropout

        for m in (policy, value.backbone if value is not None else None):
            if m is not None:
                disable_dropout(m)
                enable_gradient_checkpointing(m)

    accelerator.wait_for_everyone()
    if resume:  # continue in place: the checkpoint is this run's own
        return _train(cfg, algo, accelerator, policy, reference, tok, reward, prompt_pool, value, out, world,
                      world_eval, resumed=resumed, prompt_rows=prompt_rows, held_out=held_out)
    # Written beside its place; a first run is renamed in once the files --resume reads are
    # written (killed, it can be resumed; failed, it is kept only if it holds a checkpoint); a
    # replacement stays beside the earlier run, which is kept until the end.
    with run_directory(out, overwrite, accelerator, keep="checkpoint") as work:
        if accelerator.is_main_process:
            import os

            from rlhflab.instruments.judges import judge_name

            save_config(cfg, work / "config.yaml")
            write_json(work / "run.json", {
                "algo": algo, "sft": str(Path(sft).resolve()), "rm": str(Path(rm).resolve()) if rm else None,
                "reward_fns": [absolute_spec(f) if isinstance(f, str)
                               else f"<python {getattr(f, '__name__', type(f).__name__)}>" for f in reward_fns],
                "prompts": str(Path(prompts).resolve()) if prompts else None,
                "eval_prompts": str(Path(eval_prompts).resolve()) if eval_prompts else None,
                "judge": None if judge is None else absolute_spec(judge, judge=True) if isinstance(judge, str)
                else judge_name(judge),
                "reference": str(ref_dir.resolve()) if ref_dir != sft_dir else None, "cwd": os.getcwd()})
        accelerator.wait_for_everyone()
        work = publish_run(work, out, accelerator)
        return _train(cfg, algo, accelerator, policy, reference, tok, reward, prompt_pool, value, work, world,
                      world_eval, prompt_rows=prompt_rows, held_out=held_out)


def _train(cfg, algo, accelerator, policy, reference, tok, reward, prompt_pool, value, out: Path, world,
           eval_prompts, resumed: dict | None = None, prompt_rows=None, held_out=None) -> dict:
    from rlhflab.algos.online import OnlineRun
    from rlhflab.config import to_dict
    from rlhflab.distributed import trackers

    run = OnlineRun(cfg, algo, accelerator, policy, reference, tok, reward, prompt_pool, value_model=value,
                    out_dir=out, world=world if eval_prompts else None, eval_prompts=eval_prompts,
                    prompt_rows=prompt_rows, held_out=held_out)
    if resumed is not None:
        if resumed["checkpoint"]:
            run.load_checkpoint(out / "checkpoint")  # checked in full against the modules before it changes them
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # it loaded: now the run directory changes
            _commit_resume(cfg, out, resumed)
            changed = "".join(f", {k} {a} -> {b}" for k, (a, b) in resumed["changes"].items())
            print(f"[{algo}] resumed from step {resumed['step']} of {cfg.rl.steps}{changed}")
        accelerator.wait_for_everyone()
    with trackers(accelerator, out, algo, to_dict(cfg)):
        summary = ONLINE_ALGORITHMS[algo](run)  # the algorithm's training loop
    if accelerator.is_main_process:
        _print_summary(summary)
    return summary


def _make_value_model(cfg, policy, tokenizer, rm: str | None):
    from rlhflab.algos.ppo import ValueModel

    if cfg.rl.value_init == "rm":
        from rlhflab.rewards import ModelReward

        return ValueModel.from_reward_model(ModelReward(rm).model, tokenizer)
    return ValueModel.from_causal_lm(policy)


def _print_summary(s: dict) -> None:
    def f(key):
        v = s.get(key)
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    line = (f"[{s['algo']}] {s['steps']} steps: scores {f('objective/scores')}  KL {f('objective/kl')} nats  "
            f"beta {f('kl/beta')}  eos {f('rollout/eos_rate')}")
    if s.get("gold/initial") is not None:
        line += f"  gold {f('gold/initial')} -> {f('gold/final')} (best {f('gold/best')} at {s['gold/best_step']})"
    print(line)
