"""Losses against hand-derived numbers, naive loops, gradcheck, and stability limits.

Handy constants used in the docstrings:
    softplus(-1) = log(1 + e^-1) = log(1.367879) = 0.313262
    softplus(1)  = 1 + softplus(-1)               = 1.313262
    sigmoid(-1)  = 1 - sigmoid(1) = 1 - 0.731059  = 0.268941
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rlhflab.losses import (
    bradley_terry_loss,
    cdpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    log1mexp,
    orpo_loss,
    plackett_luce_loss,
    simpo_loss,
)
from rlhflab.registry import PREFERENCE_LOSSES

SP_M1 = math.log1p(math.exp(-1.0))  # softplus(-1) = 0.313262
SIG_M1 = 1.0 / (1.0 + math.e)  # sigmoid(-1) = 0.268941


def t(*values: float, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def approx(x: float, rel: float = 1e-5, atol: float = 1e-6):
    return pytest.approx(x, rel=rel, abs=atol)


# ------------------------------------------------------------------ Bradley-Terry


def test_bt_hand_value_and_metrics():
    """r_w = 1, r_l = 0: L = softplus(-1) = log(1 + e^-1) = 0.31326.

    A second identical pair leaves the mean unchanged; accuracy 1, margin 1.
    """
    loss, m = bradley_terry_loss(t(1.0, 1.0), t(0.0, 0.0))
    assert loss.item() == approx(0.31326168)
    assert m == {
        "rm/accuracy": 1.0,
        "rm/margin_mean": 1.0,
        "rm/chosen_mean": 1.0,
        "rm/rejected_mean": 0.0,
    }


def test_bt_margin():
    """r_w = 1, r_l = 0, m = 0.5: softplus(-(1 - 0.5)) = log(1 + e^-0.5) = 0.47408.

    The metric margin_mean is r_w - r_l = 1 (the margin m is not subtracted); a float
    margin equals the same per-pair tensor.
    """
    loss, m = bradley_terry_loss(t(1.0), t(0.0), margin=t(0.5))
    assert loss.item() == approx(0.47407698)
    assert m["rm/margin_mean"] == 1.0
    loss_f, _ = bradley_terry_loss(t(1.0), t(0.0), margin=0.5)
    assert loss_f.item() == approx(0.47407698)


def test_bt_label_smoothing_hand_value():
    """d = 1, eps = 0.1: 0.9 * softplus(-1) + 0.1 * softplus(1)
    = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.281936 + 0.131326 = 0.413262."""
    loss, _ = bradley_terry_loss(t(1.0), t(0.0), label_smoothing=0.1)
    assert loss.item() == approx(0.41326169)


def test_bt_label_smoothing_half_is_independent_of_margin_sign():
    """eps = 0.5: 0.5 * (softplus(-d) + softplus(d)) is even in d, so swapping chosen and
    rejected (d -> -d) changes nothing. For d = 3: 0.5 * (0.048587 + 3.048587) = 1.548587."""
    a, _ = bradley_terry_loss(t(3.0, -2.0), t(0.0, 1.0), label_smoothing=0.5)
    b, _ = bradley_terry_loss(t(0.0, 1.0), t(3.0, -2.0), label_smoothing=0.5)
    assert a.item() == approx(b.item())
    single, _ = bradley_terry_loss(t(3.0), t(0.0), label_smoothing=0.5)
    assert single.item() == approx(0.5 * (math.log1p(math.exp(-3)) + math.log1p(math.exp(3))))


def test_bt_soft_targets_hand_values():
    """Soft labels: l = p softplus(-d) + (1 - p) softplus(d).

    d = 1, p = 0.8: 0.8 * 0.313262 + 0.2 * 1.313262 = 0.250610 + 0.262652 = 0.513262;
    d = 0, p = 0.3: softplus(0) = log 2 = 0.693147 whatever p; the mean of the two is 0.603205.
    dl/dd = sigmoid(d) - p: at d = 1, 0.731059 - 0.8 = -0.068941 (halved by the mean of two)."""
    c = t(1.0, 0.0).requires_grad_(True)
    loss, _ = bradley_terry_loss(c, t(0.0, 0.0), targets=t(0.8, 0.3))
    assert loss.item() == approx(0.6032046)
    loss.backward()
    assert c.grad[0].item() == approx(-0.0689414 / 2)
    assert c.grad[1].item() == approx((0.5 - 0.3) / 2)


def test_bt_soft_targets_one_is_the_hard_loss_and_compose_with_smoothing():
    """p = 1 gives softplus(-d); p = 0.8 with eps = 0.1 is the target q = 0.9 * 0.8 + 0.1 * 0.2
    = 0.74: 0.74 * 0.313262 + 0.26 * 1.313262 = 0.231814 + 0.341448 = 0.573262."""
    hard, _ = bradley_terry_loss(t(1.0, -2.0), t(0.0, 0.5))
    soft, _ = bradley_terry_loss(t(1.0, -2.0), t(0.0, 0.5), targets=t(1.0, 1.0))
    assert soft.item() == approx(hard.item())
    both, _ = bradley_terry_loss(t(1.0), t(0.0), targets=t(0.8), label_smoothing=0.1)
    assert both.item() == approx(0.5732617)


def test_bt_weights_normalized_by_their_sum_and_zero_removes_pair():
    """Pairs d = 1 and d = 0: losses softplus(-1) = 0.313262 and softplus(0) = log 2 = 0.693147.

    weights (1, 0): only the first pair -> 0.313262 (a zero weight removes a pair).
    weights (2, 1): (2 * 0.313262 + 0.693147) / 3 = 0.439890 (normalized by sum of weights).
    weights (4, 2): same as (2, 1).
    """
    cw, cr = t(1.0, 5.0), t(0.0, 5.0)
    only_first, _ = bradley_terry_loss(cw, cr, weights=t(1.0, 0.0))
    assert only_first.item() == approx(SP_M1)
    w21, _ = bradley_terry_loss(cw, cr, weights=t(2.0, 1.0))
    assert w21.item() == approx(0.43989019)
    w42, _ = bradley_terry_loss(cw, cr, weights=t(4.0, 2.0))
    assert w42.item() == approx(w21.item())
    # the zero-weight pair also leaves the centering term and gets no gradient
    r_w, r_l = t(1.0, 5.0, grad=True), t(0.0, 5.0, grad=True)
    loss, _ = bradley_terry_loss(r_w, r_l, weights=t(1.0, 0.0), center_coef=0.01)
    assert loss.item() == approx(SP_M1 + 0.01 * 1.0)
    loss.backward()
    assert r_w.grad[1].item() == 0.0 and r_l.grad[1].item() == 0.0


def test_bt_all_zero_weights_give_zero_not_nan():
    loss, _ = bradley_terry_loss(t(1.0), t(0.0), weights=t(0.0))
    assert loss.item() == 0.0


def test_bt_center_penalty():
    """r_w = 1, r_l = 0, coef 0.01: softplus(-1) + 0.01 * (1 + 0)^2 = 0.313262 + 0.01 = 0.323262.
    The metric is the term added to the loss, 0.01. Shifting both rewards by +c leaves the BT
    part unchanged but raises the penalty: (1+1+0+1)^2 = 9 -> 0.09 for c = 1."""
    loss, m = bradley_terry_loss(t(1.0), t(0.0), center_coef=0.01)
    assert loss.item() == approx(0.32326169)
    assert m["rm/center_penalty"] == approx(0.01)
    shifted, m2 = bradley_terry_loss(t(2.0), t(1.0), center_coef=0.01)
    assert m2["rm/center_penalty"] == approx(0.09)
    assert shifted.item() == approx(SP_M1 + 0.09)
    _, m0 = bradley_terry_loss(t(1.0), t(0.0))
    assert "rm/center_penalty" not in m0


def test_bt_accuracy_counts_ties_as_wrong():
    """Pairs with d = 1, 0, -1: one strict win out of three -> accuracy 1/3; margin mean 0."""
    _, m = bradley_terry_loss(t(1.0, 0.0, 0.0), t(0.0, 0.0, 1.0))
    assert m["rm/accuracy"] == approx(1 / 3)
    assert m["rm/margin_mean"] == approx(0.0)


def test_bt_gradient_by_hand():
    """d L / d r_w = -sigmoid(-d) = -sigmoid(-1) = -0.268941 for one pair with d = 1,
    and d L / d r_l = +0.268941."""
    r_w, r_l = t(1.0, grad=True), t(0.0, grad=True)
    bradley_terry_loss(r_w, r_l)[0].backward()
    assert r_w.grad.item() == approx(-SIG_M1)
    assert r_l.grad.item() == approx(SIG_M1)


def test_bt_gradcheck_float64_all_options():
    gen = torch.Generator().manual_seed(0)
    r_w = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    r_l = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(5, generator=gen, dtype=torch.float64)
    weights = torch.rand(5, generator=gen, dtype=torch.float64)

    def fn(a, b):
        return bradley_terry_loss(
            a, b, margin=margin, weights=weights, label_smoothing=0.1, center_coef=0.05
        )[0]

    assert torch.autograd.gradcheck(fn, (r_w, r_l))


def test_bt_matches_naive_loop():
    """Loss and gradient equal a per-pair python loop of -log(sigmoid(d)) (fine in float64
    for moderate d), weighted and normalized by the sum of weights."""
    gen = torch.Generator().manual_seed(1)
    r_w = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    r_l = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, generator=gen, dtype=torch.float64)
    loss, _ = bradley_terry_loss(r_w, r_l, weights=w)
    g_w, g_l = torch.autograd.grad(loss, (r_w, r_l))

    a = r_w.detach().clone().requires_grad_(True)
    b = r_l.detach().clone().requires_grad_(True)
    naive = sum(w[i] * -torch.log(torch.sigmoid(a[i] - b[i])) for i in range(6)) / w.sum()
    n_w, n_l = torch.autograd.grad(naive, (a, b))
    assert loss.item() == approx(naive.item(), rel=1e-12)
    torch.testing.assert_close(g_w, n_w)
    torch.testing.assert_close(g_l, n_l)


@pytest.mark.parametrize("d", [1e4, -1e4])
def test_bt_stable_for_huge_margins(d):
    """d = +1e4: loss ~ 0; d = -1e4: loss = softplus(1e4) = 1e4 (log(sigmoid) would be -inf)."""
    r_w, r_l = t(d, grad=True), t(0.0, grad=True)
    loss, _ = bradley_terry_loss(r_w, r_l, label_smoothing=0.1, center_coef=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(r_w.grad).all()
    plain, _ = bradley_terry_loss(t(d), t(0.0))
    assert plain.item() == approx(max(0.0, -d), atol=1e-3)


def test_bt_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        bradley_terry_loss(t(1.0, 2.0), t(0.0))


# ------------------------------------------------------------------ Plackett-Luce


def test_pl_hand_value_equal_rewards():
    """K = 3, all rewards 0: choose item 0 among 3 (prob 1/3), then item 1 among 2 (1/2):
    L = -(log 1/3 + log 1/2) = log 6 = 1.791759."""
    loss, _ = plackett_luce_loss(torch.zeros(2, 3))
    assert loss.item() == approx(math.log(6))


def test_pl_hand_value_distinct_rewards():
    """K = 3, r = (2, 1, 0):
    k=0: 2 - log(e^2 + e + 1) = 2 - log(11.107338) = 2 - 2.407606 = -0.407606
    k=1: 1 - log(e + 1)       = 1 - 1.313262              = -0.313262
    L = 0.407606 + 0.313262 = 0.720868."""
    loss, m = plackett_luce_loss(t(2.0, 1.0, 0.0).unsqueeze(0))
    assert loss.item() == approx(0.7208684)
    # pairs (0,1), (0,2), (1,2): margins 1, 2, 1 -> mean 4/3, all correct
    assert m["rm/accuracy"] == 1.0
    assert m["rm/margin_mean"] == approx(4 / 3)
    assert m["rm/top1_accuracy"] == 1.0
    assert m["rm/best_mean"] == 2.0 and m["rm/worst_mean"] == 0.0


def test_pl_k2_equals_bradley_terry():
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    pl, pl_m = plackett_luce_loss(r)
    bt, bt_m = bradley_terry_loss(r[:, 0], r[:, 1])
    assert pl.item() == approx(bt.item(), rel=1e-12)
    assert pl_m["rm/accuracy"] == approx(bt_m["rm/accuracy"])
    assert pl_m["rm/margin_mean"] == approx(bt_m["rm/margin_mean"])


def _naive_pl(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = rewards.new_zeros(())
    for b in range(rewards.shape[0]):
        items = [rewards[b, k] for k in range(rewards.shape[1]) if mask[b, k]]
        for k in range(len(items) - 1):
            total = total - (items[k] - torch.logsumexp(torch.stack(items[k:]), dim=0))
    return total / rewards.shape[0]


def test_pl_mask_matches_naive_loop_and_shorter_ranking():
    """Row 0 ranks 4 items, row 1 ranks 3 (last masked), row 2 ranks 2, row 3 only 1 item
    (contributes 0). A row (a, b, pad) equals BT on (a, b)."""
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    loss, _ = plackett_luce_loss(r, mask=mask)
    (g,) = torch.autograd.grad(loss, r)
    r2 = r.detach().clone().requires_grad_(True)
    naive = _naive_pl(r2, mask)
    (g_naive,) = torch.autograd.grad(naive, r2)
    assert loss.item() == approx(naive.item(), rel=1e-12)
    torch.testing.assert_close(g, g_naive)
    assert (g[~mask] == 0).all()

    two = torch.tensor([[1.0, 0.0, 123.0]])
    pl, _ = plackett_luce_loss(two, mask=torch.tensor([[True, True, False]]))
    assert pl.item() == approx(SP_M1)


def test_pl_gradcheck_float64_with_mask():
    gen = torch.Generator().manual_seed(4)
    r = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    assert torch.autograd.gradcheck(lambda x: plackett_luce_loss(x, mask=mask)[0], (r,))


def test_pl_stable_for_huge_rewards():
    """r = (-1e4, 0, 1e4) is the worst possible order: L = 2e4 + 1e4 = 3e4, finite grads."""
    r = t(-1e4, 0.0, 1e4, grad=True)
    loss, _ = plackett_luce_loss(r.unsqueeze(0), mask=torch.tensor([[True, True, True]]))
    loss.backward()
    assert loss.item() == approx(3e4)
    assert torch.isfinite(r.grad).all()


def test_pl_metrics_pairwise_accuracy():
    """Ranking (best first) with rewards (0, 2, 1): pairs (0,1) wrong, (0,2) wrong, (1,2)
    right -> accuracy 1/3; top-1 is item 1, not 0 -> top1 0."""
    _, m = plackett_luce_loss(t(0.0, 2.0, 1.0).unsqueeze(0))
    assert m["rm/accuracy"] == approx(1 / 3)
    assert m["rm/top1_accuracy"] == 0.0


# ------------------------------------------------------------------ DPO family


def _dpo_inputs(h_half: float = 1.0, grad: bool = False):
    """policy_chosen -1, ref_chosen -2 (log-ratio +h/2); policy_rejected -3, ref_rejected
    -2 (log-ratio -h/2), so h = h_half - (-h_half) = 2 * h_half."""
    return (
        t(-2.0 + h_half, grad=grad),
        t(-2.0 - h_half, grad=grad),
        t(-2.0),
        t(-2.0),
    )


def test_dpo_hand_value_and_metrics():
    """h = 1 - (-1) = 2, beta = 0.5: -logsigmoid(1) = softplus(-1) = 0.31326.
    rewards: chosen 0.5 * 1 = 0.5, rejected -0.5, margins 1, accuracies 1;
    logps: chosen -1, rejected -3."""
    loss, m = dpo_loss(*_dpo_inputs(), beta=0.5)
    assert loss.item() == approx(0.31326168)
    assert m == {
        "rewards/chosen": 0.5,
        "rewards/rejected": -0.5,
        "rewards/margins": 1.0,
        "rewards/accuracies": 1.0,
        "logps/chosen": -1.0,
        "logps/rejected": -3.0,
    }


def test_dpo_gradient_by_hand():
    """dL/d policy_chosen = -beta * sigmoid(-beta h) = -0.5 * sigmoid(-1) = -0.134471;
    dL/d policy_rejected = +0.134471."""
    pc, pr, rc, rr = _dpo_inputs(grad=True)
    dpo_loss(pc, pr, rc, rr, beta=0.5)[0].backward()
    assert pc.grad.item() == approx(-0.5 * SIG_M1)
    assert pr.grad.item() == approx(0.5 * SIG_M1)


def test_dpo_gradcheck_and_naive_loop_float64():
    gen = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-5 * torch.rand(6, generator=gen, dtype=torch.float64) for _ in range(4))
    pc, pr = pc.requires_grad_(True), pr.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, beta=0.3)[0], (pc, pr))

    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    naive = (
        sum(-torch.log(torch.sigmoid(0.3 * ((pc[i] - rc[i]) - (pr[i] - rr[i])))) for i in range(6))
        / 6
    )
    assert loss.item() == approx(naive.item(), rel=1e-12)
    g = torch.autograd.grad(loss, (pc, pr))
    g_naive = torch.autograd.grad(naive, (pc, pr))
    torch.testing.assert_close(g, g_naive)


def test_cdpo_eps_zero_equals_dpo_and_hand_value():
    """eps = 0 is DPO. h = 2, beta = 0.5, eps = 0.1: 0.9 * softplus(-1) + 0.1 * softplus(1)
    = 0.281936 + 0.131326 = 0.413262. eps = 0.5 is even in h."""
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(5, generator=gen) for _ in range(4)]
    assert cdpo_loss(*xs, beta=0.2)[0].item() == approx(dpo_loss(*xs, beta=0.2)[0].item())
    assert cdpo_loss(*_dpo_inputs(), beta=0.5, label_smoothing=0.1)[0].item() == approx(0.41326169)
    pc, pr, rc, rr = _dpo_inputs()
    a = cdpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.5)[0]
    b = cdpo_loss(pr, pc, rr, rc, beta=0.5, label_smoothing=0.5)[0]
    assert a.item() == approx(b.item())


def test_dpo_soft_targets_hand_values_and_gradient():
    """Soft labels: l = -[p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)].

    Two pairs, beta = 0.5: h = 2 (beta h = 1), p = 0.8: 0.8 * 0.313262 + 0.2 * 1.313262 =
    0.513262; h = 0, p = 0.3: log 2 = 0.693147 whatever p. Mean 0.603205.
    dl/d(beta h) = sigmoid(beta h) - p, so dL/d policy_chosen of pair 1 =
    beta (0.731059 - 0.8) / 2 = -0.017235 (the mean over two pairs), of pair 2
    0.5 (0.5 - 0.3) / 2 = 0.05."""
    pc, pr = t(-1.0, -2.0, grad=True), t(-3.0, -2.0, grad=True)
    loss, m = dpo_loss(pc, pr, t(-2.0, -2.0), t(-2.0, -2.0), beta=0.5, targets=t(0.8, 0.3))
    assert loss.item() == approx(0.6032046)
    loss.backward()
    assert pc.grad[0].item() == approx(0.5 * (1.0 - SIG_M1 - 0.8) / 2)
    assert pc.grad[1].item() == approx(0.05)
    assert pr.grad[1].item() == approx(-0.05)
    assert m["rewards/margins"] == approx(0.5)


def test_dpo_soft_targets_of_one_are_dpo_and_compose_with_cdpo_smoothing():
    """p = 1 everywhere is DPO; p = 1 - eps is cDPO with that eps; p = 0.8 with eps = 0.1 is
    the target q = 0.9 * 0.8 + 0.1 * 0.2 = 0.74: at beta h = 1, 0.74 * 0.313262 + 0.26 *
    1.313262 = 0.573262. Without targets the numbers are today's exactly."""
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(5, generator=gen) for _ in range(4)]
    ones = torch.ones(5)
    assert dpo_loss(*xs, beta=0.2, targets=ones)[0].item() == approx(dpo_loss(*xs, beta=0.2)[0].item())
    assert dpo_loss(*xs, beta=0.2, targets=ones * 0.9)[0].item() == approx(
        cdpo_loss(*xs, beta=0.2, label_smoothing=0.1)[0].item())
    both = cdpo_loss(*_dpo_inputs(), beta=0.5, label_smoothing=0.1, targets=t(0.8))[0]
    assert both.item() == approx(0.5732617)
    assert torch.equal(cdpo_loss(*xs, beta=0.2, label_smoothing=0.1)[0],
                       -(0.9 * F.logsigmoid(0.2 * ((xs[0] - xs[2]) - (xs[1] - xs[3])))
                         + 0.1 * F.logsigmoid(-0.2 * ((xs[0] - xs[2]) - (xs[1] - xs[3])))).mean())


