"""Judges for a win-rate where no gold utility exists: a reward model, a local language model
asked to compare, or a Python callable; and the win-rate, its interval and its
length-controlled version.

Every judge answers ``compare(prompts, completions_a, completions_b)`` with a
``Comparison``: per pair, p_i = P(a is better) in [0, 1] (1/0/0.5 for a hard verdict).

- ``RewardModelJudge`` (``--judge rm:DIR``): p_i = 1 if r(x, a) > r(x, b), 0 if lower, 1/2
  on a tie; the scores' difference is kept (``margins``).
- ``LanguageModelJudge`` (``--judge lm:DIR``): the multiple-choice form of Constitutional AI
  (Bai et al. 2022, section 4.1)::

      Consider the following conversation between a human and an assistant:
      [conversation]
      [question, e.g. "Which response is more helpful?"]
      Options:
      (A) [response]
      (B) [response]
      The answer is: (

  and the normalized probabilities of the continuations "A)" and "B)". Both orders are
  asked, and P(a better) = (P_A(a first) + P_B(a second)) / 2 cancels a preference for a
  position. The position bias itself is reported: the mean probability given to whichever
  response stands first, minus 1/2 (``judge/position_bias``, 0 for an unbiased judge),
  with how often the two orders pick the same response (``judge/order_agreement``).
- ``CallableJudge`` (``--judge py:module:function`` or ``py:file.py:function``):
  ``fn(prompts, completions_a, completions_b[, eos_a, eos_b, ...]) -> list[float]`` of
  P(a better).

``win_rate`` is the mean of p_i with the Wilson interval of ``instruments.win_rate`` (each
p_i in [0, 1], so the interval is conservative); the length-controlled win-rate is
``instruments.win_rate.length_controlled_win_rate`` on the same p_i.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhflab.errors import InputError
from rlhflab.instruments.win_rate import wilson_interval

JUDGE_KINDS = ("rm", "lm", "py")


@dataclass
class Comparison:
    """One judge's verdicts on n pairs (a_i, b_i)."""

    prob_a: list[float]  # P(a_i is better), in [0, 1]
    judge: str  # what judged: "rm:DIR", "lm:DIR", "py:..."
    margins: list[float] | None = None  # RM: r(a) - r(b)
    readings: dict[str, float] = field(default_factory=dict)  # judge/position_bias, ...


def win_rate(prob_a: Sequence[float]) -> dict[str, float]:
    """Mean of p_i with its 95% Wilson interval; ``n`` the pairs."""
    n = len(prob_a)
    if n == 0:
        raise ValueError("no pairs to compare")
    p = float(sum(prob_a) / n)
    low, high = wilson_interval(p, n)
    return {"win_rate": p, "ci_low": low, "ci_high": high, "n": float(n)}


def _text(value: Any) -> str:
    """A prompt or completion as plain text: messages become "Human: ... / Assistant: ..."."""
    if isinstance(value, str):
        return value
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names.get(m.get('role'), m.get('role'))}: {m.get('content')}" for m in value)


# ---------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------


class RewardModelJudge:
    """Hard verdicts from a reward model's scores (see the module docstring)."""

    def __init__(self, rm, name: str = "rm") -> None:
        self.rm, self.name = rm, name

    def compare(self, prompts, completions_a, completions_b, *, eos_a=None, eos_b=None, **columns) -> Comparison:
        ra = self.rm.score(list(prompts), list(completions_a), eos=eos_a or [True] * len(prompts)).double()
        rb = self.rm.score(list(prompts), list(completions_b), eos=eos_b or [True] * len(prompts)).double()
        diff = (ra - rb).tolist()
        prob = [1.0 if m > 0 else 0.0 if m < 0 else 0.5 for m in diff]
        return Comparison(prob, self.name, margins=diff)


PAIRWISE_TEMPLATE = ("Consider the following conversation between a human and an assistant:\n{conversation}\n"
                     "{question}\nOptions:\n(A) {first}\n(B) {second}\n")
ANSWER_PREFIX = "The answer is: ("


