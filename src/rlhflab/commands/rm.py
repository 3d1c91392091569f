"""``rlhflab rm``: train a reward model (or an ensemble), normalize it, save it.

Data, in order of precedence:

1. ``--data FILE``: a preference JSONL (TRL standard or conversational, optional
   ``margin`` and ``votes``; a file written by ``rlhflab collect`` also carries rankings);
   held out: ``--eval-data FILE``, else every ``1/rm.eval_fraction``-th group;
2. ``--world-pairs``: the world's off-policy pairs (two demonstrations of a prompt);
3. default: comparisons collected from the SFT policy on the fly (``rlhflab collect``
   with ``rm.k`` samples per prompt on ``rm.n_prompts`` prompts, ``rm.n_eval_prompts``
   held out), the InstructGPT way.

``--adversarial A`` appends adversarial pairs to the training data (never to the held-out
pairs): ``A/adversarial.jsonl`` of an ``rlhflab attack-rm`` output (or such a file itself),
found exploits against clean responses to the same prompts. Rows on world prompts are
labelled by the world's raters (``world.rater``: each rater votes, the majority is
``chosen``, an even split is dropped) unless they carry ``votes`` of their own; other rows
are taken as the file labels them (people reviewed them: ``chosen`` is the clean response as
``attack-rm`` presumed it). They are
written to ``DIR/data/adversarial.jsonl`` and counted as ``data/source/adversarial``; with
``A/attack.json`` beside them, the attack's patterns are measured again on the new reward
model (``adversarial/patterns``: gain before and after).

Writes ``DIR/model`` (see ``rlhflab.reward_model``), ``DIR/metrics.jsonl`` (step metrics,
``rm/member`` tells ensemble members apart), ``DIR/metrics.json`` (summary),
``DIR/config.yaml`` and, for world data, ``DIR/data/train.jsonl`` and ``DIR/data/eval.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import (
    Config,
    RMConfig,
    add_config_arguments,
    check_section,
    config_from_args,
    field_choices,
    save_config,
    to_dict,
)
from rlhflab.errors import InputError


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--sft", help="SFT run directory (or its model/): the default backbone, the policy "
                   "comparisons are collected from, and the source of the reference samples")
    p.add_argument("--data", help="preference rows (prompt/chosen/rejected, optional votes and margin; "
                   "JSONL, JSON, Parquet, Arrow or a datasets directory)")
    p.add_argument("--eval-data", help="held-out preference rows, same formats (default: a share of --data)")
    p.add_argument("--world-pairs", action="store_true",
                   help="train on the world's off-policy demonstrator pairs instead of collecting")
    p.add_argument("--backbone", help="local HF checkpoint (encoder or decoder) to build the RM on "
                   "(default: rm.backbone, else the SFT policy)")
    p.add_argument("--ensemble", type=int, help="train K members (sets rm.ensemble)")
    p.add_argument("--min-agreement", type=float, help="drop pairs with less rater agreement (sets rm.min_agreement)")
    p.add_argument("--loss", choices=field_choices(RMConfig, "loss"), help="sets rm.loss")
    p.add_argument("--label-smoothing", type=float, help="sets rm.label_smoothing")
    p.add_argument("--center-coef", type=float, help="sets rm.center_coef")
    p.add_argument("--adversarial", help="an `rlhflab attack-rm` output directory (its adversarial.jsonl) or a "
                   "file of adversarial pairs: appended to the training pairs, labelled by the world's raters on "
                   "world prompts")


def run(args) -> int:
    cfg = config_from_args(args)
    for flag, name in (("ensemble", "ensemble"), ("min_agreement", "min_agreement"), ("loss", "loss"),
                       ("label_smoothing", "label_smoothing"), ("center_coef", "center_coef"),
                       ("backbone", "backbone")):
        if getattr(args, flag) is not None:
            setattr(cfg.rm, name, getattr(args, flag))
    check_section(cfg.rm, "rm")  # re-check values set from flags
    adversarial = adversarial_file(args.adversarial) if args.adversarial else None
    if adversarial is not None and cfg.rm.loss == "plackett_luce":
        raise InputError("adversarial pairs are pairs, not rankings: train them with rm.loss=bradley_terry",
                         field="--adversarial")
    run_rm(cfg, Path(args.out), sft=args.sft, data=args.data, eval_data=args.eval_data,
           world_pairs=args.world_pairs, overwrite=args.overwrite, adversarial=adversarial)
    return 0


ADVERSARIAL_FILE = "adversarial.jsonl"


def adversarial_file(path: str) -> Path:
    """The pairs ``--adversarial`` names: a file, or an ``attack-rm`` directory's ``adversarial.jsonl``."""
    p = Path(path)
    if p.is_dir():
        p = p / ADVERSARIAL_FILE
        if not p.is_file():
            raise InputError(f"no {ADVERSARIAL_FILE} here: give an `rlhflab attack-rm` output directory or a file "
                             "of pairs", file=str(p.parent))
    elif not p.exists():
        raise InputError("cannot open: No such file or directory", file=path)
    return p


