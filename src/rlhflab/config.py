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
import functools
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhflab.errors import InputError
from rlhflab.registry import (
    AI_FEEDBACK_ARMS,
    KL_CAUTION_NATS,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    KL_WARNING_NATS,
    LOSS_AGGREGATIONS,
    LR_SCHEDULES,
    ONLINE_ALGORITHMS,
    PREFERENCE_LOSSES,
    SAMPLERS,
    SAMPLING_ARMS,
    SEQUENCE_BASELINES,
)
from rlhflab.world.demonstrator import DemonstratorConfig
from rlhflab.world.labeler import RaterConfig
from rlhflab.world.tasks import FAMILIES


@dataclass(frozen=True)
class Domain:
    """The values a config field accepts beyond its type, declared next to its help text as a
    short spec (``_f(1e-3, "peak learning rate", "> 0")``):

    - ``finite``: any finite number; ``> 0``, ``>= 0``, ``< 1``, ...: a finite number so bounded;
      ``[0, 1]``, ``(0, 1]``, ``[0, 0.5]``: a finite number in the interval;
    - ``int``, ``int >= 1``, ``int in [0, 2147483647]``: an integer (never a bool), so bounded;
    - ``one of a, b, c``: one of these strings;
    - ``each <spec>``: every item of a list (or value of a mapping) is in ``<spec>``.

    ``None`` is allowed exactly where the field's type allows it (its default is empty); the
    domain applies to every other value. Checked by :func:`check_value` when the config is
    loaded, so bad values fail before any command writes anything.
    """

    spec: str
    integer: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    item: Domain | None = None

    @classmethod
    def parse(cls, spec: str) -> Domain:
        text = spec.strip()
        if text.startswith("each "):
            return cls(spec, item=cls.parse(text[5:]))
        if text.startswith("one of "):
            return cls(spec, choices=tuple(c.strip() for c in text[7:].split(",")))
        integer = text == "int" or text.startswith("int ")
        rest = text[3:].strip() if integer else text
        rest = rest[3:].strip() if rest.startswith("in ") else rest
        if rest in ("", "finite") and (integer or rest):
            return cls(spec, integer=integer)
        m = re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", rest)
        if m:
            op, x = m.group(1), float(m.group(2))
            if op.startswith(">"):
                return cls(spec, integer=integer, lo=x, lo_open=op == ">")
            return cls(spec, integer=integer, hi=x, hi_open=op == "<")
        m = re.fullmatch(r"([\[(])\s*([^,]+?)\s*,\s*([^\])]+?)\s*([\])])", rest)
        if m:
            return cls(spec, integer=integer, lo=float(m.group(2)), hi=float(m.group(3)),
                       lo_open=m.group(1) == "(", hi_open=m.group(4) == ")")
        raise ValueError(f"not a domain spec: {spec!r}")

    def describe(self) -> str:
        """The domain in words: 'a finite number > 0', 'an integer >= 1', 'one of a, b'."""
        if self.item is not None:
            return f"a list of items each {self.item.describe()}"
        if self.choices:
            return "one of " + ", ".join(self.choices)
        noun = "an integer" if self.integer else "a finite number"
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{noun} {'<' if self.hi_open else '<='} {hi}"
        return noun

    def contains(self, value: Any) -> bool:
        if self.item is not None:
            items = value.values() if isinstance(value, dict) else value
            return isinstance(value, (list, tuple, dict)) and all(self.item.contains(v) for v in items)
        if self.choices:
            return isinstance(value, str) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):  # (an int is finite, however large)
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is in the domain, else why not (for an error message)."""
        if self.contains(value):
            return None
        if self.item is not None and isinstance(value, (list, tuple, dict)):
            pairs = value.items() if isinstance(value, dict) else enumerate(value)
            key, bad = next((k, v) for k, v in pairs if not self.item.contains(v))
            at = f"key {key!r}" if isinstance(value, dict) else f"index {key}"
            return f"every item must be {self.item.describe()}, got {bad!r} at {at}"
        return f"must be {self.describe()}, got {value!r}"


def _num(x: float | None) -> str:
    return "" if x is None else str(int(x)) if float(x).is_integer() else repr(x)


@functools.cache
def _parse_domain(spec: str) -> Domain:
    return Domain.parse(spec)


def field_domain(f: dataclasses.Field) -> Domain | None:
    """The :class:`Domain` declared in a dataclass field's metadata, or None."""
    spec = f.metadata.get("domain")
    return _parse_domain(spec) if spec else None


def field_choices(cls: type, name: str) -> tuple[str, ...]:
    """The words field ``name`` of config dataclass ``cls`` accepts (a CLI flag's choices)."""
    return _parse_domain(next(f for f in dataclasses.fields(cls) if f.name == name).metadata["domain"]).choices


def check_value(f: dataclasses.Field, value: Any) -> str | None:
    """None if ``value`` (already of the field's type) is allowed in field ``f``, else why not."""
    dom = field_domain(f)
    if value is None or dom is None:
        return None
    return dom.problem(value)


