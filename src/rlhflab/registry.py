"""Every name a user can write, registered once: the online algorithms with their defaults,
the preference losses, the loss aggregations, the KL estimators and controllers, the
learning-rate schedules and the REINFORCE baselines.

Each family is one ``Registry``: name -> an ``Entry`` whose ``target`` ("module:attribute")
is imported on first use. The CLI's choices, the ``rlhflab run`` arms, the tabular bandits
and the config's field domains all read these tables, so a name is spelled here and nowhere
else, and reading a name costs no torch import (the CLI checks its arguments before it
loads torch and transformers). ``tests/unit/test_registry.py`` resolves every target.

The pattern is verl's ``register_adv_est`` / ``register_policy_loss``, with the table in
one torch-free module instead of decorators spread over the modules that need torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered name: where its implementation lives, what it is, and the family's
    own attributes (an algorithm's defaults, whether a loss needs a reference, ...)."""

    name: str
    target: str  # "module:attribute", imported on first use
    doc: str  # one line: what it is, after which paper
    options: Mapping[str, Any] = field(default_factory=dict)


class Registry(Mapping):
    """name -> implementation, resolved lazily; ``entry(name)`` gives the ``Entry``."""

    def __init__(self, family: str, entries: list[Entry]) -> None:
        self.family = family
        self._entries = {e.name: e for e in entries}
        if len(self._entries) != len(entries):
            raise ValueError(f"{family}: a name is registered twice")
        self._resolved: dict[str, Any] = {}

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.family} {name!r}; expected one of {', '.join(self)}") from None

    def __getitem__(self, name: str) -> Any:
        if name not in self._resolved:
            module, _, attribute = self.entry(name).target.partition(":")
            self._resolved[name] = getattr(importlib.import_module(module), attribute)
        return self._resolved[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def domain(self) -> str:
        """The config field domain "one of a, b, c" (``rlhflab.config``)."""
        return "one of " + ", ".join(self._entries)

    def where(self, **options: Any) -> tuple[str, ...]:
        """The names whose options include all of ``options``."""
        return tuple(n for n, e in self._entries.items() if all(e.options.get(k) == v for k, v in options.items()))

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {list(self._entries)})"


# ---------------------------------------------------------------------------------------
# Online RL algorithms
# ---------------------------------------------------------------------------------------
# The target is the training loop, called with an ``algos.online.OnlineRun``. options:
#   command    the CLI command that trains it (``rlhflab ppo|reinforce|rloo|grpo``), and
#   variant    its ``--variant`` there (None: the command's only algorithm)
#   estimator  its advantages: gae (a critic), sequence_baseline (R - a baseline),
#              token_returns (returns-to-go whitened over the batch), group_relative
#   baseline   the SEQUENCE_BASELINES name a sequence_baseline estimator always uses
#              (absent: ``rl.baseline``); for token_returns, the baseline subtracted from
#              the scores before the returns-to-go (REINFORCE++-baseline)
#   critic     trains a value model alongside the policy
#   defaults   the RLConfig fields a user may leave empty
#   whiten     absent: ``rl.whiten_advantages`` takes effect (its default in ``defaults``);
#              else why the algorithm's whitening is fixed, and setting it away from the
#              default is an error naming the algorithm (``algos.rl_config``)
#   min_samples_per_prompt   group estimators need at least two samples of a prompt
#   bandit     the tabular bandit's settings where they differ from its own defaults
#              (``algos.bandit_online.BANDIT_DEFAULTS``)

