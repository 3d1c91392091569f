"""The online-RL options that follow a peer's convention (dual-clip PPO, the KL cap, k3 times
the ratio, REINFORCE++-baseline, advantage whitening per algorithm) and the settings an
algorithm does not read (rlhflab.algos.rl_config.ignored_settings), against hand-derived
numbers. docs/online-rl.md tables the conventions."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlhflab.advantages import (
    per_token_rewards,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
)
from rlhflab.algos.reinforce import reinforce_advantages
from rlhflab.algos.rl_config import resolve_rl_config
from rlhflab.config import RLConfig
from rlhflab.errors import InputError
from rlhflab.kl import cap_kl, kl_estimate, kl_k2, kl_k3, kl_k3_ratio
from rlhflab.losses import (
    Counts,
    PolicyLossSettings,
    clipped_surrogate,
    dual_clipped_surrogate,
    policy_gradient_loss,
)
from rlhflab.registry import ONLINE_ALGORITHMS

# ---------------------------------------------------------------------------------------
# Dual-clip PPO
# ---------------------------------------------------------------------------------------


def test_dual_clip_by_hand_both_signs_both_sides_of_the_clip():
    """eps = 0.2, c = 3. For A >= 0, PPO's l = max(-A rho, -A clip(rho, 0.8, 1.2)); for A < 0,
    l = min(max(-A rho, -A clip(rho)), -c A) = -A min(max(rho, 0.8), 3):

    A=-1, rho=4:   PPO max(4, 1.2) = 4;   min(4, 3) = 3     dual clip binds: dl/dlog pi = 0
    A=-2, rho=3.5: PPO 7;                 min(7, 6) = 6     dual clip binds: 0
    A=-1, rho=2:   PPO max(2, 1.2) = 2;   min(2, 3) = 2     dl/dlog pi = -A rho = 2
    A=-1, rho=0.5: PPO max(0.5, 0.8) = 0.8 (clipped);  0.8  0
    A=+1, rho=4:   PPO max(-4, -1.2) = -1.2 (clipped); the same, A > 0: 0
    A=+1, rho=0.5: PPO max(-0.5, -0.8) = -0.5;  the same;   dl/dlog pi = -A rho = -0.5
    """
    rho = torch.tensor([[4.0, 3.5, 2.0, 0.5, 4.0, 0.5]])
    adv = torch.tensor([[-1.0, -2.0, -1.0, -1.0, 1.0, 1.0]])
    old = torch.zeros(1, 6)
    lp = rho.log().requires_grad_()
    loss, ratio, clipped, dual = dual_clipped_surrogate(lp, old, adv, clip_eps=0.2, dual_clip=3.0)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([[3.0, 6.0, 2.0, 0.8, -1.2, -0.5]]))
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, 0.0, 2.0, 0.0, 0.0, -0.5]]))
    torch.testing.assert_close(dual, torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(ratio.detach(), rho)
    # PPO's clip indicator unchanged; where the dual clip does not bind, PPO's loss unchanged
    ppo, _, ppo_clipped = clipped_surrogate(lp.detach(), old, adv, clip_eps=0.2)
    torch.testing.assert_close(clipped, ppo_clipped)
    torch.testing.assert_close(loss.detach()[:, 2:], ppo[:, 2:])
    torch.testing.assert_close(ppo[:, :2], torch.tensor([[4.0, 7.0]]))
    # the closed form for A < 0: -A min(max(rho, 1 - eps), c)
    negative = adv < 0
    torch.testing.assert_close(loss.detach()[negative], (-adv * rho.clamp(0.8, 3.0))[negative])
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        dual_clipped_surrogate(lp, old, adv, dual_clip=1.0)


def test_dual_clip_is_trls_two_sided_clip_with_c_delta():
    """TRL's GRPO ``delta`` (INTELLECT-2): coef_1 = min(rho, delta), coef_2 = clip(rho, 0.8, 1.2),
    l = -min(coef_1 A, coef_2 A). For A > 0 and delta > 1.2 that is -A min(rho, 1.2), PPO's; for
    A < 0, -A max(min(rho, delta), clip(rho)) = -A min(max(rho, 0.8), delta), the dual clip with
    c = delta: equal losses and gradients on both sides of both clips (delta = 3)."""
    rho = torch.tensor([[0.5, 0.9, 1.1, 1.5, 2.5, 4.0, 0.5, 1.5, 4.0]])
    adv = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -2.0, -1.0, 1.0, 1.0, 1.0]])
    ours_lp, trl_lp = rho.log().requires_grad_(), rho.log().requires_grad_()
    ours, *_ = dual_clipped_surrogate(ours_lp, torch.zeros(1, 9), adv, clip_eps=0.2, dual_clip=3.0)
    r = trl_lp.exp()
    trl = -torch.minimum(r.clamp(max=3.0) * adv, r.clamp(0.8, 1.2) * adv)
    ours.sum().backward()
    trl.sum().backward()
    torch.testing.assert_close(ours, trl)
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad)


def test_policy_loss_takes_the_dual_clip_and_reports_where_it_binds():
    """The six tokens above, one row, token_mean over 6 tokens: PPO's loss sums to
    4 + 7 + 2 + 0.8 - 1.2 - 0.5 = 12.1 -> 12.1 / 6; dual-clipped 3 + 6 + 2 + 0.8 - 1.2 - 0.5
    = 10.1 -> 10.1 / 6; policy/dual_clipfrac = 2 / 6, absent without the dual clip."""
    rho = torch.tensor([[4.0, 3.5, 2.0, 0.5, 4.0, 0.5]])
    adv = torch.tensor([[-1.0, -2.0, -1.0, -1.0, 1.0, 1.0]])
    mask, counts = torch.ones(1, 6), Counts(n_seqs=1.0, n_tokens=6.0, max_len=6)
    plain, sums = policy_gradient_loss(rho.log(), torch.zeros(1, 6), adv, mask, counts, PolicyLossSettings())
    dual, dual_sums = policy_gradient_loss(rho.log(), torch.zeros(1, 6), adv, mask, counts,
                                           PolicyLossSettings(dual_clip=3.0))
    assert plain.item() == pytest.approx(12.1 / 6) and dual.item() == pytest.approx(10.1 / 6)
    assert "policy/dual_clipfrac" not in sums
    total, n = dual_sums["policy/dual_clipfrac"]
    assert (total / n).item() == pytest.approx(2 / 6)


# ---------------------------------------------------------------------------------------
# The KL cap and k3 x ratio
# ---------------------------------------------------------------------------------------


def test_kl_cap_by_hand():
    """c = 10: (-12, -3, 0.5, 15) -> (-10, -3, 0.5, 10), gradient 1 inside, 0 where capped.
    In the estimators: k2 at l = 5 is 12.5 -> 10; k3 at l = 3 is e^3 - 4 = 16.0855 -> 10, at
    l = 1 it is e - 2 = 0.71828, under the cap."""
    x = torch.tensor([-12.0, -3.0, 0.5, 15.0], requires_grad=True)
    capped = cap_kl(x, 10.0)
    capped.sum().backward()
    torch.testing.assert_close(capped.detach(), torch.tensor([-10.0, -3.0, 0.5, 10.0]))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert cap_kl(x, None) is x
    with pytest.raises(ValueError, match="cap must be > 0"):
        cap_kl(x, 0.0)
    lp = torch.zeros(1, 2, dtype=torch.float64)
    assert kl_estimate("k2", lp, torch.tensor([[5.0, 1.0]], dtype=torch.float64), cap=10.0).tolist() == [[10.0, 0.5]]
    k3 = kl_estimate("k3", lp, torch.tensor([[3.0, 1.0]], dtype=torch.float64), cap=10.0)
    assert k3[0, 0].item() == 10.0 and k3[0, 1].item() == pytest.approx(math.e - 2, rel=1e-12)
    assert kl_estimate("k3", lp, torch.tensor([[3.0, 1.0]], dtype=torch.float64))[0, 0].item() == pytest.approx(
        math.exp(3.0) - 4.0, rel=1e-12)


def test_k3_ratio_value_and_gradient_by_hand():
    """l = log pi_ref - log pi in (-1, 0, 0.5), rho = pi / pi_old. d/dlog pi of rho k3 is
    rho k3 + rho (1 - e^l) = -rho l; k2's is -l.

    rho = 1 (old = log pi): value k3 = (e^-1 + 1 - 1, 0, e^0.5 - 1.5) = (0.367879, 0, 0.148721),
                            gradient (1, 0, -0.5) = k2's
    rho = 2 (old = log pi - ln 2): value (0.735759, 0, 0.297443), gradient (2, 0, -1)
    """
    base = torch.tensor([[-0.3, -1.2, -2.0]], dtype=torch.float64)
    ref = base + torch.tensor([[-1.0, 0.0, 0.5]], dtype=torch.float64)
    for rho, value, grad in [(1.0, [0.367879441, 0.0, 0.148721271], [1.0, 0.0, -0.5]),
                             (2.0, [0.735758882, 0.0, 0.297442541], [2.0, 0.0, -1.0])]:
        lp = base.clone().requires_grad_()
        k = kl_k3_ratio(lp, ref, old_logprobs=base - math.log(rho))
        k.sum().backward()
        torch.testing.assert_close(k.detach(), torch.tensor([value], dtype=torch.float64), rtol=0, atol=1e-9)
        torch.testing.assert_close(lp.grad, torch.tensor([grad], dtype=torch.float64))
        lp2 = base.clone().requires_grad_()
        kl_k2(lp2, ref).sum().backward()
        torch.testing.assert_close(lp.grad, rho * lp2.grad)  # rho times k2's gradient
    # without old log-probs (the reward, at sampling time) the ratio is 1: k3's value
    torch.testing.assert_close(kl_estimate("k3_ratio", base, ref), kl_k3(base, ref))


def test_k3_ratio_gives_the_reverse_kl_gradient_on_stale_samples():
    """Samples from pi_old, the loss differentiated at pi_theta != pi_old. In expectation
    L_k(theta) = sum_x pi_old(x) k(x); with k = rho k3,
    grad L = sum_x pi_old rho (log pi - log q) grad log pi = sum_x pi (log pi - log q) grad log pi
    = grad KL(pi_theta || q) exactly; k2's sum_x pi_old (log pi - log q) grad log pi is not."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, dtype=torch.float64, generator=gen)
    log_q = torch.log_softmax(torch.randn(6, dtype=torch.float64, generator=gen), dim=-1)
    log_old = torch.log_softmax(logits + 0.7 * torch.randn(6, dtype=torch.float64, generator=gen), dim=-1)

    def grad_of(fn):
        theta = logits.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(torch.log_softmax(theta, dim=-1)), theta)
        return g

    reverse = grad_of(lambda log_pi: (log_pi.exp() * (log_pi - log_q)).sum())
    ratio = grad_of(lambda log_pi: (log_old.exp() * kl_k3_ratio(log_pi, log_q, old_logprobs=log_old)).sum())
    k2 = grad_of(lambda log_pi: (log_old.exp() * kl_k2(log_pi, log_q)).sum())
    torch.testing.assert_close(ratio, reverse)
    assert (k2 - reverse).abs().max() > 1e-2


