"""Packed passes: several sequences share one row of a forward pass.

A batch of the world's rows padded to its longest row is more than half padding; cutting it
into passes of similar length (``forward.length_groups``) removes the padding but leaves
small matrix products that keep a second CPU thread idle. Packing removes the padding AND
keeps one large product: sequences are laid end to end in rows of ``row_len`` tokens
(first-fit decreasing), each attends only to itself (a block-diagonal causal mask, passed as
a 4D boolean ``attention_mask`` (R, 1, T, T)), and its position ids restart at 0. Row r of
the pass then computes, for every sequence in it, exactly what a pass over that sequence
alone would, up to float rounding.

Not every model honours a 4D mask and per-sequence position ids (flash-attention kernels
read neither; an encoder pools a [CLS] token per row). ``can_pack`` therefore checks the
model once on a probe: packed log-probs (for a reward model its scores, for a critic its
values) must equal unpacked ones. Callers fall back to length-grouped padded passes when it
says no.

Users: SFT, the reward model and the DPO family (``sft.packing``, ``rm.packing``,
``dpo.packing``), and the online algorithms' log-prob and value passes
(``rollout.forward_response``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Models that passed (True) or failed (False) the check of ``can_pack``, by module.
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> False once its forward has refused a boolean (R, T) ``logits_to_keep`` (transformers
# before 5.21 slices with it as an index: only an int or 1-D indices)
_BOOL_KEEP: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Relative tolerance of the check: float32 rounding of a different summation order.
CHECK_RTOL = 1e-4


@dataclass
class Packed:
    """Sequences laid end to end in rows; sequence i occupies ``[row[i], start[i] : start[i] + length[i]]``."""

    input_ids: torch.Tensor  # (R, T) long, pad after the last sequence of a row
    position_ids: torch.Tensor  # (R, T) long, 0 at the start of every sequence
    attention_mask: torch.Tensor  # (R, 1, T, T) bool, True where query t may attend key s
    row: torch.Tensor  # (N,) long
    start: torch.Tensor  # (N,) long
    length: torch.Tensor  # (N,) long

    def to(self, device) -> Packed:
        return Packed(*(getattr(self, f).to(device) for f in
                        ("input_ids", "position_ids", "attention_mask", "row", "start", "length")))

    def positions(self, first: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat (row, column, sequence) indices of every token from ``first[i]`` to the end
        of sequence i, in sequence order then position order."""
        first = torch.as_tensor(first, dtype=torch.long, device=self.row.device)
        counts = (self.length - first).clamp(min=0)
        seq = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        offset = torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts)
        return self.row[seq], self.start[seq] + first[seq] + offset, seq


def bins_first_fit(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices of ``lengths`` in rows of at most ``row_len`` tokens, longest first, each into
    the first row with room (first-fit decreasing: at most 11/9 of the optimal rows + 1).

    The first row with room is found in a max-tree of the rows' free room (rows not yet
    opened have all of ``row_len``): O(N log N), where scanning the rows is O(N x rows),
    12 s for the 17,800 sequences of the demo's DPO reference cache."""
    if lengths and max(lengths) > row_len:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {row_len}")
    size = 1
    while size < len(lengths):
        size *= 2
    room = [row_len] * (2 * size)  # room[size + r]: row r's free tokens; room[k]: the max below k
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n, k = lengths[i], 1
        while k < size:  # the leftmost leaf with room >= n
            k = 2 * k if room[2 * k] >= n else 2 * k + 1
        r = k - size
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        room[k] -= n
        k //= 2
        while k:
            room[k] = max(room[2 * k], room[2 * k + 1])
            k //= 2
    return rows


