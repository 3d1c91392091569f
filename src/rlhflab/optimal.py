"""Closed-form optimum of the KL-regularized objective (Rafailov et al. 2023, eq. 4).

For one prompt with responses y, reference policy pi_ref and reward R, the policy that
maximizes  E_pi[R] - beta * KL(pi || pi_ref)  is

    pi*(y) = pi_ref(y) * exp(R(y) / beta) / Z,      Z = sum_y pi_ref(y) * exp(R(y) / beta)

and at the optimum  KL(pi* || pi_ref) = E_pi*[R] / beta - log Z.

Everything is computed in log space (log-sum-exp, float64) so that no beta > 0 overflows
the policy: exp(R/beta) does overflow for tiny beta (beta=1e-4, R=100 is exp(1e6)), so
``weights`` and ``Z`` may then be ``inf`` while ``log_weights``, ``log_Z``, ``policy``,
``kl`` and ``expected_reward`` stay exact.

Limits: beta -> inf returns pi_ref; beta -> 0 puts all mass on argmax_y R over the support
of pi_ref. Tied maxima share that mass *in proportion to pi_ref* (the exact limit of the
formula; "ties share it" in the loose statement of the limit), so equal shares only when pi_ref
is equal on them.

This is the yardstick: an algorithm that claims to optimize the KL-regularized objective
must reach pi* (compare with ``kl_divergence`` / ``tv_distance``) on an enumerable problem.

CLI (``rlhflab optimal``)::

    rlhflab optimal --pi-ref 0.6,0.4 --reward 1,0 --beta 0.01,0.5,inf [--json]

prints a table per beta, or with ``--json`` one JSON object per beta (JSON Lines) with
keys weights, Z, policy, kl, expected_reward, beta; non-finite numbers are written as the
strings "inf" / "-inf" / "nan", so the output is always strict JSON. Negative numbers
need the ``=`` form (``--pi-ref=-0.2,1.2``), or argparse reads them as flags.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rlhflab.errors import InputError

PROB_TOL = 1e-6  # tolerance on sum(pi_ref) == 1



@dataclass(frozen=True, eq=False)  # eq=False: == on arrays is ambiguous
class OptimalPolicy:
    """pi* for one beta. Arrays have shape (n,), one entry per response."""

    weights: np.ndarray  # pi_ref * exp(R/beta); may be inf when R/beta is huge
    log_weights: np.ndarray  # log pi_ref + R/beta; -inf where pi_ref = 0
    log_Z: float  # log sum(weights), exact even when Z overflows
    Z: float  # sum(weights); may be inf like weights
    policy: np.ndarray  # pi* = weights / Z, always finite and normalized
    kl: float  # KL(pi* || pi_ref) in nats
    expected_reward: float  # E_pi*[R]
    beta: float


def _as_array(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
    return np.asarray(x, dtype=np.float64)


def _check_distribution(p: np.ndarray, name: str) -> None:
    if p.ndim != 1 or p.size == 0:
        raise InputError(f"{name}: expected a non-empty flat list of probabilities")
    if not np.all(np.isfinite(p)):
        raise InputError(f"{name}: probabilities must be finite numbers")
    if np.any(p < 0):
        i = int(np.argmax(p < 0))
        raise InputError(f"{name}: probabilities must be >= 0, got {p[i]:g} at index {i}")
    if abs(p.sum() - 1.0) > PROB_TOL:
        raise InputError(
            f"{name}: probabilities must sum to 1 (within {PROB_TOL:g}), got {p.sum():.9g}"
        )


def validate_inputs(
    pi_ref,
    reward,
    beta: float | None,
    *,
    names: tuple[str, str, str] = ("pi_ref", "reward", "beta"),
) -> tuple[np.ndarray, np.ndarray]:
    """Check inputs; return (pi_ref, reward) as float64 arrays, pi_ref renormalized.

    Raises InputError (a ValueError) with a one-line message
    starting with the offending name from ``names`` (the CLI passes its flag names).
    ``beta=None`` skips the beta check (used by ``argmax_policy``).
    """
    p_name, r_name, b_name = names
    p, r = _as_array(pi_ref), _as_array(reward)
    _check_distribution(p, p_name)
    if r.ndim != 1 or r.size == 0:
        raise InputError(f"{r_name}: expected a non-empty flat list of numbers")
    if r.size != p.size:
        raise InputError(f"{r_name}: has {r.size} values but {p_name} has {p.size}")
    if not np.all(np.isfinite(r)):
        raise InputError(f"{r_name}: rewards must be finite numbers")
    if beta is not None and not float(beta) > 0:  # also rejects nan
        raise InputError(f"{b_name}: must be > 0 (or inf), got {beta}")
    return p / p.sum(), r


def optimal_policy(pi_ref, reward, beta: float) -> OptimalPolicy:
    """pi* = pi_ref * exp(R/beta) / Z for beta in (0, inf]; beta=0 raises (see argmax_policy).

    Log space: pi* = softmax(log pi_ref + (R - R_max)/beta), with R_max the largest reward
    on the support, so the shifted weights lie in [0, 1]; log Z = log-sum-exp + R_max/beta.
    KL is sum pi* (log pi* - log pi_ref) over pi* > 0 (0 log 0 = 0), clipped at 0 against
    rounding; it equals E_pi*[R]/beta - log Z.
    """
    p, r = validate_inputs(pi_ref, reward, beta)
    beta = float(beta)
    support = p > 0
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        log_p = np.log(p)  # -inf off the support
        if math.isinf(beta):
            return OptimalPolicy(p.copy(), log_p, 0.0, 1.0, p.copy(), 0.0, float(p @ r), beta)
        r_max = r[support].max()
        shifted = np.where(support, log_p + (r - r_max) / beta, -np.inf)  # <= 0 on support
        lse = np.log(np.exp(shifted).sum())  # the max term is >= log min pi_ref: no underflow to 0
        log_policy = shifted - lse
        policy = np.exp(log_policy)
        log_Z = float(lse + r_max / beta)
        log_weights = np.where(support, log_p + r / beta, -np.inf)
        weights = np.exp(log_weights)  # may overflow to inf, and then so does Z
        Z = float(weights.sum())
        pos = policy > 0
        kl = float(np.sum(policy[pos] * (log_policy[pos] - log_p[pos])))
    return OptimalPolicy(
        weights, log_weights, log_Z, Z, policy, max(kl, 0.0), float(policy @ r), beta
    )


def argmax_policy(pi_ref, reward) -> np.ndarray:
    """The exact beta -> 0 limit of pi*: mass on argmax R over the support of pi_ref.

    Exactly tied maxima share the mass in proportion to pi_ref, which is what
    pi_ref * exp(R/beta) / Z tends to (the exp factors of tied entries are equal).
    """
    p, r = validate_inputs(pi_ref, reward, None)
    best = (p > 0) & (r == r[p > 0].max())
    return np.where(best, p, 0.0) / p[best].sum()


def reward_kl_frontier(pi_ref, reward, betas: Sequence[float]) -> list[OptimalPolicy]:
    """pi* for each beta, in the order given: the exact (KL, E[R]) frontier.

    Along it both KL(pi*||pi_ref) and E_pi*[R] decrease as beta grows, from
    (-log pi_ref(argmax set), max R) at beta -> 0 to (0, E_pi_ref[R]) at beta = inf.
    """
    return [optimal_policy(pi_ref, reward, beta) for beta in betas]


def kl_divergence(p, q) -> float | np.ndarray:
    """KL(p || q) = sum p (log p - log q) in nats over the last axis; 0 log 0 = 0, inf if q=0<p."""
    p, q = _as_array(p), _as_array(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return np.sum(terms, axis=-1)


def tv_distance(p, q) -> float | np.ndarray:
    """Total variation 0.5 * sum |p - q| over the last axis, in [0, 1]."""
    return 0.5 * np.sum(np.abs(_as_array(p) - _as_array(q)), axis=-1)


# ---------------------------------------------------------------- KL as a constraint


def beta_for_kl(pi_ref, reward, epsilon: float, *, tol: float = 1e-10, max_iter: int = 200) -> float:
    """The beta whose optimum spends exactly ``epsilon`` nats: mean_x KL(pi*_beta || pi_ref) = epsilon.

    The constrained problem  max_pi E_pi[R]  s.t.  KL(pi || pi_ref) <= epsilon  has the
    Lagrangian  E_pi[R] - beta (KL - epsilon), beta >= 0, whose maximizer over pi is the
    pi*_beta above; the dual's minimum sits where the constraint binds, at the beta with
    KL(pi*_beta || pi_ref) = epsilon. That KL falls monotonically from -log pi_ref(argmax
    set) at beta -> 0 to 0 at beta = inf, so bisection (on log beta) finds it. When
    epsilon is at or above the beta -> 0 KL the constraint never binds and the answer is
    0 (the argmax policy).

    ``pi_ref`` and ``reward`` are (K,) for one prompt or (P, K) for several; with several
    the constraint is on the mean KL over prompts (what a controller measures on a batch).
    """
    p, r = np.atleast_2d(_as_array(pi_ref)), np.atleast_2d(_as_array(reward))
    if not epsilon > 0:
        raise InputError(f"epsilon: must be > 0, got {epsilon}")

    def mean_kl(beta: float) -> float:
        return float(np.mean([optimal_policy(pr, rr, beta).kl for pr, rr in zip(p, r)]))

    ceiling = float(np.mean([kl_divergence(argmax_policy(pr, rr), pr) for pr, rr in zip(p, r)]))
    if epsilon >= ceiling:
        return 0.0
    lo, hi = -30.0, 30.0  # log beta; KL(lo) ~ ceiling, KL(hi) ~ 0
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if mean_kl(math.exp(mid)) > epsilon:
            lo = mid  # spends too much: beta must grow
        else:
            hi = mid
        if hi - lo < tol:
            break
    return math.exp(0.5 * (lo + hi))


# ---------------------------------------------------------------- best-of-n, exactly


def best_of_n_policy(pi_ref, reward, n: int) -> np.ndarray:
    """The exact law of best-of-n: draw y_1..y_n ~ pi_ref, keep the one with the highest R.

    With F(v) = P_ref(R(Y) <= v) and F^-(v) = P_ref(R(Y) < v), the kept response's reward
    level v has probability F(v)^n - F^-(v)^n (all n draws at or below v, not all below).
    Draws tied at the top are broken uniformly at random among the draws, so by symmetry
    the responses sharing level v split its probability in proportion to pi_ref (a
    response drawn twice as often is kept twice as often):

        pi_bon(y) = pi_ref(y) / q(v) * (F(v)^n - F^-(v)^n),   v = R(y),  q(v) = F(v) - F^-(v)

    Without ties this is F(y)^n - F^-(y)^n. n = 1 gives pi_ref. Arrays over the last
    axis: (K,) or (P, K).
    """
    if int(n) != n or n < 1:
        raise InputError(f"n: must be an integer >= 1, got {n}")
    p, r = _as_array(pi_ref), _as_array(reward)
    if p.shape != r.shape:
        raise InputError(f"reward: shape {r.shape} differs from pi_ref's {p.shape}")
    if p.ndim == 2:
        return np.stack([best_of_n_policy(pr, rr, n) for pr, rr in zip(p, r)])
    _check_distribution(p, "pi_ref")
    p = p / p.sum()
    below = np.array([p[r < v].sum() for v in r])  # F^-(R(y))
    level = np.array([p[r == v].sum() for v in r])  # q(R(y))
    at_or_below = below + level
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(level > 0, p / level, 0.0)
    return share * (at_or_below ** n - below ** n)


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n - 1) / n: KL(pi_bon || pi_ref) when no two responses tie (Gao et al.
    2022's analytic value; Beirami et al. 2024 prove it an upper bound for every pi_ref)."""
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------- CLI: rlhflab optimal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pi-ref", required=True, help="reference probabilities, e.g. 0.6,0.4")
    parser.add_argument("--reward", required=True, help="reward per response, e.g. 1,0")
    parser.add_argument(
        "--beta", required=True, help="KL coefficient(s), e.g. 0.5 or 0.01,0.1,1,inf"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per beta (JSON Lines)")


def _parse_list(text: str, flag: str) -> list[float]:
    if not text.strip():
        raise InputError(f"{flag}: expected a comma-separated list of numbers, got nothing")
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise InputError(f"{flag}: {item.strip()!r} is not a number") from None
    return values


def _jsonable(x: float) -> float | str:
    return float(x) if math.isfinite(x) else str(float(x))  # "inf", "-inf", "nan"


def to_json(res: OptimalPolicy) -> dict:
    """The CLI's JSON record; non-finite numbers become strings so json.dumps stays strict."""
    return {
        "weights": [_jsonable(w) for w in res.weights],
        "Z": _jsonable(res.Z),
        "policy": [_jsonable(x) for x in res.policy],
        "kl": _jsonable(res.kl),
        "expected_reward": _jsonable(res.expected_reward),
        "beta": _jsonable(res.beta),
    }


def _print_tables(results: list[OptimalPolicy], p: np.ndarray, r: np.ndarray) -> None:
    header = ("y", "pi_ref", "R", "weight", "pi*")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        Console = None
    for res in results:
        rows = [
            (str(i), f"{p[i]:.6g}", f"{r[i]:.6g}", f"{res.weights[i]:.6g}", f"{res.policy[i]:.6g}")
            for i in range(p.size)
        ]
        summary = f"Z = {res.Z:.6g}   KL = {res.kl:.6g} nats   E[R] = {res.expected_reward:.6g}"
        if Console is not None:
            table = Table(*header, title=f"beta = {res.beta:g}")
            for row in rows:
                table.add_row(*row)
            console = Console(highlight=False)
            console.print(table)
            console.print(summary + "\n", markup=False)  # "E[R]" is not a style tag
        else:
            print(f"beta = {res.beta:g}")
            for row in (header, *rows):
                print("  ".join(f"{c:>12}" for c in row))
            print(summary + "\n")


def run(args: argparse.Namespace) -> int:
    names = ("--pi-ref", "--reward", "--beta")
    p = _parse_list(args.pi_ref, "--pi-ref")
    r = _parse_list(args.reward, "--reward")
    betas = _parse_list(args.beta, "--beta")
    for beta in betas:  # validate everything before printing anything
        p_arr, r_arr = validate_inputs(p, r, beta, names=names)
    results = reward_kl_frontier(p_arr, r_arr, betas)
    if args.json:
        for res in results:
            print(json.dumps(to_json(res), allow_nan=False))
    else:
        _print_tables(results, p_arr, r_arr)
    return 0
