"""The reward-model fixes against hand-derived values: the input-gradient penalty (by hand on
a linear reward, by finite differences on a tiny transformer, packed = padded), the length
residualization's least-squares fit and the served score it gives, and the conservative
ensemble reductions as an RL run selects them."""

import pytest
import torch

from rlhflab.algos.reward_model import Group, _group_rewards
from rlhflab.errors import InputError
from rlhflab.losses import input_gradient_penalty
from rlhflab.reward_model import RewardModel, length_normalization


def test_input_gradient_penalty_of_a_linear_reward_by_hand():
    """r_n = w . (1/T_n) sum_{t < T_n} e_t, so d r_n / d e_t = w / T_n at each of its T_n
    positions. w = (1, 2), ||w||^2 = 5. Sequence 0: T = 2, both positions counted:
    2 * 5 / 4 = 2.5. Sequence 1: T = 4, its last two positions counted (the response):
    2 * 5 / 16 = 0.625. P = coef * (2.5 + 0.625) / 2 = 0.15625 at coef 0.1, and
    dP/dw = coef / N * 2 w * (2 / 4 + 2 / 16) = 0.0625 w = (0.0625, 0.125)."""
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    emb = torch.randn(2, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    lengths = torch.tensor([2.0, 4.0], dtype=torch.float64)
    present = (torch.arange(4)[None, :] < lengths[:, None]).double()  # (2, 4): real tokens
    rewards = ((emb * present[..., None]).sum(1) / lengths[:, None]) @ w  # (2,)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])
    loss, metrics = input_gradient_penalty(rewards, emb, mask, coef=0.1)
    assert loss.item() == pytest.approx(0.15625, rel=1e-12)
    assert metrics["rm/grad_penalty"] == pytest.approx(0.15625)
    assert metrics["rm/input_grad_sq"] == pytest.approx(1.5625)
    (grad_w,) = torch.autograd.grad(loss, w)
    assert grad_w.tolist() == pytest.approx([0.0625, 0.125], rel=1e-12)
    # A list of passes is the same sum: sequence 0 in one pass, sequence 1 in another.
    parts = [emb[:1], emb[1:]]
    rewards = ((torch.cat(parts) * present[..., None]).sum(1) / lengths[:, None]) @ w
    split, _ = input_gradient_penalty(rewards, parts, [mask[:1], mask[1:]], coef=0.1)
    assert split.item() == pytest.approx(0.15625, rel=1e-12)


def test_input_gradient_penalty_refuses_mismatched_masks():
    emb = torch.zeros(2, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="one mask"):
        input_gradient_penalty(emb.sum((1, 2)), emb, torch.ones(2, 4))


def _tiny_rm(dtype=torch.float64):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=24, n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=1, pad_token_id=0,
                     bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    return GPT2ForSequenceClassification(cfg).to(dtype)


def _groups() -> list[Group]:
    """Two groups; ids avoid the pad id 0. n_prompt marks where each response starts."""
    g1 = Group("p", ["a", "b"], [True, True], pairs=[(0, 1)], margins=[0.0], weights=[1.0], targets=[1.0],
               ids=[[3, 4, 5, 6, 7], [3, 4, 9, 10]], n_prompt=[2, 2])
    g2 = Group("q", ["c", "d"], [True, True], pairs=[(1, 0)], margins=[0.0], weights=[1.0], targets=[1.0],
               ids=[[11, 12, 13, 14, 15, 16, 17], [11, 12, 13, 20]], n_prompt=[3, 3])
    return [g1, g2]


def _penalty(model, packed: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    inputs: list = []
    with sdpa_kernel(SDPBackend.MATH):
        rewards = _group_rewards(model, _groups(), 0, "cpu", packed=packed, inputs=inputs)
    loss, _ = input_gradient_penalty(torch.cat(rewards), [e for e, _ in inputs], [m for _, m in inputs], coef=0.5)
    return loss


@pytest.mark.parametrize("packed", [False, True])
def test_penalty_gradient_matches_finite_differences_on_a_tiny_transformer(packed):
    """Double backprop through a 1-layer GPT-2 reward model in float64: the gradient of the
    penalty along a random direction v of all parameters equals the central difference
    (P(theta + eps v) - P(theta - eps v)) / 2 eps. Measured relative error 3.2e-4, 3.2e-6,
    3.2e-8 at eps = 1e-4, 1e-5, 1e-6 (the O(eps^2) of a central difference: the derivative is
    right); tolerance 1e-6 at eps = 1e-6. The response masks come from the loop's own passes
    (padded rows, or packed rows with block-diagonal attention)."""
    model = _tiny_rm()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
    loss = _penalty(model, packed)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    analytic = sum((g * d).sum() for g, d in zip(grads, v) if g is not None).item()
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
    up = _penalty(model, packed).item()
    with torch.no_grad():
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
    down = _penalty(model, packed).item()
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-6)
    assert abs(analytic) > 1e-6  # the penalty does depend on the parameters


def test_penalty_packed_equals_padded_and_reads_response_tokens_only():
    """The packed pass lays the four sequences end to end; its response mask must select the
    same tokens as the padded passes' (same penalty to float64 rounding): 3 + 2 + 4 + 1 = 10
    response tokens of the 20. Counting the prompt tokens too adds their (small, at
    initialization: the head reads the last token) share."""
    model = _tiny_rm()
    for packed in (False, True):
        inputs: list = []
        _group_rewards(model, _groups(), 0, "cpu", packed=packed, inputs=inputs)
        assert sum(m.sum().item() for _, m in inputs) == 10
    padded, packed = _penalty(model, False).item(), _penalty(model, True).item()
    assert packed == pytest.approx(padded, rel=1e-9)
    groups = _groups()
    for g in groups:
        g.n_prompt = [0] * len(g.ids)
    inputs = []
    rewards = _group_rewards(model, groups, 0, "cpu", inputs=inputs)
    everything, _ = input_gradient_penalty(torch.cat(rewards), [e for e, _ in inputs], [m for _, m in inputs],
                                           coef=0.5)
    assert everything.item() > padded


def test_length_normalization_least_squares_by_hand():
    """L = 1, 2, 3, 4 and raw = 3, 5, 7, 11: mean L 2.5, mean raw 6.5, cov = 13/4, var = 5/4,
    so b = 2.6 and a = 6.5 - 2.6 * 2.5 = 0. Residuals 0.4, -0.2, -0.8, 0.6 (mean 0), population
    variance 1.2 / 4 = 0.3: gain = 1 / sqrt(0.3), bias = -a / sqrt(0.3) = 0."""
    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0])
    raw = torch.tensor([3.0, 5.0, 7.0, 11.0])
    gain, bias, slope = length_normalization(raw, lengths)
    assert slope == pytest.approx(2.6)
    assert gain == pytest.approx(0.3 ** -0.5)
    assert bias == pytest.approx(0.0, abs=1e-12)
    z = gain * (raw - slope * lengths) + bias
    assert z.tolist() == pytest.approx([x * 0.3 ** -0.5 for x in (0.4, -0.2, -0.8, 0.6)], abs=1e-6)
    # No linear length trend left: the residuals are orthogonal to L - mean(L).
    assert ((lengths - lengths.mean()) * z).sum().item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="all have 3 tokens"):
        length_normalization(raw, torch.full((4,), 3.0))


