"""The online algorithms on the enumerable bandit (``rlhflab bandit --algo NAME``).

Each prompt is a state, each of its K responses one action, so a response is a one-token
sequence: the per-token log-probs, masks and advantages are (B, 1) tensors, and the
advantage estimators and the update are the very functions the language-model loops
call (``ppo.ppo_advantages``, ``reinforce.reinforce_advantages``,
``reinforce.reinforce_pp_token_advantages``, ``grpo.grpo_token_advantages``,
``update.update_policy``). What converges here to pi* = pi_ref exp(R/beta)/Z
(``rlhflab.optimal``) is the code that trains the language models.

The only bandit-specific parts: a tabular policy (``bandit.TabularPolicy``), a tabular
critic for PPO (one value per prompt), and a linearly decaying learning rate so that the
stochastic iterates settle at the fixed point instead of rattling around it.

A sampler/trainer mismatch can be injected: with ``sampler_temperature`` T_s != 1 the
responses are drawn from softmax(theta / T_s) while the update treats them as drawn from
pi_theta = softmax(theta) (its old log-probs are the trainer's, as when an inference engine
samples in another precision). ``tis_cap`` C then weights each token's policy-gradient and KL
terms by min(pi_theta / pi_sampler, C) (``losses.truncated_importance_weights``), the
correction the language-model loops apply with ``rl.tis_cap``.

Registry: ``BANDIT_ALGOS[name](problem, beta, *, seed, steps=None, kl_estimator=None,
kl_in=None, pairs=None, **options) -> BanditResult``, one per online algorithm of
``rlhflab.registry.ONLINE_ALGORITHMS``; options override its defaults there (group_size is
their samples_per_prompt; epochs, num_minibatches, scale_std, loss_agg, baseline,
whiten_advantages, kl_in, kl_estimator) and the bandit's own ``BANDIT_DEFAULTS`` (steps,
lr, samples; an entry's ``bandit`` option where it differs), and clip_eps, dual_clip,
kl_clip, value_lr, sampler_temperature, tis_cap. ``whiten_advantages`` away from its default
is refused where the algorithm fixes it (the registry's ``whiten``), as ``rlhflab.algos.rl_config``
refuses it for the language-model loops.

KL as a constraint: ``kl_controller="lagrangian"`` with ``kl_epsilon`` (the budget, nats, default 0.1)
and ``kl_dual_lr`` (default 0.5) starts beta at the ``beta`` given and moves it after every batch by dual
ascent on the batch's sampled KL (``kl.LagrangianKLController``, the mean of k1 over the
batch, as the language-model loop measures ``objective/kl``); its step decays linearly with
the policy's learning rate, so that beta settles as the policy does instead of following
the noise of the last batches. The result's extra holds the final beta (``beta_final``). The target is then pi* at ``optimal.beta_for_kl(..., kl_epsilon)``.
"""

from __future__ import annotations

import functools

import torch

from rlhflab.algos.grpo import grpo_token_advantages
from rlhflab.algos.ppo import ppo_advantages
from rlhflab.algos.reinforce import reinforce_advantages, reinforce_pp_token_advantages
from rlhflab.algos.update import UpdateBatch, UpdateSettings, update_policy
from rlhflab.bandit import BanditProblem, BanditResult, TabularPolicy
from rlhflab.distributed import BatchStats
from rlhflab.kl import make_kl_controller
from rlhflab.losses import truncated_importance_weights
from rlhflab.registry import ONLINE_ALGORITHMS
from rlhflab.training import lr_lambda

BANDIT_DEFAULTS: dict = dict(steps=300, lr=0.05, samples=64)
"""The bandit's own settings: training steps, learning rate and ``samples`` responses per
prompt per step. An algorithm's ``bandit`` option in the registry overrides them."""

# RLConfig fields the bandit reads from an algorithm's registry defaults (as group_size,
# kl_in, ...), and the options a caller may set besides.
_FROM_REGISTRY = ("samples_per_prompt", "epochs", "num_minibatches", "kl_in", "kl_estimator", "whiten_advantages",
                  "loss_agg", "baseline", "scale_std")
_OTHER_OPTIONS = {"clip_eps", "dual_clip", "kl_clip", "value_lr", "sampler_temperature", "tis_cap", "kl_controller",
                  "kl_epsilon", "kl_dual_lr"}


def bandit_defaults(algo: str) -> dict:
    """``algo``'s settings on the bandit: its registry defaults and the bandit's own."""
    entry = ONLINE_ALGORITHMS.entry(algo)
    registered = entry.options["defaults"]
    o = {k: registered[k] for k in _FROM_REGISTRY if k in registered}
    o["group_size"] = o.pop("samples_per_prompt")
    return {**BANDIT_DEFAULTS, **entry.options.get("bandit", {}), **o}