def test_dpo_soft_target_minimum_at_the_log_odds():
    """The per-pair minimum over h is beta h = log(p / (1 - p)): the gradient vanishes there."""
    p = 0.7
    h_half = math.log(p / (1 - p)) / (2 * 0.5)  # h = 2 h_half, beta h = log(p / (1 - p))
    pc = t(-2.0 + h_half, grad=True)
    dpo_loss(pc, t(-2.0 - h_half), t(-2.0), t(-2.0), beta=0.5, targets=t(p))[0].backward()
    assert abs(pc.grad.item()) < 1e-6


def test_ipo_hand_value_and_gradient():
    """h = 1, tau = 0.25: target 1/(2 * 0.25) = 2, L = (1 - 2)^2 = 1.
    dL/d policy_chosen = 2 (h - 2) = -2. Rewards are tau * log-ratio: 0.25 * 0.5 = 0.125."""
    pc, pr, rc, rr = _dpo_inputs(h_half=0.5, grad=True)
    loss, m = ipo_loss(pc, pr, rc, rr, tau=0.25)
    loss.backward()
    assert loss.item() == approx(1.0)
    assert pc.grad.item() == approx(-2.0)
    assert pr.grad.item() == approx(2.0)
    assert m["rewards/chosen"] == approx(0.125)
    assert m["rewards/margins"] == approx(0.25)


