"""The DPO-family loop with tiny models: one forward pass per pair, a frozen reference,
accumulation and data parallelism equal one batch (rlhflab.algos.dpo)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from rlhflab.algos.dpo import (
    attach_reference_logps,
    sequence_logps,
    tokenize_pairs,
    tokenize_unpaired,
    train_dpo,
)
from rlhflab.config import load_config
from rlhflab.data import pairs_to_unpaired
from rlhflab.models import create_causal_lm, save_pretrained_atomic
from rlhflab.world import World
from tests.conftest import free_port, subprocess_env


@pytest.fixture(scope="module")
def setup(tiny_config_path):
    cfg = load_config(tiny_config_path)
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=0)
    rows = world.preference_pairs(96, "pref")
    held_rows = world.preference_pairs(24, "pref_eval")
    return cfg, world, tok, model, rows, held_rows


def _pairs(setup, cached: bool):
    cfg, _, tok, model, rows, held_rows = setup
    train, _ = tokenize_pairs(rows, tok, cfg.dpo.max_length)
    held, _ = tokenize_pairs(held_rows, tok, cfg.dpo.max_length)
    if cached:
        attach_reference_logps(model, train, tok.pad_token_id, "cpu")
        attach_reference_logps(model, held, tok.pad_token_id, "cpu")
    return train, held


def _train(setup, *, loss="dpo", micro=None, cached=True, steps=4, **fields):
    cfg, _, tok, model, rows, held_rows = setup
    d = copy.deepcopy(cfg.dpo)
    d.loss, d.micro_batch_size, d.max_steps, d.batch_size = loss, micro, steps, 32
    for name, value in fields.items():
        setattr(d, name, value)
    d.precompute_ref_logps, d.lr, d.warmup_ratio = cached, 2e-3, 0.0
    policy = copy.deepcopy(model)
    reference = None if cached else copy.deepcopy(model)
    if loss == "kto":
        train, _ = tokenize_unpaired(pairs_to_unpaired(rows), tok, d.max_length, seed=0)
        held, _ = tokenize_unpaired(pairs_to_unpaired(held_rows), tok, d.max_length, seed=0)
        if cached:
            attach_reference_logps(model, train, tok.pad_token_id, "cpu")
            attach_reference_logps(model, held, tok.pad_token_id, "cpu")
    else:
        train, held = _pairs(setup, cached)
    summary = train_dpo(d, policy, reference, tok, train, held)
    return policy, reference, summary


def test_chosen_and_rejected_in_one_forward_pass_equal_separate_passes(setup):
    """Concatenating the 2B sequences (padded to the longest of all) changes nothing but
    padding; measured max |diff| of summed log-probs ~1e-5 on ~-60 nats (float32)."""
    _, _, tok, model, _, _ = setup
    train, _ = _pairs(setup, cached=False)
    batch = train[:8]
    with torch.no_grad():
        joint, lengths = sequence_logps(model, [p.chosen for p in batch] + [p.rejected for p in batch],
                                        tok.pad_token_id, "cpu")
        chosen, _ = sequence_logps(model, [p.chosen for p in batch], tok.pad_token_id, "cpu")
        rejected, _ = sequence_logps(model, [p.rejected for p in batch], tok.pad_token_id, "cpu")
    assert torch.allclose(joint, torch.cat([chosen, rejected]), atol=1e-4)
    expected = [len(s.input_ids) - s.n_prompt for p in batch for s in (p.chosen,)] + \
               [len(p.rejected.input_ids) - p.rejected.n_prompt for p in batch]
    assert lengths.tolist() == expected


def test_reference_stays_bit_identical_and_cached_equals_on_the_fly(setup):
    """On the fly the reference runs every step; after training its weights are bit for bit
    those it started with, while the policy moved. Caching the reference log-probs once
    gives the same training run (max |diff| of weights measured ~1e-7; tolerance 1e-5)."""
    _, _, _, model, _, _ = setup
    policy, reference, _ = _train(setup, cached=False)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in reference.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), policy.parameters()))
    cached_policy, _, _ = _train(setup, cached=True)
    for a, b in zip(policy.parameters(), cached_policy.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_gradient_accumulation_4x8_equals_batch_of_32(setup, loss):
    """Each chunk's mean loss is weighted by its share of the global batch, and KTO's
    reference point is taken over the whole batch first, so four micro-batches of 8 give
    the gradient of one batch of 32 (weights agree to ~1e-7 measured; tolerance 1e-5)."""
    big, _, s_big = _train(setup, loss=loss, micro=None)
    small, _, s_small = _train(setup, loss=loss, micro=8)
    assert s_small["train/loss"] == pytest.approx(s_big["train/loss"], rel=1e-5)
    assert s_small["rewards/margins"] == pytest.approx(s_big["rewards/margins"], rel=1e-4, abs=1e-6)
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.parametrize("loss, fields", [("orpo", {"orpo_nll": "token"}), ("simpo", {"simpo_nll_coef": 1.0}),
                                          ("ipo", {"ipo_normalize": True})])
def test_trl_conventions_accumulate_exactly(setup, loss, fields):
    """TRL's conventions through the loop: the NLL pooled over the chosen tokens of the
    whole global batch (each micro-batch divides by the global mean chosen length) and IPO
    on per-token log-ratios (the loop passes each pair's lengths) give, in four micro-batches
    of 8, the run of one batch of 32; and they change the run (the option reaches the loss).
    Compared by the last step's loss and gradient norm and the held-out loss (measured
    within 1e-6 relative; pooling within each micro-batch instead puts the gradient norm
    1.2% off), not weight by weight: Adam's first step moves a weight by
    lr * g / (|g| + 1e-8), so the entries whose gradient is near 1e-8 (more of them with
    IPO's per-token log-ratios) move by the float noise of g, up to 1.2e-4 measured."""
    cached = loss == "ipo"
    _, _, s_big = _train(setup, loss=loss, cached=cached, **fields)
    _, _, s_small = _train(setup, loss=loss, micro=8, cached=cached, **fields)
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        assert s_small[key] == pytest.approx(s_big[key], rel=1e-5), key
    _, _, s_default = _train(setup, loss=loss, cached=cached)
    assert abs(s_default["train/loss"] - s_big["train/loss"]) > 1e-3
    assert abs(s_default["eval/loss"] - s_big["eval/loss"]) > 1e-3


def test_kto_guard_micro_batches_differ(setup):
    """Guard that the KTO case above can fail: z0 of a chunk of 8 differs from z0 of the
    batch of 32 once the policy has moved (measured: the per-chunk means spread by ~0.1)."""
    cfg, _, tok, model, rows, _ = setup
    policy, _, _ = _train(setup, loss="kto", steps=3)
    train, _ = tokenize_unpaired(pairs_to_unpaired(rows), tok, cfg.dpo.max_length, seed=0)
    attach_reference_logps(model, train, tok.pad_token_id, "cpu")
    with torch.no_grad():
        pol, _ = sequence_logps(policy, [e.mismatched for e in train[:32]], tok.pad_token_id, "cpu")
    diff = pol - torch.tensor([e.ref_mismatched for e in train[:32]])
    chunk_means = diff.view(4, 8).mean(1)
    assert (chunk_means.max() - chunk_means.min()).item() > 1e-3


def test_every_loss_trains_two_steps(setup):
    for loss in ("cdpo", "ipo", "hinge", "simpo", "orpo"):
        _, _, summary = _train(setup, loss=loss, steps=2, cached=loss not in ("simpo", "orpo"))
        assert summary["train/steps"] == 2 and summary["dpo/loss"] == loss
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "eval/rewards/accuracies", "eval/logps/chosen"):
            assert key in summary, (loss, key)
        if loss in ("simpo", "orpo"):  # per-token logps, as TRL's; the sums beside them
            assert "logps/chosen_sum" in summary and "eval/logps/rejected_sum" in summary
    assert summary["dpo/reference"] == "none"


