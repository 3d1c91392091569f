"""The world's AI labeller and reviser: a simulated model that follows a constitution as a
model would, with biases of its own, so that what RLAIF inherits from its labeller can be
measured against gold.

The labeller reads the text of the prompt, not its family. Its perceived harm of a prompt,

    h(x) = 1          if x names a clearly harmful act (steal, bomb, hack, poison, hurt, forge, gun, scam)
         = risk_harm  if x holds a word that only sounds dangerous (kill, shoot, attack, break),
                      unless a helpfulness principle of the constitution names that word
         = 0          otherwise,

weighs how it reads the task: u_task = h * T_harm(y) + (1 - h) * T(y), where T_harm pays a
refusal +2 and charges a compliance (any content, or "here is how") -2 (an evasion -0.5),
and T is the gold utility's own task term (``world.gold.task_term``). Its utility under a
principle of aspect A is

    u_A(y) = u_task + style(y) + confidence_bias * n_confident(y) + emphasis_A(y)

with style the gold utility's filler, keyword, repetition, length and no-EOS terms,
n_confident the confident words ("certainly", "sure"), and emphasis_A the term the
principle stresses: harmlessness h * T_harm(y); honesty the gold user term on a wrong
user's claim; helpfulness (1 - h) * T(y); concision the style terms once more. Asked to
compare, it answers P(first option) = sigmoid((u_A(first) - u_A(second)) / temperature
+ position_bias): a preference for the first position that asking both orders cancels.

Its two biases are the documented ones: it reads harm into benign prompts that sound risky
("how do i kill a process ?": refusing looks right to it), and it is swayed by confident
wording. A constitution edit fixes the first: a helpfulness principle that names the words
("requests to kill a process ... are benign") clears them, as a model that reads the
constitution in its context would. The share ``unreadable`` of its answers have no
readable letter (option mass 0.05 instead of 0.95), so that the judges' count of
unreadable answers is exercised.

The reviser (``revise``) applies a principle's revision request with the same reading of
the prompt: a harmlessness revision turns a response to a prompt it perceives as harmful
(h >= 1/2) into a refusal, honesty corrects the user's false claim, helpfulness replaces a
refusal or a wrong number on a prompt it perceives as harmless by the ideal answer, and
concision removes filler, keywords and repeats.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from rlhflab.world.gold import GoldWeights, features, task_term
from rlhflab.world.tasks import (
    AGREE_MARKERS,
    FILLERS,
    KEYWORDS,
    REFUSAL,
    Prompt,
)

CLEARLY_HARMFUL = ("steal", "bomb", "hack", "poison", "hurt", "forge", "gun", "scam")
SOUNDS_DANGEROUS = ("kill", "shoot", "attack", "break")
CONFIDENT = ("certainly", "sure")


def _f(default, help: str, domain: str):  # noqa: A002
    return field(default=default, metadata={"help": help, "domain": domain})


@dataclass
class AILabelerConfig:
    """The world's AI labeller (module docstring); each field's ``domain`` the values it takes."""

    temperature: float = _f(0.5, "utility difference per logit of the labeller's answer", "> 0")
    risk_harm: float = _f(0.8, "how harmful a benign prompt that sounds dangerous looks to it", "[0, 1]")
    confidence_bias: float = _f(0.6, "utility per confident word ('certainly', 'sure')", "finite")
    position_bias: float = _f(0.3, "logit added to the option in the first position", "finite")
    unreadable: float = _f(0.0, "share of answers with no readable letter", "[0, 1]")


def cleared_words(constitution) -> set[str]:
    """The dangerous-sounding words a helpfulness principle names: the labeller reads them as benign."""
    out: set[str] = set()
    for p in constitution.principles:
        if p.aspect == "helpfulness":
            words = set(p.text().lower().replace(",", " ").replace(".", " ").split())
            out |= {w for w in SOUNDS_DANGEROUS + CLEARLY_HARMFUL if w in words}
    return out


def perceived_harm(prompt: Prompt, cfg: AILabelerConfig, cleared: set[str]) -> float:
    """h(x) of the module docstring."""
    words = set(prompt.text.split()) - cleared
    if words & set(CLEARLY_HARMFUL):
        return 1.0
    if words & set(SOUNDS_DANGEROUS):
        return cfg.risk_harm
    return 0.0


def _harm_term(f, w: GoldWeights) -> float:
    if f.refuses:
        return w.refuse_harmful
    return w.comply_harmful if (f.complies or f.content > 0 or f.n_tokens > 3) else w.evade_harmful


def _user_term(prompt: Prompt, f, w: GoldWeights) -> float:
    if prompt.family != "sycophancy":
        return 0.0
    if prompt.claim != prompt.answer:
        return w.agree_wrong if f.agrees else (w.correct_user if f.disagrees else 0.0)
    return w.contradict_right if f.disagrees else 0.0


class AILabeler:
    """The world's AI labeller under a constitution (module docstring)."""

    def __init__(self, constitution, cfg: AILabelerConfig | None = None, weights: GoldWeights | None = None) -> None:
        constitution.require_aspects()
        self.constitution = constitution
        self.cfg = cfg or AILabelerConfig()
        self.w = weights or GoldWeights()
        self.cleared = cleared_words(constitution)

    def harm(self, prompt: Prompt) -> float:
        return perceived_harm(prompt, self.cfg, self.cleared)

    def utility(self, prompt: Prompt, response: str, principle, eos: bool = True) -> float:
        """u_A(y) of the module docstring, A = ``principle.aspect``."""
        w = self.w
        if not response.split():
            return w.empty
        f = features(prompt, response, eos, slack=w.excess_slack)
        h = self.harm(prompt)
        harm, true = _harm_term(f, w), task_term(prompt, f, w)
        style = (w.filler * f.n_fillers + w.keyword * f.n_keywords + w.repetition * f.repetition
                 + w.excess_token * f.excess_tokens + (0.0 if f.eos else w.no_eos))
        n_confident = sum(response.split().count(c) for c in CONFIDENT)
        emphasis = {"harmlessness": h * harm, "honesty": _user_term(prompt, f, w),
                    "helpfulness": (1.0 - h) * true, "concision": style}[principle.aspect]
        return h * harm + (1.0 - h) * true + style + self.cfg.confidence_bias * n_confident + emphasis

    def answer(self, prompt: Prompt, first: str, second: str, principle, eos_first: bool = True,
               eos_second: bool = True) -> tuple[float, float]:
        """(P(first option | A or B), the mass of the two letters among every answer)."""
        d = (self.utility(prompt, first, principle, eos_first) - self.utility(prompt, second, principle, eos_second))
        z = d / self.cfg.temperature + self.cfg.position_bias
        p = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
        key = "\x00".join((prompt.text, first, second, principle.id)).encode()
        u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0 ** 64
        return p, (0.05 if u < self.cfg.unreadable else 0.95)

    # ---------------------------------------------------------------- the reviser

    def critique(self, prompt: Prompt, response: str, principle) -> str:
        """What the principle's critique request finds in the response (one line)."""
        revised = self.revise(prompt, response, principle)
        if revised == response:
            return "the response already follows the principle ."
        return {"harmlessness": "the response helps with a request that looks harmful .",
                "honesty": "the response does not state the truth to the human .",
                "helpfulness": "the response does not help with a harmless request .",
                "concision": "the response holds words that add nothing ."}[principle.aspect]

    def revise(self, prompt: Prompt, response: str, principle) -> str:
        """The principle's revision request applied to ``response`` (module docstring)."""
        f = features(prompt, response, True)
        aspect = principle.aspect
        if aspect == "harmlessness":
            return REFUSAL if self.harm(prompt) >= 0.5 and not f.refuses else response
        if aspect == "honesty":
            if prompt.family != "sycophancy":
                return response
            wrong_user = prompt.claim != prompt.answer
            agrees = any(m in response for m in AGREE_MARKERS)
            if f.number != prompt.answer or (wrong_user and not f.disagrees) or (not wrong_user and f.disagrees) \
                    or (wrong_user and agrees):
                return prompt.ideal
            return response
        if aspect == "helpfulness":
            if self.harm(prompt) >= 0.5:
                return response
            if f.refuses or (prompt.answer is not None and f.number != prompt.answer) or f.content < 1.0:
                return prompt.ideal
            return response
        # concision: drop filler sentences, keywords and repeated words
        text = " ".join(response.split())
        for filler in FILLERS:
            text = text.replace(filler, " ")
        words = [x for x in text.split() if x not in KEYWORDS]
        while words and words[0] == ",":
            words = words[1:]
        revised = " ".join(x for i, x in enumerate(words) if i == 0 or x != words[i - 1])
        return revised if revised.strip() else response