def test_ipo_zero_at_target():
    """h = 2 = 1/(2 tau) with tau = 0.25: L = 0 (IPO does not push h to infinity)."""
    assert ipo_loss(*_dpo_inputs(h_half=1.0), tau=0.25)[0].item() == approx(0.0)


def test_ipo_normalize_averages_each_log_ratio_over_its_tokens():
    """TRL's IPO. Chosen log-ratio -1 - (-2) = +1 over 2 tokens -> 0.5; rejected -3 - (-2) =
    -1 over 4 tokens -> -0.25; h = 0.75. tau = 0.25, target 2: L = (0.75 - 2)^2 = 1.5625
    (summed: h = 2, L = 0). dL/d policy_chosen = 2 (0.75 - 2) / 2 = -1.25, dL/d
    policy_rejected = -2 (0.75 - 2) / 4 = +0.625. Rewards stay tau * summed log-ratio:
    0.25 and -0.25. Lengths of 1 give the summed loss."""
    pc, pr, rc, rr = _dpo_inputs(grad=True)
    lc, lr = torch.tensor([2]), torch.tensor([4])
    assert ipo_loss(pc, pr, rc, rr, tau=0.25)[0].item() == approx(0.0)
    loss, m = ipo_loss(pc, pr, rc, rr, tau=0.25, normalize=True, chosen_lengths=lc, rejected_lengths=lr)
    loss.backward()
    assert loss.item() == approx(1.5625)
    assert pc.grad.item() == approx(-1.25) and pr.grad.item() == approx(0.625)
    assert m["rewards/chosen"] == approx(0.25) and m["rewards/rejected"] == approx(-0.25)
    assert m["logps/chosen"] == -1.0 and m["logps/rejected"] == -3.0
    ones = torch.ones(1)
    summed = ipo_loss(*_dpo_inputs(h_half=0.5), tau=0.25)[0]
    unit = ipo_loss(*_dpo_inputs(h_half=0.5), tau=0.25, normalize=True, chosen_lengths=ones,
                    rejected_lengths=ones)[0]
    assert unit.item() == summed.item() == approx(1.0)
    # the lengths are ignored unless normalize is set, and required when it is
    assert ipo_loss(*_dpo_inputs(), tau=0.25, chosen_lengths=lc, rejected_lengths=lr)[0].item() == approx(0.0)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        ipo_loss(*_dpo_inputs(), tau=0.25, normalize=True)


