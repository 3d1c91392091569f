"""Rollout: sample responses with the KV cache, score them, and return a typed ``Rollout``.

Shared by every online algorithm (PPO, REINFORCE, RLOO, REINFORCE++, GRPO); the
algorithms only consume the ``Rollout``.

1. Generation: HF ``generate`` (KV cache) on left-padded prompts, temperature, top-k,
   top-p and max new tokens; everything after a response's first EOS is padding, and the
   pad token is distinct from EOS. The decoding loop drops a row from the batch (and
   from the KV cache) once it has emitted EOS, instead of decoding it to the end.
2. Log-probs of the policy and of the frozen reference on the sampled tokens, both on the
   logits divided by the sampling temperature (what the sampler drew from), with the same
   position ids as generation (left padding counted out). The policy's come from the
   sampling pass itself (the logits each token was drawn from, the same model and
   weights: a separate pass gives them again up to float rounding); the reference's from
   a forward pass that skips padding: each row's real tokens are packed to the left and
   rows of similar length share a pass.
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

import contextlib
import functools
import hashlib
import os
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
from rlhflab.packing import can_pack, model_config, pack, packed_logits, packed_values
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
    token uses the t-th draw of V uniforms from its own generator, whatever the other rows
    do. The draws are taken ``block`` steps at a time (one call per row per block, and
    the Gumbel transform on the whole block): a CPU generator's stream does not depend on
    how it is split into calls, so the noise is the same as drawing step by step. Tokens
    in ``suppress`` (the pad token) are never drawn: a pad inside a response would read as
    a hole in its mask.
    """

    def __init__(self, seeds: Sequence[int], suppress: Sequence[int] = (), block: int = 32) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.suppress = list(suppress)
        self.block = max(1, int(block))
        self._noise: torch.Tensor | None = None  # (B, block, V) Gumbel noise of the current block
        self._t = 0  # decoding steps taken
        self.rows: torch.Tensor | None = None  # rows of the batch present in ``scores`` (None: all)

    def _draw(self, V: int) -> torch.Tensor:
        n = self.block * V
        u = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in self.generators])
        return (-torch.log(-torch.log(u.clamp(min=1e-300)))).view(len(self.generators), self.block, V)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, V = scores.shape
        if self.suppress:
            scores = scores.clone()
            scores[:, self.suppress] = float("-inf")
        k = self._t % self.block
        if k == 0:
            self._noise = self._draw(V)
        self._t += 1
        noise = self._noise[:, k] if self.rows is None else self._noise[self.rows.cpu(), k]
        return scores + noise.to(scores.device, scores.dtype)


@contextlib.contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Below this many multiply-adds, rows x d x d, a decode step's products run on one thread when
# OpenMP threads sleep while they wait (see ``decode_threads``).
PASSIVE_DECODE_WORK = 4_000_000


def decode_threads(rows: int, hidden: int) -> int:
    """How many intra-op threads the decode steps of a batch of ``rows`` use.

    A decode step of a small model is a chain of small products, (rows, d) x (d, k d), each
    a fork/join of the OpenMP threads. When the threads sleep while they wait
    (``OMP_WAIT_POLICY=PASSIVE`` or ``GOMP_SPINCOUNT=0``, the settings for a shared
    machine), waking them costs more than the split saves: on this project's 2-core
    benchmark machine a (64, 128) x (128, 384) product took 69 us on one thread and 190 us
    on two (44 us on two with libgomp's default policy, whose threads spin a while first),
    and decoding 64 rows of the demo model went from 172 to 117 ms per call on one thread.
    Splitting pays once a product takes several wake-ups' time, about rows x d^2 = 4e6 at
    50 GFLOP/s per core. So: one thread under a passive policy below that, all of them
    otherwise. A rule, not a timing, so that a run repeats bit for bit: the thread count
    changes float rounding (not the samples' law).
    """
    n = torch.get_num_threads()
    passive = (os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
               or os.environ.get("GOMP_SPINCOUNT", "").strip() == "0")
    return 1 if passive and rows * hidden * hidden < PASSIVE_DECODE_WORK else n


