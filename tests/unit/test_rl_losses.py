"""Policy-gradient losses and aggregations (rlhflab.losses), batch statistics
(rlhflab.distributed), the shared update (rlhflab.algos.update) and the algorithms' settings
(rlhflab.algos.rl_config) against hand-derived numbers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhflab.advantages import masked_whiten, reinforce_pp_advantages
from rlhflab.algos.reinforce import reinforce_advantages, sequence_returns
from rlhflab.algos.reinforce import reinforce_pp_token_advantages as rpp_global
from rlhflab.algos.rl_config import resolve_rl_config
from rlhflab.algos.update import UpdateBatch, UpdateSettings, update_policy
from rlhflab.config import RLConfig
from rlhflab.distributed import BatchStats
from rlhflab.errors import InputError
from rlhflab.kl import kl_status
from rlhflab.losses import (
    Counts,
    PolicyLossSettings,
    clipped_surrogate,
    clipped_value_loss,
    constant_normalizer,
    policy_gradient_loss,
    seq_mean,
    seq_sum,
    token_mean,
)
from rlhflab.registry import LOSS_AGGREGATIONS, ONLINE_ALGORITHMS


def test_clipped_surrogate_by_hand():
    """eps = 0.2, l_t = max(-A r, -A clip(r, 0.8, 1.2)):

    A=+1, r=1.5: max(-1.5, -1.2) = -1.2   clipped (no gradient)
    A=-1, r=0.5: max( 0.5,  0.8) =  0.8   clipped
    A=+1, r=0.5: max(-0.5, -0.8) = -0.5   not clipped
    A=-1, r=1.5: max( 1.5,  1.2) =  1.5   not clipped
    """
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros(1, 4)
    loss, r, clipped = clipped_surrogate(ratio.log(), old, adv, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -0.5, 1.5]]))
    torch.testing.assert_close(r, ratio)
    torch.testing.assert_close(clipped, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipped_surrogate_two_tokens_both_branches_by_hand(sign):
    """Two tokens, log pi_old = (-1, -1), log pi = (-1 + ln 1.1, -1 + ln 1.5): rho = (1.1, 1.5),
    eps = 0.2, so clip(rho) = (1.1, 1.2).

    A = +2:  l_1 = max(-2.2, -2.2) = -2.2   (branches equal: not counted as clipped)
             l_2 = max(-3.0, -2.4) = -2.4   clipped: dl/dlog pi = 0
             dl_1/dlog pi_1 = -A rho_1 = -2.2
    A = -2:  l_1 = max( 2.2,  2.2) =  2.2   dl_1/dlog pi_1 = -A rho_1 = 2.2
             l_2 = max( 3.0,  2.4) =  3.0   unclipped: dl_2/dlog pi_2 = -A rho_2 = 3.0
    """
    old = torch.tensor([[-1.0, -1.0]])
    lp = (old + torch.tensor([[1.1, 1.5]]).log()).requires_grad_()
    adv = torch.full((1, 2), 2.0 * sign)
    loss, ratio, clipped = clipped_surrogate(lp, old, adv, clip_eps=0.2)
    loss.sum().backward()
    torch.testing.assert_close(ratio.detach(), torch.tensor([[1.1, 1.5]]))
    if sign > 0:
        torch.testing.assert_close(loss.detach(), torch.tensor([[-2.2, -2.4]]))
        torch.testing.assert_close(clipped, torch.tensor([[0.0, 1.0]]))
        torch.testing.assert_close(lp.grad, torch.tensor([[-2.2, 0.0]]))
    else:
        torch.testing.assert_close(loss.detach(), torch.tensor([[2.2, 3.0]]))
        torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0]]))
        torch.testing.assert_close(lp.grad, torch.tensor([[2.2, 3.0]]))


def test_surrogate_log_ratio_is_clamped_at_20():
    """log rho = 30 is clamped to 20 before exp: rho = e^20 ~ 4.85e8, not e^30 ~ 1.07e13.
    A = -1: l = max(e^20, 1.2) = e^20 with gradient 0 (the clamp is flat there);
    A = +1: l = max(-e^20, -1.2) = -1.2, clipped. log rho = -30: rho = e^-20 ~ 2.06e-9,
    A = +1: l = max(-e^-20, -0.8) = -e^-20."""
    lp = torch.tensor([[30.0, 30.0, -30.0]], requires_grad=True)
    loss, ratio, clipped = clipped_surrogate(lp, torch.zeros(1, 3), torch.tensor([[-1.0, 1.0, 1.0]]), clip_eps=0.2)
    loss.sum().backward()
    e20 = math.exp(20.0)
    assert ratio[0, 0].item() == pytest.approx(e20, rel=1e-6)
    assert loss[0, 0].item() == pytest.approx(e20, rel=1e-6)
    assert loss[0, 1].item() == pytest.approx(-1.2, rel=1e-6)
    assert loss[0, 2].item() == pytest.approx(-math.exp(-20.0), rel=1e-5)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 1.0, 0.0]]))
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() == 0.0
    # below the clamp nothing changes: log rho = 19 gives e^19 exactly as exp does
    _, r19, _ = clipped_surrogate(torch.tensor([[19.0]]), torch.zeros(1, 1), torch.ones(1, 1))
    assert r19.item() == torch.exp(torch.tensor(19.0)).item()


def test_asymmetric_clipping():
    """clip-higher: A=+1, r=1.25 is clipped at 1.2 with eps_high = 0.2 (loss -1.2) but not
    with eps_high = 0.28 (loss -1.25); the lower bound stays 0.8."""
    lp = torch.tensor([[1.25, 0.7]]).log()
    adv = torch.tensor([[1.0, -1.0]])
    sym, _, _ = clipped_surrogate(lp, torch.zeros(1, 2), adv, clip_eps=0.2)
    asym, _, _ = clipped_surrogate(lp, torch.zeros(1, 2), adv, clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(sym, torch.tensor([[-1.2, 0.8]]))
    torch.testing.assert_close(asym, torch.tensor([[-1.25, 0.8]]))


def test_on_policy_surrogate_gradient_is_reinforce():
    """At ratio 1 the gradient of l_t w.r.t. log pi(y_t) is -A_t (the REINFORCE gradient)."""
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([[0.3, -1.2, 2.0]])
    loss, _, _ = clipped_surrogate(lp, lp.detach(), adv, clip_eps=0.2)
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, -adv)


def test_clipped_value_loss_by_hand():
    """V_old = 0, eps = 0.2, R = 1:
    V = 0.5 -> V_clip = 0.2: 0.5 * max(0.25, 0.64) = 0.32 (clipped branch larger)
    V = 0.1 -> V_clip = 0.1: 0.5 * 0.81 = 0.405 (equal branches: not counted as clipped)
    V = 1.5 -> V_clip = 0.2: 0.5 * max(0.25, 0.64) = 0.32
    """
    v = torch.tensor([[0.5, 0.1, 1.5]])
    loss, clipped = clipped_value_loss(v, torch.zeros(1, 3), torch.ones(1, 3), clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.405, 0.32]]))
    torch.testing.assert_close(clipped, torch.tensor([[1.0, 0.0, 1.0]]))


def test_clipped_value_loss_gradient_by_hand():
    """V_old = 0, eps = 0.2, R = 1; dl/dV = V - R on the unclipped branch, 0 on the clipped one:
    V = 0.5:  V_clip = 0.2, (0.25 vs 0.64): clipped, l = 0.32, dl/dV = 0
    V = -0.5: V_clip = -0.2, (2.25 vs 1.44): unclipped, l = 1.125, dl/dV = -1.5
    V = 0.1:  V_clip = V, both 0.81: l = 0.405, dl/dV = -0.9
    """
    v = torch.tensor([[0.5, -0.5, 0.1]], requires_grad=True)
    loss, clipped = clipped_value_loss(v, torch.zeros(1, 3), torch.ones(1, 3), clip_eps=0.2)
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.32, 1.125, 0.405]]))
    torch.testing.assert_close(clipped, torch.tensor([[1.0, 0.0, 0.0]]))
    torch.testing.assert_close(v.grad, torch.tensor([[0.0, -1.5, -0.9]]))


def test_each_aggregation_by_hand():
    """x = [[2, 4], [6, 9]], mask = [[1, 1], [1, 0]]: masked sum 12 over 3 tokens of 2 sequences.
    With two processes the counts are the global ones / W: 6 tokens, 4 sequences, W = 2 ->
    n_tokens = 3, n_seqs = 2; L_max = 4.

    token_mean = 12 / 3 = 4;  seq_sum = 12 / 2 = 6
    seq_mean   = (6/2 + 6/1) / 2 = 4.5;  constant_normalizer = 12 / (2 * 4) = 1.5
    """
    x = torch.tensor([[2.0, 4.0], [6.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    c = Counts(n_seqs=4 / 2, n_tokens=6 / 2, max_len=4)
    assert token_mean(x, mask, c).item() == 4.0
    assert seq_sum(x, mask, c).item() == 6.0
    assert seq_mean(x, mask, c).item() == 4.5
    assert constant_normalizer(x, mask, c).item() == 1.5
    assert [LOSS_AGGREGATIONS[k] for k in ("token_mean", "seq_sum", "seq_mean", "constant")] == \
        [token_mean, seq_sum, seq_mean, constant_normalizer]


def test_loss_aggregations_by_hand():
    """x = [[1, 2, 3], [4, 0, 0]], mask = [[1, 1, 1], [1, 0, 0]]: 4 tokens, 2 sequences.

    token_mean = (1+2+3+4)/4 = 2.5;  seq_sum = 10/2 = 5
    seq_mean   = (6/3 + 4/1)/2 = 3;  constant (L=5) = 10/(2*5) = 1
    """
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    c = Counts(n_seqs=2, n_tokens=4, max_len=5)
    got = {k: float(f(x, mask, c)) for k, f in LOSS_AGGREGATIONS.items()}
    assert got == {"token_mean": 2.5, "seq_sum": 5.0, "seq_mean": 3.0, "constant": 1.0}


def test_policy_gradient_loss_adds_kl_value_and_entropy_terms():
    """At ratio 1 with A = 0 the surrogate is 0, so the loss is exactly
    kl_coef * k3 + vf_coef * value loss - entropy_coef * entropy (all token means)."""
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])  # l = ref - lp = (-0.5, 1.0)
    k3 = (torch.exp(ref - lp) - 1 - (ref - lp)).mean()
    hp = PolicyLossSettings(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, vf_coef=0.5, value_clip_eps=10.0)
    ent = torch.tensor([[2.0, 4.0]])
    values, returns = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    loss, sums = policy_gradient_loss(lp, lp, torch.zeros(1, 2), torch.ones(1, 2), Counts(1, 2, 2), hp,
                                      ref_logprobs=ref, entropy=ent, values=values, old_values=values,
                                      returns=returns)
    expected = 0.1 * k3 + 0.5 * (0.5 * 1.0 / 2) - 0.01 * 3.0
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert set(sums) >= {"loss/policy", "loss/kl", "loss/value", "policy/clipfrac", "policy/approxkl"}


def test_batch_stats_equal_the_pure_functions_in_one_process():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.3).float()
    stats = BatchStats()
    torch.testing.assert_close(stats.whiten(x, mask), masked_whiten(x, mask))
    torch.testing.assert_close(stats.whiten(x, mask, shift_mean=False), masked_whiten(x, mask, shift_mean=False))
    # REINFORCE++ with the global statistics equals the pure single-process function.
    lp, ref = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    scores = torch.randn(5, generator=g)
    mask[:, 0] = 1.0
    from rlhflab.advantages import per_token_rewards

    rewards = per_token_rewards(scores, lp - ref, mask, beta=0.1)
    torch.testing.assert_close(rpp_global(scores, lp, ref, mask, beta=0.1, stats=stats),
                               reinforce_pp_advantages(rewards, mask))


def test_sequence_returns_and_baselines_by_hand():
    """score = (1, 3), per-token k1 = (0.5, 0.5 | 1.0, pad): R = (1 - 0.1*1, 3 - 0.1*1) = (0.9, 2.9).
    Batch mean baseline: A = R - 1.9 = (-1, 1). Broadcast on the response tokens only."""
    lp = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    ref = torch.tensor([[-0.5, -0.5], [-1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    scores = torch.tensor([1.0, 3.0])
    R = sequence_returns(scores, lp, ref, mask, beta=0.1)
    torch.testing.assert_close(R, torch.tensor([0.9, 2.9]))
    A = reinforce_advantages(scores, lp, ref, mask, baseline="batch", group_size=1, beta=0.1)
    torch.testing.assert_close(A, torch.tensor([[-1.0, -1.0], [1.0, 0.0]]))


def _rows(B: int, **fields) -> UpdateBatch:
    """B one-token rows: prompt i is row i, responses and fields as given."""
    ones = torch.ones(B, 1)
    return UpdateBatch(prompt_ids=torch.arange(B)[:, None], prompt_mask=ones, mask=ones, **fields)


def _tabular_setup(B=8, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.nn.Parameter(torch.randn(K, generator=g))
    actions = torch.randint(0, K, (B,), generator=g)
    adv = torch.randn(B, 1, generator=g)

    def forward(rows):
        return torch.log_softmax(logits, -1)[rows.response_ids[:, 0]][:, None], None, None

    with torch.no_grad():
        old = torch.log_softmax(logits, -1)[actions][:, None]
    return logits, forward, _rows(B, response_ids=actions[:, None], old_logprobs=old, advantages=adv)


def test_update_counts_steps_and_stops_on_target_kl():
    """epochs x minibatches optimizer steps; a tiny target_kl stops after the first step
    whose minibatch already moved (the first minibatch is exactly on-policy: approx-KL 0)."""
    for target, expected in ((None, 6), (1e-12, 2)):
        logits, forward, batch = _tabular_setup()
        opt = torch.optim.SGD([logits], lr=0.5)

        def step(opt=opt):
            opt.step()
            opt.zero_grad()
            return 0.0

        hp = UpdateSettings(epochs=3, num_minibatches=2, target_kl=target)
        out = update_policy(batch, forward, step, hp, BatchStats(), torch.Generator().manual_seed(0))
        assert out["policy/updates"] == expected
        assert out["policy/early_stopped"] == float(target is not None)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "seq_sum"])
def test_micro_batches_accumulate_to_the_minibatch_gradient(agg):
    """Micro-batches of 2 accumulate exactly the gradient of the minibatch of 8: every
    micro-batch's loss is divided by the minibatch's counts, not its own."""
    grads = []
    for micro in (None, 2):
        logits, forward, batch = _tabular_setup()
        hp = UpdateSettings(micro_batch_size=micro, loss_agg=agg)
        captured = []

        def step(logits=logits, captured=captured):
            captured.append(logits.grad.clone())
            logits.grad = None
            return 0.0

        update_policy(batch, forward, step, hp, BatchStats(), torch.Generator().manual_seed(0))
        grads.append(captured[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_kl_status_thresholds():
    assert [kl_status(k, 8, 15) for k in (0.5, 8.0, 8.1, 15.0, 15.1)] == \
        ["ok", "ok", "caution", "caution", "warning"]


def test_resolve_fills_algorithm_defaults_and_names_bad_fields():
    rl = resolve_rl_config(RLConfig(), "grpo")
    assert (rl.samples_per_prompt, rl.kl_in, rl.kl_estimator, rl.scale_std, rl.loss_agg) == \
        (8, "loss", "k3", True, "seq_mean")
    dr = resolve_rl_config(RLConfig(), "dr-grpo")
    assert (dr.scale_std, dr.loss_agg) == (False, "constant")
    assert resolve_rl_config(RLConfig(epochs=2), "ppo").epochs == 2  # explicit values win
    assert set(ONLINE_ALGORITHMS) == {"ppo", "reinforce", "rloo", "reinforce++", "reinforce++-baseline", "grpo",
                                      "dr-grpo"}
    with pytest.raises(InputError, match="rl.kl_in"):
        resolve_rl_config(RLConfig(kl_in="both"), "ppo")
    with pytest.raises(InputError, match="rl.batch_size"):
        resolve_rl_config(RLConfig(batch_size=10), "grpo")
    with pytest.raises(InputError, match="rl.samples_per_prompt"):
        resolve_rl_config(RLConfig(samples_per_prompt=1), "rloo")


def test_truncated_importance_weights_by_hand():
    """pi_train / pi_sampler = 0.5/0.25 = 2, 0.2/0.4 = 0.5, 0.9/0.3 = 3 (capped at C = 2.5),
    and a log-ratio of 50 nats clamped to 20 before exp, then capped."""
    from rlhflab.losses import truncated_importance_weights

    train = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    w = truncated_importance_weights(train, sampler, cap=2.5)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 2.5]]))
    big = truncated_importance_weights(torch.tensor([0.0]), torch.tensor([-50.0]), cap=1e12)
    assert big.item() == pytest.approx(float(torch.exp(torch.tensor(20.0))), rel=1e-6)
    assert not truncated_importance_weights(train.requires_grad_(), sampler, cap=2.0).requires_grad
    with pytest.raises(ValueError):
        truncated_importance_weights(train, sampler, cap=0.0)


def test_importance_weights_scale_each_tokens_surrogate_and_kl_term():
    """With w = (2, 0.5) on two tokens, A = (1, 1), ratio 1, no clipping and k2 = 0.5 l^2
    with l = (0.2, -0.4) from the reference: token_mean of w * (-A) = (-2 - 0.5)/2 = -1.25,
    plus beta 0.1 x token_mean of w * k2 = 0.1 x (2 x 0.02 + 0.5 x 0.08)/2 = 0.004."""
    lp = torch.zeros(1, 2)
    ref = torch.tensor([[-0.2, 0.4]])
    mask = torch.ones(1, 2)
    hp = PolicyLossSettings(loss_agg="token_mean", kl_coef=0.1, kl_estimator="k2")
    counts = Counts(n_seqs=1, n_tokens=2, max_len=2)
    loss, _ = policy_gradient_loss(lp, lp, torch.ones(1, 2), mask, counts, hp, ref_logprobs=ref,
                                   is_weights=torch.tensor([[2.0, 0.5]]))
    assert loss.item() == pytest.approx(-1.25 + 0.004, abs=1e-6)


def test_update_reports_the_first_minibatch_mismatch_and_calls_the_guard():
    """The first minibatch's forward runs before any optimizer step: its log-probs against
    the sampler's give rollout/logprob_diff_mean and _max; the guard sees them first."""
    B = 4
    sampler = torch.tensor([[-1.0], [-1.0], [-2.0], [-2.0]])
    batch = _rows(B, response_ids=torch.zeros(B, 1, dtype=torch.long), old_logprobs=sampler.clone(),
                  advantages=torch.zeros(B, 1), sampler_logprobs=sampler)
    offset = torch.tensor([[0.1], [0.0], [-0.3], [0.0]])
    theta = torch.nn.Parameter(torch.zeros(()))

    def forward(rows):
        row = rows.prompt_ids[:, 0]
        return sampler[row] + offset[row] + 0 * theta, None, None

    seen = []
    out = update_policy(batch, forward, lambda: 0.0, UpdateSettings(num_minibatches=1), BatchStats(),
                        torch.Generator().manual_seed(0), mismatch_guard=seen.append)
    assert out["rollout/logprob_diff_mean"] == pytest.approx(0.1, abs=1e-6)  # (0.1 + 0.3) / 4
    assert out["rollout/logprob_diff_max"] == pytest.approx(0.3, abs=1e-6)
    want_ratio = (torch.exp(offset).sum() / B).item()
    assert out["rollout/first_ratio_mean"] == pytest.approx(want_ratio, abs=1e-6)
    assert len(seen) == 1 and seen[0]["rollout/logprob_diff_max"] == pytest.approx(0.3, abs=1e-6)