def test_policy_loss_reads_k3_ratio_against_the_old_log_probs_and_caps_the_kl():
    """One token, A = 0, log pi = log pi_old + ln 2 (rho = 2), l = log pi_ref - log pi = 1:
    k3_ratio = 2 (e - 2) = 1.436564 with beta 1; with kl_clip = 1 the KL term is 1 and its
    gradient 0, so the loss's gradient is 0 (the surrogate's is -A rho = 0)."""
    old = torch.zeros(1, 1, dtype=torch.float64)
    lp = (old + math.log(2.0)).requires_grad_()
    ref = lp.detach() + 1.0
    args = (lp, old, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
            Counts(n_seqs=1.0, n_tokens=1.0, max_len=1))
    loss, _ = policy_gradient_loss(*args, PolicyLossSettings(kl_coef=1.0, kl_estimator="k3_ratio"), ref_logprobs=ref)
    assert loss.item() == pytest.approx(2 * (math.e - 2), rel=1e-12)
    capped, _ = policy_gradient_loss(*args, PolicyLossSettings(kl_coef=1.0, kl_estimator="k3_ratio", kl_clip=1.0),
                                     ref_logprobs=ref)
    capped.backward()
    assert capped.item() == 1.0 and lp.grad.item() == 0.0


# ---------------------------------------------------------------------------------------
# REINFORCE++-baseline and whitening per algorithm
# ---------------------------------------------------------------------------------------


