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
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from rlhflab.errors import InputError

RewardSource = Callable[[list[str], list[str], list[bool]], torch.Tensor]


class UserCodeError(InputError):
    """A user's function (a reward function, a judge) failed: it raised, called ``sys.exit``,
    could not be called with the arguments it is given, or returned something other than one
    number per item. The message names the function, the call and what went wrong."""


class NonFiniteRewardError(InputError):
    """A reward source returned NaN or infinity; the run stops before any update."""


# ---------------------------------------------------------------------------------------
# Calling a user's function

TRACEBACK_ENV = "RLHFLAB_TRACEBACK"
"""Set to 1 to print a failing user function's own traceback before rlhflab's one line."""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else ""


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def call_user(fn: Callable, args: tuple, kwargs: dict, *, what: str, name: str, call: int, batch: str,
              arg_names: Sequence[str] = ()):
    """``fn(*args, **kwargs)``, for a function the user wrote. Whatever it does becomes one
    ``UserCodeError`` naming ``what`` ("reward function", "judge"), ``name``, the ``call``
    (1 for the first) and the ``batch`` ("batch of 8 responses"); ``arg_names`` name the
    positional arguments in the message:

    - arguments its signature cannot take: "cannot be called with (prompts, completions, eos)";
    - an exception: "raised ZeroDivisionError on call 3 (batch of 8 responses): division by
      zero" (with ``RLHFLAB_TRACEBACK=1`` the function's traceback is printed first);
    - ``sys.exit``: "called sys.exit(3)", a failure of the function, not a request to stop
      rlhflab with that exit code.

    Ctrl-C (``KeyboardInterrupt``) is not the function's failure: it stops the run as it
    would anywhere else."""
    at = f"on call {call} ({batch})"
    try:
        bind = inspect.signature(fn).bind
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        bind = None
    if bind is not None:
        try:
            bind(*args, **kwargs)
        except TypeError as err:
            given = ", ".join([*arg_names, *kwargs])
            raise UserCodeError(f"{what} {name} cannot be called with ({given}) {at}: {err}") from None
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except SystemExit as err:
        raise UserCodeError(f"{what} {name} called sys.exit({err.code!r}) {at}; a {what} returns its values, "
                            "it does not end rlhflab") from None
    except BaseException as err:  # noqa: BLE001 - the user's code: anything it raises is its failure
        raise _raised(err, what, name, at) from None


def _raised(err: BaseException, what: str, name: str, at: str) -> UserCodeError:
    if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        hint = ""
    else:
        hint = f" ({TRACEBACK_ENV}=1 prints its traceback)"
    said = _first_line(err)
    return UserCodeError(f"{what} {name} raised {type(err).__name__} {at}{': ' + said if said else ''}{hint}")


def user_values(out, n: int, *, what: str, name: str, call: int, batch: str, unit: str,
                bools: bool = False, numbers_are: str = "numbers") -> list[float]:
    """The ``n`` numbers a user's function returned (``call_user``'s result): a list, a tuple,
    a 1-D tensor or array, or any other iterable of real numbers (numpy and 0-d tensor
    scalars included; ``bools`` accepts True/False as 1/0; ``numbers_are`` says what they
    are in a message). Anything else is a
    ``UserCodeError`` saying what came back and, for an item, at which position. Iterating a
    generator runs the user's code: what it raises is reported as ``call_user`` does."""
    at = f"on call {call} ({batch})"
    expected = f"; expected a list of {n} {numbers_are}, one per {unit}"

    def fail(problem: str) -> UserCodeError:
        return UserCodeError(f"{what} {name} {problem} {at}{expected}")

    if out is None or isinstance(out, (str, bytes, numbers.Number, Mapping)):
        kind = type(out).__name__
        article = "an" if kind[0] in "aeiou" else "a"
        raise fail("returned None" if out is None else f"returned {article} {kind}" + (
            "" if isinstance(out, Mapping) else f" ({_short(out)})"))
    if hasattr(out, "shape") and hasattr(out, "tolist"):  # a tensor or an array
        kind = "tensor" if isinstance(out, torch.Tensor) else "array"
        if len(out.shape) != 1:
            raise fail(f"returned a {kind} of shape {tuple(out.shape)}")
        items = out.tolist()
    elif isinstance(out, Iterable):
        try:
            items = list(out)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 - a generator running the user's code
            raise _raised(err, what, name, at) from None
    else:
        raise fail(f"returned a {type(out).__name__}")
    if len(items) != n:
        raise UserCodeError(f"{what} {name} returned {len(items)} {'rewards' if unit == 'response' else 'values'} "
                            f"for {n} {unit}s {at}")
    values = []
    for i, v in enumerate(items):
        if isinstance(v, torch.Tensor) and v.numel() == 1 or getattr(v, "shape", None) == ():
            v = v.item()
        if isinstance(v, bool) and not bools or not isinstance(v, numbers.Real):
            raise fail(f"returned {_short(v)} (a {type(v).__name__}) at position {i}")
        values.append(float(v))
    return values


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
        self.calls = 0  # calls so far: a failure names its call
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
        self.calls += 1
        n = len(prompts)
        where = dict(what="reward function", name=self.name, call=self.calls, batch=f"batch of {n} responses")
        out = call_user(self.fn, (prompts, completions), kwargs, arg_names=("prompts", "completions"), **where)
        values = user_values(out, n, unit="response", bools=True, **where)
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:  # named here, with the call; score_responses' own check covers the other sources
            i = bad[0]
            raise NonFiniteRewardError(
                f"reward {values[i]} at position {i} from reward function {self.name} on call {self.calls} "
                f"(batch of {n} responses), for prompt {_short(prompts[i], 80)} (response "
                f"{_short(responses[i], 80)}); {len(bad)} of {n} rewards are not finite")
        return torch.tensor(values, dtype=torch.float32)


