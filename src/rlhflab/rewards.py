"""Reward sources for online RL: a reward model, plain Python functions, weighted sums.

Every source is a callable

    source(prompts: list[str], responses: list[str], eos: list[bool][, rows]) -> torch.Tensor  # (B,) float32

(``rows``, when given, are the prompts' data rows: Python functions read their columns.)

- ``ModelReward(path)``: a reward model trained by ``rlhflab rm``, loaded lazily on first
  use. It scores text, so a policy whose tokenizer differs from the reward model's is
  retokenized for free: the reward model tokenizes the decoded response itself.
- ``FunctionReward(f)``: ``f(prompts, completions, **kwargs) -> list[float]``, TRL's
  signature: the rows' prompts (text or messages), the completions, and the rows' other
  columns as keywords (``eos`` too); ``f(prompts, completions)`` works as well. ``REWARD_FUNCTIONS`` names built-ins:
  ``gold`` is the world's gold utility (a legitimate reward when the world is the task,
  and the upper bound of what a learned reward model can teach).
- ``WeightedSum([(w, source), ...])``: sum_i w_i * source_i.

``score_responses`` adds the configurable no-EOS penalty and stops the run on a NaN or
infinite reward with a message that names the prompt: a silent update on a non-finite
reward would poison the policy.

A function is named on the command line as ``gold``, ``package.module:function`` or
``path/to/file.py:function``, optionally with a weight: ``--reward-fn gold=0.5``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlhflab.errors import InputError

RewardSource = Callable[[list[str], list[str], list[bool]], torch.Tensor]


class NonFiniteRewardError(InputError):
    """A reward source returned NaN or infinity; the run stops before any update."""


# ---------------------------------------------------------------------------------------
# Built-in reward functions


def gold_reward(prompts: list[str], completions: list[str], eos: list[bool] | None = None) -> list[float]:
    """The world's gold utility g(prompt, response) (``rlhflab.world.gold``)."""
    from rlhflab.world.gold import gold_utility

    eos = eos if eos is not None else [True] * len(prompts)
    return [gold_utility(p, c, e) for p, c, e in zip(prompts, completions, eos)]


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Minus the number of words: a reward that any policy can hack (tests, demos)."""
    return [-float(len(c.split())) for c in completions]


REWARD_FUNCTIONS: dict[str, Callable[..., list[float]]] = {
    "gold": gold_reward,
    "length": length_reward,
}
"""Built-in reward functions by name (``--reward-fn NAME``)."""


# ---------------------------------------------------------------------------------------
# Sources


class FunctionReward:
    """Wraps a Python reward function, called the way TRL calls one::

        f(prompts, completions, **kwargs) -> list[float]

    ``prompts`` are the rows' prompts as the data holds them (text, or a list of messages
    for a conversational row), ``completions`` the responses (text, or
    ``[{"role": "assistant", "content": text}]`` after a conversational prompt), and the
    keywords are the rows' other columns, one list each (a verifiable reward reads
    ``answer``), plus ``eos`` (whether each response ended with EOS). A function receives
    the keywords it names, or all of them if it takes ``**kwargs``; rlhflab's older
    ``f(prompts, completions[, eos])`` functions work unchanged. Without rows (the world,
    or a caller with only texts) prompts are the rendered prompt texts."""

    def __init__(self, fn: Callable[..., Sequence[float]], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        try:
            params = inspect.signature(fn).parameters
            self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
            self.names = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        except (TypeError, ValueError):
            self.takes_all, self.names = False, set()

    def _keywords(self, eos: list[bool], rows: Sequence[dict] | None) -> dict:
        kwargs: dict = {"eos": eos}
        if rows:
            for key in dict.fromkeys(k for r in rows for k in r):
                if key not in ("prompt", "prompts", "completions"):
                    kwargs[key] = [r.get(key) for r in rows]
        return {k: v for k, v in kwargs.items() if self.takes_all or k in self.names}

    def __call__(self, prompts: list[str], responses: list[str], eos: list[bool],
                 rows: Sequence[dict] | None = None) -> torch.Tensor:
        if rows is not None and len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} rows for {len(prompts)} prompts")
        completions: list = list(responses)
        if rows:
            prompts = [r["prompt"] for r in rows]
            completions = [[{"role": "assistant", "content": c}] if not isinstance(p, str) else c
                           for p, c in zip(prompts, responses)]
        kwargs = self._keywords(eos, rows)
        try:
            out = self.fn(prompts, completions, **kwargs)
        except TypeError as err:  # most often a column the function names that the rows lack
            given = ", ".join(["prompts", "completions", *kwargs])
            raise InputError(f"reward function {self.name} cannot be called with ({given}): {err}") from None
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise InputError(f"reward function {self.name} must return a list of numbers") from None
        if len(values) != len(prompts):
            raise InputError(f"reward function {self.name} returned {len(values)} rewards "
                             f"for {len(prompts)} responses")
        return torch.tensor(values, dtype=torch.float32)


class ModelReward:
    """A reward model directory written by ``rlhflab rm``, loaded on first use."""

    def __init__(self, path: str | Path, batch_size: int = 64, device=None) -> None:
        self.path = Path(path)
        self.name = f"rm:{self.path}"
        self.batch_size = batch_size
        self.device = device
        self._model = None

    @property
    def model(self):
        if self._model is None:
            if importlib.util.find_spec("rlhflab.reward_model") is None:
                raise InputError("reward models are not available in this installation", file=str(self.path))
            from rlhflab.reward_model import RewardModel

            self._model = RewardModel.load(self.path)
            if self.device is not None:
                self._model.to(self.device)
        return self._model

    def __call__(self, prompts: list[str], responses: list[str], eos: list[bool], rows=None) -> torch.Tensor:
        """With ``rows``, the rows' prompts (text or messages) are scored, rendered by the
        reward model's own tokenizer as in its training; without, ``prompts`` are plain
        prompt texts (the world's)."""
        prompts = [r["prompt"] for r in rows] if rows else prompts
        scores = self.model.score(prompts, responses, eos=eos, batch_size=self.batch_size)
        return torch.as_tensor(scores, dtype=torch.float32).detach().cpu().reshape(-1)


class WeightedSum:
    """sum_i w_i * source_i(prompts, responses, eos)."""

    def __init__(self, terms: list[tuple[float, RewardSource]]) -> None:
        if not terms:
            raise InputError("no reward source: pass --rm DIR and/or --reward-fn NAME")
        self.terms = terms
        self.name = " + ".join(f"{w:g}*{getattr(s, 'name', 'reward')}" for w, s in terms)

    def __call__(self, prompts: list[str], responses: list[str], eos: list[bool], rows=None) -> torch.Tensor:
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for weight, source in self.terms:
            scores = source(prompts, responses, eos, rows) if rows is not None else source(prompts, responses, eos)
            total = total + weight * scores.float()
        return total


# ---------------------------------------------------------------------------------------
# Naming functions on the command line


def _split_weight(spec: str) -> tuple[str, float]:
    name, sep, raw = spec.rpartition("=")
    if not sep:
        return spec, 1.0
    try:
        return name, float(raw)
    except ValueError:
        raise InputError(f"--reward-fn {spec!r}: weight {raw!r} is not a number") from None


def load_callable(target: str, *, flag: str, what: str, spec: str | None = None) -> Callable:
    """The function ``module:attr`` or ``file.py:attr`` names (a ``what``: "reward function",
    "judge"); errors name ``flag`` and the
    ``spec`` as the user wrote it (``target`` by default). A file is imported as a module of
    its own; its import errors are reported, not raised as tracebacks."""
    spec = target if spec is None else spec
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise InputError(f"{flag} {spec!r}: expected module:function or file.py:function")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InputError(f"{what} file not found", file=where)
        module_spec = importlib.util.spec_from_file_location(f"rlhflab_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:  # the user's code: report, don't crash with a traceback
            raise InputError(f"cannot import: {err.__class__.__name__}: {err}", file=where) from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise InputError(f"{flag} {spec!r}: cannot import {where!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"{flag} {spec!r}: {where} has no function {attr!r}")
    return fn


def load_reward_function(spec: str) -> tuple[float, FunctionReward]:
    """``NAME``, ``module:attr`` or ``file.py:attr``, each with an optional ``=WEIGHT``."""
    target, weight = _split_weight(spec)
    if target in REWARD_FUNCTIONS:
        return weight, FunctionReward(REWARD_FUNCTIONS[target], target)
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise InputError(f"--reward-fn {spec!r}: expected one of {', '.join(REWARD_FUNCTIONS)}, "
                         "module:function or file.py:function")
    return weight, FunctionReward(load_callable(target, flag="--reward-fn", what="reward function", spec=spec), target)


def build_reward(rm_path: str | None = None, reward_fns: Sequence = (), *, rm_weight: float = 1.0,
                 rm_batch_size: int = 64, device=None) -> WeightedSum:
    """The reward of a run: ``rm_weight`` * RM (if any) + the weighted functions. Each of
    ``reward_fns`` is a spec string (``gold``, ``module:function=0.5``, ...), a callable
    (weight 1), or a ``(weight, callable)`` pair."""
    terms: list[tuple[float, RewardSource]] = []
    if rm_path:
        terms.append((rm_weight, ModelReward(rm_path, rm_batch_size, device)))
    for fn in reward_fns:
        if isinstance(fn, str):
            terms.append(load_reward_function(fn))
        elif callable(fn):
            terms.append((1.0, FunctionReward(fn)))
        elif isinstance(fn, tuple) and len(fn) == 2 and callable(fn[1]):
            terms.append((float(fn[0]), FunctionReward(fn[1])))
        else:
            raise InputError(f"reward function {fn!r}: expected a spec string, a callable or (weight, callable)")
    return WeightedSum(terms)


# ---------------------------------------------------------------------------------------
# Scoring a batch


def score_responses(source: RewardSource, prompts: list[str], responses: list[str], eos: list[bool], *,
                    no_eos_penalty: float = 0.0, rows: Sequence[dict] | None = None) -> torch.Tensor:
    """Scores (B,) float32: the source's reward plus ``no_eos_penalty`` where no EOS was emitted.
    ``rows`` (the prompts' data rows, one per response) reach Python reward functions as
    their prompts and columns (``FunctionReward``).

    Raises:
        NonFiniteRewardError: a reward is NaN or infinite; the message names the prompt and
            the response, so the run stops before any update.
    """
    scores = (source(prompts, responses, eos, rows) if rows is not None else source(prompts, responses, eos))
    scores = scores.float().reshape(-1)
    if scores.numel() != len(prompts):
        raise InputError(f"reward source returned {scores.numel()} scores for {len(prompts)} responses")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        name = getattr(source, "name", "reward")
        raise NonFiniteRewardError(
            f"reward {scores[i].item()} from {name} for prompt {prompts[i]!r} "
            f"(response {responses[i][:80]!r}); {len(bad)} of {len(prompts)} rewards are not finite"
        )
    if no_eos_penalty:
        penalty = torch.tensor([0.0 if e else no_eos_penalty for e in eos], dtype=torch.float32)
        scores = scores + penalty
    return scores