def label_adversarial(rows: list[dict], world, seed: int) -> tuple[list[dict], dict]:
    """Adversarial pairs labelled: on world prompts by the world's raters (every rater votes on
    the pair, the majority is ``chosen``, an even split is dropped), unless a row carries its
    own ``votes`` (someone labelled it); other rows as the file has them. Returns (rows, counts)."""
    from rlhflab.seeds import derive_seed
    from rlhflab.world.labeler import RaterPanel
    from rlhflab.world.tasks import parse_prompt

    panel = RaterPanel(world.cfg.rater, seed=derive_seed(seed, "adversarial"))
    out, counts = [], {"adversarial/pairs_in": len(rows), "adversarial/rater_labelled": 0,
                       "adversarial/rater_prefers_clean": 0, "adversarial/ties": 0}
    for row in rows:
        row = {**row, "source": "adversarial"}
        parsed = parse_prompt(row["prompt"]) if isinstance(row["prompt"], str) else None
        if parsed is None or row.get("votes") or not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
            out.append(row)  # not a world prompt, or labelled already (votes): as the file has it
            continue
        votes = panel.compare(parsed, row["chosen"], row["rejected"], row.get("chosen_eos", True),
                              row.get("rejected_eos", True))
        counts["adversarial/rater_labelled"] += 1
        if 2 * sum(votes) == len(votes):
            counts["adversarial/ties"] += 1
            continue
        if 2 * sum(votes) > len(votes):
            counts["adversarial/rater_prefers_clean"] += 1
            out.append({**row, "votes": votes})
        else:  # the raters prefer the exploit: the labels say so
            out.append({**row, "chosen": row["rejected"], "rejected": row["chosen"],
                        "chosen_eos": row.get("rejected_eos", True), "rejected_eos": row.get("chosen_eos", True),
                        "votes": [1 - v for v in votes]})
    counts["adversarial/pairs"] = len(out)
    return out, counts


def _positions(path: Path, trust_remote_code: bool) -> int | None:
    """The backbone's longest input (position embeddings), if its config says."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)


def _split_held_out(groups: list, fraction: float) -> tuple[list, list]:
    if fraction <= 0 or len(groups) < 2:
        return groups, []
    every = max(2, round(1 / fraction))
    return ([g for i, g in enumerate(groups) if i % every != every - 1],
            [g for i, g in enumerate(groups) if i % every == every - 1])


def collect_world_data(cfg: Config, world, sft_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """Comparisons collected from the SFT policy on the world's pref / pref_eval prompts."""
    from rlhflab.commands.collect import collect, rater_panel
    from rlhflab.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(sft_dir)
    policy = load_causal_lm(sft_dir, tok)
    train, counts = collect(policy, tok, world, world.prompts(cfg.rm.n_prompts, "pref"), cfg.rm.k,
                            cfg.generation, rater_panel(world, "pref"), seed=cfg.rm.seed)
    held, _ = collect(policy, tok, world, world.prompts(cfg.rm.n_eval_prompts, "pref_eval"), cfg.rm.k,
                      cfg.generation, rater_panel(world, "pref_eval"), seed=cfg.rm.seed + 1)
    return train, held, counts