def test_a_filtered_batch_trains_on_the_rows_it_holds():
    """Rows 1, 4 and 6 of eight (in any order): the update's gradient is that of those rows
    alone. One epoch, one minibatch, ratio 1, token_mean over 3 tokens:

        L = -(1/3) sum_{i in rows} A_i log pi(a_i),  dL/dz = -(1/3) sum_i A_i (onehot(a_i) - pi)
    """
    logits, forward, batch = _tabular_setup()
    rows = torch.tensor([1, 4, 6])
    with torch.no_grad():
        pi = torch.softmax(logits, -1)
        a, A = batch.response_ids[rows, 0], batch.advantages[rows, 0]
        want = -(A[:, None] * (torch.nn.functional.one_hot(a, 3).float() - pi)).sum(0) / 3
    for chosen in (rows, rows.flip(0), torch.isin(torch.arange(8), rows)):
        sub = batch.select(chosen)
        assert sub.batch_size == 3 and torch.equal(sub.prompt_ids.sort(0).values[:, 0], rows)
        captured = []

        def step(captured=captured):
            captured.append(logits.grad.clone())
            logits.grad = None
            return 0.0

        update_policy(sub, forward, step, UpdateSettings(), BatchStats(), torch.Generator().manual_seed(0))
        torch.testing.assert_close(captured[0], want)