def _sample_unfinished_rows(model, input_ids, logits_processor, stopping_criteria, generation_config, *,
                            sampler: GumbelMaxSampler, record: dict | None = None, temperature: float = 1.0,
                            **model_kwargs):
    """The decoding loop ``generate`` runs (its ``custom_generate``): greedy on the
    processed scores (the Gumbel noise makes it a sample), each step on the rows that have
    not emitted EOS yet; a finished row leaves the batch and its KV cache. Row by row the
    same computation as HF's loop, which keeps decoding finished rows and discards their
    tokens. Returns (B, P + steps) ids, pad after each row's EOS.

    With a ``record`` dict, also stores there the log-prob of each drawn token and the
    entropy, both of softmax(logits / temperature) before any top-k / top-p filter (what
    ``forward_response`` computes from a full pass): ``record["logprobs"]`` and
    ``record["entropy"]``, (B, steps), 0 after a row's EOS."""
    eos = generation_config._eos_token_tensor
    pad = int(generation_config._pad_token_tensor)
    cache = model_kwargs.get("past_key_values")
    attn = model_kwargs["attention_mask"]
    B = input_ids.shape[0]
    steps = generation_config.max_new_tokens
    out = input_ids.new_full((B, steps), pad)
    if record is not None:
        lp_out = torch.zeros(B, steps, device=input_ids.device)
        ent_out = torch.zeros(B, steps, device=input_ids.device)
    active = torch.arange(B, device=input_ids.device)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                   use_cache=True).logits[:, -1]
    next_pos = attn.long().sum(-1, keepdim=True)  # (b, 1): real tokens so far = the next position
    can_drop = cache is not None and hasattr(cache, "batch_select_indices")
    seq = input_ids
    t = 0
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    # The prompts' pass above keeps every thread; the decode steps take what suits them.
    with intra_op_threads(decode_threads(B, hidden) if input_ids.device.type == "cpu" else torch.get_num_threads()):
        for t in range(steps):
            sampler.rows = active
            z = logits.float() / temperature if record is not None else None  # a copy: processors may work in place
            scores = logits_processor(seq, logits.float())
            token = scores.argmax(-1)
            out[active, t] = token
            if record is not None:
                lp_out[active, t] = gather_logprobs(z[:, None], token[:, None])[:, 0]
                ent_out[active, t] = entropy_from_logits(z)
            done = torch.isin(token, eos)
            if t == steps - 1 or bool(done.all()):
                break
            if can_drop and bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, token, attn, next_pos = active[keep], token[keep], attn[keep], next_pos[keep]
                seq = seq[keep]
            elif not can_drop:
                token = torch.where(torch.isin(out[active, :t + 1], eos).any(-1), torch.full_like(token, pad), token)
            seq = torch.cat([seq, token[:, None]], dim=1)
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            logits = model(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache,
                           use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
    sampler.rows = None
    if record is not None:
        record["logprobs"], record["entropy"] = lp_out[:, :t + 1], ent_out[:, :t + 1]
    return torch.cat([input_ids, out[:, :t + 1]], dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens, as ``generate`` uses (left padding -> 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


@torch.no_grad()
def generate(policy, tokenizer, prompt_ids: list[list[int]], seeds: Sequence[int], *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 24, batch_size: int = 64,
             drop_finished: bool = True, with_logprobs: bool = False):
    """Sample one response per prompt, ``batch_size`` prompts per ``generate`` call.

    ``drop_finished`` decodes only the rows without EOS yet (``_sample_unfinished_rows``);
    False runs HF's own loop, which decodes every row to the end (same samples).
    ``with_logprobs`` also returns the sampling pass's log-probs and entropies (B, R) of
    the drawn tokens on logits / temperature, 0 on padding (None with HF's loop).

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
    chunks, lp_chunks, ent_chunks = [], [], []
    was_training = policy.training
    policy.eval()
    for start in range(0, len(prompt_ids), batch_size):
        ids = p_ids[start:start + batch_size].to(device)
        attn = p_mask[start:start + batch_size].to(device)
        sampler = GumbelMaxSampler(seeds[start:start + batch_size], suppress=[pad], block=max_new_tokens)
        processors = LogitsProcessorList([*warpers, sampler])
        record = {} if with_logprobs else None
        out = policy.generate(input_ids=ids, attention_mask=attn, generation_config=gen_cfg,
                              logits_processor=processors,
                              custom_generate=functools.partial(_sample_unfinished_rows, sampler=sampler,
                                                                record=record, temperature=temperature)
                              if drop_finished else None)
        chunks.append(out[:, ids.shape[1]:].cpu())
        if record:
            lp_chunks.append(record["logprobs"].cpu())
            ent_chunks.append(record["entropy"].cpu())
    policy.train(was_training)
    R = max(c.shape[1] for c in chunks)
    response = torch.cat([torch.nn.functional.pad(c, (0, R - c.shape[1]), value=pad) for c in chunks])
    mask, eos = response_mask_after_eos(response, eos_id, pad)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad))
    if not with_logprobs:
        return p_ids, p_mask, response, mask, eos
    if len(lp_chunks) != len(chunks):
        return p_ids, p_mask, response, mask, eos, None, None

    def cat(parts):
        x = torch.cat([torch.nn.functional.pad(c, (0, R - c.shape[1])) for c in parts])
        return torch.where(mask.bool(), x, torch.zeros_like(x))

    return p_ids, p_mask, response, mask, eos, cat(lp_chunks), cat(ent_chunks)


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
    """``forward_response`` in one pass of packed rows (``packing.pack``): the real tokens of
    every row laid end to end, block-diagonal attention."""
    B, R = response_ids.shape
    lengths = (p_len + r_len).tolist()
    p = pack([rows[b, :n].tolist() for b, n in enumerate(lengths)], pad_id).to(rows.device)

    def place(x, where):
        return torch.zeros(B, R, dtype=x.dtype, device=x.device).index_put(where, x)

    if values:
        v, seq, t = packed_values(model, p, p_len)
        return place(v, (seq, t))
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
                     with_entropy: bool = False, values: bool = False, grouped: bool | None = None,
                     entropy_grad: bool = True, packing: bool = True):
    """Forward passes over prompt + response; outputs aligned to the response tokens.

    For a causal LM (``values=False``) returns (logprobs, entropy): log pi(y_t | x, y_<t)
    on logits / temperature, (B, R), and the per-token entropy of that distribution (B, R)
    or None; 0 on padding. For a critic (``values=True``) returns V(x, y_<t), (B, R),
    read at the same positions as the logits that predict y_t.

    No compute on padding: each row's real tokens (``prompt_mask`` a suffix, as left
    padding makes it, ``response_mask`` a prefix) are packed to the left with positions
    0..L_i-1, the same positions generation used, and rows are cut into runs of similar
    length (``algos.sft.length_groups``), one pass each; the log-softmax is taken at the
    response positions only. Row by row this is the same computation as one left-padded
    pass (up to float rounding). ``grouped=False`` keeps one pass for the whole batch (still
    trimmed); the default groups unless the model is wrapped in DDP and gradients are on,
    since DDP expects one forward per backward. ``entropy_grad=False`` computes the entropy
    on detached logits (a metric, no graph kept for it).

    A model that passes ``packing.can_pack`` (and ``packing`` left on) goes through ONE
    pass instead, its rows' real tokens laid end to end in rows of the longest one with
    block-diagonal attention (``packing.pack``): no padding and one large product, the same
    values up to float rounding; a critic (``values=True``) likewise when it passes.
    """
    from rlhflab.algos.sft import length_groups

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

    if values:
        return assemble(lp_parts)
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
                    forward_batch_size: int | None = None, defer_rows: torch.Tensor | None = None) -> Rollout:
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
        defer_rows: indices of rows whose policy log-probs and entropy the caller fills in:
            the rows of the first update, whose forward pass with gradients gives them at
            no extra cost (``OnlineRun.rollout``). Only used when the sampling pass did not
            score its tokens (HF's decoding loop); left at 0 then.
    """
    from rlhflab.rewards import score_responses

    T = generation.temperature
    encoded = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    p_ids, p_mask, r_ids, r_mask, eos, gen_logps, gen_ents = generate(
        policy, tokenizer, encoded, seeds, temperature=T, top_k=generation.top_k, top_p=generation.top_p,
        max_new_tokens=generation.max_new_tokens, batch_size=generation.batch_size, with_logprobs=True)
    device = next(policy.parameters()).device
    fb = forward_batch_size or generation.batch_size
    B, R = r_ids.shape
    here = torch.ones(B, dtype=torch.bool)
    if gen_logps is not None:  # the sampling pass scored its own tokens: no policy pass needed
        here[:] = False
    elif defer_rows is not None:
        here[defer_rows.cpu()] = False
    logps = gen_logps if gen_logps is not None else torch.zeros(B, R)
    ents = gen_ents if gen_ents is not None else torch.zeros(B, R)
    ref_logps, vals = [], []
    for s in range(0, B, fb):
        args = [t[s:s + fb].to(device) for t in (p_ids, p_mask, r_ids, r_mask)]
        rows = here[s:s + fb]
        if rows.all():
            lp, ent = forward_response(policy, *args, temperature=T, with_entropy=True)
            logps[s:s + fb], ents[s:s + fb] = lp.cpu(), ent.cpu()
        elif rows.any():
            lp, ent = forward_response(policy, *(a[rows.to(device)] for a in args), temperature=T, with_entropy=True)
            logps[s:s + fb][rows], ents[s:s + fb][rows] = lp.cpu(), ent.cpu()
        ref_lp, _ = forward_response(reference, *args, temperature=T)
        ref_logps.append(ref_lp.cpu())
        if value_model is not None:
            vals.append(forward_response(value_model, *args, values=True).float().cpu())
    drop = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode([[t for t in row if t not in drop] for row in r_ids.tolist()],
                                   skip_special_tokens=True)
    eos_list = [bool(e) for e in eos.tolist()]
    scores = score_responses(reward, list(prompts), texts, eos_list, no_eos_penalty=no_eos_penalty)
    return Rollout(
        prompts=list(prompts), texts=texts, prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids,
        mask=r_mask.float(), eos=eos.bool(), logprobs=logps, ref_logprobs=torch.cat(ref_logps),
        entropy=ents, scores=scores, values=torch.cat(vals) if vals else None,
        group_size=group_size, seeds=list(seeds),
    )