def check_section(obj: Any, prefix: str) -> None:
    """Check every field of a config dataclass instance (and nested ones) against its domain,
    then the section's checks across fields (:func:`cross_field_problems`); raises InputError
    naming the first bad field (for configs built in code, not from a file)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_section(value, f"{prefix}.{f.name}")
            continue
        problem = check_value(f, value)
        if problem:
            raise InputError(problem, field=f"{prefix}.{f.name}")
    for message, names in cross_field_problems(obj, prefix):
        raise InputError(message, field=names[0])


def cross_field_problems(obj: Any, prefix: str) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(message, dotted names of the fields involved) for each check of section ``obj`` that
    no one field's domain can express. A section declares them in a ``cross_check(prefix)``
    method; this is the one hook, read by :func:`check_section` and :func:`validate`."""
    hook = getattr(obj, "cross_check", None)
    return iter(hook(prefix)) if hook is not None else iter(())


_SEED = "int in [0, 2147483647]"
_SCHEDULES = LR_SCHEDULES.domain()
_PRECISIONS = "one of no, bf16, fp16"  # what numpy (through accelerate's set_seed) accepts, with headroom
_ATTENTION = "one of eager, sdpa, flash_attention_2"
_TRACKERS = "each one of tensorboard, wandb, mlflow"
_REPORT_TO = ("experiment trackers the metrics also go to, through accelerate (the run's metrics.jsonl is "
              "always written): tensorboard, wandb, mlflow; [] = none")
# A baseline that is an algorithm of its own (rloo) is chosen by naming that algorithm.
_BASELINES = "one of " + ", ".join(n for n in SEQUENCE_BASELINES if n not in ONLINE_ALGORITHMS)


def _words(names: Iterable[str]) -> str:
    """"a, b or c": registered names in a help text."""
    *rest, last = names
    return f"{', '.join(rest)} or {last}" if rest else last


def _f(default: Any, help: str, domain: str | None = None) -> Any:  # noqa: A002 - "help" reads best here
    """A config field: its default, its help text and its domain (see :class:`Domain`)."""
    meta = {"help": help, "domain": domain}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class WorldConfig:
    """The simulated-human world: sizes, prompt mix, raters and demonstrator."""

    seed: int = _f(0, "seed of every draw in the world", _SEED)
    max_operand: int = _f(9, "arithmetic operands are drawn from 0..max_operand", "int >= 1")
    n_sft: int = _f(2000, "SFT demonstrations", "int >= 1")
    n_sft_eval: int = _f(200, "held-out demonstrations for SFT loss", "int >= 1")
    n_preferences: int = _f(1000, "off-policy preference pairs from the demonstrator", "int >= 1")
    n_prompts: int = _f(512, "prompts for online RL", "int >= 1")
    n_eval: int = _f(40, "held-out evaluation prompts per family", "int >= 1")
    family_weights: dict = _f(
        {"arithmetic": 0.3, "sycophancy": 0.2, "harmful": 0.15, "benign": 0.2, "open": 0.15},
        "mix of prompt families (weights >= 0, some positive)", "each >= 0",
    )
    rater: RaterConfig = field(default_factory=RaterConfig, metadata={"help": "simulated raters"})
    demonstrator: DemonstratorConfig = field(
        default_factory=DemonstratorConfig, metadata={"help": "SFT demonstrator imperfections"}
    )

    def cross_check(self, at: str) -> Iterator[tuple[str, tuple[str, ...]]]:
        unknown = [k for k in self.family_weights if k not in FAMILIES]
        if unknown:
            yield f"unknown family {unknown[0]!r} (known: {', '.join(FAMILIES)})", (f"{at}.family_weights",)
        elif not sum(self.family_weights.values()) > 0:
            yield "must give some family a positive weight", (f"{at}.family_weights",)