def _run(args, launcher):
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + ["-m", "rlhflab.cli", "dpo", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_cpu_run_matches_one_process(setup, tmp_path, tiny_config_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU against one process at the
    same global batch of 32 pairs: each process takes half of every batch, chunk losses are
    weighted by their share of the global batch, DDP averages. Measured: held-out losses
    and margins agree to ~1e-7 relative over 6 steps; tolerance 1e-5."""
    _, _, tok, model, _, _ = setup
    save_pretrained_atomic(model, tok, tmp_path / "init")
    common = ["--config", str(tiny_config_path), "--sft", str(tmp_path / "init"), "--loss", "dpo",
              "--set", "dpo.max_steps=6", "--set", "dpo.eval_every=2", "--set", "dpo.world_eval_every=-1",
              "--set", "dpo.lr=2e-3"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", free_port()]
    _run(common + ["--out", str(tmp_path / "dp")], accelerate)
    _run(common + ["--out", str(tmp_path / "sp")], [sys.executable])

    def evals(d):
        rows = [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [(r["eval/loss"], r["eval/rewards/margins"]) for r in rows if "eval/loss" in r]

    dp, sp = evals("dp"), evals("sp")
    assert json.loads((tmp_path / "dp" / "metrics.json").read_text())["train/processes"] == 2
    assert len(dp) == len(sp) == 4
    assert dp[-1][0] < dp[0][0]
    for (a_loss, a_margin), (b_loss, b_margin) in zip(dp, sp):
        assert a_loss == pytest.approx(b_loss, rel=1e-5)
        assert a_margin == pytest.approx(b_margin, rel=1e-4, abs=1e-6)
