"""``rlhflab ppo | reinforce | rloo | grpo``: online RL from an SFT policy.

    rlhflab ppo --config configs/demo.yaml --sft runs/sft --rm runs/rm --out runs/ppo
    rlhflab reinforce --variant reinforce++ --sft runs/sft --reward-fn gold --out runs/rpp
    rlhflab grpo --variant dr-grpo --sft runs/sft --rm runs/rm --out runs/drgrpo
    rlhflab ppo --resume runs/ppo            # continue from the last checkpoint

The SFT policy is both the starting point and the frozen reference. The reward is the
reward model (``--rm``), Python reward functions (``--reward-fn``) or their weighted sum.
Prompts are the world's RL split unless ``--prompts FILE`` (prompt JSONL) is given; on
world prompts the run also measures the gold utility of held-out samples every
``rl.eval_every`` steps.

Writes ``OUT/metrics.jsonl`` (per step), ``OUT/metrics.json`` (summary), ``OUT/model/``
(the trained policy, safetensors), ``OUT/value.safetensors`` (PPO critic),
``OUT/checkpoint/`` (every ``rl.save_every`` steps), ``OUT/best/`` (with early stopping),
``OUT/config.yaml`` (resolved) and ``OUT/run.json`` (the inputs, for ``--resume``).
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args, load_config, save_config
from rlhflab.errors import InputError
from rlhflab.registry import ONLINE_ALGORITHMS, online_commands

VARIANTS: dict[str, dict[str, str]] = online_commands()
"""command -> variant -> algorithm (``registry.ONLINE_ALGORITHMS``); the first variant is the default."""


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
    from rlhflab.artifacts import read_json

    command = args.command
    if args.resume:
        out = Path(args.resume)
        if not (out / "run.json").is_file() or not (out / "config.yaml").is_file():
            raise InputError("not an RL run directory (no run.json / config.yaml)", file=str(out))
        inputs = read_json(out / "run.json")
        cfg = load_config(out / "config.yaml", args.overrides)
        if inputs["algo"] not in VARIANTS.get(command, {}).values():
            raise InputError(f"this is a {inputs['algo']} run; resume it with the matching command",
                             file=str(out / "run.json"))
        fns = inputs.get("reward_fns", [])
        python = [f for f in fns if f.startswith("<python ")]
        if python:
            raise InputError(f"the run was given Python reward functions ({', '.join(python)}); resume it from Python "
                             "with run_rl(..., reward_fns=[...], resume=True)", file=str(out / "run.json"))
        run_rl(cfg, inputs["algo"], out, sft=inputs["sft"], rm=inputs.get("rm"),
               reward_fns=fns, prompts=inputs.get("prompts"), resume=True,
               eval_prompts=inputs.get("eval_prompts"), judge=inputs.get("judge"), reference=inputs.get("reference"))
        return 0
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


def run_rl(cfg, algo: str, out: Path, *, sft: str, rm: str | None = None, reward_fns=(), prompts: str | None = None,
           overwrite: bool = False, resume: bool = False, eval_prompts: str | None = None,
           judge: str | None = None, reference: str | None = None) -> dict:
    """One online RL run end to end; returns the summary (also ``out/metrics.json``).
    ``reference``: the frozen policy the KL is taken to (a run or model directory), when it
    is not ``sft`` (``rlhflab iterate`` anchors every round to the SFT policy); default ``sft``."""
    from accelerate.utils import set_seed

    from rlhflab.algos.rl_config import check_layout, resolve_rl_config
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.checkpoint import read_state
    from rlhflab.distributed import make_accelerator
    from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir
    from rlhflab.rewards import build_reward
    from rlhflab.world import World

    accelerator = make_accelerator(cfg.rl.mixed_precision, cfg.rl.report_to, "rl")
    cfg.rl = resolve_rl_config(cfg.rl, algo)
    check_layout(cfg.rl, accelerator.num_processes)
    ckpt_state = None
    if resume:
        ckpt = out / "checkpoint"
        if not ckpt.is_dir():
            raise InputError("no checkpoint to resume from (set rl.save_every)", file=str(ckpt))
        ckpt_state = read_state(ckpt)
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
    reward = build_reward(rm, reward_fns, rm_weight=cfg.rl.rm_weight, device=accelerator.device)
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
    critic = ONLINE_ALGORITHMS.entry(algo).options["critic"]
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
        if accelerator.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", ckpt_state["step"])
        accelerator.wait_for_everyone()
        return _train(cfg, algo, accelerator, policy, reference, tok, reward, prompt_pool, value, out, world,
                      world_eval, resume=True, prompt_rows=prompt_rows, held_out=held_out)
    # A first run writes in place (killed, it can be resumed; failed, it is kept only if it holds
    # a checkpoint); a replacement is written beside the earlier run, which stays until the end.
    with run_directory(out, overwrite, accelerator, keep="checkpoint") as work:
        if accelerator.is_main_process:
            from rlhflab.instruments.judges import judge_name

            save_config(cfg, work / "config.yaml")
            write_json(work / "run.json", {
                "algo": algo, "sft": str(Path(sft).resolve()), "rm": str(Path(rm).resolve()) if rm else None,
                "reward_fns": [f if isinstance(f, str) else f"<python {getattr(f, '__name__', type(f).__name__)}>"
                               for f in reward_fns],
                "prompts": str(Path(prompts).resolve()) if prompts else None,
                "eval_prompts": str(Path(eval_prompts).resolve()) if eval_prompts else None,
                "judge": judge if judge is None else judge_name(judge),
                "reference": str(ref_dir.resolve()) if ref_dir != sft_dir else None})
        accelerator.wait_for_everyone()
        return _train(cfg, algo, accelerator, policy, reference, tok, reward, prompt_pool, value, work, world,
                      world_eval, prompt_rows=prompt_rows, held_out=held_out)


def _train(cfg, algo, accelerator, policy, reference, tok, reward, prompt_pool, value, out: Path, world,
           eval_prompts, resume: bool = False, prompt_rows=None, held_out=None) -> dict:
    from rlhflab.algos.online import OnlineRun
    from rlhflab.config import to_dict
    from rlhflab.distributed import trackers

    run = OnlineRun(cfg, algo, accelerator, policy, reference, tok, reward, prompt_pool, value_model=value,
                    out_dir=out, world=world if eval_prompts else None, eval_prompts=eval_prompts,
                    prompt_rows=prompt_rows, held_out=held_out)
    if resume:
        run.load_checkpoint(out / "checkpoint")
        if accelerator.is_main_process:
            print(f"[{algo}] resumed from step {run.state['step']} of {cfg.rl.steps}")
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint (they will be recomputed)."""
    import json

    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _print_summary(s: dict) -> None:
    def f(key):
        v = s.get(key)
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    line = (f"[{s['algo']}] {s['steps']} steps: scores {f('objective/scores')}  KL {f('objective/kl')} nats  "
            f"beta {f('kl/beta')}  eos {f('rollout/eos_rate')}")
    if s.get("gold/initial") is not None:
        line += f"  gold {f('gold/initial')} -> {f('gold/final')} (best {f('gold/best')} at {s['gold/best_step']})"
    print(line)
