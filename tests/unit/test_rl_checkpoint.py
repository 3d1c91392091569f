"""Checkpoints (rlhflab.checkpoint): safetensors + JSON round trips, atomic writes."""

from __future__ import annotations

import random

import pytest
import torch

from rlhflab.checkpoint import (
    flatten_optimizer_state,
    load_checkpoint,
    save_checkpoint,
    unflatten_optimizer_state,
)
from rlhflab.errors import InputError


def _trained(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def test_optimizer_state_round_trip():
    _, opt, _ = _trained(0)
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    back = unflatten_optimizer_state(tensors, meta)
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]
    for i, entry in ref["state"].items():
        for k, v in entry.items():
            torch.testing.assert_close(back["state"][i][k], v, rtol=0, atol=0)


def test_checkpoint_restores_training_exactly(tmp_path):
    """Save after 3 steps, restore into a differently initialised copy: the next step of
    both gives bit-identical weights (optimizer moments, step counts and LR included)."""
    model, opt, sched = _trained(0)
    random.seed(7)
    save_checkpoint(tmp_path / "ckpt", policy=model, optimizer=opt, scheduler=sched, state={"step": 3})
    other, opt2, sched2 = _trained(1)
    state = load_checkpoint(tmp_path / "ckpt", policy=other, optimizer=opt2, scheduler=sched2)
    assert state["step"] == 3 and sched2.get_last_lr() == sched.get_last_lr()
    assert random.random() == (random.seed(7) or random.random())  # python RNG restored
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (other, opt2)):
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_is_atomic_and_replaces_the_old_one(tmp_path):
    model, opt, sched = _trained(0)
    save_checkpoint(tmp_path / "ckpt", policy=model, optimizer=opt, scheduler=sched, state={"step": 1})

    class Boom(Exception):
        pass

    def explode():
        raise Boom

    broken_sched = type("S", (), {"state_dict": staticmethod(explode)})()
    with pytest.raises(Boom):
        save_checkpoint(tmp_path / "ckpt", policy=model, optimizer=opt, scheduler=broken_sched, state={"step": 2})
    # The failed write left the previous checkpoint intact and no temp directory behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    save_checkpoint(tmp_path / "ckpt", policy=model, optimizer=opt, scheduler=sched, state={"step": 2})
    other, opt2, sched2 = _trained(1)
    assert load_checkpoint(tmp_path / "ckpt", policy=other, optimizer=opt2, scheduler=sched2)["step"] == 2


def test_incomplete_checkpoint_is_an_input_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    model, opt, sched = _trained(0)
    with pytest.raises(InputError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "ckpt", policy=model, optimizer=opt, scheduler=sched)


def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    """An optimizer state of another shape (a checkpoint of another model's optimizer):
    refused naming the file, and the model, optimizer and RNG are as they were."""
    from safetensors.torch import load_file, save_file

    model, opt, sched = _trained(0)
    save_checkpoint(tmp_path / "ckpt", policy=model, optimizer=opt, scheduler=sched, state={"step": 3})
    tensors = load_file(str(tmp_path / "ckpt" / "optimizer.safetensors"))
    key = next(k for k in sorted(tensors) if tensors[k].dim() == 2)
    tensors[key] = tensors[key].reshape(-1).contiguous()
    save_file(tensors, str(tmp_path / "ckpt" / "optimizer.safetensors"))
    other, opt2, sched2 = _trained(1)
    weights = [p.detach().clone() for p in other.parameters()]
    moments = opt2.state_dict()["state"][0]["exp_avg"].clone()
    rng = torch.get_rng_state()
    with pytest.raises(InputError, match=rf"optimizer.safetensors: tensor '{key}' is \[\d+\], its parameter"):
        load_checkpoint(tmp_path / "ckpt", policy=other, optimizer=opt2, scheduler=sched2)
    assert all(torch.equal(a, b) for a, b in zip(weights, other.parameters()))
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], moments) and torch.equal(torch.get_rng_state(), rng)


def test_a_truncated_file_is_named_before_anything_is_read(tmp_path):
    from rlhflab.checkpoint import check_checkpoint

    model, opt, sched = _trained(0)
    save_checkpoint(tmp_path / "ckpt", policy=model, optimizer=opt, scheduler=sched, state={"step": 3})
    f = tmp_path / "ckpt" / "policy.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    with pytest.raises(InputError, match="policy.safetensors: cut short: the header describes"):
        check_checkpoint(tmp_path / "ckpt")