def reference_texts(cfg: Config, world, sft_dir: Path | None, rows: list[dict], tokenizer,
                    from_world: bool) -> tuple[list[str], list[str], list[bool], str]:
    """Reference samples for the normalization: the SFT policy's samples on the world's RL
    prompts (or on the data's prompts), else the responses of the training data."""

    n = cfg.rm.n_reference
    if sft_dir is not None:
        from rlhflab.models import load_causal_lm, load_tokenizer
        from rlhflab.sampling import sample

        prompts = [p.text for p in world.prompts(n, "rl")] if from_world else [r["prompt"] for r in rows][:n]
        if prompts:
            tok = load_tokenizer(sft_dir)
            g = cfg.generation
            done = sample(load_causal_lm(sft_dir, tok), tok, prompts, temperature=g.temperature, top_k=g.top_k,
                          top_p=g.top_p, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                          seed=cfg.rm.seed + 2)
            return list(prompts), [c.text for c in done], [c.eos for c in done], "sft_samples"
    ps, rs, es = [], [], []
    for r in rows[:n]:  # as the data holds them: the reward model renders them as in training
        for side in ("chosen", "rejected"):
            ps.append(r["prompt"])
            rs.append(r[side])
            es.append(bool(r.get(f"{side}_eos", True)))
    return ps, rs, es, "training_responses"


def _merged(model):
    """A trained member with its LoRA adapters folded in (``lora.merge``), else itself."""
    from rlhflab import lora

    return lora.merge(model)


