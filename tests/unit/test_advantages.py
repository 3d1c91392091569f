"""Advantages against hand-derived numbers and naive loops (rlhflab.advantages)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab.advantages import (
    batch_mean_baseline,
    gae,
    group_mean_baseline,
    grpo_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)

NAN = float("nan")


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------


def test_masked_mean_and_var_by_hand():
    """x = [[1, 2, 3], [4, 5, 6]], mask = [[1, 1, 0], [1, 0, 0]]: valid values 1, 2, 4.

    mean = 7/3; per row (dim=1): (1 + 2)/2 = 1.5 and 4.
    squared deviations: (4/3)^2 + (1/3)^2 + (5/3)^2 = (16 + 1 + 25)/9 = 14/3
    unbiased var = (14/3)/2 = 7/3; biased var = (14/3)/3 = 14/9.
    The padded entries hold nan/inf in the second copy and must not matter.
    """
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for x in (_t([[1, 2, 3], [4, 5, 6]]), _t([[1, 2, NAN], [4, float("inf"), NAN]])):
        assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
        torch.testing.assert_close(masked_mean(x, mask, dim=1), _t([1.5, 4.0]))
        assert masked_var(x, mask).item() == pytest.approx(7 / 3)
        assert masked_var(x, mask.bool(), unbiased=False).item() == pytest.approx(14 / 9)


def test_masked_mean_of_empty_slice_is_zero():
    """A row with no valid entry averages to 0 (denominator floored at 1), not nan."""
    x = _t([[1, 2], [3, 4]])
    mask = torch.tensor([[1, 1], [0, 0]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), _t([1.5, 0.0]))


def test_masked_whiten_mean_zero_std_one():
    """Over valid entries: mean 0 and (unbiased) std 1; padded entries come out 0. With
    shift_mean=False the std is still 1 but the mean stays that of x."""
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 2.5 * torch.randn(4, 7, dtype=torch.float64, generator=gen)
    lengths = torch.tensor([7, 3, 5, 1])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    x = torch.where(mask, x, torch.full_like(x, NAN))
    valid_x = x[mask]

    white = masked_whiten(x, mask)
    assert white[mask].mean().item() == pytest.approx(0.0, abs=1e-12)
    assert white[mask].std().item() == pytest.approx(1.0, rel=1e-6)
    assert (white[~mask] == 0).all()

    kept = masked_whiten(x, mask.float(), shift_mean=False)
    assert kept[mask].mean().item() == pytest.approx(valid_x.mean().item(), rel=1e-12)
    assert kept[mask].std().item() == pytest.approx(1.0, rel=1e-6)
    assert (kept[~mask] == 0).all()


# ---------------------------------------------------------------------------------------
# Per-token rewards and GAE
# ---------------------------------------------------------------------------------------


def test_per_token_rewards_places_score_at_last_valid_token():
    """beta = 0.5, k1 = [[0.1, 0.2, 0.3], [0.4, 0.5, nan]], scores = (1, 2):

    row 0 (3 valid): (-0.05, -0.10, -0.15 + 1) = (-0.05, -0.1, 0.85)
    row 1 (2 valid): (-0.20, -0.25 + 2, 0)     = (-0.2, 1.75, 0)  (nan pad ignored)
    """
    k1 = _t([[0.1, 0.2, 0.3], [0.4, 0.5, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = per_token_rewards(_t([1.0, 2.0]), k1, mask, beta=0.5)
    torch.testing.assert_close(out, _t([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))


def test_per_token_rewards_last_valid_with_left_zeros_and_empty_row():
    """With zeros before the response (a prompt part) the score still goes to the last 1,
    position 3 here (mask.sum(1) - 1 = 1 would be wrong). A row without any valid token
    would silently lose its score, so it is an error."""
    mask = torch.tensor([[0, 0, 1, 1, 0]])
    out = per_token_rewards(_t([5.0]), torch.zeros(1, 5, dtype=torch.float64), mask, beta=0.1)
    torch.testing.assert_close(out, _t([[0, 0, 0, 5.0, 0]]))
    with pytest.raises(ValueError, match="at least one valid token"):
        per_token_rewards(_t([1.0]), torch.zeros(1, 3), torch.zeros(1, 3), beta=0.1)


def test_gae_gamma1_lam1_is_return_minus_value():
    """gamma = lam = 1: A_t = (sum_{s >= t} r_s) - V_t.

    r = (0.1, -0.2, 1.0), V = (0.5, 0.3, 0.8)
    returns-to-go G = (0.9, 0.8, 1.0); A = G - V = (0.4, 0.5, 0.2); returns = A + V = G.
    """
    adv, ret = gae(
        _t([[0.1, -0.2, 1.0]]), _t([[0.5, 0.3, 0.8]]), torch.ones(1, 3), gamma=1.0, lam=1.0
    )
    torch.testing.assert_close(adv, _t([[0.4, 0.5, 0.2]]))
    torch.testing.assert_close(ret, _t([[0.9, 0.8, 1.0]]))


def test_gae_gamma_lambda_by_hand_with_padding():
    """gamma = 0.9, lam = 0.8 (gamma*lam = 0.72).

    Row 0, r = (0, 0, 1), V = (0.5, 0.6, 0.7), 3 valid tokens:
      delta_2 = 1 - 0.7 = 0.3                       A_2 = 0.3
      delta_1 = 0.9*0.7 - 0.6 = 0.03                A_1 = 0.03 + 0.72*0.3   = 0.246
      delta_0 = 0.9*0.6 - 0.5 = 0.04                A_0 = 0.04 + 0.72*0.246 = 0.21712
      returns = A + V = (0.71712, 0.846, 1.0)
    Row 1, r = (0, 1, 99), V = (0.5, 0.6, nan), mask (1, 1, 0): the padded reward and
    value are never read, no bootstrap after the last valid token:
      delta_1 = 1 - 0.6 = 0.4                       A_1 = 0.4
      delta_0 = 0.9*0.6 - 0.5 = 0.04                A_0 = 0.04 + 0.72*0.4 = 0.328
      returns = (0.828, 1.0, 0); advantages and returns are 0 at the pad.
    """
    rewards = _t([[0, 0, 1], [0, 1, 99]])
    values = _t([[0.5, 0.6, 0.7], [0.5, 0.6, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, _t([[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]]))
    torch.testing.assert_close(ret, _t([[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]]))


def _naive_gae(rewards, values, mask, gamma, lam):
    """Per row, per valid token, in plain python floats: the textbook recursion on the
    compacted sequence of valid tokens; masked positions get advantage 0 and return 0."""
    batch, length = len(rewards), len(rewards[0])
    adv = [[0.0] * length for _ in range(batch)]
    ret = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        idx = [t for t in range(length) if mask[b][t]]
        last_adv, next_value = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            last_adv = delta + gamma * lam * last_adv
            adv[b][t] = last_adv
            ret[b][t] = last_adv + values[b][t]
            next_value = values[b][t]
    return _t(adv), _t(ret)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (0.7, 1.0)])
def test_gae_matches_naive_loop_on_ragged_masks(gamma, lam):
    """Right padding, left zeros (a prompt part), holes in the middle, an all-valid row and
    an empty row; pads hold nan. Masked positions: advantage and return defined as 0."""
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 1, 1, 0],
            [1, 1, 0, 0, 1, 1, 0, 1],
            [0, 0, 0, 0, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    rewards = torch.randn(mask.shape, dtype=torch.float64, generator=gen)
    values = torch.randn(mask.shape, dtype=torch.float64, generator=gen)
    expected_adv, expected_ret = _naive_gae(
        rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam
    )
    pad = torch.full_like(rewards, NAN)
    adv, ret = gae(
        torch.where(mask, rewards, pad),
        torch.where(mask, values, pad),
        mask.float(),
        gamma=gamma,
        lam=lam,
    )
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, expected_ret)


# ---------------------------------------------------------------------------------------
# REINFORCE-family baselines
# ---------------------------------------------------------------------------------------


def test_batch_and_group_mean_baselines_by_hand():
    """R = (1, 2, 3, 6, 5, 5, 5, 5): batch mean 32/8 = 4 -> (-3, -2, -1, 2, 1, 1, 1, 1).
    Groups of 4: means 3 and 5 -> (-2, -1, 0, 3, 0, 0, 0, 0)."""
    returns = _t([1, 2, 3, 6, 5, 5, 5, 5])
    torch.testing.assert_close(batch_mean_baseline(returns), _t([-3, -2, -1, 2, 1, 1, 1, 1]))
    torch.testing.assert_close(group_mean_baseline(returns, 4), _t([-2, -1, 0, 3, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_mean_baseline(returns, 3)


def test_rloo_by_hand_and_against_leave_one_out_loop():
    """R = (1, 2, 3, 6), k = 4:
    A_0 = 1 - (2 + 3 + 6)/3 = -8/3     A_1 = 2 - (1 + 3 + 6)/3 = -4/3
    A_2 = 3 - (1 + 2 + 6)/3 = 0        A_3 = 6 - (1 + 2 + 3)/3 = 4
    (= 4/3 * (R - 3)). Second group (5, 5, 5, 5) -> 0.
    """
    returns = _t([1, 2, 3, 6, 5, 5, 5, 5])
    expected = _t([-8 / 3, -4 / 3, 0, 4, 0, 0, 0, 0])
    torch.testing.assert_close(rloo_advantages(returns, 4), expected)

    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(15, dtype=torch.float64, generator=gen)
    loo = []
    for i, r in enumerate(rand.tolist()):
        group = rand[(i // 3) * 3 : (i // 3) * 3 + 3].tolist()
        loo.append(r - (sum(group) - r) / 2)
    torch.testing.assert_close(rloo_advantages(rand, 3), _t(loo))
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(returns, 1)


def test_grpo_by_hand_and_constant_group():
    """Group (1, 2, 3, 6): mean 3, deviations (-2, -1, 0, 3), unbiased variance
    (4 + 1 + 0 + 9)/3 = 14/3, std = sqrt(14/3) = 2.160247 -> A = (-2, -1, 0, 3)/2.160247
    = (-0.925820, -0.462910, 0, 1.388730). Group (5, 5, 5, 5): std 0 -> A = 0/(0 + eps) = 0,
    no nan. Dr. GRPO (scale_std=False): (-2, -1, 0, 3, 0, 0, 0, 0).
    """
    returns = _t([1, 2, 3, 6, 5, 5, 5, 5])
    std = math.sqrt(14 / 3)
    got = grpo_advantages(returns, 4, eps=1e-12)
    torch.testing.assert_close(got, _t([-2 / std, -1 / std, 0, 3 / std, 0, 0, 0, 0]))
    torch.testing.assert_close(
        got[:4], _t([-0.925820, -0.462910, 0.0, 1.388730]), rtol=0, atol=1e-6
    )
    default_eps = grpo_advantages(returns, 4)
    assert torch.isfinite(default_eps).all() and (default_eps[4:] == 0).all()
    torch.testing.assert_close(
        grpo_advantages(returns, 4, scale_std=False), _t([-2, -1, 0, 3, 0, 0, 0, 0])
    )
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo_advantages(returns, 1)


def test_reinforce_pp_by_hand():
    """r = [[0, 0, 1], [0, 2, nan]], mask [[1, 1, 1], [1, 1, 0]], gamma = 1.

    returns-to-go: [[1, 1, 1], [2, 2, -]]. Valid values 1, 1, 1, 2, 2:
    mean 7/5 = 1.4; squared deviations 3*0.16 + 2*0.36 = 1.2; unbiased var 1.2/4 = 0.3;
    std = sqrt(0.3) = 0.547723 -> A = -0.4/0.547723 = -0.730297 and 0.6/0.547723 = 1.095445.
    """
    rewards = _t([[0, 0, 1], [0, 2, NAN]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = reinforce_pp_advantages(rewards, mask, eps=0.0)
    low, high = -0.4 / math.sqrt(0.3), 0.6 / math.sqrt(0.3)
    torch.testing.assert_close(adv, _t([[low, low, low], [high, high, 0.0]]))
    assert low == pytest.approx(-0.730297, abs=1e-6) and high == pytest.approx(1.095445, abs=1e-6)
