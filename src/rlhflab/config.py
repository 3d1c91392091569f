"""Configuration: one dataclass per stage, YAML presets, command-line overrides.

A preset (``configs/tiny.yaml``, ``configs/demo.yaml``) holds one mapping per section
(``world``, ``model``, ``generation``, ``sft``, ...). Any field can be overridden with
``--set section.field=value`` (the value is read as YAML: ``--set sft.lr=3e-4``,
``--set world.rater.length_bias=0``). Unknown keys and values of the wrong type are errors
that name the file, line and field. The resolved config is written as ``config.yaml`` into
every output directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhflab.errors import InputError
from rlhflab.world.demonstrator import DemonstratorConfig
from rlhflab.world.labeler import RaterConfig


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best here
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class WorldConfig:
    """The simulated-human world: sizes, prompt mix, raters and demonstrator."""

    seed: int = _f(0, "seed of every draw in the world")
    max_operand: int = _f(9, "arithmetic operands are drawn from 0..max_operand")
    n_sft: int = _f(2000, "SFT demonstrations")
    n_sft_eval: int = _f(200, "held-out demonstrations for SFT loss")
    n_preferences: int = _f(1000, "off-policy preference pairs from the demonstrator")
    n_prompts: int = _f(512, "prompts for online RL")
    n_eval: int = _f(40, "held-out evaluation prompts per family")
    family_weights: dict = _f(
        {"arithmetic": 0.3, "sycophancy": 0.2, "harmful": 0.15, "benign": 0.2, "open": 0.15},
        "mix of prompt families",
    )
    rater: RaterConfig = field(default_factory=RaterConfig, metadata={"help": "simulated raters"})
    demonstrator: DemonstratorConfig = field(
        default_factory=DemonstratorConfig, metadata={"help": "SFT demonstrator imperfections"}
    )


@dataclass
class ModelConfig:
    """The policy model: a local HF checkpoint, or a tiny one created from a config."""

    path: str | None = _f(None, "local HF causal-LM directory; empty = create a tiny model")
    arch: str = _f("gpt2", "architecture of a created model: gpt2 or llama")
    d_model: int = _f(64, "hidden size of a created model")
    n_layers: int = _f(2, "layers of a created model")
    n_heads: int = _f(4, "attention heads of a created model")
    max_positions: int = _f(128, "position embeddings of a created model")
    dropout: float = _f(0.0, "dropout of a created model (off by default, as usual in RLHF)")
    trust_remote_code: bool = _f(False, "allow custom model code from a local checkpoint")


@dataclass
class GenerationConfig:
    """Sampling for samples, rollouts and evaluation."""

    temperature: float = _f(1.0, "sampling temperature")
    top_k: int = _f(0, "top-k filter; 0 = off")
    top_p: float = _f(1.0, "nucleus filter; 1 = off")
    max_new_tokens: int = _f(24, "longest response; one without EOS by then is truncated")
    batch_size: int = _f(64, "prompts per generate call")


@dataclass
class SFTConfig:
    """Supervised fine-tuning: NLL on response tokens only."""

    seed: int = _f(0, "seed of initialisation and data order")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(32, "global batch: examples per optimizer step over all processes")
    micro_batch_size: int | None = _f(None, "examples per forward pass per process; empty = all")
    packing: bool = _f(True, "lay several sequences end to end in each row of a forward pass "
                       "(block-diagonal attention, no padding) when the model is checked to support "
                       "it; false = padded passes of similar length")
    epochs: float = _f(3.0, "passes over the data (fractions allowed)")
    max_steps: int | None = _f(None, "stop after this many steps (overrides epochs)")
    warmup_ratio: float = _f(0.05, "fraction of steps of linear warm-up")
    lr_schedule: str = _f("cosine", "decay after warm-up: cosine, linear or constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off")
    max_length: int = _f(64, "longest prompt + response in tokens; longer rows are truncated")
    eval_every: int = _f(50, "steps between held-out loss evaluations")
    log_every: int = _f(10, "steps between metric lines")
    mixed_precision: str = _f("no", "no, bf16 or fp16 (through accelerate)")
    n_samples: int = _f(64, "held-out prompts sampled after training to measure the policy")
    n_show: int = _f(6, "sample generations printed after training")


@dataclass
class RMConfig:
    """Reward modeling (Bradley-Terry and variants)."""

    seed: int = _f(0, "seed of the head initialisation and data order (member i uses seed + i)")
    lr: float = _f(5e-4, "peak learning rate (AdamW)")
    batch_size: int = _f(32, "comparison groups per optimizer step over all processes (a group is "
                         "one prompt with all its pairs, as InstructGPT batches them; rows of a "
                         "user's file without a `group` field are groups of one pair)")
    epochs: float = _f(2.0, "passes over the comparisons")
    max_length: int = _f(64, "longest prompt + response in tokens")
    micro_batch_size: int | None = _f(None, "groups per forward pass per process; empty = all")
    packing: bool = _f(True, "lay several sequences end to end in each row of a forward pass "
                       "(block-diagonal attention, no padding) when the model is checked to support "
                       "it; false = padded passes of similar length")
    max_steps: int | None = _f(None, "stop after this many steps (overrides epochs)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.05, "fraction of steps of linear warm-up")
    lr_schedule: str = _f("cosine", "decay after warm-up: cosine, linear or constant")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off")
    mixed_precision: str = _f("no", "no, bf16 or fp16 (through accelerate)")
    eval_every: int = _f(20, "steps between held-out accuracy evaluations")
    log_every: int = _f(5, "steps between metric lines")
    loss: str = _f("bradley_terry", "bradley_terry (pairs) or plackett_luce (the raters' K-way "
                   "rankings; needs data from `rlhflab collect`)")
    label_smoothing: float = _f(0.0, "BT label smoothing eps in [0, 0.5]")
    center_coef: float = _f(0.0, "reward centering regularizer: coef * mean((r_w + r_l)^2)")
    margin_scale: float = _f(1.0, "BT margin m = margin_scale * the row's `margin` field (0 = ignore)")
    weights: str = _f("none", "per-pair weights: none, or agreement (fraction of votes with the majority)")
    min_agreement: float = _f(0.0, "drop pairs whose votes agree with the majority less than this")
    ensemble: int = _f(1, "members trained with different seeds and data orders")
    train_backbone: bool = _f(True, "false = only the head trains (a linear probe on frozen features)")
    backbone: str | None = _f(None, "local HF checkpoint for the RM; empty = the SFT policy")
    k: int = _f(4, "responses sampled per prompt when collecting comparisons")
    n_prompts: int = _f(256, "prompts to collect comparisons on (each gives up to C(k, 2) pairs)")
    n_eval_prompts: int = _f(64, "held-out prompts collected for evaluation")
    n_reference: int = _f(256, "SFT samples whose rewards set the normalization (mean 0, std 1)")
    eval_fraction: float = _f(0.1, "share of a user's file held out when no --eval-data is given")

    def __post_init__(self) -> None:
        checks = [
            (self.loss in ("bradley_terry", "plackett_luce"), "loss", "expected bradley_terry or plackett_luce"),
            (self.weights in ("none", "agreement"), "weights", "expected none or agreement"),
            (self.lr_schedule in ("cosine", "linear", "constant"), "lr_schedule", "expected cosine, linear or constant"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "expected no, bf16 or fp16"),
            (0.0 <= self.label_smoothing <= 0.5, "label_smoothing", "must be in [0, 0.5]"),
            (self.batch_size > 0, "batch_size", "must be positive"),
            (self.ensemble >= 1, "ensemble", "must be at least 1"),
            (self.k >= 2, "k", "must be at least 2"),
            (0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise InputError(msg, field=f"rm.{name}")


@dataclass
class RLConfig:
    """Online RL: PPO, REINFORCE, RLOO, REINFORCE++, GRPO.

    Fields left empty (null) take the algorithm's default (``rlhflab.algos.online.ALGO_DEFAULTS``);
    the resolved values are what ``config.yaml`` of a run records.
    """

    seed: int = _f(0, "seed of sampling and data order")
    beta: float = _f(0.05, "KL coefficient (initial value for adaptive or scheduled control)")
    lr: float = _f(1e-4, "policy learning rate")
    steps: int = _f(100, "rollout-and-update iterations")
    batch_size: int = _f(64, "responses per rollout step over all processes (prompts x samples_per_prompt)")
    samples_per_prompt: int | None = _f(None, "responses per prompt (GRPO group size G, RLOO k); empty = algorithm default")
    micro_batch_size: int | None = _f(None, "rows per forward pass per process; empty = a whole minibatch")
    epochs: int | None = _f(None, "passes over each rollout batch (PPO epochs); empty = algorithm default")
    num_minibatches: int | None = _f(None, "optimizer steps per epoch; empty = algorithm default")
    clip_eps: float = _f(0.2, "clip range of the policy ratio, [1 - clip_eps, 1 + clip_eps_high]")
    clip_eps_high: float | None = _f(None, "upper clip range (asymmetric clipping); empty = clip_eps")
    target_kl: float | None = _f(None, "stop the epoch loop once policy/approxkl exceeds this; empty = off")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_schedule: str = _f("constant", "decay over the rollout steps: constant, linear or cosine")
    warmup_ratio: float = _f(0.0, "fraction of rollout steps of linear warm-up")
    vf_coef: float = _f(0.1, "PPO: weight of the value loss")
    value_clip_eps: float = _f(0.2, "PPO: clip range of the value update around the rollout values")
    value_lr: float | None = _f(None, "PPO: critic learning rate; empty = lr")
    value_init: str = _f("zero", "PPO critic: zero (SFT backbone, zero-initialised head) or rm (the reward model)")
    gamma: float = _f(1.0, "PPO: discount")
    gae_lambda: float = _f(0.95, "PPO: GAE lambda")
    whiten_rewards: bool = _f(False, "PPO: rescale per-token rewards to unit variance, keeping their mean")
    whiten_advantages: bool | None = _f(None, "whiten advantages over the batch; empty = algorithm default")
    kl_in: str | None = _f(None, "where the KL term goes: reward (per token, -beta*k) or loss (beta*k)")
    kl_estimator: str | None = _f(None, "k1, k2 or k3 (k1 belongs in the reward, k2/k3 in the loss)")
    kl_controller: str = _f("fixed", "beta control: fixed, linear (beta -> beta_end) or adaptive")
    beta_end: float | None = _f(None, "linear controller: beta at the last step; empty = beta / 10")
    kl_target: float = _f(6.0, "adaptive controller: target sequence KL in nats")
    kl_horizon: int = _f(10000, "adaptive controller: horizon in samples")
    kl_caution: float = _f(8.0, "sequence KL (nats) above which the run is flagged 'caution'")
    kl_warning: float = _f(15.0, "sequence KL (nats) above which the run is flagged 'warning'")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient (a defence against mode collapse)")
    no_eos_penalty: float = _f(0.0, "added to the score of a response that never emits EOS (e.g. -1)")
    baseline: str | None = _f(None, "REINFORCE baseline: batch or group (mean of the prompt's samples)")
    scale_std: bool | None = _f(None, "GRPO: divide advantages by the group std (false = Dr. GRPO)")
    loss_agg: str | None = _f(None, "token_mean, seq_sum, seq_mean or constant (Dr. GRPO); empty = algorithm default")
    rm_weight: float = _f(1.0, "weight of the reward model in a weighted sum with reward functions")
    save_every: int = _f(0, "checkpoint every N steps (atomic, for --resume); 0 = off")
    eval_every: int = _f(10, "steps between gold evaluations on held-out world prompts; 0 = off")
    n_eval: int = _f(64, "held-out world prompts per gold evaluation")
    early_stop_patience: int = _f(0, "stop after this many gold evaluations without a new best, "
                                     "restoring the best policy; 0 = off")
    log_every: int = _f(1, "steps between metric lines")
    tis_cap: float | None = _f(None, "truncated importance sampling (Yao et al. 2025): score the samples with "
                               "the trainer too and weight each token's policy-gradient term by "
                               "min(pi_train / pi_sampler, tis_cap); empty = off (sampler and trainer agree)")
    mismatch_tolerance: float = _f(1e-3, "largest |log pi_train - log pi_sampler| (nats, any token of the first "
                                   "update) allowed before the run stops; without tis_cap the two come from "
                                   "the same weights and must agree to float precision")


@dataclass
class DPOConfig:
    """Direct preference optimization and its family."""

    seed: int = _f(0, "seed of data order")
    loss: str = _f("dpo", "dpo, cdpo, ipo, hinge, kto, simpo or orpo")
    beta: float = _f(0.1, "beta of dpo/cdpo/hinge/kto/simpo; tau of ipo; lambda of orpo")
    lr: float = _f(1e-4, "peak learning rate (AdamW); 5e-4 collapses the demo policy (docs/dpo.md)")
    label_smoothing: float = _f(0.1, "cdpo: probability eps in [0, 0.5] that a label is flipped")
    simpo_gamma: float = _f(0.5, "simpo: target reward margin gamma")
    kto_desirable_weight: float = _f(1.0, "kto: weight of desirable examples")
    kto_undesirable_weight: float = _f(1.0, "kto: weight of undesirable examples")
    batch_size: int = _f(32, "global batch: pairs (kto: examples) per optimizer step over all processes")
    micro_batch_size: int | None = _f(None, "pairs per forward pass per process; empty = all")
    packing: bool = _f(True, "lay several sequences end to end in each row of a forward pass "
                       "(block-diagonal attention, no padding) when the model is checked to support "
                       "it; false = padded passes of similar length")
    epochs: float = _f(1.0, "passes over the data (fractions allowed)")
    max_steps: int | None = _f(None, "stop after this many steps (overrides epochs)")
    warmup_ratio: float = _f(0.1, "fraction of steps of linear warm-up")
    lr_schedule: str = _f("cosine", "decay after warm-up: cosine, linear or constant")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off")
    max_length: int = _f(64, "longest prompt + response in tokens; longer rows are truncated "
                         "(prompt start first, then response end; counted in data/truncated)")
    precompute_ref_logps: bool = _f(True, "compute reference log-probs once before training and "
                                    "release the reference model; false = reference forward every step")
    mixed_precision: str = _f("no", "no, bf16 or fp16 (through accelerate)")
    eval_every: int = _f(25, "steps between held-out preference metrics (eval/...)")
    log_every: int = _f(5, "steps between metric lines")
    n_eval_pairs: int | None = _f(None, "held-out world pairs; empty = world.n_preferences // 5")
    world_eval_every: int = _f(0, "steps between gold utility and sampled KL on the world's "
                               "held-out prompts (always at start and end); -1 = never")
    n_world_eval: int = _f(64, "held-out world prompts sampled per world evaluation")
    n_show: int = _f(4, "sample generations printed after training")

    def __post_init__(self) -> None:
        checks = [
            (self.loss in ("dpo", "cdpo", "ipo", "hinge", "kto", "simpo", "orpo"), "loss",
             "expected dpo, cdpo, ipo, hinge, kto, simpo or orpo"),
            (self.beta > 0, "beta", "must be positive"),
            (0.0 <= self.label_smoothing <= 0.5, "label_smoothing", "must be in [0, 0.5]"),
            (self.batch_size > 0, "batch_size", "must be positive"),
            (self.micro_batch_size is None or self.micro_batch_size > 0, "micro_batch_size", "must be positive"),
            (self.max_length >= 2, "max_length", "must be at least 2"),
            (self.lr_schedule in ("cosine", "linear", "constant"), "lr_schedule", "expected cosine, linear or constant"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "expected no, bf16 or fp16"),
            (self.eval_every > 0 and self.log_every > 0, "eval_every", "eval_every and log_every must be positive"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise InputError(msg, field=f"dpo.{name}")


@dataclass
class RunConfig:
    """The main job (``rlhflab run``): which arms to train beside SFT and the RM."""

    arms: list = _f(["ppo", "dpo", "grpo"], "policies to train from SFT: ppo, grpo, rloo, reinforce, "
                    "reinforce++, or a DPO-family loss (dpo, cdpo, ipo, hinge, kto, simpo, orpo)")
    seed: int = _f(0, "seed of the evaluation samples")
    bandit_algos: list = _f(["ppo", "dpo"], "algorithms drawn against the exact frontier on the bandit; [] = skip")
    bandit_betas: list = _f([0.1, 0.25, 0.5, 1.0, 2.0], "betas of the bandit frontier")


@dataclass
class Config:
    """Everything a run needs, one section per stage."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------
