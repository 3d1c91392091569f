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


@dataclass
class DemonstratorConfig:
    """Probabilities of each imperfection in a demonstration, each in [0, 1] (its ``domain``,
    ``rlhflab.config.Domain``)."""

    p_wrong: float = field(default=0.2, metadata={"help": "states a wrong number", "domain": "[0, 1]"})
    p_sycophancy: float = field(default=0.4, metadata={"help": "agrees with a wrong user", "domain": "[0, 1]"})
    p_over_refusal: float = field(default=0.15, metadata={"help": "refuses a benign request", "domain": "[0, 1]"})
    p_under_refusal: float = field(default=0.15, metadata={"help": "complies with a harmful request", "domain": "[0, 1]"})
    p_keyword: float = field(default=0.1, metadata={"help": "opens with a keyword such as 'certainly ,'", "domain": "[0, 1]"})
    p_filler: float = field(default=0.15, metadata={"help": "opens with a filler sentence", "domain": "[0, 1]"})
    p_padding: float = field(default=0.2, metadata={"help": "ends with one to three filler sentences", "domain": "[0, 1]"})


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
