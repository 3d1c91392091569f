"""``rlhflab sft``: supervised fine-tuning, on the world's demonstrations or the user's JSONL."""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import Config, add_config_arguments, config_from_args, save_config, to_dict


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--data", help="SFT rows: prompt/completion, text or messages (JSONL, JSON, Parquet, Arrow, "
                   "a datasets directory; docs/user-data.md); default: the world's demonstrations")
    p.add_argument("--eval-data", help="held-out SFT rows, same formats; default: the world's, or every 20th row of --data")
    p.add_argument("--model", help="local HF causal-LM directory to fine-tune (default: model.path, "
                   "else a tiny model created from the config)")


def run(args) -> int:
    cfg = config_from_args(args)
    if args.model:
        cfg.model.path = args.model
    run_sft(cfg, Path(args.out), data=args.data, eval_data=args.eval_data, overwrite=args.overwrite)
    return 0


def load_sft_rows(cfg: Config, world, data: str | None, eval_data: str | None) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows: the user's files (validated) or the world's demonstrations."""
    from rlhflab.data import load_rows

    if data is None:
        return world.sft_examples(cfg.world.n_sft, "sft"), world.sft_examples(cfg.world.n_sft_eval, "sft_eval")
    rows = load_rows(data, "sft")
    if eval_data is not None:
        return rows, load_rows(eval_data, "sft")
    held = rows[::20]
    return [r for i, r in enumerate(rows) if i % 20], held


def load_policy(cfg: Config, world):
    """(model, tokenizer): a local checkpoint if ``model.path`` is set, else a tiny new model."""
    from rlhflab.models import create_causal_lm, load_causal_lm, load_tokenizer

    if cfg.model.path:
        tok = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        return load_causal_lm(cfg.model.path, tok, cfg.model.trust_remote_code, cfg.model.attn_implementation), tok
    tok = world.tokenizer(cfg.model.max_positions)
    return create_causal_lm(cfg.model, tok, seed=cfg.sft.seed), tok


def run_sft(cfg: Config, out: Path, data: str | None = None, eval_data: str | None = None,
            overwrite: bool = False) -> dict:
    """The SFT stage end to end: validate, train, save ``out/model``, measure, summarise."""
    from accelerate.utils import set_seed

    from rlhflab.algos.sft import tokenize_rows, train_sft
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.commands.sample import print_samples
    from rlhflab.distributed import check_strategy, gathered, make_accelerator, trackers
    from rlhflab.generation import prompt_room
    from rlhflab.instruments.policy_eval import measure_policy_on_world
    from rlhflab.models import (
        count_parameters,
        enable_gradient_checkpointing,
        save_pretrained_atomic,
    )
    from rlhflab.training import batch_plan
    from rlhflab.world import World

    accelerator = make_accelerator(cfg.sft.mixed_precision, cfg.sft.report_to, "sft")
    check_strategy(cfg.sft, "sft", accelerator, cfg.lora.r)
    check_out_dir(out, overwrite)  # on every process, before anything is written
    world = World(cfg.world)
    train_rows, eval_rows = load_sft_rows(cfg, world, data, eval_data)
    set_seed(cfg.sft.seed)
    model, tok = load_policy(cfg, world)
    if cfg.lora.r:
        from rlhflab import lora

        lora.attach(model, cfg.lora)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    train, n_trunc = tokenize_rows(train_rows, tok, cfg.sft.max_length)
    held, n_trunc_eval = tokenize_rows(eval_rows, tok, cfg.sft.max_length)
    # What would otherwise fail once training is done: less than one batch, or samples that
    # cannot fit the model's positions.
    batch_plan("sft", cfg.sft, accelerator.num_processes, len(train))
    prompt_room(model, cfg.generation.max_new_tokens)
    accelerator.wait_for_everyone()
    with run_directory(out, overwrite, accelerator) as work, trackers(accelerator, work, "sft", to_dict(cfg)):
        if accelerator.is_main_process:
            save_config(cfg, work / "config.yaml")
        accelerator.wait_for_everyone()

        summary = train_sft(cfg.sft, model, tok, train, held, work, accelerator)
        summary.update({"data/truncated": n_trunc, "data/truncated_eval": n_trunc_eval,
                        "model/parameters": count_parameters(model),
                        "data/source": data or "world"})
        policy = gathered(accelerator, model)  # the whole model on the main process, sharded or not
        if accelerator.is_main_process:
            save_pretrained_atomic(policy, tok, work / "model")
            if data is None:
                prompts = world.prompts(cfg.sft.n_samples, "eval")
                measured, completions = measure_policy_on_world(policy, tok, world, prompts, cfg.generation)
                summary.update(measured)
                print_samples(completions[: cfg.sft.n_show], prompts[: cfg.sft.n_show], title="SFT samples")
            else:
                from rlhflab.sampling import sample

                g = cfg.generation
                # text or messages: sample renders a conversation through the chat template
                completions = sample(policy, tok, [r["prompt"] for r in eval_rows[: cfg.sft.n_show]],
                                     temperature=g.temperature, max_new_tokens=g.max_new_tokens)
                print_samples(completions, None, title="SFT samples")
            write_json(work / "metrics.json", summary)
            _print_summary(summary)
    accelerator.wait_for_everyone()
    return summary


def _print_summary(summary: dict) -> None:
    keys = ["eval/loss_initial", "eval/loss", "eval/perplexity", "samples/well_formed_rate", "gold/mean",
            "gold/demonstrator_mean", "gold/ideal_mean", "gold/headroom", "train/seconds"]
    print("  ".join(f"{k}={summary[k]:.3f}" for k in keys if isinstance(summary.get(k), float)))