ONLINE_ALGORITHMS = Registry("online algorithm", [
    Entry("ppo", "rlhflab.algos.ppo:train_ppo",
          "PPO with a KL penalty and a critic (Ouyang et al. 2022; Huang et al. 2022)",
          dict(command="ppo", variant=None, estimator="gae", critic=True, min_samples_per_prompt=1,
               defaults=dict(samples_per_prompt=1, epochs=4, num_minibatches=4, kl_in="reward", kl_estimator="k1",
                             whiten_advantages=True, loss_agg="token_mean"),
               bandit=dict(steps=60))),
    Entry("reinforce", "rlhflab.algos.reinforce:train_reinforce",
          "REINFORCE with a batch or group baseline (Williams 1992; Ahmadian et al. 2024)",
          dict(command="reinforce", variant="baseline", estimator="sequence_baseline", critic=False,
               min_samples_per_prompt=1,
               defaults=dict(samples_per_prompt=1, epochs=1, num_minibatches=1, kl_in="reward", kl_estimator="k1",
                             whiten_advantages=False, loss_agg="seq_sum", baseline="batch"))),
    Entry("rloo", "rlhflab.algos.reinforce:train_reinforce",
          "REINFORCE leave-one-out (Ahmadian et al. 2024)",
          dict(command="rloo", variant=None, estimator="sequence_baseline", baseline="rloo", critic=False,
               min_samples_per_prompt=2,
               defaults=dict(samples_per_prompt=4, epochs=1, num_minibatches=1, kl_in="reward", kl_estimator="k1",
                             whiten_advantages=False, loss_agg="seq_sum"))),
    Entry("reinforce++", "rlhflab.algos.reinforce:train_reinforce",
          "REINFORCE++: token returns whitened over the global batch (Hu 2025)",
          dict(command="reinforce", variant="reinforce++", estimator="token_returns", critic=False,
               min_samples_per_prompt=1,
               defaults=dict(samples_per_prompt=1, epochs=1, num_minibatches=2, kl_in="reward", kl_estimator="k1",
                             whiten_advantages=True, loss_agg="token_mean"),
               whiten="whitens its token returns over the global batch by definition (Hu 2025): they are its only "
                      "baseline")),
    Entry("reinforce++-baseline", "rlhflab.algos.reinforce:train_reinforce",
          "REINFORCE++-baseline: the prompt's mean score subtracted, token returns whitened over the global batch "
          "(Hu et al. 2025; OpenRLHF's reinforce_baseline)",
          dict(command="reinforce", variant="reinforce++-baseline", estimator="token_returns", baseline="group",
               critic=False, min_samples_per_prompt=2,
               defaults=dict(samples_per_prompt=4, epochs=1, num_minibatches=2, kl_in="reward", kl_estimator="k1",
                             whiten_advantages=True, loss_agg="token_mean"),
               whiten="normalizes its token returns over the global batch by definition (Hu et al. 2025); without "
                      "it, it is reinforce with rl.baseline=group")),
    Entry("grpo", "rlhflab.algos.grpo:train_grpo",
          "GRPO: group-normalized advantages, k3 in the loss (Shao et al. 2024)",
          dict(command="grpo", variant="grpo", estimator="group_relative", critic=False, min_samples_per_prompt=2,
               defaults=dict(samples_per_prompt=8, epochs=1, num_minibatches=2, kl_in="loss", kl_estimator="k3",
                             whiten_advantages=False, loss_agg="seq_mean", scale_std=True),
               whiten="normalizes its advantages per group by design (Shao et al. 2024): whitening over the batch on "
                      "top would divide them by a second, token-weighted std and shift them by a token-weighted mean")),
    Entry("dr-grpo", "rlhflab.algos.grpo:train_grpo",
          "Dr. GRPO: no std scaling, no length bias (Liu et al. 2025)",
          dict(command="grpo", variant="dr-grpo", estimator="group_relative", critic=False, min_samples_per_prompt=2,
               defaults=dict(samples_per_prompt=8, epochs=1, num_minibatches=2, kl_in="loss", kl_estimator="k3",
                             whiten_advantages=False, loss_agg="constant", scale_std=False),
               whiten="drops the std scaling by design (Liu et al. 2025): whitening over the batch would divide the "
                      "advantages by a std again")),
])


def online_commands() -> dict[str, dict[str, str]]:
    """CLI command -> {variant: algorithm}; the first variant is the command's default."""
    out: dict[str, dict[str, str]] = {}
    for name, e in ONLINE_ALGORITHMS._entries.items():
        out.setdefault(e.options["command"], {})[e.options["variant"] or name] = name
    return out


# ---------------------------------------------------------------------------------------
# Preference losses (the DPO family)
# ---------------------------------------------------------------------------------------
# options:
#   reference_free  needs no reference model (takes response lengths instead)
#   unpaired        trains on single labelled responses (KTO) rather than pairs
#   hparams         the loss's keyword -> the DPOConfig field it reads
#   soft_labels     takes ``targets``, the rows' soft labels label_prob (absent: hard labels only)
#   length_inputs   keywords the training loop fills from the response lengths (absent: none):
#                   chosen_lengths/rejected_lengths per pair (IPO per token, dpo.ipo_normalize),
#                   chosen_length_mean of the global batch (an NLL pooled over its chosen tokens)