def test_hinge_hand_values():
    """h = 2: beta = 0.25 -> relu(1 - 0.5) = 0.5, dL/d policy_chosen = -beta = -0.25;
    beta = 1 -> relu(1 - 2) = 0 with zero gradient (beyond the margin)."""
    pc, pr, rc, rr = _dpo_inputs(grad=True)
    loss, _ = hinge_loss(pc, pr, rc, rr, beta=0.25)
    loss.backward()
    assert loss.item() == approx(0.5)
    assert pc.grad.item() == approx(-0.25)
    pc, pr, rc, rr = _dpo_inputs(grad=True)
    loss, _ = hinge_loss(pc, pr, rc, rr, beta=1.0)
    loss.backward()
    assert loss.item() == 0.0 and pc.grad.item() == 0.0


def test_simpo_hand_value_and_metrics():
    """log pi(y_w) = -4 over 2 tokens -> -2; log pi(y_l) = -9 over 3 tokens -> -3.
    beta = 2, gamma = 0.5: 2(-2) - 2(-3) - 0.5 = 1.5; L = softplus(-1.5) = log(1 + e^-1.5)
    = log(1.223130) = 0.201413. Rewards are beta * logp / len: chosen -4, rejected -6."""
    loss, m = simpo_loss(
        t(-4.0), t(-9.0), torch.tensor([2]), torch.tensor([3]), beta=2.0, gamma=0.5
    )
    assert loss.item() == approx(0.20141328)
    assert m["rewards/chosen"] == approx(-4.0)
    assert m["rewards/rejected"] == approx(-6.0)
    assert m["rewards/margins"] == approx(2.0)
    assert m["rewards/accuracies"] == 1.0
    # logps/* per token, as TRL's SimPO reports them; the sums beside them
    assert m["logps/chosen"] == -2.0 and m["logps/rejected"] == -3.0
    assert m["logps/chosen_sum"] == -4.0 and m["logps/rejected_sum"] == -9.0
    assert "simpo/nll_loss" not in m


