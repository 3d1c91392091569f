"""Precision, memory and attention settings on tiny models: bf16 autocast in SFT, DPO and
PPO on a CPU, fp16 refused without a GPU, gradient checkpointing and the attention kernel."""

import json

import pytest
import torch

from rlhflab.commands.dpo import run_dpo
from rlhflab.commands.rl import run_rl
from rlhflab.commands.sft import run_sft
from rlhflab.config import load_config
from rlhflab.distributed import MIXED_PRECISION_MISMATCH_NATS, make_accelerator, mismatch_tolerance
from rlhflab.errors import InputError
from rlhflab.models import (
    checkpointed_passes,
    create_causal_lm,
    enable_gradient_checkpointing,
    is_checkpointing,
)
from rlhflab.world import World


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def restore_precision():
    yield
    make_accelerator("no")  # later tests of this process run in float32 again


def test_bf16_sft_dpo_ppo_learn_on_cpu(tmp_path, tiny_config_path, restore_precision):
    """Each stage in bf16 autocast: losses finite and falling (SFT, DPO), PPO's scores move,
    and the update really ran in bf16: the sampler (float32) and the trainer's first
    forward differ by more than float32's 1e-6 nats but stay under the guard's bf16 floor."""
    cfg = load_config(tiny_config_path, ["sft.mixed_precision=bf16", "dpo.mixed_precision=bf16",
                                         "rl.mixed_precision=bf16", "sft.max_steps=16", "rl.steps=3",
                                         "rl.eval_every=0", "dpo.world_eval_every=-1"])
    run_sft(cfg, tmp_path / "sft")
    sft = [r["train/loss"] for r in _rows(tmp_path / "sft" / "metrics.jsonl") if "train/loss" in r]
    assert all(map(torch.isfinite, torch.tensor(sft))) and sft[-1] < sft[0] - 0.3

    run_dpo(cfg, tmp_path / "dpo", sft=tmp_path / "sft")
    dpo = [r["train/loss"] for r in _rows(tmp_path / "dpo" / "metrics.jsonl") if "train/loss" in r]
    assert all(map(torch.isfinite, torch.tensor(dpo))) and dpo[-1] < dpo[0]

    run_rl(cfg, "ppo", tmp_path / "ppo", sft=str(tmp_path / "sft"), reward_fns=["gold"])
    ppo = [r for r in _rows(tmp_path / "ppo" / "metrics.jsonl") if "objective/scores" in r]
    assert len(ppo) == 3 and len({r["objective/scores"] for r in ppo}) > 1
    gaps = [r["rollout/logprob_diff_max"] for r in ppo]
    assert max(gaps) > 1e-5 and max(gaps) < MIXED_PRECISION_MISMATCH_NATS  # measured 8e-3 here


def test_fp16_parses_and_is_refused_without_a_gpu(tiny_config_path, restore_precision):
    cfg = load_config(tiny_config_path, ["rl.mixed_precision=fp16", "sft.mixed_precision=fp16"])
    assert (cfg.rl.mixed_precision, cfg.sft.mixed_precision) == ("fp16", "fp16")
    if torch.cuda.is_available():
        pytest.skip("a GPU runs fp16")
    with pytest.raises(InputError, match="rl.mixed_precision.*fp16 needs a GPU"):
        make_accelerator("fp16", section="rl")


def test_mismatch_tolerance_is_precision_aware():
    assert mismatch_tolerance(1e-3, "no") == 1e-3
    assert mismatch_tolerance(1e-3, "bf16") == MIXED_PRECISION_MISMATCH_NATS
    assert mismatch_tolerance(2.0, "bf16") == 2.0


def _tiny(tiny_config_path, overrides=()):
    cfg = load_config(tiny_config_path, list(overrides))
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    return cfg, tok


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_config_path, arch):
    """Recomputing activations repeats the same float32 operations in the same order, so
    loss and gradients agree to float rounding (measured bit-identical; atol 1e-6 leaves room
    for a kernel that reorders a reduction)."""
    cfg, tok = _tiny(tiny_config_path, [f"model.arch={arch}"])
    ids = torch.randint(3, len(tok), (4, 24), generator=torch.Generator().manual_seed(0))
    grads, losses = [], []
    for checkpointing in (False, True):
        model = create_causal_lm(cfg.model, tok, seed=0)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert is_checkpointing(model) and model.config.use_cache is False
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-6), name


def test_checkpointed_passes_train_only_checkpointing_models(tiny_config_path):
    cfg, tok = _tiny(tiny_config_path)
    plain, ckpt = create_causal_lm(cfg.model, tok), enable_gradient_checkpointing(create_causal_lm(cfg.model, tok))
    plain.eval()
    ckpt.eval()
    with checkpointed_passes(plain, ckpt, None):
        assert ckpt.training and not plain.training
    assert not ckpt.training and not plain.training


def test_gradient_checkpointing_in_ppo(tmp_path, tiny_config_path):
    """A PPO run with checkpointing: the update's first forward equals the sampler's to
    float32 precision (train mode with dropout off computes the eval-mode function)."""
    cfg = load_config(tiny_config_path, ["sft.max_steps=4", "rl.steps=2", "rl.eval_every=0",
                                         "model.gradient_checkpointing=true"])
    run_sft(cfg, tmp_path / "sft")
    run_rl(cfg, "ppo", tmp_path / "ppo", sft=str(tmp_path / "sft"), reward_fns=["gold"])
    ppo = [r for r in _rows(tmp_path / "ppo" / "metrics.jsonl") if "rollout/logprob_diff_max" in r]
    assert len(ppo) == 2 and max(r["rollout/logprob_diff_max"] for r in ppo) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_eager_and_sdpa_attention_agree(tiny_config_path, arch):
    """The setting reaches the model, and both kernels compute the same attention (float32
    reductions in another order: measured max |diff| of logits ~1e-6; atol 1e-5)."""
    logits = {}
    for impl in ("eager", "sdpa"):
        cfg, tok = _tiny(tiny_config_path, [f"model.arch={arch}", f"model.attn_implementation={impl}"])
        model = create_causal_lm(cfg.model, tok, seed=0).eval()
        assert model.config._attn_implementation == impl
        ids = torch.randint(3, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0  # left padding on one row
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    assert torch.allclose(logits["eager"], logits["sdpa"], atol=1e-5)


def test_flash_attention_without_the_package_is_one_line_input_error(tiny_config_path):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed")
    cfg, tok = _tiny(tiny_config_path, ["model.attn_implementation=flash_attention_2"])
    with pytest.raises(InputError, match="model.attn_implementation.*flash-attn"):
        create_causal_lm(cfg.model, tok)