# Advantages by registry estimator: fn(scores, logprobs, ref_logprobs, values, mask, beta, o,
# stats) -> (advantages (B, 1), returns (B, 1) or None); ``o`` holds the resolved options.
def _gae(scores, lp, ref, values, mask, beta, o, stats):
    adv, ret, _ = ppo_advantages(scores, lp, ref, values, mask, beta=beta, kl_in_reward=o["kl_in"] == "reward",
                                 kl_estimator=o["kl_estimator"], kl_clip=o.get("kl_clip"),
                                 whiten_advantages=o["whiten_advantages"], stats=stats)
    return adv, ret


def _sequence_baseline(scores, lp, ref, values, mask, beta, o, stats):
    adv = reinforce_advantages(scores, lp, ref, mask, baseline=o["baseline"], group_size=o["group_size"], beta=beta,
                               kl_in_reward=o["kl_in"] == "reward", kl_estimator=o["kl_estimator"],
                               kl_clip=o.get("kl_clip"), whiten=o["whiten_advantages"], stats=stats)
    return adv, None


def _token_returns(scores, lp, ref, values, mask, beta, o, stats):
    return reinforce_pp_token_advantages(scores, lp, ref, mask, beta=beta, kl_in_reward=o["kl_in"] == "reward",
                                         kl_estimator=o["kl_estimator"], kl_clip=o.get("kl_clip"),
                                         group_size=o["group_size"] if o.get("token_baseline") else None,
                                         stats=stats), None


def _group_relative(scores, lp, ref, values, mask, beta, o, stats):
    return grpo_token_advantages(scores, lp, ref, mask, group_size=o["group_size"], scale_std=o["scale_std"],
                                 beta=beta, kl_in_reward=o["kl_in"] == "reward",
                                 kl_estimator=o["kl_estimator"], kl_clip=o.get("kl_clip")), None


ESTIMATORS = {
    "gae": _gae,
    "sequence_baseline": _sequence_baseline,
    "token_returns": _token_returns,
    "group_relative": _group_relative,
}
"""The registry's ``estimator`` option -> the bandit's advantage function."""


def train_bandit(algo: str, problem: BanditProblem, beta: float, *, seed: int = 0, steps: int | None = None,
                 kl_estimator: str | None = None, kl_in: str | None = None, pairs=None,
                 **options) -> BanditResult:
    """Train a tabular policy with ``algo`` on ``problem``; returns the learned policy."""
    o = bandit_defaults(algo)
    unknown = set(options) - set(o) - (set(_FROM_REGISTRY) - {"samples_per_prompt"}) - _OTHER_OPTIONS
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}")
    registered = ONLINE_ALGORITHMS.entry(algo).options
    fixed = registered.get("whiten")
    if fixed and "whiten_advantages" in options and options["whiten_advantages"] != o["whiten_advantages"]:
        raise TypeError(f"whiten_advantages: {algo} {fixed}")
    o.update(options)
    if registered.get("baseline"):  # RLOO: the algorithm is its baseline (REINFORCE++-baseline: on the scores)
        o["baseline"] = registered["baseline"]
        o["token_baseline"] = registered["estimator"] == "token_returns"
    o.setdefault("whiten_advantages", False)
    o.setdefault("scale_std", True)
    o.setdefault("baseline", "batch")
    o.setdefault("sampler_temperature", 1.0)
    o.setdefault("tis_cap", None)
    if not o["sampler_temperature"] > 0:
        raise TypeError(f"sampler_temperature must be > 0, got {o['sampler_temperature']}")
    if o["tis_cap"] is not None and not o["tis_cap"] > 0:
        raise TypeError(f"tis_cap must be > 0, got {o['tis_cap']}")
    if steps is not None:
        o["steps"] = steps
    if kl_estimator is not None:
        o["kl_estimator"] = kl_estimator
    if kl_in is not None:
        o["kl_in"] = kl_in
    o.setdefault("kl_controller", "fixed")
    if o["kl_controller"] not in ("fixed", "lagrangian"):
        raise TypeError(f"kl_controller must be fixed or lagrangian on the bandit, got {o['kl_controller']!r}")
    if o["samples"] % o["group_size"]:
        raise TypeError(f"samples {o['samples']} is not a multiple of group_size {o['group_size']}")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (B, 1) tensors: threads only add synchronisation
    try:
        return _train(algo, problem, beta, seed, o)
    finally:
        torch.set_num_threads(threads)


