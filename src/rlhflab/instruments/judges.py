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
  A principle can be given per comparison (``principles``: its ``comparison`` question is
  asked, Bai et al. 2022 sample one per comparison). An answer that cannot be read is
  counted, never scored as a tie: at the answer position, the likelier of the two letters'
  first tokens must be at least ``min_option_ratio`` (default 1) times as likely as every
  other token of the vocabulary together; otherwise the pair's P(a better) is NaN, it is
  left out of the win-rate, and ``judge/unreadable`` counts it (``judge/unreadable_rate``
  its share; either order unreadable makes the pair unreadable).
- ``WorldLabelerJudge`` (``--judge world:ai``): the world's AI labeller
  (``world.ai_labeler``) under a constitution, asked in both orders like the LM judge.
- ``CallableJudge`` (``--judge py:module:function`` or ``py:file.py:function``, or the
  function itself through ``rlhflab.api``):
  ``fn(prompts, completions_a, completions_b[, eos_a, eos_b, ...]) -> list[float]`` of
  P(a better).

``win_rate`` is the mean of the readable p_i with the Wilson interval of ``instruments.win_rate`` (each
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
from rlhflab.registry import JUDGE_KINDS


@dataclass
class Comparison:
    """One judge's verdicts on n pairs (a_i, b_i)."""

    prob_a: list[float]  # P(a_i is better), in [0, 1]; NaN where the answer could not be read
    judge: str  # what judged: "rm:DIR", "lm:DIR", "py:...", "world:ai"
    margins: list[float] | None = None  # RM: r(a) - r(b)
    readings: dict[str, float] = field(default_factory=dict)  # judge/position_bias, ...
    principles: list[str] | None = None  # the principle asked per pair, where one was

    @property
    def readable(self) -> list[bool]:
        return [not math.isnan(p) for p in self.prob_a]


def win_rate(prob_a: Sequence[float]) -> dict[str, float]:
    """Mean of the readable p_i with its 95% Wilson interval; ``n`` the readable pairs,
    ``unreadable`` the pairs whose answer could not be read (NaN), left out."""
    kept = [float(p) for p in prob_a if not math.isnan(p)]
    n = len(kept)
    if n == 0:
        raise ValueError("no readable pairs to compare" if prob_a else "no pairs to compare")
    p = float(sum(kept) / n)
    low, high = wilson_interval(p, n)
    return {"win_rate": p, "ci_low": low, "ci_high": high, "n": float(n), "unreadable": float(len(prob_a) - n)}


def both_orders(first_a: Sequence[float], first_b: Sequence[float], readable: Sequence[bool]) -> tuple[list, dict]:
    """P(a better) from two orders of one question, and the judge's readings.

    ``first_a[i]``: P(first option) with a first; ``first_b[i]``: P(first option) with b first;
    ``readable[i]``: both answers could be read. p_i = (first_a + (1 - first_b)) / 2; the
    position bias is the mean P given to whichever stands first, minus 1/2."""
    p_a, first, agree = [], [], []
    for fa, fb, ok in zip(first_a, first_b, readable):
        if not ok:
            p_a.append(float("nan"))
            continue
        p_a.append(0.5 * (fa + (1.0 - fb)))
        first.append(0.5 * (fa + fb))
        agree.append(float((fa > 0.5) == (fb < 0.5)))
    n = len(p_a)
    readings = {"judge/unreadable": float(n - len(first)), "judge/unreadable_rate": (n - len(first)) / n if n else 0.0}
    if first:
        readings.update({"judge/position_bias": sum(first) / len(first) - 0.5,
                         "judge/order_agreement": sum(agree) / len(agree)})
    return p_a, readings


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
                 name: str = "lm", batch_size: int = 16, max_length: int | None = None,
                 min_option_ratio: float = 1.0) -> None:
        self.model, self.tokenizer, self.question, self.name = model, tokenizer, question, name
        self.min_option_ratio = min_option_ratio
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
    def option_probs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(A), P(B) normalized over the two, # (n, 2); whether the answer is readable, # (n,)).

        Readable: max(P(A), P(B)) >= min_option_ratio * (1 - P(A) - P(B)), with P(A), P(B)
        the model's probabilities of the letters' first tokens at the answer position over its
        whole vocabulary (the rest, 1 - P(A) - P(B), is every other token); where the two
        options share their first token, of the whole continuations "A)" and "B)"."""
        from rlhflab.generation import fit_prompts, prompt_room
        from rlhflab.logprobs import token_logprobs

        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        model.eval()
        scores, firsts = [], []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            seqs, spans = [], []
            encoded = [tok(t, add_special_tokens=not getattr(tok, "chat_template", None)).input_ids for t in chunk]
            # the question and the answer's letter must fit the model's positions: a text too
            # long loses its start (said on stderr), as a prompt the engine samples from does
            letters = max(len(o) for o in self.options)
            for ids in fit_prompts(encoded, prompt_room(model, letters), letters):
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
            lp = token_logprobs(logits, input_ids.to(device))  # (N, L): lp[:, t] is token t's (column 0 is 0)
            for i, (a, b) in enumerate(spans):
                scores.append(float(lp[i, a:b].sum()))
                firsts.append(float(lp[i, a]))
        s = torch.tensor(scores, dtype=torch.float64).view(-1, 2)
        same_first = self.options[0][0] == self.options[1][0]
        mass = (s if same_first else torch.tensor(firsts, dtype=torch.float64).view(-1, 2)).exp()
        readable = mass.max(dim=1).values >= self.min_option_ratio * (1.0 - mass.sum(dim=1)).clamp(min=0.0)
        return torch.softmax(s, dim=1), readable

    def compare(self, prompts, completions_a, completions_b, *, question: str | Sequence[str] | None = None,
                principles: Sequence | None = None, **columns) -> Comparison:
        """``principles``: one per pair, whose ``comparison`` question is asked (else ``question``)."""
        n = len(prompts)
        if principles is not None:
            qs = [p.comparison for p in principles]
        else:
            qs = [question] * n if question is None or isinstance(question, str) else list(question)
        texts = [self.prompt_text(p, a, b, q) for p, a, b, q in zip(prompts, completions_a, completions_b, qs)]
        texts += [self.prompt_text(p, b, a, q) for p, a, b, q in zip(prompts, completions_a, completions_b, qs)]
        probs, readable = self.option_probs(texts)
        ok = (readable[:n] & readable[n:]).tolist()
        p_a, readings = both_orders(probs[:n, 0].tolist(), probs[n:, 0].tolist(), ok)
        return Comparison(p_a, self.name, readings=readings,
                          principles=[p.id for p in principles] if principles is not None else None)


class WorldLabelerJudge:
    """The world's AI labeller (``world.ai_labeler.AILabeler``) as a judge: world prompts
    only, a principle per pair (sampled from its constitution when none is given), both
    orders asked and averaged as for the LM judge."""

    def __init__(self, labeler, name: str = "world:ai", seed: int = 0) -> None:
        import random

        self.labeler, self.name = labeler, name
        self.rng = random.Random(seed)

    def compare(self, prompts, completions_a, completions_b, *, principles: Sequence | None = None,
                eos_a=None, eos_b=None, **columns) -> Comparison:
        from rlhflab.world.tasks import parse_prompt

        n = len(prompts)
        eos_a, eos_b = eos_a or [True] * n, eos_b or [True] * n
        if principles is None:
            principles = [self.labeler.constitution.sample(self.rng) for _ in range(n)]
        first_a, first_b, ok = [], [], []
        for x, a, b, pr, ea, eb in zip(prompts, completions_a, completions_b, principles, eos_a, eos_b):
            prompt = parse_prompt(_text(x))
            if prompt is None:
                raise InputError(f"the world's labeller judges world prompts only, got {_text(x)[:60]!r}",
                                 field="prompt")
            fa, ma = self.labeler.answer(prompt, a, b, pr, ea, eb)
            fb, mb = self.labeler.answer(prompt, b, a, pr, eb, ea)
            first_a.append(fa)
            first_b.append(fb)
            # the same readability rule as the LM judge, on the labeller's letter mass
            ok.append(all(max(p, 1 - p) * m >= 1.0 - m for p, m in ((fa, ma), (fb, mb))))
        p_a, readings = both_orders(first_a, first_b, ok)
        return Comparison(p_a, self.name, readings=readings, principles=[p.id for p in principles])


class CallableJudge:
    """A Python function ``fn(prompts, completions_a, completions_b, **columns)`` returning,
    per pair, P(a better) in [0, 1]; anything else is an error naming the function."""

    def __init__(self, fn: Callable, name: str) -> None:
        import inspect

        self.fn, self.name = fn, name
        self.calls = 0  # calls so far: a failure names its call
        try:
            params = inspect.signature(fn).parameters
            self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
            self.names = set(params)
        except (TypeError, ValueError):
            self.takes_all, self.names = False, set()

    def compare(self, prompts, completions_a, completions_b, **columns) -> Comparison:
        """``columns`` (``eos_a``, ``eos_b``, the rows' other columns) reach the function when
        it names them or takes ``**kwargs``. Whatever the function does wrong (raises, exits,
        returns anything but one P per pair) is one ``rewards.UserCodeError`` naming it and
        the call (``rewards.call_user``, ``rewards.user_values``)."""
        from rlhflab.rewards import UserCodeError, call_user, user_values

        kwargs = {k: v for k, v in columns.items() if self.takes_all or k in self.names}
        self.calls += 1
        n = len(prompts)
        where = dict(what="judge", name=self.name, call=self.calls, batch=f"batch of {n} pairs")
        out = call_user(self.fn, (list(prompts), list(completions_a), list(completions_b)), kwargs,
                        arg_names=("prompts", "completions_a", "completions_b"), **where)
        values = user_values(out, n, unit="pair", numbers_are="values of P(a better) in [0, 1]", **where)
        for i, v in enumerate(values):
            if not 0.0 <= v <= 1.0:  # NaN fails this too
                raise UserCodeError(f"judge {self.name} returned {v!r} at position {i} on call {self.calls} "
                                    f"(batch of {n} pairs); expected P(a better) in [0, 1]")
        return Comparison(values, self.name)


def judge_name(judge) -> str:
    """How a judge is named in logs and ``run.json``: its spec, or ``<python fn>`` for a
    callable or a judge object given through the Python API."""
    if isinstance(judge, str):
        return judge
    if hasattr(judge, "compare"):
        return getattr(judge, "name", None) or f"<python {type(judge).__name__}>"
    return f"<python {getattr(judge, '__qualname__', None) or type(judge).__name__}>"


def parse_judge(spec) -> tuple[str, str]:
    """``rm:DIR`` / ``lm:DIR`` / ``py:module:function`` / ``py:file.py:function`` /
    ``world:ai`` -> (kind, rest); a Python callable or a judge object (anything with
    ``compare``) -> ("py", its name). Anything else is an InputError naming ``--judge``."""
    if not isinstance(spec, str):
        if callable(spec) or callable(getattr(spec, "compare", None)):
            return "py", judge_name(spec)
        raise InputError(f"expected a judge spec (rm:DIR, ...), a callable or a judge, got {type(spec).__name__}",
                         field="--judge")
    if spec.startswith("<python "):  # recorded in run.json for a callable: not something to reload
        raise InputError(f"the run was given a Python judge ({spec}); give it again from Python, e.g. "
                         "rlhflab.api.rl(..., judge=fn, resume=True)", field="--judge")
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in JUDGE_KINDS or not rest or (kind == "world" and rest != "ai"):
        raise InputError(f"expected rm:DIR, lm:DIR, py:module:function or world:ai, got {spec!r}", field="--judge")
    return kind, rest


def load_judge(spec, *, trust_remote_code: bool = False, question: str | None = None,
               constitution=None, labeler_cfg=None, seed: int = 0):
    """The judge a ``--judge`` spec names (models load on CPU or the default device);
    ``world:ai`` labels under ``constitution`` (default ``configs/constitution.yaml``). Through
    the Python API: a callable ``fn(prompts, completions_a, completions_b, **columns) ->
    list[P(a better)]`` becomes a ``CallableJudge``, and a judge object (with ``compare``) is
    used as it is."""
    kind, rest = parse_judge(spec)
    if not isinstance(spec, str):
        return spec if callable(getattr(spec, "compare", None)) else CallableJudge(spec, name=rest)
    if kind == "world":
        from rlhflab.constitution import load_constitution
        from rlhflab.world.ai_labeler import AILabeler

        return WorldLabelerJudge(AILabeler(constitution or load_constitution(), labeler_cfg), name=spec, seed=seed)
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
