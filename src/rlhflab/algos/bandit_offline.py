"""The DPO family on the enumerable bandit, checked against exact optima.

Setting (as in the DPO paper, Rafailov et al. 2023, Sec. 4-5): for each of N comparisons a
prompt x is drawn uniformly, two responses y1, y2 are drawn independently from pi_ref(.|x),
and the preference is drawn from Bradley-Terry on the bandit's rewards,

    P(y1 > y2 | x) = sigmoid(R(x, y1) - R(x, y2))        (or, with ``deterministic=True``,
                                                          y1 wins iff R(x, y1) > R(x, y2))

Draws with y1 == y2 carry no preference (h = 0 for every policy) and are dropped, as
``rlhflab.data`` refuses chosen == rejected; the count is reported. A TabularPolicy (one
logit per response, initialised at log pi_ref) is then trained FULL-BATCH on those N pairs
with the SAME loss functions as the language-model stage (``rlhflab.losses``), a response
being one action: its summed log-prob is log pi(y|x), its length 1.

Where this departs from training a language model: full-batch Adam with a cosine-decayed
step size on a fixed sample, so what the policy converges to is the EMPIRICAL optimum of
the loss on those N pairs. For DPO that is the Bradley-Terry maximum-likelihood fit of the
implicit reward beta*log(pi/pi_ref), which tends to pi* of the KL-regularized objective
(``problem.optimum(beta)``) as N grows, at the usual O(1/N) rate in KL. For IPO both
optima are computed exactly (``ipo_optimum``): the empirical one (from the sampled win
counts) and the population one (pairs ~ pi_ref x pi_ref, BT probabilities), derived in
docs/dpo.md:

    pi_IPO(y|x) = pi_ref(y|x) exp(P(y > pi_ref | x) / tau) / Z(x),
    P(y > pi_ref | x) = sum_y' pi_ref(y'|x) P(y > y' | x)       (P(y > y) = 1/2)

Hyper-parameters: ``beta`` is the temperature of dpo, cdpo, hinge and kto, tau of ipo,
beta of simpo, and lambda of orpo; options: ``label_smoothing`` (cdpo, default 0.1),
``gamma`` and ``nll_coef`` (simpo, defaults 0.5 and 0), ``normalize`` (ipo), ``nll`` (orpo:
sequence or token), ``desirable_weight``/``undesirable_weight`` (kto),
``lr`` (default 0.3), ``deterministic`` (default false). ``steps`` defaults to 500.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from rlhflab.bandit import BanditProblem, BanditResult, TabularPolicy
from rlhflab.losses import kto_reference_point
from rlhflab.optimal import kl_divergence
from rlhflab.registry import PREFERENCE_LOSSES

DEFAULT_PAIRS = 20000
DEFAULT_STEPS = 500
DEFAULT_LR = 0.3


# --------------------------------------------------------------------------- data


@dataclass
class PairData:
    """N sampled comparisons: prompt index, winner and loser response index, each (N,)."""

    prompts: torch.Tensor  # (N,) long
    chosen: torch.Tensor  # (N,) long
    rejected: torch.Tensor  # (N,) long
    n_identical: int  # draws with y1 == y2, dropped

    def wins(self, n_prompts: int, n_responses: int) -> np.ndarray:
        """(P, K, K) counts: wins[x, y, y'] = comparisons of x in which y beat y'."""
        w = np.zeros((n_prompts, n_responses, n_responses))
        np.add.at(w, (self.prompts.numpy(), self.chosen.numpy(), self.rejected.numpy()), 1.0)
        return w


def preference_matrix(problem: BanditProblem, deterministic: bool = False) -> np.ndarray:
    """(P, K, K): P(y > y' | x) = sigmoid(R(x,y) - R(x,y')), or 1/0/0.5 if deterministic."""
    diff = problem.rewards[:, :, None] - problem.rewards[:, None, :]
    if deterministic:
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-diff))


def sample_pairs(problem: BanditProblem, n_pairs: int, *, seed: int = 0,
                 deterministic: bool = False) -> PairData:
    """Draw ``n_pairs`` comparisons (module docstring); identical draws are dropped."""
    rng = np.random.default_rng(seed)
    P, K = problem.pi_ref.shape
    x = rng.integers(0, P, size=n_pairs)
    cdf = np.cumsum(problem.pi_ref, axis=1)
    cdf[:, -1] = 1.0

    def draw() -> np.ndarray:
        u = rng.random(n_pairs)
        return (u[:, None] > cdf[x]).sum(1)

    y1, y2 = draw(), draw()
    p = preference_matrix(problem, deterministic)[x, y1, y2]
    first_wins = rng.random(n_pairs) < p
    keep = y1 != y2
    chosen = np.where(first_wins, y1, y2)[keep]
    rejected = np.where(first_wins, y2, y1)[keep]
    as_long = partial(torch.as_tensor, dtype=torch.long)
    return PairData(as_long(x[keep]), as_long(chosen), as_long(rejected), int((~keep).sum()))


# ---------------------------------------------------------------- exact IPO optimum


def ipo_optimum(pi_ref: np.ndarray, wins: np.ndarray, tau: float) -> np.ndarray:
    """Minimizer of the IPO loss  sum_{x,y,y'} wins[x,y,y'] (h(y) - h(y') - 1/(2 tau))^2
    over h(y) = log pi(y|x)/pi_ref(y|x), i.e. for any weighting of comparisons.

    Setting the gradient in h(k) to zero gives, per prompt, a graph-Laplacian system

        sum_y' A[k,y'] (h(k) - h(y')) = (1/(2 tau)) sum_y' (wins[k,y'] - wins[y',k]),
        A = wins + wins^T,

    solved up to the per-prompt constant (which the normalization of pi absorbs) with a
    least-squares solve. Unique when the comparison graph of a prompt is connected; an
    unconnected response keeps h = 0 here. ``wins`` are counts (the empirical optimum) or
    expected frequencies such as pi_ref(y) pi_ref(y') P(y > y') (the population optimum).
    """
    policies = []
    for ref, w in zip(pi_ref, wins):
        a = w + w.T
        laplacian = np.diag(a.sum(1)) - a
        b = (w.sum(1) - w.sum(0)) / (2.0 * tau)
        h = np.linalg.lstsq(laplacian, b, rcond=None)[0]
        logits = np.log(ref) + h
        e = np.exp(logits - logits.max())
        policies.append(e / e.sum())
    return np.stack(policies)


def ipo_population_optimum(problem: BanditProblem, tau: float, deterministic: bool = False) -> np.ndarray:
    """pi_IPO(y|x) ∝ pi_ref(y|x) exp(P(y > pi_ref | x) / tau): the population IPO optimum
    for pairs drawn from pi_ref x pi_ref (Azar et al. 2023, eq. 8 with mu = pi_ref; the
    derivation is in docs/dpo.md)."""
    prefs = preference_matrix(problem, deterministic)
    p_beats_ref = np.einsum("xyz,xz->xy", prefs, problem.pi_ref)
    logits = np.log(problem.pi_ref) + p_beats_ref / tau
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------- training

# The bandit's options named after the losses' own keywords, with their defaults; ``beta``
# fills the keyword the registry maps to ``dpo.beta`` (beta, tau or lam).
# Every response is one action (length 1), so ipo's normalize and orpo's nll pooling change
# nothing here; they are accepted as in ``rlhflab dpo``.
LOSS_OPTIONS: dict[str, float | bool | str] = {"label_smoothing": 0.1, "gamma": 0.5, "desirable_weight": 1.0,
                                               "undesirable_weight": 1.0, "nll_coef": 0.0, "normalize": False,
                                               "nll": "sequence"}
KNOWN_OPTIONS = {*LOSS_OPTIONS, "lr", "deterministic"}


def bandit_hparams(name: str, beta: float, options: dict) -> dict:
    """The keyword hyper-parameters of loss ``name`` (``registry.PREFERENCE_LOSSES``) from the
    bandit's ``beta`` and options."""
    table = PREFERENCE_LOSSES.entry(name).options["hparams"]
    return {kw: beta if field == "beta" else type(LOSS_OPTIONS[kw])(options.get(kw, LOSS_OPTIONS[kw]))
            for kw, field in table.items()}


def _paired_objective(name: str, data: PairData, ref_logps: torch.Tensor, hp: dict):
    """policy log-probs (P, K) -> (loss, metrics) for a paired loss of ``losses.py``."""
    fn = PREFERENCE_LOSSES[name]
    x, w, l_ = data.prompts, data.chosen, data.rejected
    ones = torch.ones(len(x))  # every response is one action: length 1
    if PREFERENCE_LOSSES.entry(name).options["reference_free"]:
        third, fourth = ones, ones
    else:
        third, fourth = ref_logps[x, w], ref_logps[x, l_]
    lengths = {"chosen_lengths": ones, "rejected_lengths": ones, "chosen_length_mean": 1.0}
    extra = {k: lengths[k] for k in PREFERENCE_LOSSES.entry(name).options.get("length_inputs", ())}

    def objective(logps: torch.Tensor):
        return fn(logps[x, w], logps[x, l_], third, fourth, **hp, **extra)

    return objective


def _kto_objective(data: PairData, ref_logps: torch.Tensor, hp: dict):
    """Each pair split into a desirable (winner) and an undesirable (loser) example; the
    reference point uses mismatched pairs: example i's prompt with example i+1's response
    (a shift by one, as TRL does within a batch), over the full batch."""
    x = torch.cat([data.prompts, data.prompts])
    y = torch.cat([data.chosen, data.rejected])
    desirable = torch.cat([torch.ones(len(data.prompts), dtype=torch.bool),
                           torch.zeros(len(data.prompts), dtype=torch.bool)])
    y_mismatched = torch.roll(y, shifts=-1)
    ref_mismatched = ref_logps[x, y_mismatched]

    def objective(logps: torch.Tensor):
        z0 = kto_reference_point(logps[x, y_mismatched], ref_mismatched)
        return PREFERENCE_LOSSES["kto"](logps[x, y], ref_logps[x, y], desirable, z0, **hp)

    return objective


def train_offline(problem: BanditProblem, name: str, beta: float, *, seed: int = 0,
                  steps: int | None = None, pairs: int | None = None, **options) -> BanditResult:
    """Sample comparisons, train a TabularPolicy full-batch on ``name``'s loss, report."""
    unknown = set(options) - KNOWN_OPTIONS
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(KNOWN_OPTIONS))})")
    steps = DEFAULT_STEPS if steps is None else int(steps)
    n_pairs = DEFAULT_PAIRS if pairs is None else int(pairs)
    if n_pairs < 1 or steps < 1:
        raise TypeError("pairs and steps must be positive")
    deterministic = bool(options.get("deterministic", False))
    data = sample_pairs(problem, n_pairs, seed=seed, deterministic=deterministic)
    if len(data.prompts) == 0:
        raise TypeError(f"all {n_pairs} sampled pairs had y1 == y2; sample more pairs")
    ref_logps = torch.log(torch.as_tensor(problem.pi_ref, dtype=torch.float32))
    hp = bandit_hparams(name, beta, options)
    objective = (_kto_objective(data, ref_logps, hp) if PREFERENCE_LOSSES.entry(name).options["unpaired"]
                 else _paired_objective(name, data, ref_logps, hp))

    torch.manual_seed(seed)
    policy = TabularPolicy(problem.pi_ref)
    lr = float(options.get("lr", DEFAULT_LR))
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    # Cosine decay to 0: full-batch Adam with a constant step keeps oscillating at the
    # scale of the step; decaying it lets the iterate settle on the empirical optimum.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    for _ in range(steps):
        loss, metrics = objective(policy.log_probs())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()

    pi = policy.probs()
    loss, metrics = objective(policy.log_probs())
    extra = {
        "pairs": int(len(data.prompts)),
        "pairs_identical_dropped": data.n_identical,
        "deterministic": deterministic,
        "final_loss": float(loss.item()),
        "kl_to_ref": float(np.mean(kl_divergence(pi, problem.pi_ref))),
        "min_prob": float(pi.min()),
        **{k: v for k, v in metrics.items() if k.startswith("rewards/")},
    }
    if name == "ipo":
        empirical = ipo_optimum(problem.pi_ref, data.wins(*problem.pi_ref.shape), beta)
        population = ipo_population_optimum(problem, beta, deterministic)
        extra["kl_to_ipo_empirical_optimum"] = float(np.mean(kl_divergence(pi, empirical)))
        extra["kl_to_ipo_population_optimum"] = float(np.mean(kl_divergence(pi, population)))
        extra["ipo_population_optimum"] = np.round(population, 4).tolist()
    return BanditResult(policy=pi, steps=steps, extra=extra)


def _algo(name: str):
    def run(problem: BanditProblem, beta: float, *, seed: int = 0, steps: int | None = None,
            kl_estimator=None, kl_in=None, pairs: int | None = None, **options) -> BanditResult:
        if kl_estimator is not None or kl_in is not None:
            raise TypeError("offline algorithms take no --kl-estimator or --kl-in (the KL is implicit)")
        return train_offline(problem, name, beta, seed=seed, steps=steps, pairs=pairs, **options)

    run.__name__ = f"bandit_{name}"
    run.__doc__ = f"{name} on sampled Bradley-Terry comparisons (see the module docstring)."
    return run


BANDIT_ALGOS: dict[str, Callable[..., BanditResult]] = {
    name: _algo(name) for name in PREFERENCE_LOSSES
}