def _train(algo: str, problem: BanditProblem, beta: float, seed: int, o: dict) -> BanditResult:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    P = problem.n_prompts
    policy = TabularPolicy(problem.pi_ref)
    critic = torch.nn.Parameter(torch.zeros(P))  # V(x), PPO only
    ref_logp = torch.tensor(problem.pi_ref, dtype=torch.float32).log()  # (P, K)
    rewards = torch.tensor(problem.rewards, dtype=torch.float32)        # (P, K)
    groups = [{"params": [policy.logits], "lr": o["lr"]}]
    options = ONLINE_ALGORITHMS.entry(algo).options
    if options["critic"]:
        groups.append({"params": [critic], "lr": o.get("value_lr", 0.1)})
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("linear", 0, o["steps"]))
    ctl = make_kl_controller("fixed", beta=beta) if o["kl_controller"] == "fixed" else make_kl_controller(
        "lagrangian", init_beta=beta, epsilon=o.get("kl_epsilon", 0.1), lr=o.get("kl_dual_lr", 0.5))

    dual_lr = getattr(ctl, "lr", 0.0)

    def settings(beta: float) -> UpdateSettings:
        return UpdateSettings(epochs=o["epochs"], num_minibatches=o["num_minibatches"],
                              clip_eps=o.get("clip_eps", 0.2), dual_clip=o.get("dual_clip"), loss_agg=o["loss_agg"],
                              max_len=1, kl_coef=beta if o["kl_in"] == "loss" else 0.0,
                              kl_estimator=o["kl_estimator"], kl_clip=o.get("kl_clip"), vf_coef=1.0,
                              value_clip_eps=10.0)
    stats = BatchStats()

    def step_fn() -> float:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float("nan")

    x = torch.arange(P).repeat_interleave(o["samples"])  # (B,) contiguous groups per prompt
    mask = torch.ones(len(x), 1)
    T_s = float(o["sampler_temperature"])
    last: dict[str, float] = {}
    for _ in range(o["steps"]):
        beta = ctl.value
        hp = settings(beta)
        with torch.no_grad():
            sampler = torch.log_softmax(policy.logits[x] / T_s, -1)               # (B, K) the sampler's law
            y = (policy.sample(x, gen) if T_s == 1.0                             # (B,)
                 else torch.multinomial(sampler.exp(), 1, generator=gen).squeeze(-1))
            sampler_lp = sampler.gather(1, y[:, None])                           # (B, 1)
            old = policy.log_probs(x).gather(1, y[:, None])                      # (B, 1) the trainer's
            values = critic[x][:, None].clone()                                  # (B, 1)
        ref = ref_logp[x, y][:, None]                                            # (B, 1)
        advantages, returns = ESTIMATORS[options["estimator"]](rewards[x, y], old, ref, values, mask, beta, o, stats)
        weights = None if o["tis_cap"] is None else truncated_importance_weights(old, sampler_lp, cap=o["tis_cap"])
        # one-token responses: the prompt's index is its "token id", the action the response's
        batch = UpdateBatch(prompt_ids=x[:, None], prompt_mask=mask, response_ids=y[:, None], mask=mask,
                            old_logprobs=old, advantages=advantages.detach(),
                            ref_logprobs=ref if o["kl_in"] == "loss" else None,
                            returns=returns, old_values=values if returns is not None else None,
                            sampler_logprobs=sampler_lp, is_weights=weights)

        def forward(rows: UpdateBatch, with_values=returns is not None):
            states = rows.prompt_ids[:, 0]
            lp = policy.log_probs(states).gather(1, rows.response_ids)
            return lp, None, (critic[states][:, None] if with_values else None)

        last = update_policy(batch, forward, step_fn, hp, stats, gen)
        if o["kl_controller"] == "lagrangian":  # the dual step decays with the policy's, to settle too
            ctl.lr = dual_lr * scheduler.get_last_lr()[0] / o["lr"]
        ctl.update(float((old - ref).mean()), len(x))  # the batch's sampled KL (k1), nats
        scheduler.step()
    mismatch = {}
    if T_s != 1.0 or o["tis_cap"] is not None:
        mismatch = {"sampler_temperature": T_s, "tis_cap": o["tis_cap"],
                    "logprob_diff_mean": last["rollout/logprob_diff_mean"],
                    "logprob_diff_max": last["rollout/logprob_diff_max"]}
    return BanditResult(policy=policy.probs(), steps=o["steps"],
                        extra={k: o[k] for k in ("kl_in", "kl_estimator", "group_size", "samples", "lr")}
                        | ({"scale_std": o["scale_std"], "loss_agg": o["loss_agg"]}
                           if options["estimator"] == "group_relative" else {})
                        | mismatch
                        | ({"kl_controller": "lagrangian", "kl_epsilon": ctl.epsilon, "kl_dual_lr": dual_lr,
                            "beta_final": ctl.value} if o["kl_controller"] == "lagrangian" else {}))


BANDIT_ALGOS = {name: functools.partial(train_bandit, name) for name in ONLINE_ALGORITHMS}
"""``rlhflab bandit --algo NAME``: the online algorithms."""
