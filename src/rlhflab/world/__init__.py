"""The built-in simulated-human world: the embedded default data source and the lab in which
every instrument can be checked against the truth.

- ``tasks``: prompt families and their ideal answers;
- ``gold``: the gold utility g, what the simulated human truly wants;
- ``labeler``: noisy, biased raters voting by Bradley-Terry on g plus biases;
- ``demonstrator``: imperfect SFT demonstrations;
- ``tokenizer``: the world's word-level HF tokenizer;
- ``export``: ``rlhflab world --out DIR``, everything as TRL-format JSONL.

Everything is deterministic given ``WorldConfig.seed``; each split draws from its own
stream, so growing one split never changes another.
"""

from __future__ import annotations

import random

from rlhflab.seeds import derive_seed
from rlhflab.world.demonstrator import demonstrate
from rlhflab.world.gold import gold_utility, is_well_formed
from rlhflab.world.labeler import RaterPanel
from rlhflab.world.tasks import FAMILIES, Prompt, make_prompt, parse_prompt
from rlhflab.world.tokenizer import build_tokenizer

__all__ = ["World", "Prompt", "gold_utility", "is_well_formed", "parse_prompt", "FAMILIES"]


def _stream_seed(seed: int, name: str) -> int:
    return derive_seed(seed, name, bits=64)


class World:
    """Draws prompts, demonstrations and rated comparisons from a :class:`WorldConfig`."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        weights = {f: float(cfg.family_weights.get(f, 0.0)) for f in FAMILIES}
        if sum(weights.values()) <= 0:
            raise ValueError("world.family_weights must give some family a positive weight")
        self.families = [f for f in FAMILIES if weights[f] > 0]
        self.weights = [weights[f] for f in self.families]

    def rng(self, name: str) -> random.Random:
        return random.Random(_stream_seed(self.cfg.seed, name))

    def prompts(self, n: int, split: str, family: str | None = None) -> list[Prompt]:
        """``n`` prompts of one split ("sft", "pref", "rl", "eval", ...), mixed or of one family."""
        rng = self.rng(f"prompts/{split}/{family or 'mix'}")
        out = []
        for _ in range(n):
            fam = family or rng.choices(self.families, self.weights)[0]
            out.append(make_prompt(rng, fam, max_operand=self.cfg.max_operand))
        return out

    def sft_examples(self, n: int, split: str = "sft") -> list[dict]:
        """TRL prompt/completion rows written by the demonstrator."""
        rng = self.rng(f"demos/{split}")
        return [
            {"prompt": p.text, "completion": demonstrate(p, rng, self.cfg.demonstrator)}
            for p in self.prompts(n, split)
        ]

    def preference_pairs(self, n: int, split: str = "pref") -> list[dict]:
        """Off-policy comparisons: two different demonstrations of a prompt, rated by the panel.

        Rows are TRL preference rows (``prompt``/``chosen``/``rejected``) plus ``votes``
        (1 = voted for the row's chosen) where chosen is the majority's pick.
        """
        rng = self.rng(f"pairs/{split}")
        panel = RaterPanel(self.cfg.rater, seed=_stream_seed(self.cfg.seed, f"raters/{split}"))
        rows = []
        for p in self.prompts(n, split):
            a = demonstrate(p, rng, self.cfg.demonstrator)
            b = a
            for _ in range(20):  # a different second response where the prompt allows one
                b = demonstrate(p, rng, self.cfg.demonstrator)
                if b != a:
                    break
            if a == b:
                continue
            votes = panel.compare(p, a, b)
            if 2 * sum(votes) < len(votes) or (2 * sum(votes) == len(votes) and rng.random() < 0.5):
                a, b, votes = b, a, [1 - v for v in votes]
            rows.append({"prompt": p.text, "chosen": a, "rejected": b, "votes": votes})
        return rows

    def tokenizer(self, model_max_length: int = 128):
        return build_tokenizer(self.cfg.max_operand, model_max_length)

    def gold(self, prompt: str | Prompt, response: str, eos: bool = True) -> float:
        return gold_utility(prompt, response, eos)
