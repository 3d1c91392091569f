"""Rollout: sample responses with the KV cache, score them, and return a typed ``Rollout``.

Shared by every online algorithm (PPO, REINFORCE, RLOO, REINFORCE++, GRPO); the
algorithms only consume the ``Rollout``.

1. Generation through the engine (``rlhflab.generation``): KV cache, per-row seeded
   sampling at temperature T with top-k / top-p, everything after a response's first EOS
   is padding (the pad token is distinct from EOS), finished rows leave the batch. Each
   row i of step s draws from ``row_seed(seed, s, i)``, i its index in the *global*
   batch, so a row's response does not depend on how rows are split into chunks or
   processes (which makes the multi-process test meaningful and a resumed run replay
   the same samples). Or an external sampler (``rlhflab.samplers``, ``rl.sampler``) decodes
   and returns each drawn token's log-prob; its samples are laid out the same way.
2. Log-probs of the policy and of the frozen reference on the sampled tokens, both on the
   logits divided by the sampling temperature (what the sampler drew from), with the same
   position ids as generation (left padding counted out). The policy's come from the
   sampling pass itself (the logits each token was drawn from, the same model and
   weights: a separate pass gives them again up to float rounding, which the update
   checks: ``rollout/logprob_diff_*``); the reference's from a forward pass that skips
   padding (packed rows, ``forward_response``).
3. Values of the critic (PPO), per-token entropy, and the scores of the reward source
   (``rlhflab.rewards``), with the no-EOS penalty and the NaN guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhflab.generation import generate
from rlhflab.logprobs import entropy_from_logits, gather_logprobs
from rlhflab.packing import can_pack, model_config, pack, packed_logits, packed_values


def _packed_rows(prompt_ids, prompt_mask, response_ids, response_mask):
    """Each row's real tokens (prompt without its left padding, then the response up to its
    mask's end) moved to the left: (B, L) ids with L = the longest row, the lengths of
    prompts and responses (B,) each. Right padding is never attended by a real token under
    the causal mask, so positions are 0..L_i-1 as in generation."""
    P = prompt_ids.shape[1]
    p_len = prompt_mask.long().sum(-1)
    r_len = response_mask.long().sum(-1)
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    L = int((p_len + r_len).max())
    cols = (P - p_len)[:, None] + torch.arange(L, device=ids.device)[None]
    return ids.gather(1, cols.clamp(max=ids.shape[1] - 1)), p_len, r_len


def _forward_packed(model, rows, p_len, r_len, response_ids, response_mask, pad_id: int, temperature: float,
                    with_entropy: bool, entropy_grad: bool, values: bool = False):
    """``_forward_rows`` in one pass of packed rows (``packing.pack``): the real tokens of
    every row laid end to end, block-diagonal attention."""
    B, R = response_ids.shape
    lengths = (p_len + r_len).tolist()
    p = pack([rows[b, :n].tolist() for b, n in enumerate(lengths)], pad_id).to(rows.device)

    def place(x, where):
        return torch.zeros(B, R, dtype=x.dtype, device=x.device).index_put(where, x)

    if values:
        v, seq, t = packed_values(model, p, p_len)
        return place(v, (seq, t)), None
    logits, targets, seq, t = packed_logits(model, p, p_len)
    if temperature != 1.0:
        logits = logits / temperature
    where = (seq, t)

    lp = place(gather_logprobs(logits, targets), where)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = place(entropy_from_logits(logits if entropy_grad else logits.detach()), where)
    return lp, ent


def forward_response(model, prompt_ids, prompt_mask, response_ids, response_mask, *, temperature: float = 1.0,
                     with_entropy: bool = False, grouped: bool | None = None, entropy_grad: bool = True,
                     packing: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of a causal LM on the response tokens of prompt + response.

    Returns (logprobs, entropy): log pi(y_t | x, y_<t) on logits / temperature, (B, R), and
    the per-token entropy of that distribution (B, R), or None without ``with_entropy``;
    0 on padding. ``entropy_grad=False`` computes the entropy on detached logits (a metric,
    no graph kept for it). How the passes skip padding: ``_forward_rows``.
    """
    return _forward_rows(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=temperature,
                         with_entropy=with_entropy, values=False, grouped=grouped, entropy_grad=entropy_grad,
                         packing=packing)


