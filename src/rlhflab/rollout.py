"""Rollout: sample responses with the KV cache, score them, and return a typed ``Rollout``.

Shared by every online algorithm (PPO, REINFORCE, RLOO, REINFORCE++, GRPO); the
algorithms only consume the ``Rollout``.

1. Generation: HF ``generate`` (KV cache) on left-padded prompts, temperature, top-k,
   top-p and max new tokens; everything after a response's first EOS is padding, and the
   pad token is distinct from EOS.
2. Log-probs of the policy and of the frozen reference on the sampled tokens, both on the
   logits divided by the sampling temperature (what the sampler drew from), with the same
   position ids as generation (left padding counted out).
3. Values of the critic (PPO), per-token entropy, and the scores of the reward source
   (``rlhflab.rewards``), with the no-EOS penalty and the NaN guard.

Sampling randomness is per row, not per batch. Each row i draws its tokens with the
Gumbel-max trick from its own generator seeded by ``row_seed(seed, step, i)``, where i is
the row's index in the *global* batch:

    y_t = argmax_v (z_v / T + G_v),  G_v = -log(-log U_v),  U ~ Uniform(0, 1)

is an exact sample from softmax(z / T) (after the top-k / top-p filters, which set
filtered z_v to -inf). So a row's response depends only on (seed, step, row index, model)
and not on how rows are split into generation chunks or across processes: two processes
each sampling their half of the global batch draw exactly what one process draws for the
whole batch (up to float rounding of the logits), which is what makes the multi-process
test meaningful and a resumed run replay the same samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhflab.logprobs import entropy_from_logits, gather_logprobs, response_mask_after_eos
from rlhflab.sampling import left_pad

# ---------------------------------------------------------------------------------------
# Per-row sampling


def row_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for one row of one rollout step, independent of batch layout."""
    digest = hashlib.sha256(f"rollout/{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class GumbelMaxSampler(LogitsProcessor):
    """Adds per-row Gumbel noise so that greedy decoding draws a sample (see module doc).

    ``seeds`` holds one seed per row of the batch given to ``generate``; row i's t-th
    token uses the t-th draw of its own generator, whatever the other rows do. Tokens in
    ``suppress`` (the pad token) are never drawn: a pad inside a response would read as
    a hole in its mask.
    """

    def __init__(self, seeds: Sequence[int], suppress: Sequence[int] = ()) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.suppress = list(suppress)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, V = scores.shape
        if self.suppress:
            scores = scores.clone()
            scores[:, self.suppress] = float("-inf")
        u = torch.stack([torch.rand(V, generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        return scores + gumbel.to(scores.device, scores.dtype)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens, as ``generate`` uses (left padding -> 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


@torch.no_grad()
def generate(policy, tokenizer, prompt_ids: list[list[int]], seeds: Sequence[int], *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 24, batch_size: int = 64):
    """Sample one response per prompt, ``batch_size`` prompts per ``generate`` call.

    Returns ``prompt_ids`` (B, P) left-padded, ``prompt_mask`` (B, P), ``response_ids``
    (B, R) with pad after the first EOS, ``response_mask`` (B, R) 1 up to and including
    the first EOS, and ``eos`` (B,) bool.
    """
    pad, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    device = next(policy.parameters()).device
    p_ids, p_mask = left_pad(prompt_ids, pad)
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                               pad_token_id=pad, bos_token_id=getattr(tokenizer, "bos_token_id", None))
    chunks = []
    was_training = policy.training
    policy.eval()
    for start in range(0, len(prompt_ids), batch_size):
        ids = p_ids[start:start + batch_size].to(device)
        attn = p_mask[start:start + batch_size].to(device)
        processors = LogitsProcessorList([*warpers, GumbelMaxSampler(seeds[start:start + batch_size], suppress=[pad])])
        out = policy.generate(input_ids=ids, attention_mask=attn, generation_config=gen_cfg,
                              logits_processor=processors)
        chunks.append(out[:, ids.shape[1]:].cpu())
    policy.train(was_training)
    R = max(c.shape[1] for c in chunks)
    response = torch.cat([torch.nn.functional.pad(c, (0, R - c.shape[1]), value=pad) for c in chunks])
    mask, eos = response_mask_after_eos(response, eos_id, pad)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad))
    return p_ids, p_mask, response, mask, eos


def forward_response(model, prompt_ids, prompt_mask, response_ids, response_mask, *, temperature: float = 1.0,
                     with_entropy: bool = False, values: bool = False):
    """One forward pass over prompt + response; outputs aligned to the response tokens.

    For a causal LM (``values=False``) returns (logprobs, entropy): log pi(y_t | x, y_<t)
    on logits / temperature, (B, R), and the per-token entropy of that distribution (B, R)
    or None; 0 on padding. For a critic (``values=True``) returns V(x, y_<t), (B, R),
    read at the same positions as the logits that predict y_t.
    """
    P = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    attn = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)
    pos = position_ids_from_mask(attn)
    mask = response_mask.bool()
    if values:
        v = model(input_ids=ids, attention_mask=attn, position_ids=pos)[:, P - 1:-1]
        return torch.where(mask, v, torch.zeros_like(v))
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1]
    if temperature != 1.0:
        logits = logits / temperature
    lp = gather_logprobs(logits, response_ids)
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    ent = None
    if with_entropy:
        ent = entropy_from_logits(logits)
        ent = torch.where(mask, ent, torch.zeros_like(ent))
    return lp, ent


