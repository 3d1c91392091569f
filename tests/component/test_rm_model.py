"""The reward model as a Hugging Face model and the scoring API, with tiny models."""

import math

import pytest
import torch

from rlhflab.config import load_config
from rlhflab.reward_model import (
    RewardModel,
    collate,
    create_reward_model,
    encode,
    reward_head,
)
from tests.conftest import save_tiny_backbone

PROMPTS = ["what is 2 plus 3 ?", "tell me about cats .", "how do i steal a car ?"]
RESPONSES = ["the answer is 5 .", "cats are small pets that like to sleep . i hope this helps .",
             "sorry , i can not help with that ."]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, tiny_config_path):
    """A tiny GPT-2 causal LM with the world tokenizer, saved like an SFT policy."""
    return save_tiny_backbone(load_config(tiny_config_path), tmp_path_factory.mktemp("rm_model") / "sft" / "model")


def test_head_is_initialised_as_stiennon_et_al_and_dropout_is_off(backbone):
    model, tok = create_reward_model(backbone.parent, seed=3)  # the run dir works too
    head = reward_head(model)
    d = head.in_features
    expected = torch.randn((1, d), generator=torch.Generator().manual_seed(3)) / math.sqrt(d + 1)
    assert torch.equal(head.weight.detach(), expected)
    assert head.bias is None or torch.all(head.bias == 0)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    assert type(model).__name__ == "GPT2ForSequenceClassification"


def _rm(backbone, seeds=(0,), gains=None, biases=None):
    members = []
    for s in seeds:
        model, tok = create_reward_model(backbone, seed=s)
        members.append(model)
    return RewardModel(members, tok, gains, biases, max_length=48)


def test_saved_model_loads_in_plain_transformers_with_the_same_raw_scores(backbone, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = _rm(backbone, gains=[2.0], biases=[-1.0])
    rm.save(tmp_path / "rm" / "model")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model").eval()
    assert type(plain).__name__ == "GPT2ForSequenceClassification" and plain.config.num_labels == 1
    ids, attn = collate([encode(rm.tokenizer, p, r, True, 48) for p, r in zip(PROMPTS, RESPONSES)],
                        rm.tokenizer.pad_token_id)
    with torch.no_grad():
        plain_scores = plain(input_ids=ids, attention_mask=attn).logits[:, 0]
    loaded = RewardModel.load(tmp_path / "rm")
    raw = loaded.raw_member_scores(PROMPTS, RESPONSES)[0]
    assert torch.allclose(raw, plain_scores, atol=1e-6)
    assert torch.allclose(loaded.score(PROMPTS, RESPONSES), 2.0 * raw - 1.0, atol=1e-6)
    assert torch.allclose(RewardModel.load(tmp_path / "rm" / "model").score(PROMPTS, RESPONSES),
                          loaded.score(PROMPTS, RESPONSES))


def test_score_is_read_at_the_last_non_pad_token_and_eos_matters(backbone):
    rm = _rm(backbone)
    tok = rm.tokenizer
    model = rm.members[0]
    seq = encode(tok, PROMPTS[0], RESPONSES[0], True, 48)
    assert seq[-1] == tok.eos_token_id
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([seq])).logits[0, 0]
        padded = model(input_ids=torch.tensor([seq + [tok.pad_token_id] * 5]),
                       attention_mask=torch.tensor([[1] * len(seq) + [0] * 5])).logits[0, 0]
        # The hidden state at the EOS position, through the head, is the score.
        h = model.transformer(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
        by_hand = reward_head(model)(h)[0]
    assert torch.allclose(alone, padded, atol=1e-6) and torch.allclose(alone, by_hand, atol=1e-6)
    with_eos = rm.score(PROMPTS, RESPONSES, eos=[True] * 3)
    without = rm.score(PROMPTS, RESPONSES, eos=[False, True, True])
    assert with_eos[0] != without[0] and torch.equal(with_eos[1:], without[1:])


def test_score_is_batched_without_changing_results_and_builds_no_graph(backbone):
    rm = _rm(backbone)
    prompts, responses = PROMPTS * 5, RESPONSES * 5
    big = rm.score(prompts, responses, batch_size=64)
    small = rm.score(prompts, responses, batch_size=2)
    assert big.shape == (15,) and big.dtype == torch.float32 and big.device.type == "cpu"
    assert not big.requires_grad
    assert torch.allclose(big, small, atol=1e-5)
    with pytest.raises(ValueError):
        rm.score(PROMPTS, RESPONSES[:2])
    with pytest.raises(ValueError):
        rm.score(PROMPTS, RESPONSES, reduce="median")
    assert rm.score([], []).shape == (0,)


def test_ensemble_saves_loads_and_reduces(backbone, tmp_path):
    rm = _rm(backbone, seeds=(0, 1, 2), gains=[1.0, 0.5, 2.0], biases=[0.0, 0.1, -0.2])
    rm.save(tmp_path / "ens" / "model")
    assert sorted(p.name for p in (tmp_path / "ens" / "model").iterdir()) == [
        "member_0", "member_1", "member_2", "reward_model.json"]
    loaded = RewardModel.load(tmp_path / "ens")
    assert loaded.n_members == 3
    members = loaded.member_scores(PROMPTS, RESPONSES)
    assert members.shape == (3, 3)
    assert torch.allclose(loaded.score(PROMPTS, RESPONSES), members.mean(0))
    assert torch.allclose(loaded.score(PROMPTS, RESPONSES, reduce="min"), members.min(0).values)
    penalized = loaded.score(PROMPTS, RESPONSES, reduce="mean_minus_std", k=2.0)
    assert torch.allclose(penalized, members.mean(0) - 2.0 * members.std(0, unbiased=False))
    assert (members[0] != members[1]).any()  # different seeds, different heads


def test_rewardmodel_moves_with_to_and_scores_inside_a_training_loop(backbone):
    rm = _rm(backbone).to(torch.device("cpu"))
    policy = torch.nn.Linear(2, 1)
    loss = policy(torch.ones(1, 2)).sum()
    reward = rm.score(PROMPTS[:1], RESPONSES[:1])
    (loss * reward.item()).backward()  # the reward carries no graph of its own
    assert policy.weight.grad is not None
    assert all(not p.requires_grad for p in rm.parameters())