class ModelReward:
    """A reward model directory written by ``rlhflab rm``, loaded on first use.

    ``reduce`` combines an ensemble's members (``reward_model.REDUCTIONS``: ``mean``, or the
    conservative ``min`` and ``mean_minus_std`` with ``k``, Coste et al. 2024); a conservative
    reduction of a single model would be the model itself, so it is refused on load."""

    def __init__(self, path: str | Path, batch_size: int = 64, device=None, reduce: str = "mean",
                 k: float = 1.0) -> None:
        self.path = Path(path)
        self.name = f"rm:{self.path}" + (f" ({reduce})" if reduce != "mean" else "")
        self.batch_size = batch_size
        self.device = device
        self.reduce, self.k = reduce, k
        self._model = None

    @property
    def model(self):
        if self._model is None:
            if importlib.util.find_spec("rlhflab.reward_model") is None:
                raise InputError("reward models are not available in this installation", file=str(self.path))
            from rlhflab.reward_model import RewardModel

            model = RewardModel.load(self.path)
            if self.reduce != "mean" and model.n_members < 2:
                raise InputError(f"rl.rm_reduce={self.reduce} combines the members of an ensemble; this reward "
                                 "model has one (train it with rm.ensemble > 1)", file=str(self.path),
                                 field="rl.rm_reduce")
            self._model = model
            if self.device is not None:
                self._model.to(self.device)
        return self._model

    def __call__(self, prompts: list[str], responses: list[str], eos: list[bool], rows=None) -> torch.Tensor:
        """With ``rows``, the rows' prompts (text or messages) are scored, rendered by the
        reward model's own tokenizer as in its training; without, ``prompts`` are plain
        prompt texts (the world's)."""
        prompts = [r["prompt"] for r in rows] if rows else prompts
        scores = self.model.score(prompts, responses, eos=eos, batch_size=self.batch_size, reduce=self.reduce,
                                  k=self.k)
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
        except KeyboardInterrupt:
            raise
        except SystemExit as err:  # the user's code: its exit is its failure, not rlhflab's exit code
            raise InputError(f"cannot import: it called sys.exit({err.code!r})", file=where) from None
        except BaseException as err:  # noqa: BLE001 - the user's code: report, don't crash with a traceback
            raise InputError(f"cannot import: {err.__class__.__name__}: {_first_line(err)}", file=where) from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise InputError(f"{flag} {spec!r}: cannot import {where!r} ({err})") from None
        except KeyboardInterrupt:
            raise
        except SystemExit as err:
            raise InputError(f"{flag} {spec!r}: importing {where!r} called sys.exit({err.code!r})") from None
        except BaseException as err:  # noqa: BLE001 - the module's own code failed on import
            raise InputError(f"{flag} {spec!r}: cannot import {where!r} ({err.__class__.__name__}: "
                             f"{_first_line(err)})") from None
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
                 rm_batch_size: int = 64, device=None, rm_reduce: str = "mean",
                 rm_reduce_k: float | None = None) -> WeightedSum:
    """The reward of a run: ``rm_weight`` * RM (if any) + the weighted functions. Each of
    ``reward_fns`` is a spec string (``gold``, ``module:function=0.5``, ...), a callable
    (weight 1), or a ``(weight, callable)`` pair. ``rm_reduce`` (and its ``rm_reduce_k``)
    combine an ensemble reward model's members (``ModelReward``)."""
    terms: list[tuple[float, RewardSource]] = []
    if rm_reduce != "mean" and not rm_path:
        raise InputError(f"rl.rm_reduce={rm_reduce} combines a reward model's members: give --rm DIR (an ensemble)",
                         field="rl.rm_reduce")
    if rm_path:
        terms.append((rm_weight, ModelReward(rm_path, rm_batch_size, device, reduce=rm_reduce,
                                             k=1.0 if rm_reduce_k is None else rm_reduce_k)))
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
