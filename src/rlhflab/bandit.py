"""An enumerable problem where the optimum of the KL-regularized objective is known exactly.

A few prompts, K candidate responses each, given rewards R(x, y) and a reference policy
pi_ref(y | x). For every beta the optimum is pi*(y | x) ∝ pi_ref(y | x) exp(R(x, y) / beta)
(``rlhflab.optimal``), so any algorithm that claims to optimize

    E_x E_{y ~ pi(.|x)} [R(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x))

can be run here and its distance to pi* measured: ``rlhflab bandit --algo NAME --json``
prints ``{"algo", "kl_to_optimum", "tv_to_optimum", "steps", ...}``.

Best-of-n needs no training: ``rlhflab bandit --algo bon --n N --json`` prints its exact law
(``optimal.best_of_n_policy``: the probability that a response is the best of N draws from
pi_ref, draws tied at the top broken at random), its exact KL from pi_ref beside the
analytic log N - (N-1)/N, and its expected reward beside pi_ref's.

The policy is tabular: one logit per (prompt, response), initialised at log pi_ref, so a
response is one action and its log-prob is one "token" log-prob. Algorithms plug in
through registries in ``rlhflab.algos.bandit_online`` (PPO, REINFORCE, RLOO, REINFORCE++,
GRPO) and ``rlhflab.algos.bandit_offline`` (DPO family), each
``name -> fn(problem, beta, **options) -> BanditResult``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rlhflab.optimal import (
    best_of_n_kl_bound,
    best_of_n_policy,
    kl_divergence,
    optimal_policy,
    tv_distance,
)


@dataclass
class BanditProblem:
    """pi_ref and R, both (P, K): P prompts, K candidate responses each."""

    pi_ref: np.ndarray
    rewards: np.ndarray

    def __post_init__(self) -> None:
        self.pi_ref = np.asarray(self.pi_ref, dtype=np.float64)
        self.rewards = np.asarray(self.rewards, dtype=np.float64)
        if self.pi_ref.shape != self.rewards.shape or self.pi_ref.ndim != 2:
            raise ValueError("pi_ref and rewards must both have shape (P, K)")
        if not np.allclose(self.pi_ref.sum(1), 1.0, atol=1e-6) or (self.pi_ref <= 0).any():
            raise ValueError("each row of pi_ref must be a positive distribution")

    @property
    def n_prompts(self) -> int:
        return self.pi_ref.shape[0]

    @property
    def n_responses(self) -> int:
        return self.pi_ref.shape[1]

    def optimum(self, beta: float) -> np.ndarray:
        """pi* (P, K) for this beta, row by row from ``rlhflab.optimal``."""
        return np.stack([optimal_policy(p, r, beta).policy for p, r in zip(self.pi_ref, self.rewards)])


def default_bandit() -> BanditProblem:
    """Three prompts, four responses each: a clear winner, a near tie, and a case where the
    reference policy prefers a poor response (so the optimum must move mass a long way)."""
    return BanditProblem(
        pi_ref=[[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]],
        rewards=[[1.0, 0.0, -0.5, 0.5], [0.2, 0.25, -1.0, 0.0], [1.0, 0.5, 0.0, -0.5]],
    )


class TabularPolicy(torch.nn.Module):
    """pi_theta(y | x) = softmax(theta[x])[y], theta initialised at log pi_ref."""

    def __init__(self, pi_ref: np.ndarray) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(np.log(pi_ref), dtype=torch.float32))

    def log_probs(self, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) log-probs of every response for the given prompt indices (all if None)."""
        lp = torch.log_softmax(self.logits, dim=-1)
        return lp if prompts is None else lp[prompts]

    def probs(self) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self.logits.double(), -1).numpy()

    def sample(self, prompts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One response index per prompt index: (B,) -> (B,)."""
        with torch.no_grad():
            return torch.multinomial(torch.softmax(self.logits[prompts], -1), 1, generator=generator).squeeze(-1)


@dataclass
class BanditResult:
    policy: np.ndarray  # (P, K) learned pi_theta
    steps: int
    extra: dict = field(default_factory=dict)


def distance_to_optimum(policy: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean over prompts of KL(pi_theta || target) and of total variation."""
    return {
        "kl_to_optimum": float(np.mean(kl_divergence(policy, target))),
        "tv_to_optimum": float(np.mean(tv_distance(policy, target))),
    }


REGISTRY_MODULES = ("rlhflab.algos.bandit_online", "rlhflab.algos.bandit_offline")


def offline_algorithms() -> set[str]:
    name = "rlhflab.algos.bandit_offline"
    return set(importlib.import_module(name).BANDIT_ALGOS) if importlib.util.find_spec(name) is not None else set()


def algorithms() -> dict[str, Callable[..., BanditResult]]:
    """Every bandit algorithm, from the registries of the modules that exist."""
    algos: dict[str, Callable[..., BanditResult]] = {}
    for name in REGISTRY_MODULES:
        if importlib.util.find_spec(name) is not None:
            algos.update(importlib.import_module(name).BANDIT_ALGOS)
    return algos


# ---------------------------------------------------------------------------------------
# CLI: rlhflab bandit


def best_of_n_row(problem: BanditProblem, n: int) -> dict:
    """Best-of-n on the bandit, exactly: its law, KL from pi_ref (per prompt and mean) beside
    the analytic log n - (n-1)/n, and the expected reward beside pi_ref's."""
    policy = best_of_n_policy(problem.pi_ref, problem.rewards, n)
    kl = np.asarray(kl_divergence(policy, problem.pi_ref))
    return {"algo": "bon", "n": n, "kl": float(kl.mean()), "kl_per_prompt": np.round(kl, 6).tolist(),
            "kl_analytic": best_of_n_kl_bound(n),
            "expected_reward": float(np.mean((policy * problem.rewards).sum(1))),
            "ref_expected_reward": float(np.mean((problem.pi_ref * problem.rewards).sum(1))),
            "policy": np.round(policy, 6).tolist(), "pi_ref": problem.pi_ref.tolist()}