# Loading, overriding, saving


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line in a YAML text, for error messages."""
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _check_type(value: Any, tp: Any) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float only), or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg)
            except TypeError:
                pass
        raise TypeError(" or ".join(getattr(a, "__name__", str(a)) for a in args))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
        try:
            return float(value)
        except ValueError:
            raise TypeError("float") from None
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool, dict, list) and isinstance(value, tp):
        return value
    raise TypeError(getattr(tp, "__name__", str(tp)))


def _build(cls: type, data: Any, prefix: str, source: str, lines: dict[str, int]) -> Any:
    if not isinstance(data, dict):
        raise InputError("expected a mapping", file=source, line=lines.get(prefix[:-1]), field=prefix[:-1] or None)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise InputError(
                f"unknown key (known: {', '.join(sorted(known))})", file=source, line=lines.get(name), field=name
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, name + ".", source, lines)
            continue
        try:
            kwargs[key] = _check_type(value, tp)
        except TypeError as err:
            raise InputError(
                f"expected {err}, got {value!r}", file=source, line=lines.get(name), field=name
            ) from None
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the preset at ``path``, then ``section.field=value`` overrides."""
    data: dict = to_dict(Config())
    lines: dict[str, int] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read config: {err.__class__.__name__}", file=source) from None
        try:
            preset = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise InputError("not valid YAML", file=source, line=mark.line + 1 if mark else None) from None
        if not isinstance(preset, dict):
            raise InputError("expected a mapping of sections", file=source)
        lines = _key_lines(text)
        _build(Config, preset, "", source, lines)  # validate the file on its own first
        data = _merge(data, preset)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"expected section.field=value, got {item!r}", file="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node: dict = {}
        cursor = node
        *parents, leaf = key.strip().split(".")
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = value
        _build(Config, _merge(data, node), "", "--set", {})
        data = _merge(data, node)
    cfg = _build(Config, data, "", source, lines)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a type cannot express."""
    checks = [
        (cfg.model.arch in ("gpt2", "llama"), "model.arch", "expected gpt2 or llama"),
        (cfg.sft.lr_schedule in ("cosine", "linear", "constant"), "sft.lr_schedule", "expected cosine, linear or constant"),
        (cfg.sft.mixed_precision in ("no", "bf16", "fp16"), "sft.mixed_precision", "expected no, bf16 or fp16"),
        (cfg.sft.batch_size > 0, "sft.batch_size", "must be positive"),
        (cfg.generation.temperature > 0, "generation.temperature", "must be positive"),
        (cfg.world.rater.noise > 0, "world.rater.noise", "must be positive"),
        (set(cfg.world.family_weights) <= {"arithmetic", "sycophancy", "harmful", "benign", "open"},
         "world.family_weights", "unknown family"),
    ]
    for ok, name, msg in checks:
        if not ok:
            raise InputError(msg, field=name)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def help_text(cls: type) -> dict[str, str]:
    """Field name -> help text of a config dataclass (for documentation and --help)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------
# Command-line glue shared by every stage


def add_config_arguments(parser, *, out: bool = True) -> None:
    """--config, --set and (for stages that write) --out and --overwrite."""
    parser.add_argument("--config", help="YAML preset, e.g. configs/tiny.yaml (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set sft.lr=3e-4 (repeatable)")
    if out:
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")


def config_from_args(args) -> Config:
    return load_config(args.config, args.overrides)