def test_simpo_nll_term_is_pooled_over_all_chosen_tokens():
    """TRL's cpo_alpha term. Chosen log-probs -4 over 2 tokens and -2 over 6 tokens:
    pooled NLL = (4 + 2) / (2 + 6) = 0.75 (a per-response mean would be (2 + 1/3) / 2 =
    1.1667). nll_coef = 0.5 adds 0.5 * 0.75 = 0.375 to the loss; its gradient on each chosen
    log-prob is -0.5 / (B * mean length) = -0.5 / (2 * 4) = -0.0625.
    Given the mean chosen length of a larger batch (chosen_length_mean = 2), the term is
    mean(4/2, 2/2) = 1.5, and the halves of a batch, each given the whole batch's mean
    length, average to the whole batch's loss."""
    pc, pr = t(-4.0, -2.0, grad=True), t(-9.0, -9.0)
    lc, lr = torch.tensor([2, 6]), torch.tensor([3, 3])
    base, _ = simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5)
    loss, m = simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5, nll_coef=0.5)
    assert loss.item() - base.item() == approx(0.375)
    assert m["simpo/nll_loss"] == approx(0.75)
    g_base = torch.autograd.grad(base, pc)[0]
    g = torch.autograd.grad(loss, pc)[0]
    torch.testing.assert_close(g - g_base, torch.tensor([-0.0625, -0.0625]))
    _, m2 = simpo_loss(pc, pr, lc, lr, nll_coef=1.0, chosen_length_mean=2.0)
    assert m2["simpo/nll_loss"] == approx(1.5)

    gen = torch.Generator().manual_seed(11)
    pc4, pr4 = -10 * torch.rand(4, generator=gen), -10 * torch.rand(4, generator=gen)
    lc4, lr4 = torch.tensor([1, 3, 5, 7]), torch.tensor([2, 2, 9, 1])
    whole = simpo_loss(pc4, pr4, lc4, lr4, nll_coef=1.0)[0]
    halves = [simpo_loss(pc4[i:i + 2], pr4[i:i + 2], lc4[i:i + 2], lr4[i:i + 2], nll_coef=1.0,
                         chosen_length_mean=lc4.float().mean())[0] for i in (0, 2)]
    assert (halves[0] + halves[1]).item() / 2 == approx(whole.item())


