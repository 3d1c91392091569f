"""Closed-form pi* against numbers derived by hand, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from rlhflab.cli import main
from rlhflab.errors import InputError
from rlhflab.optimal import (
    argmax_policy,
    kl_divergence,
    optimal_policy,
    reward_kl_frontier,
    tv_distance,
    validate_inputs,
)

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
WORKED = ["--pi-ref", "0.6,0.4", "--reward", "1,0"]


def test_worked_example():
    """pi_ref=(0.6, 0.4), R=(1, 0), beta=0.5.

    weights: 0.6 * e^2 = 0.6 * 7.389056 = 4.433434 and 0.4 * e^0 = 0.4
    Z = 4.833434, log Z = 1.575558
    pi* = (4.433434 / 4.833434, 0.4 / 4.833434) = (0.917243, 0.082757)
    E[R] = pi*(y1) = 0.917243
    KL = 0.917243 ln(0.917243/0.6) + 0.082757 ln(0.082757/0.4)
       = 0.917243 * 0.424443 + 0.082757 * (-1.575558) = 0.389317 - 0.130388 = 0.258929
    """
    res = optimal_policy([0.6, 0.4], [1.0, 0.0], 0.5)
    np.testing.assert_allclose(res.weights, [4.433434, 0.4], rtol=1e-6)
    assert res.Z == pytest.approx(4.833434, rel=1e-6)
    assert res.log_Z == pytest.approx(1.575558, rel=1e-6)
    np.testing.assert_allclose(res.policy, [0.917243, 0.082757], atol=1e-6)
    assert res.expected_reward == pytest.approx(0.917243, abs=1e-6)
    assert res.kl == pytest.approx(0.258929, abs=1e-6)
    assert res.beta == 0.5


@pytest.mark.parametrize(
    "beta, pi1",
    [
        # 0.6e / (0.6e + 0.4) = 1.630969 / 2.030969
        (1.0, 0.803049),
        # 1 / (1 + (0.4/0.6) e^-10) = 1 / (1 + 3.02666e-5)
        (0.1, 0.99996973),
        # exp(R/beta) -> 1: pi* = pi_ref
        (math.inf, 0.6),
    ],
)
def test_other_betas(beta, pi1):
    """The companions of the worked example: beta = 1, 0.1, inf."""
    res = optimal_policy([0.6, 0.4], [1.0, 0.0], beta)
    assert res.policy[0] == pytest.approx(pi1, abs=1e-6)
    assert res.policy.sum() == pytest.approx(1.0)


def test_beta_inf_is_pi_ref_exactly():
    """beta = inf: weights = pi_ref, Z = 1, log Z = 0, KL = 0, E[R] = 0.6*1 + 0.4*0 = 0.6."""
    res = optimal_policy([0.6, 0.4], [1.0, 0.0], math.inf)
    assert res.weights.tolist() == [0.6, 0.4] and res.policy.tolist() == [0.6, 0.4]
    assert (res.Z, res.log_Z, res.kl, res.expected_reward) == (1.0, 0.0, 0.0, 0.6)


def test_tiny_beta_ties_share_in_proportion_to_pi_ref_without_overflow():
    """beta = 1e-4, R = (1, 1, 0), pi_ref = (0.2, 0.3, 0.5).

    exp(R/beta) = exp(1e4) overflows float64 (max ~ exp(709.8)), so weights and Z are inf,
    but in log space pi* = (0.2, 0.3, 0.5 e^-1e4) / (0.5 + 0.5 e^-1e4) = (0.4, 0.6, 0):
    the tied maxima share the mass in proportion to pi_ref, = argmax_policy.
    KL = 0.4 ln 2 + 0.6 ln 2 = ln 2; E[R] = 1; log Z = 1e4 + ln 0.5.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any overflow/invalid RuntimeWarning fails the test
        res = optimal_policy([0.2, 0.3, 0.5], [1.0, 1.0, 0.0], 1e-4)
        limit = argmax_policy([0.2, 0.3, 0.5], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(res.policy, [0.4, 0.6, 0.0], atol=1e-12)
    np.testing.assert_allclose(limit, [0.4, 0.6, 0.0], atol=1e-12)
    assert np.isinf(res.weights[:2]).all() and math.isinf(res.Z)
    assert res.log_Z == pytest.approx(1e4 + math.log(0.5))
    assert res.kl == pytest.approx(math.log(2)) and res.expected_reward == pytest.approx(1.0)
    assert not np.isnan(res.log_weights).any()


def test_large_beta_tends_to_pi_ref():
    """beta = 1e6: pi*(y1) = 0.6 e^1e-6 / (0.6 e^1e-6 + 0.4) ~ 0.6 + 0.6*0.4*1e-6; KL ~ 0."""
    res = optimal_policy([0.6, 0.4], [1.0, 0.0], 1e6)
    assert res.policy[0] == pytest.approx(0.6 + 2.4e-7, abs=1e-12)
    assert tv_distance(res.policy, [0.6, 0.4]) < 1e-6 and res.kl < 1e-12


@pytest.mark.parametrize("beta", [0.05, 0.5, 1.0, 3.0, 100.0])
def test_kl_identity(beta):
    """KL(pi*||pi_ref) = E_pi*[R]/beta - log Z: log pi* = log pi_ref + R/beta - log Z,
    so sum pi* (log pi* - log pi_ref) = sum pi* R / beta - log Z."""
    res = optimal_policy([0.1, 0.2, 0.3, 0.4], [2.0, -1.0, 0.5, 1.5], beta)
    assert res.kl == pytest.approx(res.expected_reward / beta - res.log_Z, abs=1e-10)
    assert res.kl == pytest.approx(kl_divergence(res.policy, [0.1, 0.2, 0.3, 0.4]), abs=1e-12)


def test_frontier_is_monotone_in_beta():
    """Raising beta moves pi* toward pi_ref: KL and E[R] both decrease, from
    (-ln pi_ref(argmax) = -ln 0.1, max R = 2) at beta -> 0 to (0, E_ref[R] = .2 - .2 + .15 + .6 = 0.75) at inf."""
    betas = [1e-3, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, math.inf]
    front = reward_kl_frontier([0.1, 0.2, 0.3, 0.4], [2.0, -1.0, 0.5, 1.5], betas)
    kls = np.array([f.kl for f in front])
    rewards = np.array([f.expected_reward for f in front])
    assert [f.beta for f in front] == betas
    assert (np.diff(kls) <= 1e-12).all() and (np.diff(rewards) <= 1e-12).all()
    assert kls[0] == pytest.approx(-math.log(0.1)) and rewards[0] == pytest.approx(2.0)
    assert kls[-1] == 0.0 and rewards[-1] == pytest.approx(0.75)


def test_zero_reference_probability_gets_zero_mass():
    """pi_ref = (0.5, 0, 0.5), R = (0, 10, 1), beta = 1: the big reward at y2 is unreachable.

    pi* = (0.5, 0, 0.5e) / (0.5 + 0.5e) = (1, 0, e) / (1 + e) = (0.268941, 0, 0.731059)
    KL = 0.268941 ln(0.537883) + 0.731059 ln(1.462117) = -0.166774 + 0.277718 = 0.110944
       (check: E[R]/beta - ln Z = 0.731059 - ln(0.5 + 0.5e) = 0.731059 - 0.620115)
    argmax over the support is y3: argmax_policy = (0, 0, 1).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = optimal_policy([0.5, 0.0, 0.5], [0.0, 10.0, 1.0], 1.0)
        tiny = optimal_policy([0.5, 0.0, 0.5], [0.0, 10.0, 1.0], 1e-4)
    np.testing.assert_allclose(res.policy, [0.268941, 0.0, 0.731059], atol=1e-6)
    assert res.kl == pytest.approx(0.110944, abs=1e-6)
    assert res.weights[1] == 0.0 and res.log_weights[1] == -math.inf
    assert argmax_policy([0.5, 0.0, 0.5], [0.0, 10.0, 1.0]).tolist() == [0.0, 0.0, 1.0]
    np.testing.assert_allclose(tiny.policy, [0.0, 0.0, 1.0], atol=1e-12)


def test_kl_and_tv_helpers():
    """KL((.5,.5)||(.25,.75)) = .5 ln 2 + .5 ln(2/3) = .5(.693147 - .405465) = .143841;
    0 log 0 = 0; q = 0 < p gives inf. TV = .5(|.25| + |-.25|) = .25. Batched on last axis."""
    assert kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.143841, abs=1e-6)
    assert kl_divergence([0.0, 1.0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert kl_divergence([0.5, 0.5], [1.0, 0.0]) == math.inf
    assert tv_distance([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.25)
    batch = kl_divergence([[0.5, 0.5], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(batch, [0.0, math.log(2)])


@pytest.mark.parametrize(
    "pi_ref, reward, beta, match",
    [
        ([0.6, 0.4], [1, 0], 0.0, "beta"),
        ([0.6, 0.4], [1, 0], -1.0, "beta"),
        ([0.6, 0.4], [1, 0], math.nan, "beta"),
        ([1.2, -0.2], [1, 0], 1.0, ">= 0"),
        ([0.6, 0.5], [1, 0], 1.0, "sum to 1"),
        ([0.6, 0.4], [1, 0, 2], 1.0, "has 3 values"),
        ([], [], 1.0, "non-empty"),
        ([0.6, 0.4], [1, math.inf], 1.0, "finite"),
    ],
)
def test_validation(pi_ref, reward, beta, match):
    """Each bad input raises InputError (also a ValueError for library callers)."""
    with pytest.raises(InputError, match=match):
        validate_inputs(pi_ref, reward, beta)
    with pytest.raises(ValueError, match=match):
        optimal_policy(pi_ref, reward, beta)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    res = optimal_policy(torch.tensor([0.6, 0.4]), torch.tensor([1.0, 0.0]), 0.5)
    assert res.policy[0] == pytest.approx(0.917243, abs=1e-6)


# ---------------------------------------------------------------- CLI


def test_cli_table(capsys):
    assert main(["optimal", *WORKED, "--beta", "0.5,inf"]) == 0
    out = capsys.readouterr().out
    assert "4.43343" in out and "0.917243" in out and "4.83343" in out and "beta = inf" in out


def test_cli_json_single_beta(capsys):
    assert main(["optimal", *WORKED, "--beta", "0.5", "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    rec = json.loads(line)
    assert set(rec) == {"weights", "Z", "policy", "kl", "expected_reward", "beta"}
    np.testing.assert_allclose(rec["weights"], [4.433434, 0.4], rtol=1e-6)
    assert rec["Z"] == pytest.approx(4.833434, rel=1e-6)
    np.testing.assert_allclose(rec["policy"], [0.917243, 0.082757], atol=1e-6)
    assert rec["kl"] == pytest.approx(0.258929, abs=1e-6) and rec["beta"] == 0.5


def test_cli_json_lines_per_beta_with_non_finite_as_strings(capsys):
    """beta = 1e-4 makes exp(1e4) overflow: weights[0] and Z are written as "inf"."""
    assert main(["optimal", *WORKED, "--beta", "1,1e-4,inf", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()

    def strict(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    recs = [json.loads(line, parse_constant=strict) for line in lines]
    assert [r["beta"] for r in recs] == [1.0, 1e-4, "inf"]
    assert recs[0]["policy"][0] == pytest.approx(0.803049, abs=1e-6)
    assert recs[1]["weights"][0] == "inf" and recs[1]["Z"] == "inf"
    assert recs[1]["policy"] == [1.0, 0.0]
    assert recs[2]["policy"] == [0.6, 0.4] and recs[2]["Z"] == 1.0


BAD = [
    (["--pi-ref", "x,0.4", "--reward", "1,0", "--beta", "1"], "--pi-ref"),
    (["--pi-ref=-0.2,1.2", "--reward", "1,0", "--beta", "1"], "--pi-ref"),
    (["--pi-ref", "0.6,0.5", "--reward", "1,0", "--beta", "1"], "--pi-ref"),
    (["--pi-ref", "", "--reward", "1,0", "--beta", "1"], "--pi-ref"),
    (["--pi-ref", "0.6,0.4", "--reward", "1,0,2", "--beta", "1"], "--reward"),
    (["--pi-ref", "0.6,0.4", "--reward", "1,inf", "--beta", "1"], "--reward"),
    (["--pi-ref", "0.6,0.4", "--reward", "1,", "--beta", "1"], "--reward"),
    (["--pi-ref", "0.6,0.4", "--reward", "1,0", "--beta", "0"], "--beta"),
    (["--pi-ref", "0.6,0.4", "--reward", "1,0", "--beta", "-1"], "--beta"),
    (["--pi-ref", "0.6,0.4", "--reward", "1,0", "--beta", "abc"], "--beta"),
    (["--pi-ref", "0.6,0.4", "--reward", "1,0", "--beta", "0.5,nan"], "--beta"),
]


@pytest.mark.parametrize("argv, flag", BAD)
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, flag):
    assert main(["optimal", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and flag in err
    assert err.startswith("rlhflab optimal: error: ")


def test_console_entry_subprocess_bad_input():
    env = {**os.environ, "PYTHONPATH": os.path.abspath(SRC)}
    argv = [sys.executable, "-m", "rlhflab.cli", "optimal", *WORKED, "--beta", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "--beta" in proc.stderr
