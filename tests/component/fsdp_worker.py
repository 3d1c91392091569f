"""One FSDP2 step on rlhflab's tiny Llama, run by tests/component/test_sharding.py under
``torch.distributed.run`` (gloo, CPU) and alone: prints the loss and the updated weights.

Sharding: ``fully_shard`` on every decoder layer (the model's ``_no_split_modules``, what
accelerate's TRANSFORMER_BASED_WRAP wraps) and on the root. Each of W processes takes its
share of a fixed global batch; its loss is W x (its tokens' summed NLL) / (the global token
count), so that FSDP's gradient average is the gradient of the global token mean."""

from __future__ import annotations

import json
import sys

import torch

from rlhflab.config import load_config
from rlhflab.models import create_causal_lm
from rlhflab.world import World


def main(out: str) -> None:
    distributed = "--fsdp" in sys.argv
    rank, world_size = 0, 1
    if distributed:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    cfg = load_config(None, ["model.arch=llama", "model.d_model=32", "model.n_layers=2", "model.n_heads=2"])
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    model = create_causal_lm(cfg.model, tok, seed=0)
    if distributed:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(tok), (4, 12), generator=g)  # the global batch: 4 rows of 12 tokens
    mine = ids[rank::world_size]
    logits = model(input_ids=mine).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), mine[:, 1:].reshape(-1),
                                            reduction="sum")
    loss = world_size * nll / (ids.shape[0] * (ids.shape[1] - 1))
    loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().tolist()
            for n, p in model.named_parameters()}
    sharded = [type(p).__name__ for p in model.parameters()]
    losses = torch.tensor([nll.item()])
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(losses)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"loss": losses.item() / (ids.shape[0] * (ids.shape[1] - 1)), "weights": full,
                       "param_types": sorted(set(sharded)), "world_size": world_size}, fh)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