def forward_values(model, prompt_ids, prompt_mask, response_ids, response_mask, *, grouped: bool | None = None,
                   packing: bool = True) -> torch.Tensor:
    """A critic's V(x, y_<t) on the response tokens of prompt + response, (B, R), read at the
    same positions as the logits that predict y_t; 0 on padding."""
    values, _ = _forward_rows(model, prompt_ids, prompt_mask, response_ids, response_mask, values=True,
                              grouped=grouped, packing=packing)
    return values


def _forward_rows(model, prompt_ids, prompt_mask, response_ids, response_mask, *, temperature: float = 1.0,
                  with_entropy: bool = False, values: bool = False, grouped: bool | None = None,
                  entropy_grad: bool = True, packing: bool = True):
    """Forward passes over prompt + response; (out, entropy) aligned to the response tokens,
    out the log-probs of a causal LM or, with ``values``, a critic's values (entropy None).

    No compute on padding: each row's real tokens (``prompt_mask`` a suffix, as left
    padding makes it, ``response_mask`` a prefix) are packed to the left with positions
    0..L_i-1, the same positions generation used, and rows are cut into runs of similar
    length (``forward.length_groups``), one pass each; the log-softmax is taken at the
    response positions only. Row by row this is the same computation as one left-padded
    pass (up to float rounding). ``grouped=False`` keeps one pass for the whole batch (still
    trimmed); the default groups unless the model is wrapped in DDP and gradients are on,
    since DDP expects one forward per backward.

    A model that passes ``packing.can_pack`` (and ``packing`` left on) goes through ONE
    pass instead, its rows' real tokens laid end to end in rows of the longest one with
    block-diagonal attention (``packing.pack``): no padding and one large product, the same
    values up to float rounding; a critic (``values=True``) likewise when it passes.
    """
    from rlhflab.forward import length_groups

    B, R = response_ids.shape
    packed, p_len, r_len = _packed_rows(prompt_ids, prompt_mask, response_ids, response_mask)
    if packing and B > 1:
        config = model_config(getattr(model, "module", model))
        pad = getattr(config, "pad_token_id", None) or 0
        if config is not None and can_pack(model, pad_id=pad, values=values):
            return _forward_packed(model, packed, p_len, r_len, response_ids, response_mask, pad,
                                   temperature, with_entropy, entropy_grad, values)
    if grouped is None:
        grouped = not (torch.is_grad_enabled() and isinstance(model, torch.nn.parallel.DistributedDataParallel))
    lengths = (p_len + r_len).tolist()
    runs = length_groups(lengths) if grouped and B > 1 else [list(range(B))]
    lp_parts, ent_parts, order = [], [], []
    for run in runs:
        idx = torch.tensor(run, device=packed.device)
        L = max(lengths[i] for i in run)
        Rg = max(1, int(r_len[idx].max()))
        # the output at column p_i - 1 + t predicts y_t
        at = (p_len[idx] - 1)[:, None] + torch.arange(Rg, device=packed.device)[None]
        at = at.clamp(min=0, max=L - 1)
        attn = (torch.arange(L, device=packed.device)[None] < (p_len[idx] + r_len[idx])[:, None]).long()
        out = model(input_ids=packed[idx, :L], attention_mask=attn)
        if values:
            part = out.gather(1, at)
        else:
            logits = out.logits
            logits = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))
            if temperature != 1.0:
                logits = logits / temperature
            part = gather_logprobs(logits, response_ids[idx, :Rg])
            if with_entropy:
                with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                    ent = entropy_from_logits(logits if entropy_grad else logits.detach())
                ent_parts.append(torch.nn.functional.pad(ent, (0, R - Rg)))
        lp_parts.append(torch.nn.functional.pad(part, (0, R - Rg)))
        order.extend(run)
    inverse = torch.empty(B, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(B)
    inverse = inverse.to(packed.device)
    mask = response_mask.bool()

    def assemble(parts):
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        x = x[inverse] if len(parts) > 1 or order != list(range(B)) else x
        return torch.where(mask, x, torch.zeros_like(x))

    return assemble(lp_parts), (assemble(ent_parts) if with_entropy else None)


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
    sampler_logprobs: torch.Tensor  # (B, R) log-probs the sampler drew y_t with (= logprobs unless rescored)
    ref_logprobs: torch.Tensor     # (B, R) log pi_ref(y_t)
    entropy: torch.Tensor          # (B, R) entropy of pi_theta(. | x, y_<t)
    scores: torch.Tensor           # (B,) reward source + no-EOS penalty
    values: torch.Tensor | None    # (B, R) critic V(x, y_<t), PPO only
    group_size: int                # G samples per prompt
    seeds: list[int]               # B per-row sampling seeds
    seconds: float = 0.0           # wall time the batch took to collect (set by OnlineRun.rollout)

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
                    forward_batch_size: int | None = None, rescore: bool = False,
                    rows: Sequence[dict] | None = None, sampler=None) -> Rollout:
    """Generate, score and measure one batch.

    Args:
        policy: the causal LM being trained (unwrapped from DDP).
        reference: the frozen reference model.
        tokenizer: the policy's tokenizer (pad distinct from EOS).
        prompts: B prompt texts, already repeated G times (contiguous groups).
        seeds: B per-row sampling seeds (``generation.row_seed``).
        reward: a reward source (``rlhflab.rewards``).
        generation: a GenerationConfig section (temperature, top_k, top_p, max_new_tokens,
            batch_size).
        group_size: G, recorded on the Rollout.
        value_model: the PPO critic, or None.
        no_eos_penalty: added to the score of rows without EOS.
        forward_batch_size: rows per scoring forward pass (default generation.batch_size).
        rescore: also score the sampled tokens with a forward pass of the policy (the
            trainer's view) and make those the update's old log-probs; the sampler's stay in
            ``sampler_logprobs``. What truncated importance sampling needs when sampler and
            trainer legitimately differ. Without it the sampler's log-probs are the old
            log-probs (one in-process engine: equal to float precision).
        rows: the prompts' data rows, passed to the reward functions.
        sampler: an external sampler (``rlhflab.samplers``) that decodes in place of the
            engine, its weights already synced; None: the engine on ``policy``. Its samples
            get their entropy from a forward pass of the policy (the same pass re-scores
            them with ``rescore``).
    """
    from rlhflab.data import prompt_ids
    from rlhflab.rewards import score_responses

    T = generation.temperature
    encoded = [prompt_ids(p, tokenizer) for p in prompts]
    if sampler is None:
        gen = generate(policy, encoded, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       seeds=seeds, temperature=T, top_k=generation.top_k, top_p=generation.top_p,
                       max_new_tokens=generation.max_new_tokens, batch_size=generation.batch_size,
                       record_logprobs=True)
    else:
        from rlhflab.samplers import SamplingSettings, sample_with

        settings = SamplingSettings(temperature=T, top_k=generation.top_k, top_p=generation.top_p,
                                    max_new_tokens=generation.max_new_tokens,
                                    eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                                    batch_size=generation.batch_size)
        gen = sample_with(sampler, policy, encoded, seeds, settings)
    p_ids, p_mask, r_ids, r_mask, eos = gen.prompt_ids, gen.prompt_mask, gen.response_ids, gen.response_mask, gen.eos
    device = next(policy.parameters()).device
    fb = forward_batch_size or generation.batch_size
    B, R = r_ids.shape
    logps = gen.logprobs.clone() if rescore else gen.logprobs
    ref_logps, vals, ent_parts = [], [], []
    for s in range(0, B, fb):
        args = [t[s:s + fb].to(device) for t in (p_ids, p_mask, r_ids, r_mask)]
        if rescore or gen.entropy is None:
            lp, ent = forward_response(policy, *args, temperature=T, with_entropy=gen.entropy is None,
                                       entropy_grad=False)
            if rescore:
                logps[s:s + fb] = lp.cpu()
            if ent is not None:
                ent_parts.append(ent.float().cpu())
        ref_lp, _ = forward_response(reference, *args, temperature=T)
        ref_logps.append(ref_lp.cpu())
        if value_model is not None:
            vals.append(forward_values(value_model, *args).float().cpu())
    drop = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode([[t for t in row if t not in drop] for row in r_ids.tolist()],
                                   skip_special_tokens=True)
    eos_list = [bool(e) for e in eos.tolist()]
    scores = score_responses(reward, list(prompts), texts, eos_list, no_eos_penalty=no_eos_penalty, rows=rows)
    return Rollout(
        prompts=list(prompts), texts=texts, prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids,
        mask=r_mask.float(), eos=eos.bool(), logprobs=logps, sampler_logprobs=gen.logprobs,
        ref_logprobs=torch.cat(ref_logps), entropy=gen.entropy if gen.entropy is not None else torch.cat(ent_parts),
        scores=scores,
        values=torch.cat(vals) if vals else None, group_size=group_size, seeds=list(seeds),
    )