def pack(seqs: Sequence[Sequence[int]], pad_id: int, row_len: int | None = None,
         rows: list[list[int]] | None = None) -> Packed:
    """Lay ``seqs`` (lists of ids) out in rows of ``row_len`` tokens (default: the longest
    sequence), or in the given ``rows`` of indices (each sequence exactly once)."""
    lengths = [len(s) for s in seqs]
    rows = rows if rows is not None else bins_first_fit(lengths, row_len or max(lengths))
    if sorted(i for r in rows for i in r) != list(range(len(seqs))):
        raise ValueError("rows must hold every sequence exactly once")
    T = max(sum(lengths[i] for i in r) for r in rows)
    R, N = len(rows), len(seqs)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    segment = torch.full((R, T), -1, dtype=torch.long)
    row, start = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.long)
    for r, members in enumerate(rows):
        o = 0
        for i in members:
            n = lengths[i]
            ids[r, o:o + n] = torch.as_tensor(list(seqs[i]), dtype=torch.long)
            pos[r, o:o + n] = torch.arange(n)
            segment[r, o:o + n] = i
            row[i], start[i] = r, o
            o += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0) & causal
    # A pad position attends to itself only: its output is never read, and a query with no
    # key at all would make the softmax NaN (and the NaN would reach the gradients).
    mask |= torch.eye(T, dtype=torch.bool)
    return Packed(ids, pos, mask[:, None], row, start, torch.tensor(lengths, dtype=torch.long))


