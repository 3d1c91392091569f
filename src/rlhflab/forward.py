"""Training forward passes that spare work: which keywords a model's forward takes
(``forward_options``), the log-probs of response tokens with the lm head only where they
are (``response_logprobs``), micro-batches of similar length (``length_groups``) and GPT-2's
activation in one fused kernel (``fuse_activations``).

Packed passes (several rows end to end in one) are ``rlhflab.packing``, built on these.
"""

from __future__ import annotations

import inspect
import math

import torch

from rlhflab.logprobs import kept_token_logprobs

# The fixed cost of one more forward + backward pass, in padded tokens: on a 2-core CPU a
# pass of the demo model costs about as much as 64 extra tokens (bench/results/sft_grouping.json).
PASS_COST_TOKENS = 64


def length_groups(lengths: list[int], max_rows: int | None = None, pass_cost: float | None = None
                  ) -> list[list[int]]:
    """Indices of ``lengths`` cut into micro-batches of similar length.

    Sorted by length, the rows are cut into contiguous runs minimizing
    sum over runs of (rows x longest row) + pass_cost per run (dynamic programming,
    O(n * max_rows)); ``max_rows`` caps a run (the memory knob). ``pass_cost`` defaults to
    ``PASS_COST_TOKENS``; ``math.inf`` keeps the rows in as few passes as ``max_rows`` allows.
    """
    pass_cost = min(PASS_COST_TOKENS if pass_cost is None else pass_cost, 1e12)  # finite: sums compare
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    L = [lengths[i] for i in order]
    n, cap = len(L), max_rows or len(L)
    best = [0.0] + [math.inf] * n  # best[j]: cost of the j shortest rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - cap), j):
            cost = best[i] + (j - i) * L[j - 1] + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], n
    while j > 0:
        runs.append(order[cut[j]:j])
        j = cut[j]
    return runs[::-1]


def forward_options(model) -> dict[str, bool]:
    """Which of the keywords that spare work this model's forward takes: ``use_cache``
    (False: no KV cache is built in a training pass) and ``logits_to_keep`` (the lm head
    only at the last positions). A DDP wrapper's ``module`` is asked: the wrapper passes
    its keywords on."""
    params = inspect.signature(getattr(model, "module", model).forward).parameters
    return {"use_cache": "use_cache" in params, "logits_to_keep": "logits_to_keep" in params}


class FusedGELUTanh(torch.nn.Module):
    """GELU with the tanh approximation in torch's one fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace, in place, every ``NewGELUActivation`` (GPT-2's ``gelu_new``, written as eight
    elementwise tensor ops whose intermediates are all kept for the backward) by
    ``FusedGELUTanh`` (torch's fused ``gelu(x, approximate="tanh")``): the same
    function, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), in one kernel forward and
    one backward, equal up to float rounding (transformers documents the two as equivalent).
    Activations hold no weights: the state dict and the saved config are unchanged, and a
    saved model reloads with its own activation. The training loops (SFT, reward model, DPO
    family) and ``dpo.attach_reference_logps`` call it on the models they are given.
    Returns how many modules were replaced.
    """
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # a release without it has no gelu_new modules to replace
        return 0
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is NewGELUActivation]
    for parent, name in targets:
        setattr(parent, name, FusedGELUTanh())
    return len(targets)


def response_logprobs(model, batch: dict, n_prompt_min: int, device, options: dict | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs of a collated batch from its first response position on, with the
    matching slice of its response mask: two (B, K - 1) tensors, K = T - n_prompt_min + 1.

    The model is asked for logits at the last K positions only (``logits_to_keep``) and no
    KV cache, when its forward takes them (``forward_options``); otherwise K = T. Masked
    sums equal those of ``token_logprobs`` over the whole row (the prompt positions cut
    off hold no response token).
    """
    options = forward_options(model) if options is None else options
    ids = batch["input_ids"].to(device)
    kwargs = {"use_cache": False} if options["use_cache"] else {}
    if options["logits_to_keep"]:
        kwargs["logits_to_keep"] = ids.shape[1] - n_prompt_min + 1
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), **kwargs).logits
    lp = kept_token_logprobs(logits, ids)
    return lp, batch["response_mask"].to(device)[:, ids.shape[1] - lp.shape[1]:]
