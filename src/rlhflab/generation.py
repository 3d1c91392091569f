"""The one decoding loop: every rollout and every instrument that samples goes through it.

The loop drives ``model(...)`` itself, the way nanochat's ``engine.py`` does, instead of
grafting a loop into HF ``generate``: it creates the KV cache through transformers' public
``DynamicCache``, feeds left-padded prompts once, then one token per step, and owns
everything else:

- **Per-row seeded sampling.** Row i draws its tokens with the Gumbel-max trick from its
  own generator seeded by ``seeds[i]``:

      y_t = argmax_v (z_v / T + G_v),  G_v = -log(-log U_v),  U ~ Uniform(0, 1)

  is an exact sample from softmax(z / T) (after the top-k / top-p filters, which set the
  filtered z_v to -inf). A row's response depends only on its seed, the prompt and the
  model, not on how rows are split into batches or across processes: two processes each
  sampling half of a global batch draw what one process draws for all of it (up to float
  rounding of the logits), and a resumed run replays the same samples.
- **Temperature, top-k, top-p** (in that order, as HF applies them), and greedy decoding.
- **Stop at EOS, finished rows leave the batch**: once a row has emitted EOS (any of the
  ``eos_token_id``), it is dropped from the batch and from the KV cache
  (``Cache.batch_select_indices``) instead of being decoded to the end. Row by row the
  same computation as decoding every row to the end (``drop_finished=False``).
- **Recording** (``record_logprobs``): the log-prob of each drawn token and the entropy,
  both of softmax(logits / T) *before* top-k / top-p, i.e. what a scoring pass over prompt
  + response computes (``rollout.forward_response``), so the sampler's log-probs serve as
  the "old" log-probs of an online update.
- **One return type**, ``Generation``.

Public API of transformers only. The one thing that differs between releases is the name
of the cache keyword of a model's forward (``past_key_values`` until 5.23, ``cache`` from
5.24): ``cache_keyword`` reads it from the forward's signature.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhflab.logprobs import entropy_from_logits, gather_logprobs
from rlhflab.progress import current_label, progress_bar
from rlhflab.seeds import derive_seed


@dataclass
class Generation:
    """A batch of sampled responses. Every row's prompt is right-aligned (left padding), so
    every response starts at column P; after a row's first EOS its response is pad."""

    prompt_ids: torch.Tensor             # (B, P) left-padded
    prompt_mask: torch.Tensor            # (B, P) 1 on prompt tokens
    response_ids: torch.Tensor           # (B, R) pad after the first EOS
    response_mask: torch.Tensor          # (B, R) 1 up to and including the first EOS
    eos: torch.Tensor                    # (B,) bool, the row emitted EOS
    logprobs: torch.Tensor | None = None  # (B, R) log softmax(z / T)[y_t], 0 on padding
    entropy: torch.Tensor | None = None   # (B, R) entropy of softmax(z / T), 0 on padding

    @property
    def lengths(self) -> torch.Tensor:
        """Response tokens per row, EOS included.                          # (B,)"""
        return self.response_mask.long().sum(-1)


# ---------------------------------------------------------------------------------------
# Seeds and noise


def row_seed(seed: int, step: int | str, index: int) -> int:
    """A 63-bit seed for one row of one sampling call, independent of batch layout."""
    return derive_seed("rollout", seed, step, index)


# Gumbel noise is drawn this many float64 values at a time per call at most (128 MiB), so
# that a real vocabulary (150k tokens) and long responses do not draw B x R x V at once.
NOISE_BUDGET = 2**24


