"""KL estimators and beta controllers against hand-derived numbers (rlhflab.kl)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    LinearKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_ratio,
    make_kl_controller,
    sequence_kl,
)

# ---------------------------------------------------------------------------------------
# Estimators: values
# ---------------------------------------------------------------------------------------


def _with_log_ratio(l_values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs, ref_logprobs) with ref_logprobs - logprobs = l, logprobs arbitrary."""
    logprobs = torch.tensor([[-0.3, -1.2, -2.0]], dtype=torch.float64)
    return logprobs, logprobs + torch.tensor([l_values], dtype=torch.float64)


def test_estimator_values_by_hand():
    """l = log pi_ref - log pi_theta in {-1, 0, 0.5}:

    k1 = -l            -> ( 1,       0, -0.5)
    k2 = l^2/2         -> ( 0.5,     0,  0.125)
    k3 = e^l - 1 - l   -> ( e^-1 - 1 + 1 = 0.367879,  0,  e^0.5 - 1.5 = 1.648721 - 1.5 = 0.148721)
    """
    logprobs, ref = _with_log_ratio([-1.0, 0.0, 0.5])
    torch.testing.assert_close(
        kl_k1(logprobs, ref), torch.tensor([[1.0, 0.0, -0.5]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        kl_k2(logprobs, ref), torch.tensor([[0.5, 0.0, 0.125]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        kl_k3(logprobs, ref),
        torch.tensor([[0.367879441, 0.0, 0.148721271]], dtype=torch.float64),
        rtol=0,
        atol=1e-9,
    )


def test_estimator_dict():
    assert KL_ESTIMATORS == {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "k3_ratio": kl_k3_ratio}


def test_k3_nonnegative_everywhere():
    """e^l >= 1 + l for every real l, so k3 >= 0, including beyond the clamp and in float32."""
    l_grid = torch.linspace(-60.0, 60.0, 20001)
    zeros = torch.zeros_like(l_grid)
    assert (kl_k3(zeros, l_grid) >= 0).all()
    assert (kl_k3(zeros.double(), l_grid.double(), log_ratio_clip=None) >= 0).all()


def test_k3_small_log_ratio_keeps_precision():
    """For |l| << 1, k3 = l^2/2 + l^3/6 + O(l^4): 5.0002e-9 at l = 1e-4. In float32,
    expm1(l) - l is off only by the spacing of float32 near 1e-4 (7e-12, i.e. 0.15%),
    while exp(l) - 1 - l is off by the spacing near 1 (1.2e-7): it returns 1.66e-8, more
    than 3x the true value. So a 1% tolerance checks that expm1 is used."""
    lr = 1e-4
    got = kl_k3(torch.zeros(1), torch.full((1,), lr))
    expected = lr**2 / 2 + lr**3 / 6
    assert got.item() == pytest.approx(expected, rel=1e-2)


def test_k3_clamp_bounds_large_log_ratios():
    """Default clamp |l| <= 20: at l = 30 the value is e^20 - 1 - 20 = 485165174.4 and the
    gradient is 0; at l = 100 float32 stays finite. With log_ratio_clip=None the exact
    e^30 - 31 = 1.0686474581524e13 is returned (float64), and float32 overflows at l = 100."""
    ref = torch.tensor([30.0], dtype=torch.float64)
    logprobs = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    value = kl_k3(logprobs, ref)
    assert value.item() == pytest.approx(math.expm1(20.0) - 20.0, rel=1e-12)
    value.sum().backward()
    assert logprobs.grad is not None and logprobs.grad.item() == 0.0

    exact = kl_k3(torch.zeros(1, dtype=torch.float64), ref, log_ratio_clip=None)
    assert exact.item() == pytest.approx(math.expm1(30.0) - 30.0, rel=1e-12)

    assert torch.isfinite(kl_k3(torch.zeros(1), torch.full((1,), 100.0))).all()
    assert torch.isinf(kl_k3(torch.zeros(1), torch.full((1,), 100.0), log_ratio_clip=None)).all()


def test_sequence_kl_sums_valid_tokens_only():
    """Row 0: 0.1 + 0.2 + 0.3 = 0.6. Row 1: 0.4 only; the padded nan and inf are ignored."""
    per_token = torch.tensor([[0.1, 0.2, 0.3], [0.4, float("nan"), float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    torch.testing.assert_close(sequence_kl(per_token, mask), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(sequence_kl(per_token, mask.bool()), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(sequence_kl(per_token, mask.float()), torch.tensor([0.6, 0.4]))


# ---------------------------------------------------------------------------------------
# Estimators: statistics and gradients
# ---------------------------------------------------------------------------------------


def test_monte_carlo_estimators_against_exact_kl():
    """pi_theta = p = (0.5, 0.3, 0.15, 0.05), pi_ref = q = (0.3, 0.3, 0.25, 0.15), x ~ p.

    l = log(q/p) = (log 0.6, 0, log 5/3, log 3) = (-0.510826, 0, 0.510826, 1.098612)

    KL(p||q) = sum p * (-l) = 0.5*0.510826 - 0.15*0.510826 - 0.05*1.098612 = 0.123858
    E_p[k2]  = 1/2 * sum p * l^2 = 1/2 * (0.130472 + 0.039141 + 0.060347) = 0.114980

    so k2 is 7% low (biased), a bias of ~30 standard errors at n = 200k, while mean k1 and
    mean k3 must land within 3 standard errors of 0.123858. k3 also has a much smaller
    spread than k1 (per-sample std 0.19 vs 0.46).
    """
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.25, 0.15], dtype=torch.float64)
    exact_kl = (p * (p / q).log()).sum().item()
    exact_k2 = 0.5 * (p * (q / p).log().square()).sum().item()
    assert exact_kl == pytest.approx(0.123858, abs=1e-6)
    assert exact_k2 == pytest.approx(0.114980, abs=1e-6)

    n = 200_000
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, n, replacement=True, generator=gen)
    logprobs, ref_logprobs = p.log()[x], q.log()[x]

    def mean_and_se(k: torch.Tensor) -> tuple[float, float]:
        return k.mean().item(), (k.std() / math.sqrt(n)).item()

    m1, se1 = mean_and_se(kl_k1(logprobs, ref_logprobs))
    m2, se2 = mean_and_se(kl_k2(logprobs, ref_logprobs))
    m3, se3 = mean_and_se(kl_k3(logprobs, ref_logprobs))

    assert abs(m1 - exact_kl) < 3 * se1
    assert abs(m3 - exact_kl) < 3 * se3
    assert abs(m2 - exact_k2) < 3 * se2  # k2 estimates its own (biased) expectation...
    assert abs(m2 - exact_kl) > 10 * se2  # ...which is measurably off the KL...
    assert abs(m2 - exact_kl) < 0.1 * exact_kl  # ...but close.
    assert se3 < 0.5 * se1  # k3: same mean as k1, far less noise


def test_loss_gradients_match_kl_gradients():
    """A loss on on-policy samples differentiates k at the samples, not the sampling
    distribution. In expectation that is

        L_k(theta) = sum_x sg[pi(x)] * k(l(x)),   l(x) = log q(x) - log pi_theta(x)

    with sg = stop-gradient, and grad l = -grad log pi. Then

    k2 = l^2/2:       grad L = sum_x pi * l * (-grad log pi) = sum_x pi log(pi/q) grad log pi
        reverse KL:   grad sum_x pi log(pi/q) = sum_x pi log(pi/q) grad log pi + sum_x grad pi
                      and sum_x grad pi = grad 1 = 0, so the two gradients are equal.

    k3 = e^l - 1 - l: grad L = sum_x pi (e^l - 1)(-grad log pi) = -sum_x (q - pi) grad log pi
                             = -sum_x q grad log pi + sum_x grad pi = -sum_x q grad log pi
        forward KL:   grad sum_x q log(q/pi) = -sum_x q grad log pi: equal.

    k1 = -l:          grad L = sum_x pi grad log pi = sum_x grad pi = 0: no signal, which is
                      why k1 goes in the reward, not in the loss.
    """
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, dtype=torch.float64, generator=gen)
    log_q = torch.log_softmax(torch.randn(6, dtype=torch.float64, generator=gen), dim=-1)

    def grad_of(fn) -> torch.Tensor:
        theta = logits.clone().requires_grad_(True)
        log_pi = torch.log_softmax(theta, dim=-1)
        (grad,) = torch.autograd.grad(fn(log_pi), theta)
        return grad

    def on_policy_loss(estimator):
        return lambda log_pi: (log_pi.exp().detach() * estimator(log_pi, log_q)).sum()

    reverse_kl = grad_of(lambda log_pi: (log_pi.exp() * (log_pi - log_q)).sum())
    forward_kl = grad_of(lambda log_pi: (log_q.exp() * (log_q - log_pi)).sum())
    assert reverse_kl.abs().max() > 1e-2 and (reverse_kl - forward_kl).abs().max() > 1e-2

    torch.testing.assert_close(grad_of(on_policy_loss(kl_k2)), reverse_kl)
    torch.testing.assert_close(grad_of(on_policy_loss(kl_k3)), forward_kl)
    torch.testing.assert_close(
        grad_of(on_policy_loss(kl_k1)), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12
    )


# ---------------------------------------------------------------------------------------
# Controllers
# ---------------------------------------------------------------------------------------


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(current_kl=100.0, n_steps=1000) == 0.05
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_by_hand():
    """init_beta = 0.1, target = 6, horizon = 10000 (Ziegler et al. 2019):

    KL = 12 (= 2 * target): e = clip(12/6 - 1, -0.2, 0.2) = 0.2; n_steps = horizon
        -> beta = 0.1 * (1 + 0.2 * 1) = 0.12
    KL = 6.6: e = 0.1 (unclipped); n_steps = 5000 -> beta = 0.12 * (1 + 0.1 * 0.5) = 0.126
    KL = 3: e = clip(-0.5) = -0.2; n_steps = 512 -> beta = 0.126 * (1 - 0.2 * 0.0512)
        = 0.126 * 0.98976 = 0.12470976
    KL = 6 (= target): e = 0 -> beta unchanged.
    """
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, n_steps=10000) == pytest.approx(0.12, rel=1e-12)
    assert ctl.update(6.6, n_steps=5000) == pytest.approx(0.126, rel=1e-12)
    assert ctl.update(3.0, n_steps=512) == pytest.approx(0.12470976, rel=1e-12)
    before = ctl.value
    ctl.update(6.0, n_steps=4096)
    assert ctl.value == pytest.approx(before, rel=1e-15)
    ctl.update(torch.tensor(12.0), n_steps=10000)  # a 0-d tensor is accepted too
    assert ctl.value == pytest.approx(before * 1.2, rel=1e-6)


def test_adaptive_controller_state_round_trip():
    """A controller restored from state_dict continues exactly like the original."""
    ctl = AdaptiveKLController(init_beta=0.2, target=4.0, horizon=1000)
    for kl in (1.0, 9.0, 5.0):
        ctl.update(kl, n_steps=64)
    restored = AdaptiveKLController(init_beta=0.2, target=4.0, horizon=1000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    assert restored.update(7.0, n_steps=64) == ctl.update(7.0, n_steps=64)


def test_linear_controller_schedule_and_round_trip():
    """beta_start = 0.2, beta_end = 0.05, total_steps = 100:
    s = 0 -> 0.2; s = 50 -> 0.2 + (0.05 - 0.2) * 0.5 = 0.125; s = 100 -> 0.05; s = 130 -> 0.05.
    The measured KL is ignored."""
    ctl = LinearKLController(beta_start=0.2, beta_end=0.05, total_steps=100)
    assert ctl.value == pytest.approx(0.2)
    assert ctl.update(123.0, n_steps=50) == pytest.approx(0.125)
    state = ctl.state_dict()
    assert ctl.update(0.0, n_steps=50) == pytest.approx(0.05)
    assert ctl.update(0.0, n_steps=30) == pytest.approx(0.05)

    restored = LinearKLController(beta_start=0.2, beta_end=0.05, total_steps=100)
    restored.load_state_dict(state)
    assert restored.value == pytest.approx(0.125)
    assert restored.update(0.0, n_steps=25) == pytest.approx(0.0875)


def test_make_kl_controller():
    assert set(KL_CONTROLLERS) == {"fixed", "linear", "adaptive", "lagrangian"}
    ctl = make_kl_controller("adaptive", init_beta=0.1, target=6.0, horizon=10000)
    assert isinstance(ctl, AdaptiveKLController) and ctl.value == 0.1
    assert isinstance(make_kl_controller("fixed", beta=0.3), FixedKLController)
    lin = make_kl_controller("linear", beta_start=1.0, beta_end=0.0, total_steps=10)
    assert isinstance(lin, LinearKLController)
    with pytest.raises(ValueError, match="unknown KL controller"):
        make_kl_controller("pid", beta=0.1)


@pytest.mark.parametrize(
    "ctor",
    [
        lambda: AdaptiveKLController(init_beta=0.1, target=0.0, horizon=10),
        lambda: AdaptiveKLController(init_beta=0.1, target=6.0, horizon=0),
        lambda: LinearKLController(beta_start=0.1, beta_end=0.0, total_steps=0),
        lambda: FixedKLController(-1.0),
    ],
)
def test_controllers_reject_bad_hyperparameters(ctor):
    with pytest.raises(ValueError):
        ctor()