class LanguageModelJudge:
    """A local causal LM asked which of two responses is better, in both orders (see the
    module docstring). With a chat template the question is the user's turn and the answer
    prefix starts the assistant's; without one, the text is given as it is."""

    def __init__(self, model, tokenizer, *, question: str = "Which response is more helpful, honest and harmless?",
                 name: str = "lm", batch_size: int = 16, max_length: int | None = None) -> None:
        self.model, self.tokenizer, self.question, self.name = model, tokenizer, question, name
        self.batch_size = batch_size
        self.max_length = max_length
        self.options = [tokenizer("A)", add_special_tokens=False).input_ids,
                        tokenizer("B)", add_special_tokens=False).input_ids]
        if not all(self.options) or self.options[0] == self.options[1]:
            raise InputError(f"the judge's tokenizer ({getattr(tokenizer, 'name_or_path', '')}) cannot tell "
                             f"'A)' from 'B)': it has no tokens for them")

    def prompt_text(self, prompt, first, second, question: str | None = None) -> str:
        body = PAIRWISE_TEMPLATE.format(conversation=_text(prompt), question=question or self.question,
                                        first=_text(first), second=_text(second))
        if getattr(self.tokenizer, "chat_template", None):
            from rlhflab.data import apply_template

            return apply_template([{"role": "user", "content": body}], self.tokenizer,
                                  add_generation_prompt=True) + ANSWER_PREFIX
        return body + ANSWER_PREFIX

    @torch.no_grad()
    def option_probs(self, texts: list[str]) -> torch.Tensor:
        """P(A), P(B) normalized over the two, for each judge prompt.   # (n, 2)"""
        from rlhflab.logprobs import token_logprobs

        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        model.eval()
        scores = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            seqs, spans = [], []
            for t in chunk:
                ids = tok(t, add_special_tokens=not getattr(tok, "chat_template", None)).input_ids
                for opt in self.options:
                    seqs.append(ids + opt)
                    spans.append((len(ids), len(ids) + len(opt)))
            L = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
            attn = torch.zeros((len(seqs), L), dtype=torch.long)
            for i, s in enumerate(seqs):
                input_ids[i, :len(s)] = torch.tensor(s)
                attn[i, :len(s)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attn.to(device)).logits.float()
            lp = token_logprobs(logits, input_ids.to(device))  # (N, L - 1): lp[:, t] is token t + 1's
            for i, (a, b) in enumerate(spans):
                scores.append(float(lp[i, a - 1:b - 1].sum()))
        s = torch.tensor(scores, dtype=torch.float64).view(-1, 2)
        return torch.softmax(s, dim=1)

    def compare(self, prompts, completions_a, completions_b, *, question: str | Sequence[str] | None = None,
                **columns) -> Comparison:
        n = len(prompts)
        qs = [question] * n if question is None or isinstance(question, str) else list(question)
        texts = [self.prompt_text(p, a, b, q) for p, a, b, q in zip(prompts, completions_a, completions_b, qs)]
        texts += [self.prompt_text(p, b, a, q) for p, a, b, q in zip(prompts, completions_a, completions_b, qs)]
        probs = self.option_probs(texts)
        a_first, a_second = probs[:n], probs[n:]
        p_a = 0.5 * (a_first[:, 0] + a_second[:, 1])  # a as (A) in the first order, as (B) in the second
        first_pick = 0.5 * (a_first[:, 0] + a_second[:, 0])  # what the position "first" receives
        agree = ((a_first[:, 0] > 0.5) == (a_second[:, 1] > 0.5)).double()
        readings = {"judge/position_bias": float(first_pick.mean() - 0.5),
                    "judge/order_agreement": float(agree.mean())}
        return Comparison(p_a.tolist(), self.name, readings=readings)


class CallableJudge:
    """A Python function ``fn(prompts, completions_a, completions_b, **columns)`` returning,
    per pair, P(a better) in [0, 1]; anything else is an error naming the function."""

    def __init__(self, fn: Callable, name: str) -> None:
        import inspect

        self.fn, self.name = fn, name
        try:
            params = inspect.signature(fn).parameters
            self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
            self.names = set(params)
        except (TypeError, ValueError):
            self.takes_all, self.names = False, set()

    def compare(self, prompts, completions_a, completions_b, **columns) -> Comparison:
        """``columns`` (``eos_a``, ``eos_b``, the rows' other columns) reach the function when
        it names them or takes ``**kwargs``."""
        kwargs = {k: v for k, v in columns.items() if self.takes_all or k in self.names}
        out = list(self.fn(list(prompts), list(completions_a), list(completions_b), **kwargs))
        if len(out) != len(prompts):
            raise InputError(f"judge {self.name} returned {len(out)} values for {len(prompts)} pairs")
        for v in out:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0) \
                    or math.isnan(float(v)):
                raise InputError(f"judge {self.name} returned {v!r}; expected P(a better) in [0, 1]")
        return Comparison([float(v) for v in out], self.name)


def parse_judge(spec: str) -> tuple[str, str]:
    """``rm:DIR`` / ``lm:DIR`` / ``py:module:function`` / ``py:file.py:function`` -> (kind,
    rest); anything else is an InputError naming ``--judge``."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in JUDGE_KINDS or not rest:
        raise InputError(f"expected rm:DIR, lm:DIR or py:module:function, got {spec!r}", field="--judge")
    return kind, rest


def load_judge(spec: str, *, trust_remote_code: bool = False, question: str | None = None):
    """The judge a ``--judge`` spec names (models load on CPU or the default device)."""
    kind, rest = parse_judge(spec)
    if kind == "rm":
        from rlhflab.reward_model import RewardModel

        return RewardModelJudge(RewardModel.load(rest), name=spec)
    if kind == "lm":
        from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir

        path = resolve_model_dir(rest, "--judge")
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_causal_lm(path, tok, trust_remote_code=trust_remote_code)
        kwargs = {"question": question} if question else {}
        return LanguageModelJudge(model, tok, name=spec, **kwargs)
    from rlhflab.rewards import load_callable

    return CallableJudge(load_callable(rest, flag="--judge", what="judge", spec=spec), name=spec)