def _module(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # a DDP wrapper checks and caches by its module


def packed_logits(model, packed: Packed, first: Sequence[int] | torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict every token of sequence i from ``first[i]`` (>= 1) on: (K, V),
    with the token ids (K,), the sequence (K,) and the token's offset from ``first`` (K,).

    The logits at position t predict token t + 1; they are computed only where they are
    read (a boolean ``logits_to_keep`` when the model's forward takes one: transformers 5.21
    and later; before, every position's, then read), and no KV cache is built."""
    from rlhflab.forward import forward_options

    options = forward_options(model)
    first = torch.as_tensor(first, dtype=torch.long, device=packed.row.device).clamp(min=1)
    r, c, seq = packed.positions(first)
    kwargs = {"use_cache": False} if options["use_cache"] else {}
    inputs = dict(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=packed.attention_mask)
    if options["logits_to_keep"] and _BOOL_KEEP.get(_module(model), True):
        keep = torch.zeros_like(packed.input_ids, dtype=torch.bool)
        keep[r, c - 1] = True
        try:
            logits = model(**inputs, **kwargs, logits_to_keep=keep).logits
        except (IndexError, TypeError, RuntimeError):
            _BOOL_KEEP[_module(model)] = False  # this release takes no boolean mask: every position
        else:
            _BOOL_KEEP[_module(model)] = True
            # The kept logits come flat, in row-major order of ``keep``: rank each needed position.
            rank = keep.flatten().cumsum(0) - 1
            logits = logits.reshape(-1, logits.shape[-1])[rank[r * keep.shape[1] + c - 1]]
            return logits, packed.input_ids[r, c], seq, c - packed.start[seq] - first[seq]
    logits = model(**inputs, **kwargs).logits[r, c - 1]
    return logits, packed.input_ids[r, c], seq, c - packed.start[seq] - first[seq]


def packed_values(model, packed: Packed, first: Sequence[int] | torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A critic's values V(x, y_<t) read where ``packed_logits`` reads logits (position
    t - 1 for token t), for every token of sequence i from ``first[i]`` (>= 1) on: (K,),
    with the sequence (K,) and the token's offset from ``first`` (K,). The critic's forward
    returns one value per position, (R, T)."""
    first = torch.as_tensor(first, dtype=torch.long, device=packed.row.device).clamp(min=1)
    r, c, seq = packed.positions(first)
    out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=packed.attention_mask)
    return out[r, c - 1], seq, c - packed.start[seq] - first[seq]


def packed_response_logps(model, packed: Packed, n_prompt: Sequence[int]) -> torch.Tensor:
    """Summed log-probs of the response tokens of every packed sequence: (N,). The response
    of sequence i is its tokens from ``n_prompt[i]`` on."""
    from rlhflab.logprobs import gather_logprobs

    logits, targets, seq, _ = packed_logits(model, packed, n_prompt)
    lp = gather_logprobs(logits, targets)
    return torch.zeros(len(packed.length), dtype=lp.dtype, device=lp.device).index_add(0, seq, lp)


def packed_scores(model, packed: Packed, head: torch.nn.Module) -> torch.Tensor:
    """Scores (N,) of a sequence-classification reward model: the head's output at the last
    token of every packed sequence. The model is called as a whole (a DDP wrapper keeps its
    hooks); the head's per-position output (R, T, 1) is caught by a forward hook, since the
    model's own pooling reads one position per row."""
    caught: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=packed.attention_mask)
    finally:
        handle.remove()
    out = caught[-1]
    if out.dim() != 3:
        raise ValueError("the head is not applied per position; this model cannot be packed")
    return out[packed.row, packed.start + packed.length - 1, 0].float()


def _probe(vocab_size: int, pad_id: int) -> list[list[int]]:
    ids = [i for i in range(min(vocab_size, 40)) if i != pad_id]
    return [ids[1:9], ids[3:8], ids[9:12], ids[2:9][::-1]]


def model_config(model):
    """The HF config of a model, or of the backbone of a critic (``algos.ppo.ValueModel``)."""
    return getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)


@torch.no_grad()
def can_pack(model, *, pad_id: int, head: torch.nn.Module | None = None, values: bool = False) -> bool:
    """Whether packed passes give this model's unpacked results: log-probs (causal LM),
    scores at the last token (``head`` given: a reward model) or a critic's value at every
    position (``values``). Checked once per model on a probe of four short sequences in two
    rows, in eval mode (no dropout); cached."""
    inner = _module(model)
    if inner in _VERDICTS:
        return _VERDICTS[inner]
    was_training = inner.training
    inner.eval()
    try:
        vocab = model_config(inner).vocab_size
        seqs = _probe(vocab, pad_id)
        device = next(inner.parameters()).device
        packed = pack(seqs, pad_id, row_len=13).to(device)
        assert int(packed.row.max()) == 1  # two rows, two sequences in at least one
        if values:
            v, seq, t = packed_values(inner, packed, [1] * len(seqs))
            got = torch.cat([v[seq == i] for i in range(len(seqs))])
            want = torch.cat([inner(input_ids=torch.tensor([s], device=device))[0, :-1].float() for s in seqs])
        elif head is None:
            got = packed_response_logps(inner, packed, [1] * len(seqs))
            want = torch.stack([
                torch.log_softmax(inner(input_ids=torch.tensor([s], device=device)).logits[0, :-1].float(), -1)
                .gather(-1, torch.tensor(s[1:], device=device)[:, None]).sum() for s in seqs])
        else:
            got = packed_scores(inner, packed, head)
            want = torch.stack([inner(input_ids=torch.tensor([s], device=device)).logits[0, 0].float()
                                for s in seqs])
        ok = bool(torch.allclose(got, want, rtol=CHECK_RTOL, atol=CHECK_RTOL * float(want.abs().max() + 1)))
    except Exception:  # noqa: BLE001 - any failure to pack means: do not pack
        ok = False
    finally:
        inner.train(was_training)
    _VERDICTS[inner] = ok
    return ok


def use_packing(model, enabled: bool, pad_id: int, head: torch.nn.Module | None = None) -> bool:
    """``enabled`` (the config's ``packing``) and the model passes ``can_pack``."""
    return bool(enabled) and can_pack(model, pad_id=pad_id, head=head)


def response_logp_sums(model, seqs: list, pad_id: int, device, packed: bool, row_len: int | None = None
                       ) -> torch.Tensor:
    """Summed response-token log-probs (N,) of ``seqs`` (``data.Tokenized``) in ONE pass:
    packed rows (``packed``) or one batch right-padded to its longest sequence."""
    if packed:
        p = pack([s.input_ids for s in seqs], pad_id, row_len).to(device)
        return packed_response_logps(model, p, [s.n_prompt for s in seqs])
    from rlhflab.data import collate_sft
    from rlhflab.forward import response_logprobs

    lp, mask = response_logprobs(model, collate_sft(seqs, pad_id), min(s.n_prompt for s in seqs), device)
    return (lp * mask).sum(-1)