def test_update_batch_refuses_rows_that_do_not_line_up():
    """Every field holds the same B rows: an advantage tensor of another batch is an error
    naming the field, not a silent mispairing."""
    with pytest.raises(ValueError, match="advantages"):
        _rows(4, response_ids=torch.zeros(4, 1, dtype=torch.long), old_logprobs=torch.zeros(4, 1),
              advantages=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="response_ids"):
        _rows(4, response_ids=torch.zeros(4, 2, dtype=torch.long), old_logprobs=torch.zeros(4, 1),
              advantages=torch.zeros(4, 1))


def test_update_batch_from_rollout_carries_the_rows_token_ids():
    """From a rollout: its token ids, mask and old log-probs; the sampler's log-probs only
    when they are not the old ones (a rollout rescored by the trainer)."""
    lp = torch.randn(2, 3)
    ro = SimpleNamespace(prompt_ids=torch.ones(2, 4, dtype=torch.long), prompt_mask=torch.ones(2, 4),
                         response_ids=torch.arange(6).view(2, 3), mask=torch.ones(2, 3), logprobs=lp,
                         sampler_logprobs=lp)
    batch = UpdateBatch.from_rollout(ro, advantages=torch.zeros(2, 3))
    assert batch.response_ids is ro.response_ids and batch.old_logprobs is lp and batch.sampler_logprobs is None
    ro.sampler_logprobs = lp + 0.1
    assert UpdateBatch.from_rollout(ro, advantages=torch.zeros(2, 3)).sampler_logprobs is ro.sampler_logprobs
    assert torch.equal(batch.select(torch.tensor([1])).response_ids, torch.tensor([[3, 4, 5]]))