PREFERENCE_LOSSES = Registry("preference loss", [
    Entry("dpo", "rlhflab.losses:dpo_loss", "DPO, the sigmoid loss (Rafailov et al. 2023)",
          dict(reference_free=False, unpaired=False, hparams={"beta": "beta"}, soft_labels=True)),
    Entry("cdpo", "rlhflab.losses:cdpo_loss", "conservative DPO: label smoothing eps (Mitchell 2023)",
          dict(reference_free=False, unpaired=False, hparams={"beta": "beta", "label_smoothing": "label_smoothing"},
               soft_labels=True)),
    Entry("ipo", "rlhflab.losses:ipo_loss", "IPO: squared loss to 1/(2 tau) (Azar et al. 2023)",
          dict(reference_free=False, unpaired=False, hparams={"tau": "beta", "normalize": "ipo_normalize"},
               length_inputs=("chosen_lengths", "rejected_lengths"))),
    Entry("hinge", "rlhflab.losses:hinge_loss", "SLiC-HF's hinge on the log-ratio margin (Zhao et al. 2023)",
          dict(reference_free=False, unpaired=False, hparams={"beta": "beta"})),
    Entry("kto", "rlhflab.losses:kto_loss", "KTO: unpaired desirable/undesirable rows (Ethayarajh et al. 2024)",
          dict(reference_free=False, unpaired=True,
               hparams={"beta": "beta", "desirable_weight": "kto_desirable_weight",
                        "undesirable_weight": "kto_undesirable_weight"})),
    Entry("simpo", "rlhflab.losses:simpo_loss", "SimPO: length-normalized, no reference (Meng et al. 2024)",
          dict(reference_free=True, unpaired=False,
               hparams={"beta": "beta", "gamma": "simpo_gamma", "nll_coef": "simpo_nll_coef"},
               length_inputs=("chosen_length_mean",))),
    Entry("orpo", "rlhflab.losses:orpo_loss", "ORPO: NLL plus an odds-ratio term, no reference (Hong et al. 2024)",
          dict(reference_free=True, unpaired=False, hparams={"lam": "beta", "nll": "orpo_nll"},
               length_inputs=("chosen_length_mean",))),
])


def loss_hparams(name: str, values: Any) -> dict[str, Any]:
    """The keyword hyper-parameters of preference loss ``name``, read from ``values`` (a
    DPOConfig, or any object or mapping with those field names)."""
    get = values.get if isinstance(values, Mapping) else lambda k: getattr(values, k)
    return {kw: get(f) for kw, f in PREFERENCE_LOSSES.entry(name).options["hparams"].items()}


# ---------------------------------------------------------------------------------------
# Sampling arms: no training
# ---------------------------------------------------------------------------------------
# An ``rlhflab run`` arm that draws from the SFT policy and lets the reward model choose,
# instead of training a policy; the target computes its record (``commands.arms``).

SAMPLING_ARMS = Registry("sampling arm", [
    Entry("bon", "rlhflab.commands.bon:run_bon",
          "best-of-n: n samples of the SFT policy, the reward model keeps its best (Nakano et al. 2021; "
          "Gao et al. 2022)"),
])

# ---------------------------------------------------------------------------------------
# AI-feedback arms: the reward model's comparisons labelled by an AI labeller
# ---------------------------------------------------------------------------------------
# An ``rlhflab run`` arm that has the world's AI labeller (``judge``) relabel the comparisons
# the human raters voted on (same prompts, same pairs) under ``run.constitution``, trains its
# own reward model on the soft labels and runs online algorithm ``algo`` on it from SFT
# (``commands.arms.feedback_arm``).

AI_FEEDBACK_ARMS = Registry("AI-feedback arm", [
    Entry("rlaif", "rlhflab.commands.arms:feedback_arm",
          "RLAIF: the RM's comparisons labelled by the world's AI labeller under a constitution, PPO on the "
          "RM trained on its soft labels (Bai et al. 2022)", dict(algo="ppo", judge="world:ai")),
])


# ---------------------------------------------------------------------------------------
# Online-RL loss aggregation, KL, baselines, learning-rate schedules
# ---------------------------------------------------------------------------------------

LOSS_AGGREGATIONS = Registry("loss aggregation", [
    Entry("token_mean", "rlhflab.losses:token_mean", "sum over tokens / tokens (PPO, REINFORCE++, DAPO)"),
    Entry("seq_sum", "rlhflab.losses:seq_sum", "sum over tokens / sequences (REINFORCE)"),
    Entry("seq_mean", "rlhflab.losses:seq_mean", "mean per sequence, then over sequences (GRPO)"),
    Entry("constant", "rlhflab.losses:constant_normalizer", "sum / (sequences x max length) (Dr. GRPO)"),
])

# options: old_logprobs (called as fn(logprobs, ref_logprobs, old_logprobs=...): it reads the
# ratio pi_theta / pi_old, so it belongs in the loss, where that ratio has a gradient; in the
# reward the ratio is 1 and only its value, k3's, would count).
KL_ESTIMATORS = Registry("KL estimator", [
    Entry("k1", "rlhflab.kl:kl_k1", "-log r: unbiased, noisy; belongs in the reward (Schulman 2020)"),
    Entry("k2", "rlhflab.kl:kl_k2", "(log r)^2 / 2: its gradient is the reverse KL's (Schulman 2020)"),
    Entry("k3", "rlhflab.kl:kl_k3", "(r - 1) - log r: unbiased, >= 0; GRPO's (Schulman 2020)"),
    Entry("k3_ratio", "rlhflab.kl:kl_k3_ratio",
          "k3 x pi_theta / pi_old: k3's value, the reverse KL's gradient off-policy too; TRL's "
          "use_bias_correction_kl (DeepSeek-AI 2025, DeepSeek-V3.2)", dict(old_logprobs=True)),
])