def test_simpo_gradcheck_float64():
    gen = torch.Generator().manual_seed(7)
    pc = -10 * torch.rand(4, generator=gen, dtype=torch.float64)
    pr = -10 * torch.rand(4, generator=gen, dtype=torch.float64)
    lc, lr = torch.tensor([1, 3, 5, 7]), torch.tensor([2, 2, 9, 1])
    assert torch.autograd.gradcheck(
        lambda a, b: simpo_loss(a, b, lc, lr)[0],
        (pc.requires_grad_(True), pr.requires_grad_(True)),
    )


def test_orpo_hand_value():
    """Chosen: 2 tokens, each p = 0.5 -> a_w = log 0.5, odds 1, log odds 0.
    Rejected: 3 tokens, each p = 0.2 -> a_l = log 0.2, odds 0.25, log odds -1.386294.
    NLL = -log 0.5 = 0.693147; log sigmoid(0 + 1.386294) = -log(1 + 0.25) = -0.223144.
    lam = 0.1: L = 0.693147 + 0.1 * 0.223144 = 0.715462."""
    loss, m = orpo_loss(
        t(2 * math.log(0.5)), t(3 * math.log(0.2)), torch.tensor([2]), torch.tensor([3]), lam=0.1
    )
    assert loss.item() == approx(0.71546154)
    assert m["orpo/nll_loss"] == approx(math.log(2))
    assert m["orpo/log_odds_chosen"] == approx(math.log(4))
    assert m["orpo/log_odds_ratio"] == approx(-math.log(1.25))
    assert m["rewards/chosen"] == approx(0.1 * math.log(0.5))
    # logps/* per token, as TRL's ORPO reports them; the sums beside them
    assert m["logps/chosen"] == approx(math.log(0.5)) and m["logps/rejected"] == approx(math.log(0.2))
    assert m["logps/chosen_sum"] == approx(2 * math.log(0.5))
    assert m["logps/rejected_sum"] == approx(3 * math.log(0.2))


