"""Simulated raters: noisy, biased humans comparing responses.

A rater's utility for a response is the gold utility plus configurable biases,

    u(y) = g(y) + length_bias * n_tokens + agreement_bias * [agrees with the user]
                + keyword_bias * n_keywords + refusal_bias * [refuses],

and each vote draws independent Gumbel noise of scale ``noise`` on every response, so a
pairwise vote follows Bradley-Terry, P(a > b) = sigmoid((u_a - u_b) / noise), and a K-way
ranking follows Plackett-Luce (Gumbel-max: the two views agree). Votes of different raters
are independent given the responses, which is what makes rater agreement measurable.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from rlhflab.world.gold import GoldWeights, features, gold_utility
from rlhflab.world.tasks import Prompt


@dataclass
class RaterConfig:
    """How the simulated raters judge (biases are per unit of the feature). Each field's
    ``domain`` is the values it accepts (``rlhflab.config.Domain``)."""

    noise: float = field(default=0.25, metadata={"help": "Gumbel noise scale of a vote; sets rater-rater agreement", "domain": "> 0"})
    length_bias: float = field(default=0.1, metadata={"help": "utility per response token the raters add", "domain": "finite"})
    agreement_bias: float = field(default=0.0, metadata={"help": "utility for agreeing with the user (sycophancy)", "domain": "finite"})
    keyword_bias: float = field(default=0.0, metadata={"help": "utility per keyword such as 'certainly'", "domain": "finite"})
    refusal_bias: float = field(default=0.0, metadata={"help": "utility for refusing, whatever the request", "domain": "finite"})
    votes: int = field(default=3, metadata={"help": "independent votes per comparison", "domain": "int >= 1"})


def rater_utility(prompt: Prompt, response: str, eos: bool, cfg: RaterConfig,
                  weights: GoldWeights | None = None) -> float:
    """u(y): gold utility plus the raters' biases (module docstring)."""
    g = gold_utility(prompt, response, eos, weights)
    if not response.split():
        return g
    f = features(prompt, response, eos)
    return (
        g
        + cfg.length_bias * f.n_tokens
        + cfg.agreement_bias * f.agrees
        + cfg.keyword_bias * f.n_keywords
        + cfg.refusal_bias * f.refuses
    )


def preference_probability(prompt: Prompt, a: str, b: str, cfg: RaterConfig,
                           eos_a: bool = True, eos_b: bool = True) -> float:
    """P(a preferred over b) for one vote: sigmoid((u_a - u_b) / noise)."""
    d = (rater_utility(prompt, a, eos_a, cfg) - rater_utility(prompt, b, eos_b, cfg)) / cfg.noise
    return 1.0 / (1.0 + math.exp(-d)) if d > -700 else 0.0


class RaterPanel:
    """Independent raters voting with the configured noise and biases."""

    def __init__(self, cfg: RaterConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.rng = random.Random(seed)

    def _noisy(self, u: float) -> float:
        # Gumbel(0, noise): differences of two are logistic, hence Bradley-Terry votes.
        return u - self.cfg.noise * math.log(-math.log(self.rng.random() or 1e-300))

    def rank(self, prompt: Prompt, responses: list[str], eos: list[bool] | None = None) -> list[list[int]]:
        """One ranking (indices best first) per vote, each a Plackett-Luce draw."""
        eos = eos or [True] * len(responses)
        us = [rater_utility(prompt, r, e, self.cfg) for r, e in zip(responses, eos)]
        rankings = []
        for _ in range(self.cfg.votes):
            noisy = [self._noisy(u) for u in us]
            rankings.append(sorted(range(len(us)), key=noisy.__getitem__, reverse=True))
        return rankings

    def compare(self, prompt: Prompt, a: str, b: str, eos_a: bool = True, eos_b: bool = True) -> list[int]:
        """Votes on one pair: 1 where a rater prefers ``a``, else 0."""
        return [int(r[0] == 0) for r in self.rank(prompt, [a, b], [eos_a, eos_b])]