class GumbelNoise:
    """Per-row Gumbel noise: row i's t-th decoding step uses the t-th draw of V uniforms
    from its own generator, whatever the other rows do.

    Draws are taken ``block`` steps at a time (one call per row per block, at most
    ``NOISE_BUDGET`` values per call): a CPU generator's stream does not depend on how it
    is split into calls, so the noise is the same as drawing step by step, and the same
    for any block size.
    """

    def __init__(self, seeds: Sequence[int], max_steps: int) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.max_steps = max(1, int(max_steps))
        self.block = 0
        self._noise: torch.Tensor | None = None  # (B, block, V)
        self._start = -1  # first step of the current block

    def at(self, t: int, vocab_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Noise of step ``t`` for ``rows`` (indices into the seeds; None: all): (b, V) float64.
        Steps are asked for in increasing order."""
        V = int(vocab_size)
        if not self.block:
            self.block = max(1, min(self.max_steps, NOISE_BUDGET // max(1, len(self.generators) * V)))
        start = t - t % self.block
        if start < self._start:
            raise ValueError("Gumbel noise is drawn in order of steps")
        while self._start < start:  # a skipped block still advances every stream
            self._start = self._start + self.block if self._start >= 0 else 0
            u = torch.stack([torch.rand(self.block * V, generator=g, dtype=torch.float64)
                             for g in self.generators])
            self._noise = (-torch.log(-torch.log(u.clamp(min=1e-300)))).view(-1, self.block, V)
        k = t - start
        return self._noise[:, k] if rows is None else self._noise[rows.cpu(), k]


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding 32-bit values, without overflowing int64:
    c = c_hi 2^16 + c_lo, and only the low 16 bits of x c_hi survive the shift by 16."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash (C. Wellons, 2018: shifts 16, 15, 15, multipliers
    0x21f0aaad, 0x735a2d97) on int64 tensors of 32-bit values: a bijection of [0, 2^32)
    with full avalanche, in elementwise torch ops that run on any device."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


class CounterNoise:
    """Per-row Gumbel noise computed where the logits are: the uniform of row i, step t,
    token v is a hash of (seed_i, t, v) (a counter-based draw, as Philox is: Salmon et al.
    2011), so nothing is drawn on the host or copied per step, and row i's noise depends on
    its seed alone, whatever the batch layout. Keyed by both 32-bit halves of the 63-bit row
    seed: k = h(h(h(hi) ^ lo) ^ t); two words per token, a = h(k ^ h(2v)) and
    b = h(k ^ h(2v + 1)), make a 53-bit uniform u = (a 2^21 + floor(b / 2^11) + 1/2) / 2^53,
    and the noise is -log(-log u) in float64.

    The engine's default on an accelerator (``generate(noise="auto")``); on the CPU the
    per-row generators of ``GumbelNoise`` stay the default, so CPU samples are unchanged."""

    def __init__(self, seeds: Sequence[int], max_steps: int = 0, device: torch.device | str = "cpu") -> None:
        s = torch.tensor([int(x) for x in seeds], dtype=torch.int64, device=device)
        self.hi = hash32((s >> 32) & _MASK32)
        self.lo = s & _MASK32
        self._tokens: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def at(self, t: int, vocab_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Noise of step ``t`` for ``rows`` (indices into the seeds; None: all): (b, V) float64."""
        V = int(vocab_size)
        if self._tokens is None or self._tokens[0] != V:
            v = torch.arange(V, dtype=torch.int64, device=self.lo.device)
            self._tokens = (V, hash32(2 * v), hash32(2 * v + 1))
        _, ha, hb = self._tokens
        hi, lo = self.hi, self.lo
        if rows is not None:
            rows = rows.to(hi.device)
            hi, lo = hi[rows], lo[rows]
        k = hash32(hash32(hi ^ lo) ^ int(t))[:, None]
        a, b = hash32(k ^ ha), hash32(k ^ hb)
        u = ((a << 21) + (b >> 11)).double().add_(0.5).mul_(2.0 ** -53)
        return -torch.log(-torch.log(u))


# ---------------------------------------------------------------------------------------
# Logit filters (pure)


def top_k_filter(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logits outside the k largest of each row set to -inf (ties at the k-th kept). (b, V)."""
    if not k or k >= z.shape[-1]:
        return z
    kth = torch.topk(z, k, dim=-1).values[..., -1:]
    return z.masked_fill(z < kth, float("-inf"))


def top_p_filter(z: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of the most likely tokens
    whose probability reaches p (at least one), the others set to -inf. (b, V).

    As HF's ``TopPLogitsWarper``: sort ascending, drop the tokens whose cumulative
    probability is <= 1 - p."""
    if p >= 1.0:
        return z
    sorted_z, order = torch.sort(z, descending=False, dim=-1)
    cum = sorted_z.softmax(-1).cumsum(-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return z.masked_fill(drop, float("-inf"))


# ---------------------------------------------------------------------------------------
# The KV cache through the public API


def _forward_parameters(model) -> dict:
    target = model
    for _ in range(4):  # wrappers (PEFT, DDP) pass keywords on to the model they hold
        params = inspect.signature(target.forward).parameters
        if "cache" in params or "past_key_values" in params:
            return params
        inner = getattr(target, "module", None) or getattr(target, "base_model", None)
        if inner is None or inner is target:
            break
        target = inner
    return params


def cache_keyword(model) -> str:
    """The keyword under which this model's forward takes a KV cache: ``cache`` (transformers
    5.24 and later) or ``past_key_values`` (earlier)."""
    params = _forward_parameters(model)
    return "cache" if "cache" in params else "past_key_values"


def make_cache(model):
    """A fresh ``DynamicCache`` for ``model`` (built from its config where the installed
    release takes one, so sliding-window layers get their own cache layers)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    if config is not None and "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


# ---------------------------------------------------------------------------------------
# Threads


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
    and decoding 64 rows of the demo model went from 172 to 117 ms per call on one thread
    (``bench/decode_threads.py``). Splitting pays once a product takes several wake-ups'
    time, about rows x d^2 = 4e6 at 50 GFLOP/s per core. So: one thread under a passive
    policy below that, all of them otherwise. A rule, not a timing, so that a run repeats
    bit for bit: the thread count changes float rounding (not the samples' law).
    """
    n = torch.get_num_threads()
    passive = (os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
               or os.environ.get("GOMP_SPINCOUNT", "").strip() == "0")
    return 1 if passive and rows * hidden * hidden < PASSIVE_DECODE_WORK else n


# ---------------------------------------------------------------------------------------
# Lengths: a prompt and its response fit the model's positions


def model_positions(model) -> int | None:
    """The longest sequence the model's position embeddings cover (its config's
    ``n_positions`` or ``max_position_embeddings``), or None when its config says nothing."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def prompt_room(model, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit beside ``max_new_tokens`` response tokens in the model's
    positions (None: no limit known). None fit: an InputError naming
    ``generation.max_new_tokens``, raised before any decoding (a stage checks it before it
    trains)."""
    from rlhflab.errors import InputError

    positions = model_positions(model)
    if positions is None:
        return None
    room = positions - int(max_new_tokens)
    if room < 1:
        raise InputError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's {positions} "
                         f"positions: lower it below {positions}", field="generation.max_new_tokens")
    return room


_CUT_REPORTED: set[tuple[int, int]] = set()


def fit_prompts(prompt_ids: Sequence[Sequence[int]], room: int | None, max_new_tokens: int = 0
                ) -> list[Sequence[int]]:
    """Prompts cut to their last ``room`` tokens (the start goes, as SFT's rows lose theirs:
    the end of a prompt is what the response answers), so that prompt + response stay within
    the model's positions. A cut is counted and said once per process on stderr for each
    (room, max_new_tokens), not once per batch."""
    if room is None:
        return list(prompt_ids)
    cut = sum(len(p) > room for p in prompt_ids)
    if not cut:
        return list(prompt_ids)
    if (room, max_new_tokens) not in _CUT_REPORTED:
        import sys

        _CUT_REPORTED.add((room, max_new_tokens))
        print(f"{cut} of {len(prompt_ids)} prompts are longer than the {room} tokens the model's positions leave "
              f"beside {max_new_tokens} new tokens: each keeps its last {room} tokens (its start is cut)",
              file=sys.stderr)
    return [p[-room:] if len(p) > room else p for p in prompt_ids]


# ---------------------------------------------------------------------------------------
# Decoding


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, each row right-aligned."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            attn[i, T - len(s):] = 1
    return ids, attn


def _logits_keyword(model) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def _reads_4d_masks(model, pad: int) -> bool:
    """The model reads a 4-D boolean mask as the attention it allows (``packing.can_pack``'s
    probe), and has no sliding-window layers (whose window a given mask would replace)."""
    from rlhflab.packing import can_pack

    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    windowed_layers = "sliding_attention" in (getattr(config, "layer_types", None) or ())
    return not (window or windowed_layers) and can_pack(model, pad_id=pad)


def _prefill_mask(attn: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: query t attends key s <= t where the prompt's key is real; a
    left pad attends to itself only (a query with no key would make the softmax NaN, and a
    NaN value is read by the real queries even at weight 0)."""
    T = attn.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attn.device).tril()
    mask = causal & attn.bool()[:, None, :]
    return (mask | torch.eye(T, dtype=torch.bool, device=attn.device))[:, None]


@torch.no_grad()
def _decode_batch(model, ids: torch.Tensor, attn: torch.Tensor, noise: GumbelNoise | CounterNoise | None, *, eos: torch.Tensor,
                  pad: int, suppress: Sequence[int], temperature: float, top_k: int, top_p: float,
                  max_new_tokens: int, record: bool, drop_finished: bool):
    """One batch: (B, R) response ids (pad after each row's EOS, R = the steps taken) and,
    with ``record``, the drawn tokens' log-probs and entropies (B, R)."""
    B = ids.shape[0]
    device = ids.device
    cache = make_cache(model)
    kw = {cache_keyword(model): cache, "use_cache": True}
    out = ids.new_full((B, max_new_tokens), pad)
    lp_out = torch.zeros(B, max_new_tokens, device=device) if record else None
    ent_out = torch.zeros(B, max_new_tokens, device=device) if record else None
    active = torch.arange(B, device=device)          # rows of the batch still decoding
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)  # positions count attended tokens only
    # The attention masks as 4-D boolean tensors where the model is known to read them as
    # such (``packing.can_pack``'s probe): transformers returns a 4-D mask as it is, where it
    # rebuilds one from a 2-D mask at every step (4-9% of a decode call of the demo's model:
    # docs/benchmarks.md, "Results").
    four_d = _reads_4d_masks(model, pad)
    prefill_mask = _prefill_mask(attn) if four_d else attn
    logits = model(input_ids=ids, attention_mask=prefill_mask, position_ids=pos, **kw,
                   **_logits_keyword(model)).logits[:, -1]
    next_pos = attn.long().sum(-1, keepdim=True)     # (b, 1) real tokens so far = the next position
    can_drop = drop_finished and hasattr(cache, "batch_select_indices")
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    threads = decode_threads(B, hidden) if device.type == "cpu" else torch.get_num_threads()
    t = 0
    # torch's thread count is process-wide: changed for the decode loop only, and restored
    # when the block ends (also on an exception), so the caller's setting is what it was.
    with intra_op_threads(threads):
        for t in range(max_new_tokens):
            z = logits.float()
            if temperature != 1.0:
                z = z / temperature
            if noise is None:  # greedy
                scores = z
            else:
                scores = top_p_filter(top_k_filter(z, top_k), top_p)
            if suppress:
                scores = scores.clone()
                scores[:, list(suppress)] = float("-inf")
            if noise is not None:
                scores = scores + noise.at(t, scores.shape[-1], active).to(device, scores.dtype)
            token = scores.argmax(-1)
            if not can_drop:
                token = torch.where(finished[active], torch.full_like(token, pad), token)
            out[active, t] = token
            if record:
                lp_out[active, t] = gather_logprobs(z[:, None], token[:, None])[:, 0]
                ent_out[active, t] = entropy_from_logits(z)
            done = torch.isin(token, eos)
            finished[active] |= done
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            if can_drop and bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, token, attn, next_pos = active[keep], token[keep], attn[keep], next_pos[keep]
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            step_mask = attn.bool()[:, None, None, :] if four_d else attn
            logits = model(input_ids=token[:, None], attention_mask=step_mask, position_ids=next_pos, **kw).logits[:, -1]
            next_pos = next_pos + 1
    R = t + 1
    return out[:, :R], (lp_out[:, :R] if record else None), (ent_out[:, :R] if record else None)


def response_mask_after_eos(response_ids: torch.Tensor, eos: torch.Tensor, pad_id: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, R) of the tokens up to and including the first EOS (any id in ``eos``), and a
    (B,) bool of the rows that emitted one."""
    is_eos = torch.isin(response_ids, eos.to(response_ids.device))
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~seen_before) & (response_ids != pad_id)
    return mask.long(), is_eos.any(-1)


@torch.no_grad()
def generate(model, prompt_ids: Sequence[Sequence[int]], *, pad_token_id: int, eos_token_id: int | Sequence[int],
             seeds: Sequence[int] | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             max_new_tokens: int = 24, batch_size: int = 64, greedy: bool = False,
             record_logprobs: bool = False, drop_finished: bool = True, noise: str = "auto") -> Generation:
    """Sample (or, with ``greedy``, decode greedily) one response per prompt.

    Args:
        model: a causal LM (unwrapped), put in eval mode for the call and restored after.
        prompt_ids: B prompts as token ids.
        pad_token_id: the pad token, never drawn (a pad inside a response would read as a
            hole in its mask); it should differ from every EOS id.
        eos_token_id: the id, or ids, that end a response.
        seeds: one sampling seed per row (``row_seed``); required unless ``greedy``.
        temperature, top_k, top_p: softmax(z / T), then the top-k, then the top-p filter
            (0 and 1.0 turn them off).
        max_new_tokens: response tokens at most. A prompt longer than the model's positions
            leave beside them is cut from its start (``fit_prompts``, said on stderr); none
            left for a prompt is an InputError (``prompt_room``).
        batch_size: rows per decoding batch (the samples do not depend on it).
        record_logprobs: also return the drawn tokens' log-probs and entropies on z / T.
        drop_finished: rows that emitted EOS leave the batch and the KV cache; False
            decodes every row to the end (the same samples, for checking).
        noise: where the Gumbel noise comes from: ``generator`` (``GumbelNoise``: one CPU
            generator per row, float64 copied to the device), ``counter`` (``CounterNoise``:
            a hash computed on the device), ``auto`` (counter on an accelerator, generator
            on the CPU). Both are per-row reproducible; they draw different samples.
    """
    if not greedy and (seeds is None or len(seeds) != len(prompt_ids)):
        raise ValueError("sampling needs one seed per prompt")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not len(prompt_ids):
        raise ValueError("no prompts to generate for")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    if pad_token_id in eos_ids:
        raise ValueError(f"the pad token ({pad_token_id}) must differ from EOS: a response's end would "
                         "read as padding")
    device = next(model.parameters()).device
    if noise not in ("auto", "generator", "counter"):
        raise ValueError(f"noise must be auto, generator or counter, got {noise!r}")
    counter = noise == "counter" or (noise == "auto" and device.type != "cpu")
    eos = torch.tensor(eos_ids, device=device)
    # A prompt and its response must fit the model's positions (learned position embeddings
    # have no row past them): a prompt too long loses its start.
    prompt_ids = fit_prompts(prompt_ids, prompt_room(model, max_new_tokens), max_new_tokens)
    p_ids, p_mask = left_pad(prompt_ids, pad_token_id)
    was_training = model.training
    model.eval()
    parts = []
    starts = range(0, len(prompt_ids), batch_size)
    label = current_label()  # a command that asked for progress (``progress.labelled``)
    try:
        with progress_bar(len(starts), label or "", enabled=label is not None and len(starts) > 1,
                          unit="batch") as bar:
            for start in starts:
                ids = p_ids[start:start + batch_size].to(device)
                attn = p_mask[start:start + batch_size].to(device)
                rows = seeds[start:start + batch_size] if not greedy else None
                noise = (None if greedy else CounterNoise(rows, max_new_tokens, device) if counter
                         else GumbelNoise(rows, max_new_tokens))
                parts.append(_decode_batch(
                    model, ids, attn, noise, eos=eos, pad=pad_token_id, suppress=[pad_token_id],
                    temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                    record=record_logprobs, drop_finished=drop_finished))
                bar.update(rows=min(start + batch_size, len(prompt_ids)))
    finally:
        model.train(was_training)
    R = max(p[0].shape[1] for p in parts)

    def cat(i: int, value) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(p[i].cpu(), (0, R - p[i].shape[1]), value=value) for p in parts])

    response = cat(0, pad_token_id)
    mask, ended = response_mask_after_eos(response, eos.cpu(), pad_token_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_token_id))
    logprobs = entropy = None
    if record_logprobs:
        logprobs = torch.where(mask.bool(), cat(1, 0.0), torch.zeros(()))
        entropy = torch.where(mask.bool(), cat(2, 0.0), torch.zeros(()))
    return Generation(prompt_ids=p_ids, prompt_mask=p_mask, response_ids=response, response_mask=mask,
                      eos=ended, logprobs=logprobs, entropy=entropy)