# ---------------------------------------------------------------------------------------
# The Rollout


@dataclass
class Rollout:
    """One batch of sampled responses with everything the update needs.

    Rows of one prompt are contiguous (rows [kG:(k+1)G] are the G samples of prompt k).
    Token tensors cover the response only; ``mask`` is 1 up to and including the first
    EOS. Log-probs are on logits / temperature. All tensors are on the CPU unless moved.
    """

    prompts: list[str]             # B prompt texts (each repeated G times)
    texts: list[str]               # B decoded responses, EOS excluded
    prompt_ids: torch.Tensor       # (B, P) left-padded
    prompt_mask: torch.Tensor      # (B, P)
    response_ids: torch.Tensor     # (B, R) pad after the first EOS
    mask: torch.Tensor             # (B, R) float, 1 on response tokens up to and incl. EOS
    eos: torch.Tensor              # (B,) bool, the response emitted EOS
    logprobs: torch.Tensor         # (B, R) log pi_theta(y_t), the "old" log-probs of the update
    ref_logprobs: torch.Tensor     # (B, R) log pi_ref(y_t)
    entropy: torch.Tensor          # (B, R) entropy of pi_theta(. | x, y_<t)
    scores: torch.Tensor           # (B,) reward source + no-EOS penalty
    values: torch.Tensor | None    # (B, R) critic V(x, y_<t), PPO only
    group_size: int                # G samples per prompt
    seeds: list[int]               # B per-row sampling seeds

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Response tokens per row, EOS included.                     # (B,)"""
        return self.mask.sum(-1)

    def to(self, device) -> Rollout:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Rollout(**moved)


@torch.no_grad()
def collect_rollout(policy, reference, tokenizer, prompts: list[str], seeds: Sequence[int], reward, *,
                    generation, group_size: int = 1, value_model=None, no_eos_penalty: float = 0.0,
                    forward_batch_size: int | None = None) -> Rollout:
    """Generate, score and measure one batch.

    Args:
        policy: the causal LM being trained (unwrapped from DDP).
        reference: the frozen reference model.
        tokenizer: the policy's tokenizer (pad distinct from EOS).
        prompts: B prompt texts, already repeated G times (contiguous groups).
        seeds: B per-row sampling seeds (``row_seed``).
        reward: a reward source (``rlhflab.rewards``).
        generation: a GenerationConfig section (temperature, top_k, top_p, max_new_tokens,
            batch_size).
        group_size: G, recorded on the Rollout.
        value_model: the PPO critic, or None.
        no_eos_penalty: added to the score of rows without EOS.
        forward_batch_size: rows per scoring forward pass (default generation.batch_size).
    """
    from rlhflab.rewards import score_responses

    T = generation.temperature
    encoded = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    p_ids, p_mask, r_ids, r_mask, eos = generate(
        policy, tokenizer, encoded, seeds, temperature=T, top_k=generation.top_k, top_p=generation.top_p,
        max_new_tokens=generation.max_new_tokens, batch_size=generation.batch_size)
    device = next(policy.parameters()).device
    fb = forward_batch_size or generation.batch_size
    logps, ref_logps, ents, vals = [], [], [], []
    for s in range(0, len(prompts), fb):
        args = [t[s:s + fb].to(device) for t in (p_ids, p_mask, r_ids, r_mask)]
        lp, ent = forward_response(policy, *args, temperature=T, with_entropy=True)
        ref_lp, _ = forward_response(reference, *args, temperature=T)
        logps.append(lp.cpu())
        ents.append(ent.cpu())
        ref_logps.append(ref_lp.cpu())
        if value_model is not None:
            vals.append(forward_response(value_model, *args, values=True).float().cpu())
    texts = [tokenizer.decode([t for t in row if t not in (tokenizer.pad_token_id, tokenizer.eos_token_id)],
                              skip_special_tokens=True) for row in r_ids.tolist()]
    eos_list = [bool(e) for e in eos.tolist()]
    scores = score_responses(reward, list(prompts), texts, eos_list, no_eos_penalty=no_eos_penalty)
    return Rollout(
        prompts=list(prompts), texts=texts, prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids,
        mask=r_mask.float(), eos=eos.bool(), logprobs=torch.cat(logps), ref_logprobs=torch.cat(ref_logps),
        entropy=torch.cat(ents), scores=scores, values=torch.cat(vals) if vals else None,
        group_size=group_size, seeds=list(seeds),
    )