def test_orpo_token_nll_is_pooled_over_all_chosen_tokens():
    """TRL's ORPO NLL. Chosen log-probs -2 over 1 token and -2 over 3 tokens: per response
    the NLL is (2 + 2/3) / 2 = 1.333333; pooled over the 4 chosen tokens it is 4 / 4 = 1.
    The odds-ratio term is the same either way, so the losses differ by 1 - 1.333333.
    Equal lengths make the two the same; halves of a batch given the whole batch's mean
    chosen length (2) average to the whole batch's loss."""
    pc, pr = t(-2.0, -2.0), t(-6.0, -6.0)
    lc, lr = torch.tensor([1, 3]), torch.tensor([2, 2])
    seq, m_seq = orpo_loss(pc, pr, lc, lr, lam=0.1)
    tok, m_tok = orpo_loss(pc, pr, lc, lr, lam=0.1, nll="token")
    assert m_seq["orpo/nll_loss"] == approx(4 / 3) and m_tok["orpo/nll_loss"] == approx(1.0)
    assert tok.item() - seq.item() == approx(1.0 - 4 / 3)
    assert m_tok["orpo/log_odds_ratio"] == m_seq["orpo/log_odds_ratio"]
    same = torch.tensor([2, 2])
    assert (orpo_loss(pc, pr, same, lr, nll="token")[0].item()
            == approx(orpo_loss(pc, pr, same, lr)[0].item()))
    halves = [orpo_loss(pc[i:i + 1], pr[i:i + 1], lc[i:i + 1], lr[i:i + 1], lam=0.1, nll="token",
                        chosen_length_mean=2.0)[0] for i in (0, 1)]
    assert (halves[0] + halves[1]).item() / 2 == approx(tok.item())
    with pytest.raises(ValueError, match="nll must be"):
        orpo_loss(pc, pr, lc, lr, nll="pair")


def test_orpo_gradcheck_float64():
    gen = torch.Generator().manual_seed(8)
    pc = -3 * torch.rand(4, generator=gen, dtype=torch.float64) - 0.01
    pr = -3 * torch.rand(4, generator=gen, dtype=torch.float64) - 0.01
    lc, lr = torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 2, 1])
    assert torch.autograd.gradcheck(
        lambda a, b: orpo_loss(a, b, lc, lr, lam=0.5)[0],
        (pc.requires_grad_(True), pr.requires_grad_(True)),
    )


def test_log1mexp_matches_float64_reference_on_both_branches():
    """log(1 - e^a) on both sides of -log 2, in float32 against float64; near 0 the naive
    float32 log1p(-exp(a)) would be -inf for a = -1e-9."""
    a64 = torch.tensor(
        [-50.0, -5.0, -1.0, -0.7, -0.69, -0.1, -1e-3, -1e-6, -1e-9], dtype=torch.float64
    )
    ref = torch.log(-torch.expm1(a64))
    got = log1mexp(a64.float())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    a = a64.float().requires_grad_(True)
    log1mexp(a).sum().backward()
    assert torch.isfinite(a.grad).all()