KL_CONTROLLERS = Registry("KL controller", [
    Entry("fixed", "rlhflab.kl:FixedKLController", "a constant beta"),
    Entry("linear", "rlhflab.kl:LinearKLController", "beta moved linearly to beta_end"),
    Entry("adaptive", "rlhflab.kl:AdaptiveKLController", "beta steered to a target KL (Ziegler et al. 2019)"),
    Entry("lagrangian", "rlhflab.kl:LagrangianKLController",
          "beta by dual ascent on KL - kl_epsilon: reward maximized subject to KL <= kl_epsilon"),
])

# options: grouped (called as fn(R, G) on the samples of each prompt; else fn(R, mean=the
# mean over every process's rows)); defaults (RLConfig fields the baseline needs, such as
# several samples per prompt); rl.baseline offers the ones with user=True (rloo is its own
# algorithm, ``rlhflab rloo``).
SEQUENCE_BASELINES = Registry("REINFORCE baseline", [
    Entry("batch", "rlhflab.advantages:batch_mean_baseline", "A = R - mean over the global batch",
          dict(grouped=False, user=True)),
    Entry("group", "rlhflab.advantages:group_mean_baseline", "A = R - mean of the prompt's samples",
          dict(grouped=True, user=True, defaults=dict(samples_per_prompt=4))),
    Entry("rloo", "rlhflab.advantages:rloo_advantages", "A = R - mean of the prompt's other samples",
          dict(grouped=True, user=False)),
])

LR_SCHEDULES = Registry("learning-rate schedule", [
    Entry("cosine", "rlhflab.training:cosine_decay", "half a cosine from 1 to 0 after warm-up"),
    Entry("linear", "rlhflab.training:linear_decay", "a straight line from 1 to 0 after warm-up"),
    Entry("constant", "rlhflab.training:constant_rate", "1 after warm-up"),
])


# ---------------------------------------------------------------------------------------
# Judges and AI labellers (``--judge KIND:...``)
# ---------------------------------------------------------------------------------------

JUDGE_KINDS = Registry("judge", [
    Entry("rm", "rlhflab.instruments.judges:RewardModelJudge", "rm:DIR: a reward model's hard verdicts"),
    Entry("lm", "rlhflab.instruments.judges:LanguageModelJudge",
          "lm:DIR: a local causal LM asked the multiple-choice question in both orders (Bai et al. 2022, 4.1)"),
    Entry("py", "rlhflab.instruments.judges:CallableJudge", "py:module:function: a Python callable's P(a better)"),
    Entry("world", "rlhflab.instruments.judges:WorldLabelerJudge",
          "world:ai: the world's AI labeller under a constitution, with its documented biases"),
])


# ---------------------------------------------------------------------------------------
# Samplers of online RL (``rl.sampler``): what decodes the rollouts
# ---------------------------------------------------------------------------------------
# The target builds the sampler from the policy and its tokenizer (``samplers.make_sampler``);
# ``engine`` has none: the rollout decodes with the project's own engine, from the policy's
# weights. Any other ``rl.sampler`` is ``module:factory``, a factory of the same signature.

SAMPLERS = Registry("sampler", [
    Entry("engine", "rlhflab.generation:generate",
          "the project's decoding loop on the policy's own weights (rlhflab.generation)"),
    Entry("vllm", "rlhflab.samplers:VLLMSampler",
          "vLLM's offline LLM.generate, the trainer's weights loaded into it after each update (Kwon et al. 2023)"),
])


# ---------------------------------------------------------------------------------------
# How far from the reference is too far
# ---------------------------------------------------------------------------------------

KL_CAUTION_NATS = 8.0
"""Sequence KL from the reference (nats) above which a run is flagged 'caution'. Ziegler et
al. 2019's adaptive controller targeted 6 nats on their stylistic tasks (target 6.0 in
their released launch.py); 8 is beyond that. Healthy world runs sit at 0.4-1 nat."""

KL_WARNING_NATS = 15.0
"""Sequence KL (nats) above which a run is flagged 'warning'. Stiennon et al. 2020 (Fig. 5):
as the KL from the SFT policy grows, the humans' preference peaks and then falls while the
reward model's keeps rising; 15 nats is this project's cut, where the world's over-optimized
runs land (14.3 nats at beta 0.005)."""
