"""LoRA adapters (rlhflab.lora) on the tiny model: DPO and PPO learn with adapters only, the
reference is the base with the adapters off and stays bit-identical to it, and a saved
adapted model loads in plain transformers (merged) and in transformers + peft (adapter)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from rlhflab import lora  # noqa: E402
from rlhflab.algos.dpo import attach_reference_logps, tokenize_pairs, train_dpo  # noqa: E402
from rlhflab.algos.online import OnlineRun  # noqa: E402
from rlhflab.algos.ppo import ValueModel, train_ppo  # noqa: E402
from rlhflab.algos.rl_config import resolve_rl_config  # noqa: E402
from rlhflab.config import LoRAConfig, load_config  # noqa: E402
from rlhflab.distributed import make_accelerator  # noqa: E402
from rlhflab.errors import InputError  # noqa: E402
from rlhflab.models import load_causal_lm, load_tokenizer  # noqa: E402
from rlhflab.rewards import build_reward  # noqa: E402
from rlhflab.world import World  # noqa: E402
from tests.component.test_rl_rollout import tiny_policy_dir  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return tiny_policy_dir(tmp_path_factory.getbasetemp())


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapters_start_at_the_base_and_only_they_train(policy_dir):
    """B = 0 at the start: the adapted model computes its base's logits exactly; the
    adapters are the only trainable weights (GPT-2's c_attn, c_proj, c_fc; r = 4: 4 (d_in +
    d_out) per layer), and a missing target module is one line naming the field."""
    tok = load_tokenizer(policy_dir)
    base, model = load_causal_lm(policy_dir, tok), load_causal_lm(policy_dir, tok)
    lora.attach(model, LoRAConfig(r=4))
    ids = torch.arange(3, 15)[None]
    assert torch.equal(_logits(model, ids), _logits(base, ids))
    trainable, total = lora.trainable_parameters(model)
    d, n_layers = base.config.n_embd, base.config.n_layer
    # per layer: c_attn (d -> 3d), attn c_proj (d -> d), c_fc (d -> 4d), mlp c_proj (4d -> d)
    assert trainable == n_layers * 4 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    with pytest.raises(InputError, match="lora.target_modules.*q_proj"):
        lora.attach(load_causal_lm(policy_dir, tok), LoRAConfig(r=4, target_modules=["q_proj"]))


def test_lora_dpo_learns_and_the_reference_is_the_base(policy_dir, tmp_path):
    """DPO with adapters (r = 8) and the reference run every step (no cache): the adapters'
    base, with them off. Measured: held-out loss ln 2 = 0.6931 -> 0.6851 after 6 steps; the
    bar is any fall (a learning signal), the exact claims are on the reference: its
    log-probs equal those of a separate copy of the base bit for bit, before and after
    training, and its weights are the base's. The saved model loads merged in plain
    transformers and as base + adapter in peft, both with the trained policy's logits."""
    cfg = load_config(TINY)
    tok = load_tokenizer(policy_dir)
    world = World(cfg.world)
    base = load_causal_lm(policy_dir, tok)
    policy = lora.attach(load_causal_lm(policy_dir, tok), LoRAConfig(r=8, alpha=16))
    reference = lora.reference_of(policy)
    train, _ = tokenize_pairs(world.preference_pairs(96, "pref"), tok, cfg.dpo.max_length)
    held, _ = tokenize_pairs(world.preference_pairs(24, "pref_eval"), tok, cfg.dpo.max_length)
    d = copy.deepcopy(cfg.dpo)
    d.max_steps, d.batch_size, d.lr, d.warmup_ratio, d.precompute_ref_logps = 6, 16, 2e-2, 0.0, False

    def cached(model) -> list[tuple[float, float]]:
        rows = copy.deepcopy(held)
        attach_reference_logps(model, rows, tok.pad_token_id, "cpu")
        return [(e.ref_chosen, e.ref_rejected) for e in rows]

    assert cached(reference) == cached(base)
    summary = train_dpo(d, policy, reference, tok, train, held)
    assert summary["eval/loss"] < summary["eval/loss_initial"]
    assert cached(reference) == cached(base)
    ref_state, base_state = reference.state_dict(), base.state_dict()
    assert ref_state.keys() == base_state.keys()
    assert all(torch.equal(ref_state[k], base_state[k]) for k in base_state)

    from rlhflab.models import save_pretrained_atomic

    save_pretrained_atomic(policy, tok, tmp_path / "model")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([train[0].chosen.input_ids])
    want = _logits(policy, ids)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(policy_dir)),
                                        str(tmp_path / "model" / "adapter"))
    assert json.loads((tmp_path / "model" / "adapter" / "adapter_config.json").read_text())["r"] == 8
    # float32 rounding of W + BA in one sum against two products: measured 2e-7
    assert torch.allclose(_logits(merged, ids), want, atol=1e-5)
    assert torch.allclose(_logits(adapted, ids), want, atol=1e-5)
    assert not (_logits(merged, ids) - _logits(base, ids)).abs().max() < 1e-4  # the policy did move


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    """The tiny policy after 32 SFT steps: LoRA adapts features, and a random model has none
    to adapt (from it, the adapters' updates barely move the samples)."""
    from rlhflab.commands.sft import run_sft

    out = tmp_path_factory.mktemp("lora") / "sft"
    run_sft(load_config(TINY, ["sft.max_steps=32", "sft.n_show=0", "sft.n_samples=8"]), out)
    return out / "model"


@pytest.mark.slow
def test_lora_ppo_learns_with_one_copy_of_the_weights(sft_dir):
    """PPO with adapters (r = 8, alpha = 16) on the policy and on the critic's backbone, the
    hackable reward -(number of words), from the SFT policy. Measured: mean score -15.8 over
    the first four of 16 steps -> -12.6 over the last four (full fine-tuning at lr 3e-3: -15 ->
    -1.2 in 12 steps; the adapters learn slower here); the bar is half the measured gain,
    1.5 words. The reference is the policy's base (no second model: its weights are the
    policy's own tensors) and ends bit-identical to the SFT weights on disk."""
    from safetensors.torch import load_file

    cfg = load_config(TINY, ["rl.steps=16", "rl.batch_size=32", "rl.lr=1e-2", "rl.eval_every=0", "lora.r=8"])
    cfg.rl = resolve_rl_config(cfg.rl, "ppo")
    tok = load_tokenizer(sft_dir)
    policy = load_causal_lm(sft_dir, tok)
    value = ValueModel.from_causal_lm(policy)
    reference = lora.adapt_online(policy, value, cfg.lora)
    assert {p.data_ptr() for p in reference.parameters()} <= {p.data_ptr() for p in policy.parameters()}
    run = OnlineRun(cfg, "ppo", make_accelerator(), policy, reference, tok, build_reward(None, ["length"]),
                    [p.text for p in World(cfg.world).prompts(cfg.world.n_prompts, "rl")], value_model=value)
    train_ppo(run)
    scores = [r["objective/scores"] for r in run.log.rows]
    print("scores", [round(x, 2) for x in scores])
    assert len(scores) == 16
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 1.5
    on_disk = load_file(str(sft_dir / "model.safetensors"))
    ref_state = reference.state_dict()
    for name, tensor in on_disk.items():
        assert torch.equal(ref_state[name], tensor), name
    assert lora.trainable_parameters(value.backbone)[0] < lora.trainable_parameters(value.backbone)[1] / 5
