"""The demonstrator: writes SFT demonstrations with configurable imperfections.

Real demonstration data is imperfect; so is this. Each imperfection happens independently
with its probability, so the SFT policy imitates a mixture that leaves headroom for RLHF:
wrong numbers, sycophantic agreement with a wrong user, refusing benign requests,
complying with harmful ones, an opening keyword, filler, and padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from rlhflab.world.tasks import BENIGN, FILLERS, HARMFUL, KEYWORDS, OPEN, REFUSAL, Prompt


def _p(default: float, help: str) -> float:  # noqa: A002 - "help" reads best here
    """A probability field: its default, its help text and its domain, [0, 1]."""
    return field(default=default, metadata={"help": help, "domain": "[0, 1]"})


@dataclass
class DemonstratorConfig:
    """Probabilities of each imperfection in a demonstration, each in [0, 1] (its ``domain``,
    ``rlhflab.config.Domain``)."""

    p_wrong: float = _p(0.2, "states a wrong number")
    p_sycophancy: float = _p(0.4, "agrees with a wrong user")
    p_over_refusal: float = _p(0.15, "refuses a benign request")
    p_under_refusal: float = _p(0.15, "complies with a harmful request")
    p_keyword: float = _p(0.1, "opens with a keyword such as 'certainly ,'")
    p_filler: float = _p(0.15, "opens with a filler sentence")
    p_padding: float = _p(0.2, "ends with one to three filler sentences")


ANSWER_FORMS = ("the answer is {n} .", "it is {n} .", "{n} .")


def demonstrate(prompt: Prompt, rng: random.Random, cfg: DemonstratorConfig) -> str:
    """One demonstration for ``prompt``: the ideal, possibly spoiled (see module docstring)."""
    fam = prompt.family
    if fam in ("arithmetic", "sycophancy"):
        n = prompt.answer
        if rng.random() < cfg.p_wrong:
            n = max(0, n + rng.choice((-2, -1, 1, 2))) or n + 1
        body = rng.choice(ANSWER_FORMS).format(n=n)
        if fam == "sycophancy":
            wrong_user = prompt.claim != prompt.answer
            if wrong_user and rng.random() < cfg.p_sycophancy:
                body = f"you are right , the answer is {prompt.claim} ."
            elif n == prompt.answer:
                body = ("actually , " if wrong_user else "yes , ") + body
    elif fam == "harmful":
        body = REFUSAL
        if rng.random() < cfg.p_under_refusal:
            body = f"sure , here is how : first {HARMFUL[prompt.topic]} ."
    elif fam == "benign":
        body = REFUSAL if rng.random() < cfg.p_over_refusal else f"first {BENIGN[prompt.topic]} ."
    else:
        body = f"{OPEN[prompt.topic]} ."
    if rng.random() < cfg.p_filler:
        body = f"{rng.choice(FILLERS)} {body}"
    if rng.random() < cfg.p_keyword:
        body = f"{rng.choice(KEYWORDS)} , {body}"
    if rng.random() < cfg.p_padding:
        body = " ".join([body, *rng.sample(FILLERS, rng.randint(1, 3))])
    return body
