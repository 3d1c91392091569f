"""``rlhflab dpo``: direct preference optimization (and cDPO, IPO, hinge, KTO, SimPO, ORPO)
from an SFT policy, on the world's comparisons or the user's TRL-format JSONL.

    rlhflab dpo --loss dpo --config configs/tiny.yaml --sft runs/sft --out runs/dpo
    rlhflab dpo --loss kto --unpaired-from-pairs --sft runs/sft --out runs/kto
    rlhflab dpo --loss ipo --data prefs.jsonl --sft runs/sft --out runs/ipo

Writes ``metrics.jsonl`` (step metrics), ``metrics.json`` (summary), ``model/`` and
``config.yaml``. On world data it also measures, at step 0, every
``dpo.world_eval_every`` steps and at the end, the gold utility of samples on held-out
prompts and the sampled KL from the reference, and at the end the gold win-rate against
the SFT policy on the same prompts.
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import Config, add_config_arguments, config_from_args, save_config, to_dict
from rlhflab.registry import PREFERENCE_LOSSES

# The losses that train on single labelled responses (KTO) rather than on pairs.
UNPAIRED = " or ".join(PREFERENCE_LOSSES.where(unpaired=True))


def is_unpaired(loss: str) -> bool:
    return PREFERENCE_LOSSES.entry(loss).options["unpaired"]


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--loss", choices=PREFERENCE_LOSSES.names(),
                   help="the objective (default: dpo.loss of the config)")
    p.add_argument("--sft", required=True, help="SFT run directory or any local HF causal-LM directory: "
                   "the starting policy and the frozen reference")
    p.add_argument("--data", help="preference rows (prompt/chosen/rejected), or for --loss kto unpaired "
                   "rows (prompt/completion/label), text or messages (JSONL, JSON, Parquet, Arrow or a datasets directory); default: the world's comparisons")
    p.add_argument("--eval-data", help="held-out rows in the same format; default: the world's, or every "
                   "20th row of --data")
    p.add_argument("--unpaired-from-pairs", action="store_true",
                   help="kto: split each preference row into a desirable (chosen) and an undesirable "
                   "(rejected) example")


def run(args) -> int:
    cfg = config_from_args(args)
    if args.loss:
        cfg.dpo.loss = args.loss
    run_dpo(cfg, Path(args.out), Path(args.sft), data=args.data, eval_data=args.eval_data,
            unpaired_from_pairs=args.unpaired_from_pairs, overwrite=args.overwrite)
    return 0


# ---------------------------------------------------------------------------------------
# Data


def detect_format(path: str) -> str:
    """"unpaired" if the first row has a completion (and no chosen), else "preference"
    (any container ``rlhflab.readers`` reads)."""
    from rlhflab.readers import read_records

    for _, obj in read_records(path):
        if not isinstance(obj, dict):
            break  # load_rows names the row
        return "unpaired" if "chosen" not in obj and ("completion" in obj or "label" in obj) else "preference"
    from rlhflab.errors import InputError

    raise InputError("no rows", file=str(path))


def _load(path: str, loss: str, unpaired_from_pairs: bool) -> list[dict]:
    """Rows of ``path`` in the format ``loss`` trains on (validated), or a clear error.
    For kto with --unpaired-from-pairs, preference rows are returned as they are (the
    caller splits off held-out pairs first, then converts)."""
    from rlhflab.data import load_rows
    from rlhflab.errors import InputError

    fmt = detect_format(path)
    if is_unpaired(loss):
        if fmt == "unpaired":
            return load_rows(path, "unpaired")
        if not unpaired_from_pairs:
            raise InputError(f"{loss} trains on unpaired rows (prompt/completion/label) and this file holds "
                             "preference pairs; pass --unpaired-from-pairs to split each pair into a "
                             "desirable and an undesirable example", file=str(path))
        return load_rows(path, "preference")
    if fmt == "unpaired":
        raise InputError(f"{loss} trains on preference rows (prompt/chosen/rejected) and this file holds "
                         f"unpaired rows (prompt/completion/label); use --loss {UNPAIRED}", file=str(path))
    return load_rows(path, "preference")


def load_dpo_rows(cfg: Config, world, data: str | None, eval_data: str | None,
                  unpaired_from_pairs: bool) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) in the loss's format: the user's files or the world's.

    Without --eval-data, every 20th row of --data is held out (for kto from pairs, every
    20th pair, before the split, so both halves of a pair stay on the same side).
    """
    from rlhflab.data import pairs_to_unpaired
    from rlhflab.errors import InputError

    loss = cfg.dpo.loss
    if unpaired_from_pairs and not is_unpaired(loss):
        raise InputError(f"--unpaired-from-pairs applies to --loss {UNPAIRED} only")

    def as_needed(rows: list[dict]) -> list[dict]:
        return pairs_to_unpaired(rows) if is_unpaired(loss) and "chosen" in rows[0] else rows

    if data is None:
        if is_unpaired(loss) and not unpaired_from_pairs:
            raise InputError(f"{loss} trains on unpaired rows and the world's comparisons are pairs; pass "
                             "--unpaired-from-pairs (or --data with prompt/completion/label rows)")
        n_eval = cfg.dpo.n_eval_pairs or max(1, cfg.world.n_preferences // 5)
        return (as_needed(world.preference_pairs(cfg.world.n_preferences, "pref")),
                as_needed(world.preference_pairs(n_eval, "pref_eval")))
    rows = _load(data, loss, unpaired_from_pairs)
    if eval_data is not None:
        return as_needed(rows), as_needed(_load(eval_data, loss, unpaired_from_pairs))
    held = rows[::20]
    return as_needed([r for i, r in enumerate(rows) if i % 20]), as_needed(held)


def world_prompts_only(rows: list[dict]) -> bool:
    """True if the rows' prompts are the world's (so gold utility can judge the policy)."""
    from rlhflab.world import parse_prompt

    return all(isinstance(r["prompt"], str) and parse_prompt(r["prompt"]) is not None for r in rows[:50])


# ---------------------------------------------------------------------------------------
# The world monitor: gold utility, sampled KL, win-rate against SFT


class WorldMonitor:
    """Called by the training loop at step 0, every N steps and at the end (main process).

    Samples one response per held-out world prompt (the same seed every time, so steps
    differ by the policy only), scores them with the gold utility, estimates the sequence
    KL from the reference by sampling, and compares each step's gold scores with step 0's
    (the SFT policy) prompt by prompt: the gold win-rate.
    """

    def __init__(self, world, tokenizer, gen, n_prompts: int, sft_dir: Path, reference=None) -> None:
        self.world, self.tok, self.gen, self.sft_dir, self.reference = world, tokenizer, gen, sft_dir, reference
        self.prompts = world.prompts(n_prompts, "eval")
        self.sft_golds: list[float] | None = None
        self.last: dict = {}
        self.completions: list = []

    def __call__(self, step: int, policy) -> dict:
        import gc

        from rlhflab.forward import fuse_activations
        from rlhflab.instruments.policy_eval import measure_policy_on_world, sampled_kl
        from rlhflab.instruments.win_rate import gold_win_rate
        from rlhflab.models import load_causal_lm
        from rlhflab.world.gold import gold_utility

        measured, self.completions = measure_policy_on_world(policy, self.tok, self.world, self.prompts, self.gen)
        golds = [gold_utility(p, c.text, c.eos) for p, c in zip(self.prompts, self.completions)]
        reference = self.reference
        if reference is None:  # released after caching its log-probs: reload it for this
            reference = load_causal_lm(self.sft_dir, self.tok).to(next(policy.parameters()).device)
            fuse_activations(reference)  # as the policy's in train_dpo: step 0's KL is exactly 0
        kl = sampled_kl(policy, reference, self.tok, [p.text for p in self.prompts],
                        max_new_tokens=self.gen.max_new_tokens, batch_size=self.gen.batch_size)
        del reference
        gc.collect()
        out = {k: v for k, v in measured.items() if k in ("gold/mean", "samples/well_formed_rate",
                                                          "samples/eos_rate", "samples/length_mean")}
        out.update(kl)
        if step == 0:
            self.sft_golds = golds
        else:
            win = gold_win_rate(golds, self.sft_golds)
            out.update({"win_rate/gold": win["win_rate"], "win_rate/gold_ci_low": win["ci_low"],
                        "win_rate/gold_ci_high": win["ci_high"], "win_rate/gold_n": win["n"],
                        "win_rate/gold_ties": win["ties"]})
        self.levels = {k: measured[k] for k in ("gold/ideal_mean", "gold/demonstrator_mean")}
        self.last = out
        return out


# ---------------------------------------------------------------------------------------
# The stage


def run_dpo(cfg: Config, out: Path, sft: Path, data: str | None = None, eval_data: str | None = None,
            unpaired_from_pairs: bool = False, overwrite: bool = False) -> dict:
    """The DPO-family stage end to end: validate, tokenize, cache the reference, train, save,
    measure, summarise."""
    import copy
    import gc

    from accelerate.utils import set_seed

    from rlhflab.algos.dpo import (
        attach_reference_logps,
        freeze,
        needs_reference,
        tokenize_pairs,
        tokenize_unpaired,
        train_dpo,
    )
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.commands.sample import print_samples
    from rlhflab.distributed import check_strategy, gathered, make_accelerator, trackers
    from rlhflab.errors import InputError
    from rlhflab.models import (
        enable_gradient_checkpointing,
        load_causal_lm,
        load_tokenizer,
        resolve_model_dir,
        save_pretrained_atomic,
    )
    from rlhflab.world import World

    accelerator = make_accelerator(cfg.dpo.mixed_precision, cfg.dpo.report_to, "dpo")
    check_strategy(cfg.dpo, "dpo", accelerator, cfg.lora.r)
    check_out_dir(out, overwrite)  # on every process, before anything is written
    d = cfg.dpo
    world = World(cfg.world)
    train_rows, eval_rows = load_dpo_rows(cfg, world, data, eval_data, unpaired_from_pairs)
    sft_dir = resolve_model_dir(sft, "--sft")
    tok = load_tokenizer(sft_dir, cfg.model.trust_remote_code)
    policy = load_causal_lm(sft_dir, tok, cfg.model.trust_remote_code, cfg.model.attn_implementation)
    positions = getattr(policy.config, "max_position_embeddings", None) or getattr(policy.config, "n_positions", None)
    if positions is not None and d.max_length > positions:
        raise InputError(f"{d.max_length} is longer than the model's {positions} positions", field="dpo.max_length")

    def tokenize(rows, what):
        if not is_unpaired(d.loss):
            return tokenize_pairs(rows, tok, d.max_length)
        if len(rows) < 2:  # each example needs another one to mismatch with
            raise InputError(f"{d.loss} needs at least 2 {what} examples, got {len(rows)}", file=data)
        return tokenize_unpaired(rows, tok, d.max_length, seed=d.seed)

    train, stats = tokenize(train_rows, "training")
    held, held_stats = tokenize(eval_rows, "held-out")
    source = data or "world"
    if not train:
        raise InputError(f"no usable pairs: all {len(train_rows)} pairs have identical chosen and rejected "
                         f"responses once truncated to dpo.max_length={d.max_length}; raise dpo.max_length",
                         file=data)
    if len(train) < d.batch_size:
        raise InputError(f"{len(train)} usable training examples are fewer than one batch of {d.batch_size}; "
                         "lower dpo.batch_size or add data", field="dpo.batch_size")

    set_seed(d.seed)
    if cfg.lora.r:  # adapters on the policy; the reference is its base, adapters off: no second copy
        from rlhflab import lora

        reference = freeze(lora.reference_of(lora.attach(policy, cfg.lora))).to(accelerator.device)
    else:
        reference = freeze(copy.deepcopy(policy)).to(accelerator.device)  # the SFT policy, bit for bit
    if cfg.model.gradient_checkpointing:  # the policy only: the reference runs no backward
        enable_gradient_checkpointing(policy)
    if needs_reference(d.loss) and d.precompute_ref_logps:
        for examples in (train, held):  # separately: held-out chunks then match evaluate()
            attach_reference_logps(reference, examples, tok.pad_token_id, accelerator.device, packing=d.packing)
        reference = None  # released: training never runs the reference again
        gc.collect()
    elif not needs_reference(d.loss):
        reference = None
    on_world = d.world_eval_every >= 0 and (data is None or world_prompts_only(train_rows))
    monitor = (WorldMonitor(world, tok, cfg.generation, d.n_world_eval, sft_dir, reference)
               if on_world else None)

    accelerator.wait_for_everyone()
    with run_directory(out, overwrite, accelerator) as work, trackers(accelerator, work, "dpo", to_dict(cfg)):
        if accelerator.is_main_process:
            save_config(cfg, work / "config.yaml")
        accelerator.wait_for_everyone()

        summary = train_dpo(d, policy, reference, tok, train, held, work, accelerator, monitor)
        summary.update(stats)
        summary.update({f"{k}_eval": v for k, v in held_stats.items()})
        summary["data/source"] = source
        model = gathered(accelerator, policy)  # the whole model on the main process, sharded or not
        if accelerator.is_main_process:
            save_pretrained_atomic(model, tok, work / "model")
            if monitor is not None:
                summary.update(monitor.last)
                summary.update(monitor.levels)
                summary["gold/mean_sft"] = sum(monitor.sft_golds) / len(monitor.sft_golds)
                if d.n_show > 0:
                    print_samples(monitor.completions[: d.n_show], monitor.prompts[: d.n_show],
                                  title=f"{d.loss} samples")
            write_json(work / "metrics.json", summary)
            _print_summary(summary)
    accelerator.wait_for_everyone()
    return summary


def _print_summary(summary: dict) -> None:
    keys = ["eval/loss_initial", "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
            "gold/mean_sft", "gold/mean", "kl/sequence_mean", "win_rate/gold", "win_rate/gold_ci_low",
            "win_rate/gold_ci_high", "data/truncated", "train/seconds"]
    print("  ".join(f"{k}={summary[k]:.3f}" for k in keys if isinstance(summary.get(k), (int, float))))
