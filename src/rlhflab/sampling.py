"""Batched sampling with the KV cache (HF ``generate``), truncated after the first EOS.

Prompts are left-padded so that every row's response starts at the same column; the pad
token is distinct from EOS, so a response's end is never confused with padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhflab.logprobs import response_mask_after_eos


@dataclass
class Completion:
    """One sampled response: its text, its token ids (EOS excluded) and whether it ended."""

    prompt: str
    text: str
    token_ids: list[int]
    eos: bool


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, each row right-aligned."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[i, T - len(s):] = 1
    return ids, attn


@torch.no_grad()
def generate_ids(model, prompt_ids: list[list[int]], tokenizer, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 24,
                 greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses for one batch of prompt ids.

    Returns ``prompt_ids`` (B, P) left-padded, ``prompt_mask`` (B, P), ``response_ids``
    (B, R) with everything after the first EOS set to pad, and ``eos`` (B,) bool.
    """
    device = next(model.parameters()).device
    ids, attn = left_pad(prompt_ids, tokenizer.pad_token_id)
    ids, attn = ids.to(device), attn.to(device)
    kwargs = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p
    )
    out = model.generate(
        input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs,
    )
    response = out[:, ids.shape[1]:]
    mask, eos = response_mask_after_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    return ids, attn, response, eos


def sample(model, tokenizer, prompts: list[str], *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, max_new_tokens: int = 24, batch_size: int = 64,
           seed: int | None = 0, greedy: bool = False) -> list[Completion]:
    """Sample one response per prompt (text-level API for instruments and sample tables)."""
    was_training = model.training
    model.eval()
    out: list[Completion] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            p_ids = [tokenizer(p, add_special_tokens=True).input_ids for p in chunk]
            _, _, resp, eos = generate_ids(
                model, p_ids, tokenizer, temperature=temperature, top_k=top_k, top_p=top_p,
                max_new_tokens=max_new_tokens, greedy=greedy,
            )
            for p, row, e in zip(chunk, resp.tolist(), eos.tolist()):
                ids = [t for t in row if t not in (tokenizer.pad_token_id, tokenizer.eos_token_id)]
                out.append(Completion(p, tokenizer.decode(ids, skip_special_tokens=True), ids, bool(e)))
    model.train(was_training)
    return out