def test_orpo_probability_one_stays_finite():
    """log pi(y_w) = 0 (probability 1) has infinite log odds; the clamp keeps it finite."""
    pc, pr = t(0.0, grad=True), t(-2.0, grad=True)
    loss, _ = orpo_loss(pc, pr, torch.tensor([3]), torch.tensor([3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize(
    ("name", "sign"), list(itertools.product(sorted(PREFERENCE_LOSSES.where(unpaired=False)), [1, -1]))
)
def test_paired_losses_stable_for_huge_margins(name, sign):
    """Log-ratio differences of +-1e4 (and log-probs of -1e4 for the reference-free losses)
    give a finite loss and finite gradients in float32."""
    big = 1e4
    pc = t(-1.0 if sign > 0 else -big, grad=True)
    pr = t(-big if sign > 0 else -1.0, grad=True)
    if PREFERENCE_LOSSES.entry(name).options["reference_free"]:
        third, fourth = torch.tensor([1]), torch.tensor([1])
    else:
        third, fourth = t(-1.0), t(-1.0)
    loss, m = PREFERENCE_LOSSES[name](pc, pr, third, fourth)
    loss.backward()
    assert torch.isfinite(loss), name
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), name
    assert all(math.isfinite(v) for v in m.values())


def test_registry_contract():
    """Every registered loss returns a scalar tensor with a grad and a flat dict of floats
    containing the DPO-family keys; KTO is kept apart because its inputs are unpaired."""
    paired = PREFERENCE_LOSSES.where(unpaired=False)
    assert set(paired) == {"dpo", "cdpo", "ipo", "hinge", "simpo", "orpo"}
    assert PREFERENCE_LOSSES.where(unpaired=True) == ("kto",)
    assert set(PREFERENCE_LOSSES.where(reference_free=True)) == {"simpo", "orpo"}
    gen = torch.Generator().manual_seed(9)
    pc = (-5 * torch.rand(3, generator=gen)).requires_grad_(True)
    pr = (-5 * torch.rand(3, generator=gen)).requires_grad_(True)
    for name in paired:
        fn = PREFERENCE_LOSSES[name]
        if PREFERENCE_LOSSES.entry(name).options["reference_free"]:
            extra = (torch.tensor([2, 3, 4]), torch.tensor([3, 3, 3]))
        else:
            extra = (-5 * torch.rand(3, generator=gen), -5 * torch.rand(3, generator=gen))
        loss, m = fn(pc, pr, *extra)
        assert loss.dim() == 0 and loss.requires_grad, name
        assert all(type(v) is float for v in m.values()), name
        for key in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ):
            assert key in m, (name, key)


# ------------------------------------------------------------------ KTO


def test_kto_hand_value():
    """beta = 0.5, kl_ref_point = -0.5 -> z0 = max(0, -0.5) = 0.
    desirable r = 2:    1 - sigmoid(0.5 * (2 - 0))    = 1 - sigmoid(1) = 0.268941
    undesirable r = -2: 1 - sigmoid(0.5 * (0 - (-2))) = 1 - sigmoid(1) = 0.268941, w_u = 2
    L = (0.268941 + 2 * 0.268941) / 2 = 0.403412.
    Metrics: rewards/chosen = 0.5 * 2 = 1, rewards/rejected = -1, margins 2, kl 0."""
    loss, m = kto_loss(
        t(-1.0, -5.0),
        t(-3.0, -3.0),
        torch.tensor([True, False]),
        t(-0.5).squeeze(),
        beta=0.5,
        undesirable_weight=2.0,
    )
    assert loss.item() == approx(0.40341213)
    assert m == {
        "count/chosen": 1.0,
        "count/rejected": 1.0,
        "kl": 0.0,
        "rewards/chosen": 1.0,
        "logps/chosen": -1.0,
        "rewards/rejected": -1.0,
        "logps/rejected": -5.0,
        "rewards/margins": 2.0,
    }


def test_kto_reference_point_shifts_values():
    """z0 = 2, beta = 1, desirable r = 2: 1 - sigmoid(0) = 0.5."""
    loss, m = kto_loss(t(0.0), t(-2.0), torch.tensor([True]), 2.0, beta=1.0)
    assert loss.item() == approx(0.5)
    assert m["kl"] == 2.0


def test_kto_reference_point_is_detached_and_clamped():
    """mean(policy - ref) over mismatched pairs: (0.5 + 1.5)/2 = 1 -> z0 = 1;
    (-1 - 2)/2 = -1.5 -> clamped to 0. No gradient reaches the mismatched log-probs, even
    when an undetached estimate is passed straight to kto_loss."""
    pol = t(0.5, 1.5, grad=True)
    z0 = kto_reference_point(pol, t(0.0, 0.0))
    assert z0.item() == approx(1.0) and not z0.requires_grad
    assert kto_reference_point(t(-1.0, -2.0), t(0.0, 0.0)).item() == 0.0

    raw = (pol - t(0.0, 0.0)).mean()  # requires grad
    policy = t(-1.0, -2.0, grad=True)
    loss, _ = kto_loss(policy, t(-1.5, -1.5), torch.tensor([True, False]), raw)
    loss.backward()
    assert pol.grad is None
    assert policy.grad is not None and torch.isfinite(policy.grad).all()


def test_kto_gradcheck_float64():
    gen = torch.Generator().manual_seed(10)
    pol = -5 * torch.rand(6, generator=gen, dtype=torch.float64)
    ref = -5 * torch.rand(6, generator=gen, dtype=torch.float64)
    des = torch.tensor([True, False, True, True, False, False])
    assert torch.autograd.gradcheck(
        lambda p: kto_loss(p, ref, des, 0.3, beta=0.7, desirable_weight=1.3)[0],
        (pol.requires_grad_(True),),
    )


def test_kto_metrics_without_one_kind_have_no_nan():
    """An all-desirable batch omits rewards/rejected, logps/rejected and margins; counts
    stay present."""
    _, m = kto_loss(t(-1.0, -2.0), t(-1.0, -1.0), torch.tensor([True, True]), 0.0)
    assert m["count/rejected"] == 0.0 and m["count/chosen"] == 2.0
    assert "rewards/rejected" not in m and "rewards/margins" not in m
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("r", [1e4, -1e4])
def test_kto_stable_for_huge_log_ratios(r):
    policy = t(r, r, grad=True)
    loss, _ = kto_loss(policy, t(0.0, 0.0), torch.tensor([True, False]), 0.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(policy.grad).all()
    assert loss.item() == approx(0.5)  # one example saturated at 0, the other at 1


def test_kto_rejects_non_bool_labels():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(t(0.0), t(0.0), torch.tensor([1]), 0.0)