@dataclass
class ModelConfig:
    """The policy model: a local HF checkpoint, or a tiny one created from a config."""

    path: str | None = _f(None, "local HF causal-LM directory; empty = create a tiny model")
    arch: str = _f("gpt2", "architecture of a created model: gpt2 or llama", "one of gpt2, llama")
    d_model: int = _f(64, "hidden size of a created model", "int >= 1")
    n_layers: int = _f(2, "layers of a created model", "int >= 1")
    n_heads: int = _f(4, "attention heads of a created model", "int >= 1")
    max_positions: int = _f(128, "position embeddings of a created model", "int >= 2")
    dropout: float = _f(0.0, "dropout of a created model (off by default, as usual in RLHF)", "[0, 1)")
    trust_remote_code: bool = _f(False, "allow custom model code from a local checkpoint")
    attn_implementation: str | None = _f(None, "attention kernel of every model loaded or created: eager, sdpa or "
                                         "flash_attention_2 (needs the flash-attn package and a GPU); empty = "
                                         "transformers' default (sdpa where the model supports it)", _ATTENTION)
    gradient_checkpointing: bool = _f(False, "recompute each layer's activations in the backward pass of every "
                                      "training stage (less memory, about a third more compute; KV cache off "
                                      "in training passes)")

    def cross_check(self, at: str) -> Iterator[tuple[str, tuple[str, ...]]]:
        heads, width = (f"{at}.n_heads", f"{at}.d_model")
        if self.d_model % self.n_heads:
            yield (f"{width} ({self.d_model}) must be a multiple of {heads} ({self.n_heads})", (heads, width))
        elif self.arch == "llama" and (self.d_model // self.n_heads) % 2:
            yield (f"llama needs an even head size (rotary embeddings), got {width} / {heads} "
                   f"= {self.d_model // self.n_heads}", (heads, width, f"{at}.arch"))


@dataclass
class GenerationConfig:
    """Sampling for samples, rollouts and evaluation."""

    temperature: float = _f(1.0, "sampling temperature", "> 0")
    top_k: int = _f(0, "top-k filter; 0 = off", "int >= 0")
    top_p: float = _f(1.0, "nucleus filter; 1 = off", "(0, 1]")
    max_new_tokens: int = _f(24, "longest response; one without EOS by then is truncated", "int >= 1")
    batch_size: int = _f(64, "prompts per generate call", "int >= 1")


@dataclass
class TrainConfig:
    """How an offline stage (SFT, the reward model, the DPO family) trains: AdamW with a linear
    warm-up and a decay (``rlhflab.training.make_optimizer``), global batches cut into shards and
    micro-batches (``training.batch_plan``), clipping, precision, evaluation and logging.

    SFTConfig, RMConfig and DPOConfig inherit these fields rather than hold them in a
    sub-section, so that a section stays flat and users keep writing ``sft.lr`` and ``dpo.lr``
    as before. The defaults are SFT's; a stage whose default or help differs restates the field
    with ``_restate`` (same domain), and a restated field keeps its place in the section.
    """

    seed: int = _f(0, "seed of initialisation and data order", _SEED)
    lr: float = _f(1e-3, "peak learning rate (AdamW)", "> 0")
    weight_decay: float = _f(0.0, "AdamW weight decay", ">= 0")
    batch_size: int = _f(32, "global batch: examples per optimizer step over all processes", "int >= 1")
    micro_batch_size: int | None = _f(None, "examples per forward pass per process; empty = all", "int >= 1")
    packing: bool = _f(True, "lay several sequences end to end in each row of a forward pass "
                       "(block-diagonal attention, no padding) when the model is checked to support "
                       "it; false = padded passes of similar length")
    epochs: float = _f(3.0, "passes over the data (fractions allowed)", "> 0")
    max_steps: int | None = _f(None, "stop after this many steps (overrides epochs)", "int >= 1")
    warmup_ratio: float = _f(0.05, "fraction of steps of linear warm-up", "[0, 1]")
    lr_schedule: str = _f("cosine", f"decay after warm-up: {_words(LR_SCHEDULES)}", _SCHEDULES)
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off", ">= 0")
    max_length: int = _f(64, "longest prompt + response in tokens; longer rows are truncated", "int >= 2")
    mixed_precision: str = _f("no", "no, bf16 or fp16 (through accelerate)", _PRECISIONS)
    sharding: str = _f("ddp", "how several processes hold the weights: ddp (each a whole copy) or fsdp2 (each "
                       "a shard of every weight, gradient and optimizer state: torch's fully_shard per "
                       "transformer block; docs/scaling.md)", "one of ddp, fsdp2")
    cpu_offload: bool = _f(False, "fsdp2 on GPUs: keep the shards, gradients and optimizer state in CPU memory")
    eval_every: int = _f(50, "steps between held-out loss evaluations", "int >= 1")
    log_every: int = _f(10, "steps between metric lines", "int >= 1")
    report_to: list = _f([], _REPORT_TO, _TRACKERS)


def _restate(name: str, default: Any = dataclasses.MISSING, help: str | None = None) -> Any:  # noqa: A002
    """Field ``name`` of :class:`TrainConfig` with a stage's own default and/or help; its
    domain stays the shared one."""
    base = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return _f(base.default if default is dataclasses.MISSING else default,
              base.metadata["help"] if help is None else help, base.metadata["domain"])


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: NLL on response tokens only (training fields: :class:`TrainConfig`)."""

    n_samples: int = _f(64, "held-out prompts sampled after training to measure the policy", "int >= 1")
    n_show: int = _f(6, "sample generations printed after training", "int >= 0")


@dataclass
class RMConfig(TrainConfig):
    """Reward modeling (Bradley-Terry and variants; training fields: :class:`TrainConfig`)."""

    seed: int = _restate("seed", help="seed of the head initialisation and data order (member i uses seed + i)")
    lr: float = _restate("lr", 5e-4)
    batch_size: int = _restate("batch_size", help="comparison groups per optimizer step over all processes "
                               "(a group is one prompt with all its pairs, as InstructGPT batches them; rows "
                               "of a user's file without a `group` field are groups of one pair)")
    loss: str = _f("bradley_terry", "bradley_terry (pairs) or plackett_luce (the raters' K-way "
                   "rankings; needs data from `rlhflab collect`)", "one of bradley_terry, plackett_luce")
    label_smoothing: float = _f(0.0, "BT label smoothing eps in [0, 0.5]", "[0, 0.5]")
    center_coef: float = _f(0.0, "reward centering regularizer: coef * mean((r_w + r_l)^2)", ">= 0")
    grad_penalty: float = _f(0.0, "lambda of the input-gradient penalty lambda * mean over responses of "
                             "sum_t ||dR/de_t||^2, e_t the embeddings of the response tokens (losses."
                             "input_gradient_penalty; double backprop, about 2-3x the cost of a step); 0 = off",
                             ">= 0")
    epochs: float = _restate("epochs", 2.0, "passes over the comparisons")
    micro_batch_size: int | None = _restate("micro_batch_size", help="groups per forward pass per process; "
                                            "empty = all")
    margin_scale: float = _f(1.0, "BT margin m = margin_scale * the row's `margin` field (0 = ignore)", ">= 0")
    weights: str = _f("none", "per-pair weights: none, or agreement (fraction of votes with the majority)",
                      "one of none, agreement")
    min_agreement: float = _f(0.0, "drop pairs whose votes agree with the majority less than this", "[0, 1]")
    eval_every: int = _restate("eval_every", 20, "steps between held-out accuracy evaluations")
    log_every: int = _restate("log_every", 5)
    ensemble: int = _f(1, "members trained with different seeds and data orders", "int >= 1")
    train_backbone: bool = _f(True, "false = only the head trains (a linear probe on frozen features)")
    backbone: str | None = _f(None, "local HF checkpoint for the RM; empty = the SFT policy")
    k: int = _f(4, "responses sampled per prompt when collecting comparisons", "int >= 2")
    n_prompts: int = _f(256, "prompts to collect comparisons on (each gives up to C(k, 2) pairs)", "int >= 1")
    n_eval_prompts: int = _f(64, "held-out prompts collected for evaluation", "int >= 1")
    n_reference: int = _f(256, "SFT samples whose rewards set the normalization (mean 0, std 1)", "int >= 2")
    length_residual: bool = _f(False, "normalize the residual of a least-squares fit raw = a + b * response "
                               "tokens on the reference samples instead of the raw score, so the served "
                               "reward has no linear length trend on them (reward_model.length_normalization)")
    eval_fraction: float = _f(0.1, "share of a user's file held out when no --eval-data is given", "[0, 1)")
    max_length: int = _restate("max_length", help="longest prompt + response in tokens")


@dataclass
class RLConfig:
    """Online RL: PPO, REINFORCE, RLOO, REINFORCE++, GRPO.

    Fields left empty (null) take the algorithm's default (its ``defaults`` in
    ``rlhflab.registry.ONLINE_ALGORITHMS``); the resolved values are what ``config.yaml`` of a
    run records.
    """

    seed: int = _f(0, "seed of sampling and data order", _SEED)
    beta: float = _f(0.05, "KL coefficient (initial value for adaptive or scheduled control)", ">= 0")
    lr: float = _f(1e-4, "policy learning rate", "> 0")
    steps: int = _f(100, "rollout-and-update iterations", "int >= 1")
    batch_size: int = _f(64, "responses per rollout step over all processes (prompts x samples_per_prompt)", "int >= 1")
    samples_per_prompt: int | None = _f(None, "responses per prompt (GRPO group size G, RLOO k); empty = algorithm default", "int >= 1")
    micro_batch_size: int | None = _f(None, "rows per forward pass per process; empty = a whole minibatch", "int >= 1")
    epochs: int | None = _f(None, "passes over each rollout batch (PPO epochs); empty = algorithm default", "int >= 1")
    num_minibatches: int | None = _f(None, "optimizer steps per epoch; empty = algorithm default", "int >= 1")
    clip_eps: float = _f(0.2, "clip range of the policy ratio, [1 - clip_eps, 1 + clip_eps_high]", "> 0")
    clip_eps_high: float | None = _f(None, "upper clip range (asymmetric clipping); empty = clip_eps", "> 0")
    dual_clip: float | None = _f(None, "dual-clip PPO (Ye et al. 2020): a negative-advantage token's loss is capped "
                                 "at -dual_clip * A, so a ratio past dual_clip adds no gradient (verl's clip_ratio_c, "
                                 "3 and on there); empty = off", "> 1")
    target_kl: float | None = _f(None, "stop the epoch loop once policy/approxkl exceeds this; empty = off", "> 0")
    max_grad_norm: float = _f(1.0, "gradient clipping norm; 0 = off", ">= 0")
    weight_decay: float = _f(0.0, "AdamW weight decay", ">= 0")
    lr_schedule: str = _f("constant", f"decay over the rollout steps: {_words(LR_SCHEDULES)}", _SCHEDULES)
    warmup_ratio: float = _f(0.0, "fraction of rollout steps of linear warm-up", "[0, 1]")
    vf_coef: float = _f(0.1, "PPO: weight of the value loss", ">= 0")
    value_clip_eps: float = _f(0.2, "PPO: clip range of the value update around the rollout values", "> 0")
    value_lr: float | None = _f(None, "PPO: critic learning rate; empty = lr", "> 0")
    value_init: str = _f("zero", "PPO critic: zero (SFT backbone, zero-initialised head) or rm (the reward model)", "one of zero, rm")
    gamma: float = _f(1.0, "discount of PPO's GAE and REINFORCE++'s returns-to-go", "[0, 1]")
    gae_lambda: float = _f(0.95, "PPO: GAE lambda", "[0, 1]")
    whiten_rewards: bool = _f(False, "PPO: rescale per-token rewards to unit variance, keeping their mean")
    whiten_advantages: bool | None = _f(None, "whiten advantages over the global batch (PPO: on, over tokens; "
                                        "reinforce, rloo: off, over sequences); fixed by definition for "
                                        "reinforce++ (on) and grpo (per group); empty = algorithm default")
    kl_in: str | None = _f(None, "where the KL term goes: reward (per token, -beta*k) or loss (beta*k)", "one of reward, loss")
    kl_estimator: str | None = _f(None, f"{_words(KL_ESTIMATORS)} (k1 belongs in the reward, k2/k3 in the loss, "
                                  "k3_ratio in the loss only)", KL_ESTIMATORS.domain())
    kl_clip: float | None = _f(None, "cap each token's KL estimate to [-kl_clip, kl_clip] in the reward or loss "
                               "(verl, OpenRLHF: 10); empty = off", "> 0")
    kl_controller: str = _f("fixed", f"beta control: {_words(KL_CONTROLLERS)} (linear: beta -> beta_end)",
                            KL_CONTROLLERS.domain())
    beta_end: float | None = _f(None, "linear controller: beta at the last step; empty = beta / 10", ">= 0")
    kl_target: float = _f(6.0, "adaptive controller: target sequence KL in nats", "> 0")
    kl_horizon: int = _f(10000, "adaptive controller: horizon in samples", "int >= 1")
    kl_epsilon: float = _f(1.0, "lagrangian controller: the KL budget epsilon, sequence KL in nats", "> 0")
    kl_dual_lr: float = _f(0.05, "lagrangian controller: beta step per nat of KL over or under the budget, "
                           "one step per rollout batch", "> 0")
    kl_caution: float = _f(KL_CAUTION_NATS, "sequence KL (nats) above which the run is flagged 'caution'", ">= 0")
    kl_warning: float = _f(KL_WARNING_NATS, "sequence KL (nats) above which the run is flagged 'warning'", ">= 0")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient (a defence against mode collapse)", "finite")
    no_eos_penalty: float = _f(0.0, "added to the score of a response that never emits EOS (e.g. -1)", "finite")
    baseline: str | None = _f(None, "REINFORCE baseline: batch or group (mean of the prompt's samples)", _BASELINES)
    scale_std: bool | None = _f(None, "GRPO: divide advantages by the group std (false = Dr. GRPO); empty = "
                                "algorithm default")
    loss_agg: str | None = _f(None, f"how the loss is normalized: {_words(LOSS_AGGREGATIONS)}; "
                              "empty = algorithm default", LOSS_AGGREGATIONS.domain())
    rm_weight: float = _f(1.0, "weight of the reward model in a weighted sum with reward functions", "finite")
    rm_reduce: str = _f("mean", "how an ensemble reward model's members are combined: mean, min, or "
                        "mean_minus_std (mean - rm_reduce_k * std; Coste et al. 2024); min and mean_minus_std "
                        "need an ensemble (rm.ensemble > 1)", "one of mean, min, mean_minus_std")
    rm_reduce_k: float | None = _f(None, "k of rm_reduce=mean_minus_std; empty = 1", ">= 0")
    save_every: int = _f(0, "checkpoint every N steps (atomic, for --resume); 0 = off", "int >= 0")
    eval_every: int = _f(10, "steps between gold evaluations on held-out world prompts; 0 = off", "int >= 0")
    n_eval: int = _f(64, "held-out world prompts per gold evaluation", "int >= 1")
    attack_every: int = _f(0, "steps between a cheap reward-model attack on the rollout's own samples "
                           "(instruments/rm_attack.py: a few gradient-search steps, the patterns found inserted "
                           "into other samples of the batch; rm_attack/* in metrics.jsonl); needs a reward model; "
                           "0 = off", "int >= 0")
    early_warning: bool = _f(True, "at each held-out evaluation, the early warning's readings without gold "
                             "(instruments/early_warning.py: the reward model's features of the samples against "
                             "two draws of the SFT policy, an ensemble's spread, proxy up while the judge goes "
                             "down, the attack's exploit gain; warn/* in metrics.jsonl); false = none of them, "
                             "and no SFT draws for them")
    stop_on_warning: bool = _f(False, "stop the run when the early warning first fires and keep the policy of "
                               "the evaluation before it (saved at every held-out evaluation to before_warning/ "
                               "in the run's directory); needs rl.early_warning and rl.eval_every")
    early_stop_patience: int = _f(0, "stop after this many gold evaluations without a new best, "
                                     "restoring the best policy; 0 = off", "int >= 0")
    log_every: int = _f(1, "steps between metric lines", "int >= 1")
    tis_cap: float | None = _f(None, "truncated importance sampling (Yao et al. 2025): score the samples with "
                               "the trainer too and weight each token's policy-gradient and KL terms by "
                               "min(pi_train / pi_sampler, tis_cap); empty = off (sampler and trainer agree)", "> 0")
    mixed_precision: str = _f("no", "no, bf16 or fp16 (through accelerate): autocast around the training "
                              "forward passes of the update; decoding stays in float32", _PRECISIONS)
    sharding: str = _f("ddp", "how several processes hold the weights: ddp (each a whole copy) or fsdp2 (the "
                       "policy, critic and reference sharded per transformer block, gathered whole for each "
                       "rollout and evaluation; docs/scaling.md)", "one of ddp, fsdp2")
    report_to: list = _f([], _REPORT_TO, _TRACKERS)
    mismatch_tolerance: float = _f(1e-3, "largest |log pi_train - log pi_sampler| (nats, any token of the first "
                                   "update) allowed before the run stops; without tis_cap the two come from "
                                   "the same weights and must agree to float precision (under bf16 or fp16 "
                                   "at least distributed.MIXED_PRECISION_MISMATCH_NATS = 0.5)", ">= 0")
    sampler: str = _f("engine", f"what decodes the rollouts: {_words(SAMPLERS)} (rlhflab.samplers), or "
                      "module:factory, a factory(policy, tokenizer) of a sampler of one's own; an external sampler "
                      "gets the trainer's weights before each rollout after an update (docs/scaling.md)")

    def cross_check(self, at: str) -> Iterator[tuple[str, tuple[str, ...]]]:
        if self.rm_reduce_k is not None and self.rm_reduce != "mean_minus_std":
            yield (f"{at}.rm_reduce_k is read by {at}.rm_reduce=mean_minus_std only (it is {self.rm_reduce})",
                   (f"{at}.rm_reduce_k", f"{at}.rm_reduce"))
        if self.stop_on_warning and not (self.early_warning and self.eval_every):
            yield (f"{at}.stop_on_warning stops at the early warning, which {at}.early_warning=true and "
                   f"{at}.eval_every > 0 compute (they are {str(self.early_warning).lower()} and {self.eval_every})",
                   (f"{at}.stop_on_warning", f"{at}.early_warning", f"{at}.eval_every"))
        where, colon, attr = self.sampler.rpartition(":")
        if self.sampler not in SAMPLERS and not (colon and where and attr):
            yield (f"{at}.sampler: expected {', '.join(SAMPLERS)} or module:factory, got {self.sampler!r}",
                   (f"{at}.sampler",))
        if self.sampler != "engine" and self.sharding != "ddp":
            yield (f"{at}.sampler={self.sampler} is sent the policy's whole weights after each update, which a "
                   f"sharded policy does not gather for it: use {at}.sharding=ddp or {at}.sampler=engine",
                   (f"{at}.sampler", f"{at}.sharding"))
        if self.kl_caution > self.kl_warning:
            yield (f"{at}.kl_caution ({self.kl_caution:g}) must not exceed {at}.kl_warning ({self.kl_warning:g})",
                   (f"{at}.kl_caution", f"{at}.kl_warning"))


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimization and its family (training fields: :class:`TrainConfig`)."""

    seed: int = _restate("seed", help="seed of data order")
    loss: str = _f("dpo", _words(PREFERENCE_LOSSES), PREFERENCE_LOSSES.domain())
    beta: float = _f(0.1, "beta of dpo/cdpo/hinge/kto/simpo; tau of ipo; lambda of orpo", "> 0")
    lr: float = _restate("lr", 1e-4, "peak learning rate (AdamW); 5e-4 collapses the demo policy (docs/dpo.md)")
    label_smoothing: float = _f(0.1, "cdpo: probability eps in [0, 0.5] that a label is flipped", "[0, 0.5]")
    simpo_gamma: float = _f(0.5, "simpo: target reward margin gamma (absolute, as TRL's simpo_gamma)", ">= 0")
    simpo_nll_coef: float = _f(0.0, "simpo: weight of an NLL term on the chosen responses pooled over their "
                               "tokens (TRL's cpo_alpha, whose default is 1); 0 = SimPO's paper", ">= 0")
    ipo_normalize: bool = _f(False, "ipo: divide each log-ratio by its response's token count, as TRL's "
                             "loss_type='ipo'; false = summed log-probs, as the paper")
    orpo_nll: str = _f("sequence", "orpo: NLL term averaged per response (sequence, as the paper) or pooled "
                       "over all chosen tokens of the batch (token, as TRL)", "one of sequence, token")
    kto_desirable_weight: float = _f(1.0, "kto: weight of desirable examples", ">= 0")
    kto_undesirable_weight: float = _f(1.0, "kto: weight of undesirable examples", ">= 0")
    batch_size: int = _restate("batch_size", help="global batch: pairs (kto: examples) per optimizer step "
                               "over all processes")
    micro_batch_size: int | None = _restate("micro_batch_size", help="pairs per forward pass per process; "
                                            "empty = all")
    epochs: float = _restate("epochs", 1.0)
    warmup_ratio: float = _restate("warmup_ratio", 0.1)
    max_length: int = _restate("max_length", help="longest prompt + response in tokens; longer rows are "
                               "truncated (prompt start first, then response end; counted in data/truncated)")
    precompute_ref_logps: bool = _f(True, "compute reference log-probs once before training and "
                                    "release the reference model; false = reference forward every step")
    eval_every: int = _restate("eval_every", 25, "steps between held-out preference metrics (eval/...)")
    log_every: int = _restate("log_every", 5)
    n_eval_pairs: int | None = _f(None, "held-out world pairs; empty = world.n_preferences // 5", "int >= 1")
    world_eval_every: int = _f(0, "steps between gold utility and sampled KL on the world's "
                               "held-out prompts (always at start and end); -1 = never", "int >= -1")
    n_world_eval: int = _f(64, "held-out world prompts sampled per world evaluation", "int >= 1")
    n_show: int = _f(4, "sample generations printed after training", "int >= 0")


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) through peft on every model a stage trains: the SFT,
    DPO-family and online-RL policy, the critic and the reward model. Each adapted weight is
    W + (alpha / r) B A with A (r x d_in), B (d_out x r) and B = 0 at the start, so an adapted
    model starts as its base; the base weights stay frozen. The reference policy of DPO and
    online RL is then the policy with its adapter disabled: one copy of the weights.
    ``rlhflab.lora`` holds the plumbing."""

    r: int = _f(0, "rank of the adapters; 0 = full fine-tuning (no adapters)", "int >= 0")
    alpha: float = _f(16.0, "the adapters' scale: the update is (alpha / r) B A", "> 0")
    dropout: float = _f(0.0, "dropout on the adapters' input (off by default, as the rest of the model)", "[0, 1)")
    target_modules: list = _f([], "names of the linear layers that get adapters (e.g. [q_proj, v_proj]); "
                              "[] = every linear layer but the output head")

    def cross_check(self, at: str) -> Iterator[tuple[str, tuple[str, ...]]]:
        bad = [m for m in self.target_modules if not isinstance(m, str) or not m]
        if bad:
            yield f"every item must be a module name, got {bad[0]!r}", (f"{at}.target_modules",)


@dataclass
class RunConfig:
    """The main job (``rlhflab run``): which arms to train beside SFT and the RM."""

    arms: list = _f(["ppo", "dpo", "grpo"], f"policies to train from SFT: {', '.join(ONLINE_ALGORITHMS)}, "
                    f"or a DPO-family loss ({', '.join(PREFERENCE_LOSSES)}); or, with no training, "
                    f"{', '.join(SAMPLING_ARMS)} (best-of-n of the SFT policy by the reward model); or "
                    f"{', '.join(AI_FEEDBACK_ARMS)} (PPO on a reward model trained on AI labels of the same "
                    "comparisons, run.constitution)")
    seed: int = _f(0, "seed of the evaluation samples", _SEED)
    bon_n: list = _f([1, 2, 4, 8, 16, 32], "the bon arm's candidates per prompt, increasing: max(n) samples of "
                     "each of the rl.n_eval held-out prompts the RL arms' gold is measured on", "each int >= 1")
    constitution: str | None = _f(None, "the constitution the rlaif arm's AI labeller follows (YAML); empty = "
                                  "configs/constitution.yaml")
    bandit_algos: list = _f(["ppo", "dpo"], "algorithms drawn against the exact frontier on the bandit; [] = skip")
    bandit_betas: list = _f([0.1, 0.25, 0.5, 1.0, 2.0], "betas of the bandit frontier", "each > 0")

    def cross_check(self, at: str) -> Iterator[tuple[str, tuple[str, ...]]]:
        ns = [n for n in self.bon_n if isinstance(n, int)]
        if ns != sorted(set(ns)):
            yield f"expected increasing distinct integers, got {self.bon_n}", (f"{at}.bon_n",)
        if not self.bon_n and any(a in SAMPLING_ARMS for a in self.arms if isinstance(a, str)):
            yield "best-of-n needs at least one n", (f"{at}.bon_n", f"{at}.arms")


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
    lora: LoRAConfig = field(default_factory=LoRAConfig)


# ---------------------------------------------------------------------------------------
# Loading, overriding, saving


class _Loader(yaml.SafeLoader):
    """YAML as a preset means it, read as YAML 1.2's core schema reads scalars: only true and
    false are booleans, so ``mixed_precision: no`` is the word "no", not False (bool fields
    still take the YAML 1.1 words yes/no/on/off, ``_check_type``); and a number is what it
    looks like: ``1e-3`` is 0.001 (YAML 1.1 wants a dot, ``1.0e-3``, and reads ``1e-3`` as a
    string), ``017`` is 17 (not octal 15), and YAML 1.1's ``1_000``, ``1:30`` (sexagesimal 90)
    and ``0b101`` are strings, which a numeric field refuses, naming itself."""


_NUMBER_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
# YAML 1.2 core schema: decimal (leading zeros allowed), 0o octal and 0x hexadecimal integers;
# decimal floats with an optional exponent (no dot needed), .inf and .nan.
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text)  # decimal: int() takes a sign and leading zeros


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_scalar(raw: str) -> Any:
    """A ``KEY=VALUE`` option's value as a preset or ``--set`` reads it (``_Loader``): numbers
    as numbers (``1e-3`` included), true/false, null (an empty value too), else the text."""
    if not raw.strip():
        return None
    try:
        return _yaml(raw)
    except yaml.YAMLError:
        return raw


def _key_lines(text: str, source: str | None = None, prefix: str = "", numbered: bool = True) -> dict[str, int]:
    """Dotted key -> 1-based line in a YAML text, for error messages.

    With ``source``, a key given twice in one mapping (a second ``sft:`` section, a field
    repeated inside one) is an InputError naming the source, the line and the key, where plain
    YAML would silently keep the last one. ``numbered=False`` leaves lines out of the error
    (for a ``--set`` value, whose lines mean nothing to the user)."""
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str, path: frozenset) -> None:
        if not isinstance(node, yaml.MappingNode) or id(node) in path:  # an alias loop ends here
            return
        path = path | {id(node)}
        here: dict[str, int] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = f"{prefix}{k.value}", k.start_mark.line + 1
            if source is not None and k.value in here:
                raise InputError(f"duplicate key (first at line {here[k.value]})" if numbered else "duplicate key",
                                 file=source, line=line if numbered else None, field=key)
            here[k.value] = lines[key] = line
            walk(v, key + ".", path)

    try:
        walk(yaml.compose(text, Loader=_Loader), prefix, frozenset())
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
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float: the domain rejects it
            return math.inf if value > 0 else -math.inf
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
        try:
            return float(value)
        except ValueError:
            raise TypeError("float") from None
    if tp is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool, dict, list) and isinstance(value, tp):
        return value
    raise TypeError(getattr(tp, "__name__", str(tp)))


@functools.cache
def _fields_of(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """(type hints, fields) of a config dataclass: resolved once, not on every load."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _build(cls: type, data: Any, prefix: str, source: str, lines: dict[str, int]) -> Any:
    """An instance of config dataclass ``cls`` from a mapping: every key known, every value of
    its field's type and in its field's domain; errors name ``source``, the line and the field."""
    if not isinstance(data, dict):
        raise InputError("expected a mapping", file=source, line=lines.get(prefix[:-1]), field=prefix[:-1] or None)
    hints, fields = _fields_of(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise InputError(
                f"unknown key (known: {', '.join(sorted(fields))})", file=source, line=lines.get(name), field=name
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, name + ".", source, lines)
            continue
        try:
            value = _check_type(value, tp)
        except TypeError as err:
            raise InputError(
                f"expected {err}, got {value!r}", file=source, line=lines.get(name), field=name
            ) from None
        problem = check_value(fields[key], value)
        if problem:
            raise InputError(problem, file=source, line=lines.get(name), field=name)
        kwargs[key] = value
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the preset at ``path``, then ``section.field=value`` overrides.

    Every value is checked against its field's type and domain, and the fields against each
    other (:func:`validate`), before this returns: nothing a command writes comes first.
    Errors name the file and line, or the ``--set`` item, and the field.
    """
    data: dict = to_dict(Config())
    lines: dict[str, int] = {}
    origin: dict[str, tuple[str, int | None]] = {}  # dotted key -> where it was set last, in order
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read config: {err.__class__.__name__}", file=source) from None
        try:
            preset = _yaml(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise InputError("not valid YAML", file=source, line=mark.line + 1 if mark else None) from None
        if not isinstance(preset, dict):
            raise InputError("expected a mapping of sections", file=source)
        lines = _key_lines(text, source)
        _build(Config, preset, "", source, lines)  # validate the file on its own first
        data = _merge(data, preset)
        origin.update((key, (source, line)) for key, line in lines.items())
    for item in overrides:
        where = f"--set {item if len(item) <= 80 else item[:77] + '...'}"
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"expected section.field=value, got {item!r}", file="--set")
        try:
            value = _yaml(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        else:
            if isinstance(value, dict):
                _key_lines(raw, where, key + ".", numbered=False)
        node: dict = {}
        cursor = node
        *parents, leaf = key.split(".")
        for p in parents:
            cursor = cursor.setdefault(p, {})
        cursor[leaf] = value
        _build(Config, _merge(data, node), "", where, {})
        data = _merge(data, node)
        origin.pop(key, None)
        origin[key] = (where, None)
    cfg = _build(Config, data, "", source, lines)
    validate(cfg, origin)
    return cfg


def validate(cfg: Config, origin: dict[str, tuple[str, int | None]] | None = None) -> None:
    """Checks across fields, which no one field's domain can express: each section's
    ``cross_check`` (:func:`cross_field_problems`).

    ``origin`` maps dotted keys to where they were set (file and line, or the ``--set``
    item), in the order they were set; an error names the place of the field involved that
    was set last.
    """
    origin = origin or {}
    order = {key: i for i, key in enumerate(origin)}

    def place(name: str) -> tuple[int, tuple[str | None, int | None]]:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):  # the field itself, else the section that set it
            key = ".".join(parts[:n])
            if key in origin:
                return order[key], origin[key]
        return -1, (None, None)

    def fail(message: str, *names: str) -> None:
        name = max(names, key=lambda n: place(n)[0])
        file, line = place(name)[1]
        raise InputError(message, file=file, line=line, field=name)

    for section in dataclasses.fields(cfg):
        for message, names in cross_field_problems(getattr(cfg, section.name), section.name):
            fail(message, *names)


# The model fields that only describe a model rlhflab creates: unused when model.path loads one.
CREATED_MODEL_FIELDS = ("arch", "d_model", "n_layers", "n_heads", "max_positions", "dropout")


def _loaded_model_note(model: ModelConfig) -> str:
    """A YAML comment for the model section of a run on a loaded checkpoint: what was loaded
    (its ``config.json``'s model type and size) and which fields were not used."""
    if not model.path:
        return ""
    found = next((d / "config.json" for d in (Path(model.path), Path(model.path) / "model")
                  if (d / "config.json").is_file()), None)
    what = "a local checkpoint"
    try:
        hf = json.loads(found.read_text(encoding="utf-8")) if found else {}
        sizes = [f"{hf[k]} {label}" for k, label in (("num_hidden_layers", "layers"), ("n_layer", "layers"),
                                                      ("hidden_size", "hidden"), ("n_embd", "hidden")) if k in hf]
        if isinstance(hf.get("model_type"), str):
            what = f"a {hf['model_type']} checkpoint" + (f" ({', '.join(sizes)})" if sizes else "")
    except (OSError, ValueError):
        pass
    return (f"  # model.path loads {what}: {', '.join(CREATED_MODEL_FIELDS)} describe a model rlhflab\n"
            "  # creates and were not used by this run\n")


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML; on a loaded model, a comment says which fields went unused."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    note = _loaded_model_note(cfg.model)
    if note:
        text = re.sub(r"^model:\n", lambda m: m.group(0) + note, text, count=1, flags=re.M)
    Path(path).write_text(text, encoding="utf-8")


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
    parser.add_argument("--report-to", metavar="TRACKERS",
                        help="tensorboard, wandb and/or mlflow, comma-separated: every training stage's "
                             "report_to (sft, rm, dpo, rl); the metrics.jsonl is written always")
    if out:
        parser.add_argument("--out", required=True, help="output directory")
        parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")


TRACKED_SECTIONS = ("sft", "rm", "dpo", "rl")
"""The sections with a ``report_to`` field, which ``--report-to`` sets."""


def report_to_overrides(value: str | None) -> list[str]:
    """``--report-to a,b`` as ``--set <section>.report_to=[a, b]`` for every tracked section
    (checked against the field's domain by ``load_config``, like any ``--set``)."""
    if value is None:
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    return [f"{section}.report_to=[{', '.join(names)}]" for section in TRACKED_SECTIONS]


def config_from_args(args) -> Config:
    return load_config(args.config, [*args.overrides, *report_to_overrides(getattr(args, "report_to", None))])