def run_rm(cfg: Config, out: Path, *, sft: str | None = None, data: str | None = None,
           eval_data: str | None = None, world_pairs: bool = False, overwrite: bool = False,
           adversarial: Path | None = None) -> dict:
    """The reward-model stage end to end: validate, (collect,) train, normalize, save."""
    from accelerate.utils import set_seed

    from rlhflab.algos.reward_model import rows_to_groups, tokenize_groups, train_reward_model
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.data import load_rows, write_jsonl
    from rlhflab.distributed import check_strategy, gathered, make_accelerator, trackers
    from rlhflab.instruments.rm_eval import pairwise_accuracy
    from rlhflab.models import count_parameters, enable_gradient_checkpointing, resolve_model_dir
    from rlhflab.reward_model import (
        RewardModel,
        create_reward_model,
        length_normalization,
        load_rm_tokenizer,
        normalization,
    )
    from rlhflab.world import World

    rm = cfg.rm
    accelerator = make_accelerator(rm.mixed_precision, rm.report_to, "rm")
    check_strategy(rm, "rm", accelerator, cfg.lora.r)
    check_out_dir(out, overwrite)  # on every process, before anything is written
    sft_dir = resolve_model_dir(sft, "--sft") if sft else None
    backbone = resolve_model_dir(rm.backbone, "--backbone") if rm.backbone else sft_dir
    if backbone is None:
        raise InputError("give --sft (the default backbone) or --backbone")
    if data is None and not world_pairs and sft_dir is None:
        raise InputError("collecting comparisons needs --sft (or give --data or --world-pairs)")
    if rm.grad_penalty and cfg.model.attn_implementation == "flash_attention_2":
        raise InputError("the input-gradient penalty differentiates the backward pass, which flash-attention "
                         "kernels cannot: use model.attn_implementation=sdpa or eager", field="rm.grad_penalty")
    world = World(cfg.world)
    # User files are validated up front: a bad row stops the run before anything is written.
    train_rows = load_rows(data, "preference") if data else None
    eval_rows = load_rows(eval_data, "preference") if eval_data else None
    adversarial_rows = load_rows(adversarial, "preference") if adversarial else None
    tok = load_rm_tokenizer(backbone, cfg.model.trust_remote_code)
    max_length = min(rm.max_length, _positions(backbone, cfg.model.trust_remote_code) or rm.max_length)
    accelerator.wait_for_everyone()
    with run_directory(out, overwrite, accelerator) as work, trackers(accelerator, work, "rm", to_dict(cfg)):
        if accelerator.is_main_process:
            save_config(cfg, work / "config.yaml")
        accelerator.wait_for_everyone()

        counts: dict = {}
        if train_rows is None:
            # World data is made on the main process, written, and read back by every process.
            if accelerator.is_main_process:
                (work / "data").mkdir()
                if world_pairs:
                    tr = world.preference_pairs(cfg.world.n_preferences, "pref")
                    ev = world.preference_pairs(max(1, cfg.world.n_preferences // 5), "pref_eval")
                else:
                    tr, ev, counts = collect_world_data(cfg, world, sft_dir)
                write_jsonl(work / "data" / "train.jsonl", tr)
                write_jsonl(work / "data" / "eval.jsonl", ev)
            accelerator.wait_for_everyone()
            train_rows = load_rows(work / "data" / "train.jsonl", "preference")
            eval_rows = load_rows(work / "data" / "eval.jsonl", "preference")
        if adversarial_rows is not None:  # appended to the training pairs only, labelled first
            adversarial_rows, adversarial_counts = label_adversarial(adversarial_rows, world, rm.seed)
            counts.update(adversarial_counts)
            if accelerator.is_main_process:
                (work / "data").mkdir(exist_ok=True)
                write_jsonl(work / "data" / ADVERSARIAL_FILE, adversarial_rows)
            train_rows = [*train_rows, *adversarial_rows]
        train, data_counts = rows_to_groups(train_rows, weights=rm.weights, margin_scale=rm.margin_scale,
                                            min_agreement=rm.min_agreement)
        counts.update(data_counts)
        if eval_rows is None:
            train, held = _split_held_out(train, rm.eval_fraction)
        else:
            held, _ = rows_to_groups(eval_rows)
        if not train:
            raise InputError("no comparisons left to train on", file=data)
        try:
            n_trunc = tokenize_groups(train, tok, max_length)
            tokenize_groups(held, tok, max_length)
        except InputError as err:
            raise InputError(err.reason, file=err.file or data, line=err.line) from None
        if len(train) < rm.batch_size:
            raise InputError(f"{len(train)} comparison groups are fewer than one batch (rm.batch_size={rm.batch_size})",
                             file=data)

        members, member_summaries = [], []
        for i in range(rm.ensemble):
            set_seed(rm.seed + i)
            model, tok = create_reward_model(backbone, seed=rm.seed + i, trust_remote_code=cfg.model.trust_remote_code,
                                             attn_implementation=cfg.model.attn_implementation)
            if cfg.lora.r:  # adapters on the backbone; the head trains in full
                from rlhflab import lora
                from rlhflab.reward_model import reward_head

                lora.attach(model, cfg.lora, trainable=[reward_head(model)])
            if cfg.model.gradient_checkpointing and rm.train_backbone:
                enable_gradient_checkpointing(model)
            n_params = count_parameters(model)
            s = train_reward_model(rm, model, tok, train, held, work, accelerator, seed=rm.seed + i, member=i)
            whole = gathered(accelerator, model)  # on the main process, sharded or not; None elsewhere
            members.append(_merged(whole).cpu() if whole is not None else None)
            member_summaries.append(s)
            accelerator.free_memory()

        summary: dict = {"rm/ensemble": rm.ensemble, "data/source": data or ("world_pairs" if world_pairs else "collected"),
                         "data/truncated": n_trunc, "data/eval_groups": len(held), "data/max_length": max_length,
                         "model/backbone": str(backbone), "model/parameters": n_params,
                         "train/seconds": sum(s["train/seconds"] for s in member_summaries), **counts}
        if accelerator.is_main_process:
            reward_model = RewardModel(members, tok, max_length=max_length)
            ps, rs, es, ref_kind = reference_texts(cfg, world, sft_dir, train_rows, tok,
                                                   from_world=data is None)
            raw = reward_model.raw_member_scores(ps, rs, eos=es)
            norm_meta: dict = {"reference": ref_kind, "n": len(rs), "raw_mean": raw.mean(1).tolist(),
                               "raw_std": raw.std(1, unbiased=False).tolist()}
            if rm.length_residual:
                lengths = reward_model.response_lengths(ps, rs, eos=es)
                try:
                    fits = [length_normalization(raw[m], lengths) for m in range(rm.ensemble)]
                except ValueError as err:
                    raise InputError(f"cannot fit the length term on the {len(rs)} reference samples: {err}",
                                     field="rm.length_residual") from None
                for m, (gain, bias, slope) in enumerate(fits):
                    reward_model.gains[m], reward_model.biases[m], reward_model.length_slopes[m] = gain, bias, slope
                norm_meta.update({"length_residual": True, "length_unit": "response tokens of this tokenizer, "
                                  "the end token not counted", "length_mean": lengths.mean().item(),
                                  "length_corr_raw": [_corr(raw[m], lengths) for m in range(rm.ensemble)]})
                summary.update({"normalization/length_slope": sum(f[2] for f in fits) / rm.ensemble,
                                "normalization/length_corr_raw": sum(norm_meta["length_corr_raw"]) / rm.ensemble})
            else:
                for m in range(rm.ensemble):
                    reward_model.gains[m], reward_model.biases[m] = normalization(raw[m])
            reward_model.meta = {"backbone": str(backbone), "loss": rm.loss, "seed": rm.seed,
                                 "normalization": norm_meta}
            reward_model.feature_stats = _feature_stats(reward_model, train, held)
            reward_model.save(work / "model")
            summary.update({"normalization/reference": ref_kind, "normalization/n": len(rs)})
            if held:
                summary["eval/accuracy"] = pairwise_accuracy(reward_model, _rows_of(held))
                summary["eval/accuracy_member_mean"] = sum(s["eval/accuracy"] for s in member_summaries) / rm.ensemble
            if adversarial_rows:
                summary.update(_adversarial_readings(reward_model, adversarial_rows, adversarial, world))
            summary["members"] = member_summaries
            for key in ("train/loss", "train/accuracy", "eval/loss", "eval/loss_initial", "eval/accuracy_initial"):
                if key in member_summaries[0]:
                    summary[key] = sum(s[key] for s in member_summaries) / rm.ensemble
            write_json(work / "metrics.json", summary)
            _print_summary(summary)
    accelerator.wait_for_everyone()
    return summary


def _corr(x, y) -> float:
    """Pearson correlation of two (B,) tensors (0 when either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = (x.pow(2).sum() * y.pow(2).sum()).sqrt().item()
    return (x * y).sum().item() / denom if denom > 0 else 0.0


def _feature_stats(reward_model, train: list, held: list, limit: int = 4096) -> dict:
    """The training data's feature statistics, saved with the model for the distribution-shift
    reading (``instruments.distribution_shift``): every distinct response of the training
    groups (at most ``limit``), the held-out groups' as the reference distances."""
    from rlhflab.instruments.distribution_shift import feature_stats

    def responses(groups):
        def key(x):  # text, or a conversational field (a list of messages) by its repr
            return x if isinstance(x, str) else repr(x)

        seen = {(key(g.prompt), key(r), bool(e)): (g.prompt, r, bool(e))
                for g in groups for r, e in zip(g.responses, g.eos)}
        rows = list(seen.values())[:limit]
        return [p for p, _, _ in rows], [r for _, r, _ in rows], [e for _, _, e in rows]

    return feature_stats(reward_model, responses(train), responses(held) if held else None)


def _adversarial_readings(reward_model, rows: list[dict], path: Path, world) -> dict:
    """How the retrained reward model orders its adversarial pairs, and, with the attack's
    ``attack.json`` beside them, its patterns measured again (gain before and after)."""
    from rlhflab.artifacts import read_json
    from rlhflab.instruments.rm_attack import remeasure
    from rlhflab.instruments.rm_eval import pairwise_accuracy

    out: dict = {"adversarial/accuracy": pairwise_accuracy(reward_model, rows)}
    record_file = path.parent / "attack.json"
    if record_file.is_file():
        record = read_json(record_file)
        if isinstance(record, dict) and record.get("patterns"):
            again = remeasure(reward_model, record, world=world)
            out["adversarial/patterns"] = again
            out["adversarial/top_gain_before"] = again[0]["gain_before"]
            out["adversarial/top_gain_after"] = again[0]["gain_after"]
    return out


def _rows_of(groups: list) -> list[dict]:
    """Preference rows back from groups (the held-out share of a user's file)."""
    return [{"prompt": g.prompt, "chosen": g.responses[i], "rejected": g.responses[j],
             "chosen_eos": g.eos[i], "rejected_eos": g.eos[j]} for g in groups for i, j in g.pairs]


def _print_summary(summary: dict) -> None:
    keys = ["train/loss", "train/accuracy", "eval/accuracy_initial", "eval/accuracy", "eval/accuracy_member_mean",
            "data/pairs", "adversarial/pairs", "adversarial/accuracy", "adversarial/top_gain_before",
            "adversarial/top_gain_after", "train/seconds"]
    print("  ".join(f"{k}={summary[k]:.3f}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
                    for k in keys if k in summary))