def test_reinforce_pp_baseline_advantages_by_hand():
    """G = 2, two prompts, T = 2, beta = 0.5, gamma = 1; row 3 has one token.

    scores (1, 3 | 4, 4) -> group means (2, 4) -> s' = (-1, 1, 0, 0)
    k1 = [[0.2, 0.4], [0, 0], [0.2, 0], [0.4, pad]]
    r_t = -0.5 k1 + [last] s':  [[-0.1, -1.2], [0, 1], [-0.1, 0], [-0.2]]
    G_t (returns-to-go):        [[-1.3, -1.2], [1, 1], [-0.1, 0], [-0.2]]
    over the 7 tokens: mean = -0.8 / 7 = -0.1142857, sum of squared deviations 5.0885714,
    unbiased var 0.8480952, std 0.9209209:
    A = [[-1.287531, -1.178944], [1.209969, 1.209969], [0.015512, 0.124099], [-0.093075, 0]]
    """
    scores = torch.tensor([1.0, 3.0, 4.0, 4.0])
    kl = torch.tensor([[0.2, 0.4], [0.0, 0.0], [0.2, 0.0], [0.4, 99.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    adv = reinforce_pp_baseline_advantages(scores, kl, mask, 2, beta=0.5)
    expected = torch.tensor([[-1.287531, -1.178944], [1.209969, 1.209969], [0.015512, 0.124099], [-0.093075, 0.0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=2e-6)
    # REINFORCE++ on the same batch keeps each prompt's level (2 against 4): its whitening
    # removes one mean for the whole batch, not one per prompt
    plain = reinforce_pp_advantages(per_token_rewards(scores, kl, mask, beta=0.5), mask)
    assert (plain - adv).abs().max() > 0.1
    with pytest.raises(ValueError, match="group_size >= 2"):
        reinforce_pp_baseline_advantages(scores, kl, mask, 1, beta=0.5)


def test_whitening_takes_effect_for_reinforce_and_rloo():
    """beta = 0, so R = scores = (1, 2, 3, 6).
    batch baseline: A = R - 3 = (-2, -1, 0, 3); whitened over the 4 sequences: mean 0,
      unbiased var 14/3, std 2.1602469: (-0.9258201, -0.4629100, 0, 1.3887301)
    rloo, k = 2: A = (1 - 3, 3 - 1, 2 - 6, 6 - 2) on scores (1, 3, 2, 6) = (-2, 2, -4, 4);
      whitened: var 40/3, std 3.6514837: (-0.5477226, 0.5477226, -1.0954451, 1.0954451)
    Broadcast over each row's tokens (the second row has one)."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    lp = torch.zeros(4, 2)

    def adv(scores, baseline, whiten):
        return reinforce_advantages(torch.tensor(scores), lp, lp, mask, baseline=baseline, group_size=2, beta=0.0,
                                    whiten=whiten)

    torch.testing.assert_close(adv([1.0, 2.0, 3.0, 6.0], "batch", False)[:, 0], torch.tensor([-2.0, -1.0, 0.0, 3.0]))
    torch.testing.assert_close(adv([1.0, 2.0, 3.0, 6.0], "batch", True)[:, 0],
                               torch.tensor([-0.9258201, -0.4629100, 0.0, 1.3887301]))
    w = adv([1.0, 3.0, 2.0, 6.0], "rloo", True)
    torch.testing.assert_close(w[:, 0], torch.tensor([-0.5477226, 0.5477226, -1.0954451, 1.0954451]))
    assert w[1, 1].item() == 0.0  # padding stays 0


# ---------------------------------------------------------------------------------------
# Settings an algorithm does not read: an error naming the algorithm, before anything runs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo,settings,field,words", [
    ("grpo", dict(gae_lambda=0.9), "rl.gae_lambda", "grpo has no critic"),
    ("rloo", dict(vf_coef=0.5), "rl.vf_coef", "rloo has no critic"),
    ("reinforce", dict(value_init="rm"), "rl.value_init", "reinforce has no critic"),
    ("reinforce++", dict(whiten_rewards=True), "rl.whiten_rewards", "reinforce++ does not whiten per-token rewards"),
    ("grpo", dict(gamma=0.9), "rl.gamma", "grpo discounts no per-token returns"),
    ("rloo", dict(baseline="group"), "rl.baseline", "rloo has its own baseline"),
    ("ppo", dict(baseline="batch"), "rl.baseline", "ppo has its own baseline"),
    ("ppo", dict(scale_std=False), "rl.scale_std", "ppo has no group std"),
    ("grpo", dict(whiten_advantages=True), "rl.whiten_advantages", "grpo normalizes its advantages per group"),
    ("dr-grpo", dict(whiten_advantages=True), "rl.whiten_advantages", "dr-grpo drops the std scaling"),
    ("reinforce++", dict(whiten_advantages=False), "rl.whiten_advantages", "reinforce++ whitens"),
    ("reinforce++-baseline", dict(whiten_advantages=False), "rl.whiten_advantages", "reinforce++-baseline normal"),
    ("rloo", dict(clip_eps=0.1), "rl.clip_eps", "rloo takes one optimizer step per rollout"),
    ("reinforce", dict(dual_clip=3.0), "rl.dual_clip", "the ratio is exactly 1"),
    ("reinforce", dict(target_kl=0.1), "rl.target_kl", "epochs 1 x num_minibatches 1"),
    ("ppo", dict(kl_target=2.0), "rl.kl_target", "read only by rl.kl_controller=adaptive"),
    ("ppo", dict(kl_epsilon=0.5), "rl.kl_epsilon", "read only by rl.kl_controller=lagrangian"),
    ("ppo", dict(beta_end=0.001), "rl.beta_end", "read only by rl.kl_controller=linear"),
    ("ppo", dict(tis_cap=2.0, mismatch_tolerance=0.01), "rl.mismatch_tolerance", "guard stands down"),
    ("ppo", dict(kl_estimator="k3_ratio"), "rl.kl_estimator", "which is 1 in the reward"),
])
def test_a_setting_the_algorithm_ignores_is_an_error_naming_it(algo, settings, field, words):
    with pytest.raises(InputError, match=f"field '{field}'") as err:
        resolve_rl_config(RLConfig(batch_size=16, **settings), algo)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("algo,settings", [
    ("ppo", dict(gae_lambda=0.9, vf_coef=0.5, whiten_advantages=False, dual_clip=3.0, kl_clip=10.0)),
    ("reinforce", dict(whiten_advantages=True, baseline="group")),
    ("rloo", dict(whiten_advantages=True, clip_eps=0.1, num_minibatches=2)),
    ("reinforce++", dict(gamma=0.99, whiten_advantages=True)),  # its default, written out
    ("grpo", dict(whiten_advantages=False, scale_std=False, kl_estimator="k3_ratio", kl_clip=10.0)),
    ("ppo", dict(kl_controller="adaptive", kl_target=2.0)),
    ("ppo", dict(kl_controller="linear", beta_end=0.001)),
    ("ppo", dict(tis_cap=2.0)),
])
def test_settings_the_algorithm_reads_are_taken(algo, settings):
    rl = resolve_rl_config(RLConfig(batch_size=16, **settings), algo)
    assert all(getattr(rl, k) == v for k, v in settings.items())


def test_every_default_and_a_resolved_config_pass():
    for algo in ONLINE_ALGORITHMS:
        rl = resolve_rl_config(RLConfig(batch_size=64), algo)
        assert resolve_rl_config(copy.deepcopy(rl), algo) == rl  # a resolved config (config.yaml, --resume)
    options = ONLINE_ALGORITHMS.entry("reinforce++-baseline").options
    assert (options["estimator"], options["baseline"], options["min_samples_per_prompt"]) == ("token_returns", "group", 2)


def test_run_and_sweep_refuse_an_arm_that_ignores_a_setting_before_writing(tmp_path, capsys):
    """``rlhflab run`` with the default arms (ppo, dpo, grpo) and a critic setting: the GRPO arm
    does not read it, so the run stops with one line naming grpo and the field, nothing written;
    ``rlhflab sweep`` the same for its algorithms."""
    from pathlib import Path

    from rlhflab.cli import main

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    out = tmp_path / "run"
    assert main(["run", "--config", tiny, "--out", str(out), "--set", "rl.gae_lambda=0.9"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "field 'rl.gae_lambda'" in lines[0] and "grpo has no critic" in lines[0], lines
    assert not out.exists()
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", tiny, "--out", str(out), "--algo", "ppo,rloo", "--beta", "0.1",
                 "--set", "rl.clip_eps=0.1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "field 'rl.clip_eps'" in lines[0] and "rloo takes one optimizer step" in lines[0]
    assert not out.exists()