class _Tok:
    eos_token_id = 1


def test_normalize_applies_the_length_slope_per_member():
    """Two members, slopes 0.5 and 0: member 0 gives gain (raw - 0.5 L) + bias, member 1 gain
    raw + bias. Without lengths a model with a slope refuses rather than leaving it out."""
    rm = RewardModel([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)], _Tok(), gains=[2.0, 3.0], biases=[1.0, -1.0],
                     length_slopes=[0.5, 0.0])
    raw = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    out = rm.normalize(raw, torch.tensor([2.0, 4.0]))
    assert out.tolist() == [[2 * (1 - 1) + 1, 2 * (2 - 2) + 1], [3 * 1 - 1, 3 * 2 - 1]]
    with pytest.raises(ValueError, match="length"):
        rm.normalize(raw)
    plain = RewardModel([torch.nn.Linear(1, 1)], _Tok(), gains=[2.0], biases=[1.0])
    assert not plain.has_length_term and plain.normalize(raw[:1]).tolist() == [[3.0, 5.0]]


def test_rm_reduce_settings_are_checked():
    """A conservative reduction needs a reward model to reduce (and k only means something
    for mean_minus_std): each is one line naming the field."""
    from rlhflab.config import load_config
    from rlhflab.rewards import build_reward

    with pytest.raises(InputError, match="rl.rm_reduce"):
        build_reward(None, ["gold"], rm_reduce="min")
    with pytest.raises(InputError, match="rm_reduce_k"):
        load_config(None, ["rl.rm_reduce_k=2"])
    assert load_config(None, ["rl.rm_reduce=mean_minus_std", "rl.rm_reduce_k=2"]).rl.rm_reduce_k == 2
    with pytest.raises(InputError, match="rl.rm_reduce"):
        load_config(None, ["rl.rm_reduce=max"])


def test_length_slope_is_saved_served_and_a_single_model_refuses_a_conservative_reduce(tmp_path, tiny_config_path):
    """A saved reward model keeps its length slope; ``score`` serves gain (raw - b L) + bias
    with L the response's tokens in the world's word-level tokenizer, counted by hand ("the
    answer is 5 ." is 5 tokens, the end token not counted, and a truncated response has
    none). rl.rm_reduce=min on one model would be that model: refused on load."""
    from rlhflab.config import load_config
    from rlhflab.reward_model import create_reward_model
    from rlhflab.rewards import ModelReward
    from tests.conftest import save_tiny_backbone

    cfg = load_config(tiny_config_path)
    model, tok = create_reward_model(save_tiny_backbone(cfg, tmp_path / "backbone"), seed=0)
    RewardModel([model], tok, gains=[2.0], biases=[0.5], length_slopes=[0.25], max_length=48).save(tmp_path / "rm")
    rm = RewardModel.load(tmp_path / "rm")
    assert rm.length_slopes == [0.25]
    prompts = ["what is 2 plus 3 ?"] * 2
    responses = ["the answer is 5 .", "the answer is 5 . let me know"]
    lengths = rm.response_lengths(prompts, responses, eos=[True, False])
    assert lengths.tolist() == [5.0, 8.0]
    raw = rm.raw_member_scores(prompts, responses, eos=[True, False])[0]
    served = rm.score(prompts, responses, eos=[True, False])
    assert served.tolist() == pytest.approx((2.0 * (raw - 0.25 * lengths) + 0.5).tolist(), abs=1e-5)
    with pytest.raises(InputError, match="rl.rm_reduce=min"):
        _ = ModelReward(tmp_path / "rm", reduce="min").model
