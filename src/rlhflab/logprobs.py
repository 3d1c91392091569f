"""Token log-probabilities, masks and entropy. Pure functions over tensors.

Conventions: ``input_ids`` (B, T) holds prompt + response; ``response_mask`` (B, T) is 1 on
response tokens. A causal LM's logits at position t predict token t + 1, so the
log-prob of token t is read from the logits at t - 1 (position 0 has none and is never a
response token).
"""

from __future__ import annotations

import torch


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets] without materialising the (B, T, V) log-softmax.

    logits (B, T, V), targets (B, T) -> (B, T); computed in float32 at least.
    """
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of each token under the distribution that produced it, aligned to input_ids.

    logits (B, T, V) from ``model(input_ids)``; returns (B, T) with column 0 = 0.
    ``temperature`` divides the logits (sampling and scoring must use the same one).
    """
    if temperature != 1.0:
        logits = logits / temperature
    lp = gather_logprobs(logits[:, :-1], input_ids[:, 1:])
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)


def kept_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probs of the tokens that the kept logits predict: (B, K - 1).

    ``logits`` (B, K, V) are the model's logits at the LAST K positions of ``input_ids``
    (B, T) (``logits_to_keep=K``; K = T is every position). The logits at position t
    predict token t + 1, so the result holds tokens T - K + 1 .. T - 1, i.e. it is aligned
    to ``input_ids[:, T - K + 1:]``; with K = T it is ``token_logprobs`` without column 0.
    """
    start = input_ids.shape[1] - logits.shape[1]  # position of the first kept logits
    return gather_logprobs(logits[:, :-1], input_ids[:, start + 1:])


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, per position: (B, T, V) -> (B, T)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def sequence_logprobs(token_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs over the mask: (B, T) -> (B,)."""
    return (token_lp * mask).sum(-1)


def response_mask_after_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, T) keeping generated tokens up to and including the first EOS, and a (B,)
    bool telling which rows emitted EOS. Tokens after the first EOS are masked out."""
    is_eos = response_ids == eos_id
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier
    mask = (~seen_before) & (response_ids != pad_id)
    return mask.long(), is_eos.any(-1)
