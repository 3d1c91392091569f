"""The reward model: a backbone with a scalar head, normalized, single or an ensemble.

A reward model here IS a Hugging Face sequence-classification model with one label
(``AutoModelForSequenceClassification``), so a saved one loads in plain transformers and
gives the same raw scores:

- decoders (GPT-2, Llama, ...) read the head at the last non-pad token (the EOS token when
  the response ended, else the last response token), found through ``config.pad_token_id``
  as ``GPT2ForSequenceClassification`` does; the pad token is distinct from EOS;
- encoders (BERT, MiniLM, ...) read it where their class does: the pooled first token
  ([CLS]), which attends to the whole sequence.

The default backbone is the SFT policy (InstructGPT): ``SFT_DIR/model`` loads as a
sequence-classification model (the LM head is dropped, a new head added). The head is
initialised N(0, 1/sqrt(d + 1)) with bias 0 (Stiennon et al. 2020), dropout is off.

Text is tokenized as in SFT (``data.tokenize_pair``): prompt with the tokenizer's special
tokens, response without, then the end token when the response ended (EOS; for encoder
tokenizers that have none, their separator [SEP]). A response truncated without EOS is
scored without it, so the model can tell the two apart.

Normalization: after training, each member gets a gain and bias so that its rewards on
reference samples (the SFT policy's own samples) have mean 0 and std 1,

    r_norm = gain * r_raw + bias,   gain = 1 / std_ref,   bias = -mean_ref / std_ref,

stored in ``reward_model.json`` next to the weights. With ``rm.length_residual`` the
normalization removes the reward's linear length trend on the same samples
(``length_normalization``): a least-squares fit raw = a + b * L (L the response's tokens),
and

    r_norm = gain * (r_raw - b * L) + bias,   gain = 1 / std(residual),   bias = -a / std(residual),

b stored as the member's ``length_slope``. Ensembles reduce the members'
normalized scores with ``mean``, ``min`` or ``mean - k * std`` (an uncertainty penalty).

On-disk layout (``rlhflab rm --out DIR`` writes ``DIR/model``):

    DIR/model/reward_model.json        gains, biases (and length slopes), max_length, metadata
    DIR/model/config.json, *.safetensors, tokenizer files      (one model)
    DIR/model/member_0/, member_1/, ...                        (an ensemble)
    DIR/model/feature_stats.safetensors    the training data's feature statistics, when measured
                                           (``instruments.distribution_shift``)
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from rlhflab.errors import InputError
from rlhflab.training import disable_dropout

META_FILE = "reward_model.json"
STATS_FILE = "feature_stats.safetensors"
FORMAT = "rlhflab-reward-model"


# ----------------------------------------------------------------------- building blocks


def load_rm_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """A tokenizer from a local directory with an end token and a pad token distinct from it.

    Decoder tokenizers end a response with EOS. Encoder tokenizers usually have no EOS;
    their separator ([SEP]) becomes the end token. A tokenizer without a pad token (or
    padding with the end token) gets a new ``<pad>``; the model must then be resized.
    """
    from rlhflab.models import tokenizer_from_dir, with_distinct_pad

    path = Path(path)
    if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise InputError("not a local HF directory (no config.json)", file=str(path))
    tok = tokenizer_from_dir(path, trust_remote_code)
    if tok.eos_token_id is None:
        if tok.sep_token_id is None:
            raise InputError("tokenizer has neither an EOS nor a separator token", file=str(path))
        tok.eos_token = tok.sep_token
    return with_distinct_pad(tok)


def reward_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The scalar head: the last ``Linear`` with one output (``score``, ``classifier``, ...)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no scalar head")
    return heads[-1]


def init_head(model: torch.nn.Module, seed: int) -> None:
    """Head weights ~ N(0, 1/sqrt(d + 1)), bias 0 (Stiennon et al. 2020)."""
    head = reward_head(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d = head.in_features
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / math.sqrt(d + 1))
        if head.bias is not None:
            head.bias.zero_()


def create_reward_model(backbone: str | Path, seed: int = 0, trust_remote_code: bool = False,
                        attn_implementation: str | None = None):
    """(model, tokenizer): a local HF checkpoint (causal LM, encoder, or an earlier reward
    model) as ``AutoModelForSequenceClassification`` with one label and a fresh head, with
    the attention kernel ``attn_implementation`` (``models.attention_kwargs``) when named."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from rlhflab.models import (
        LOAD_ERRORS,
        attention_kwargs,
        check_weights,
        first_line,
        resolve_model_dir,
    )

    path = resolve_model_dir(backbone)
    check_weights(path)
    tok = load_rm_tokenizer(path, trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code,
            **attention_kwargs(attn_implementation))
    except LOAD_ERRORS as err:
        raise InputError(f"cannot load as a reward model: {first_line(err)}", file=str(path)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(tok) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.problem_type = "regression"
    disable_dropout(model)
    init_head(model, seed)
    return model, tok


def encode(tokenizer, prompt: str, response: str, eos: bool, max_length: int) -> list[int]:
    """Ids of prompt + response (+ end token if ``eos``), truncated like SFT rows."""
    from rlhflab.data import tokenize_pair

    return tokenize_pair(prompt, response, tokenizer, max_length, add_eos=eos).input_ids


def collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


def forward_scores(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Raw scalar rewards (B,) of right-padded sequences (the model pools them itself)."""
    return model(input_ids=ids, attention_mask=attn).logits[:, 0]


# -------------------------------------------------------------------------- reductions

# (M, B) normalized member scores -> (B,). Population std: one member has std 0.
REDUCTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "mean": lambda s, k: s.mean(0),
    "min": lambda s, k: s.min(0).values,
    "mean_minus_std": lambda s, k: s.mean(0) - k * s.std(0, unbiased=False),
}


# ------------------------------------------------------------------------- the scoring API


class RewardModel(torch.nn.Module):
    """One reward model or an ensemble, with its tokenizer and normalization.

    ``score(prompts, responses)`` is what every later stage calls. It retokenizes text with
    the reward model's own tokenizer (which may differ from the policy's), batches, and
    returns normalized rewards (B,) float32 on the CPU. It never builds a graph, so it can
    run inside another model's training loop; ``.to(device)`` moves the members.
    """

    def __init__(self, members: list[torch.nn.Module], tokenizer, gains: list[float] | None = None,
                 biases: list[float] | None = None, max_length: int = 512, meta: dict | None = None,
                 length_slopes: list[float] | None = None):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.tokenizer = tokenizer
        self.gains = list(gains) if gains is not None else [1.0] * len(members)
        self.biases = list(biases) if biases is not None else [0.0] * len(members)
        # Raw reward per response token taken out before the gain (``length_normalization``).
        self.length_slopes = list(length_slopes) if length_slopes is not None else [0.0] * len(members)
        self.max_length = int(max_length)
        self.meta = dict(meta or {})
        self.feature_stats: dict[str, torch.Tensor] | None = None  # instruments.distribution_shift
        for m in self.members:
            m.eval()
            m.requires_grad_(False)

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def device(self) -> torch.device:
        return next(self.members[0].parameters()).device

    # ---- scoring

    @property
    def has_length_term(self) -> bool:
        return any(b != 0.0 for b in self.length_slopes)

    def _encode_all(self, prompts: list, responses: list, eos: list[bool] | None,
                    rendered: bool = False) -> list[list[int]]:
        """Ids of each (prompt, response): rendered as training rendered them (the chat
        template for a conversational prompt, or for any prompt when the tokenizer has one:
        ``data.render``) unless ``rendered`` (the texts are the template's output already)."""
        return [x.input_ids for x in self._tokenize_all(prompts, responses, eos, rendered)]

    def _tokenize_all(self, prompts: list, responses: list, eos: list[bool] | None, rendered: bool = False) -> list:
        """``data.Tokenized`` of each (prompt, response), as ``_encode_all`` encodes them."""
        from rlhflab.data import render, tokenize_pair

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        eos = [True] * len(prompts) if eos is None else list(eos)
        if len(eos) != len(prompts):
            raise ValueError(f"{len(eos)} eos flags for {len(prompts)} responses")
        if not rendered:
            pairs = [render(p, r, self.tokenizer) for p, r in zip(prompts, responses)]
            prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
        return [tokenize_pair(p, r, self.tokenizer, self.max_length, add_eos=bool(e))
                for p, r, e in zip(prompts, responses, eos)]

    def response_lengths(self, prompts: list, responses: list, *, eos: list[bool] | None = None,
                         rendered: bool = False) -> torch.Tensor:
        """Response tokens (B,) float32 in this model's tokenizer, as scored (after any
        truncation to ``max_length``), the end token not counted: the L of the length term."""
        end = self.tokenizer.eos_token_id
        out = []
        for x in self._tokenize_all(prompts, responses, eos, rendered):
            resp = x.input_ids[x.n_prompt:]
            out.append(len(resp) - (1 if resp and resp[-1] == end else 0))
        return torch.tensor(out, dtype=torch.float32)

    def normalize(self, raw: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Raw member scores (M, B) -> normalized (M, B): gain * (raw - length_slope * L) + bias
        per member, ``lengths`` the responses' L (``response_lengths``), needed when a member
        has a length slope."""
        gains = torch.tensor(self.gains, dtype=torch.float32)[:, None]
        biases = torch.tensor(self.biases, dtype=torch.float32)[:, None]
        if not self.has_length_term:
            return gains * raw + biases
        if lengths is None:
            raise ValueError("this reward model has a length term: normalize needs the responses' lengths")
        slopes = torch.tensor(self.length_slopes, dtype=torch.float32)[:, None]
        return gains * (raw - slopes * lengths.to(torch.float32)[None, :]) + biases

    @torch.no_grad()
    def raw_member_scores(self, prompts: list, responses: list, *, eos: list[bool] | None = None,
                          batch_size: int = 64, rendered: bool = False) -> torch.Tensor:
        """Raw (un-normalized) scores of every member: (M, B) float32 on the CPU. Prompts are
        text or messages; ``rendered`` says they are already the chat template's text."""
        seqs = self._encode_all(prompts, responses, eos, rendered)
        out = torch.zeros((self.n_members, len(seqs)), dtype=torch.float32)
        # Sorting by length keeps padding (and wasted compute) small; scores go back in order.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        device = self.device
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, attn = collate([seqs[i] for i in idx], self.tokenizer.pad_token_id)
            ids, attn = ids.to(device), attn.to(device)
            for m, model in enumerate(self.members):
                out[m, idx] = forward_scores(model, ids, attn).float().cpu()
        return out

    def member_scores(self, prompts: list, responses: list, *, eos: list[bool] | None = None,
                      batch_size: int = 64, rendered: bool = False) -> torch.Tensor:
        """Normalized scores of every member: (M, B)."""
        raw = self.raw_member_scores(prompts, responses, eos=eos, batch_size=batch_size, rendered=rendered)
        lengths = (self.response_lengths(prompts, responses, eos=eos, rendered=rendered)
                   if self.has_length_term else None)
        return self.normalize(raw, lengths)

    def score(self, prompts: list, responses: list, *, eos: list[bool] | None = None,
              batch_size: int = 64, reduce: str = "mean", k: float = 1.0, rendered: bool = False) -> torch.Tensor:
        """Normalized rewards (B,) float32 on the CPU.

        ``eos[i]`` False means response i was truncated without EOS (no end token is
        appended for it). ``reduce`` combines ensemble members: "mean", "min" or
        "mean_minus_std" (mean - k * std over members); one model ignores it.
        """
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
        if not prompts:
            return torch.zeros(0, dtype=torch.float32)
        return REDUCTIONS[reduce](self.member_scores(prompts, responses, eos=eos, batch_size=batch_size,
                                                     rendered=rendered), k)

    # ---- persistence

    @classmethod
    def load(cls, path: str | Path, trust_remote_code: bool = False) -> RewardModel:
        """A directory written by ``rlhflab rm`` (``DIR`` or ``DIR/model``), or any plain HF
        sequence-classification checkpoint with one label (then gain 1, bias 0)."""
        from transformers import AutoModelForSequenceClassification

        from rlhflab.models import LOAD_ERRORS, check_complete, check_weights, first_line

        path = Path(path)
        if not (path / META_FILE).is_file() and (path / "model").is_dir():
            path = path / "model"
        meta: dict = {}
        if (path / META_FILE).is_file():
            meta = _read_meta(path / META_FILE)
        elif not (path / "config.json").is_file():
            raise InputError(f"not a reward model directory (no {META_FILE} or config.json)", file=str(path))
        entries = meta.get("members") or [{"path": ".", "gain": 1.0, "bias": 0.0}]
        for entry in entries:  # every member's files are checked before any is loaded
            member_dir = path / entry["path"]
            if not (member_dir / "config.json").is_file():
                raise InputError("not a reward model member (no config.json)", file=str(member_dir))
            check_weights(member_dir)
        members, gains, biases, slopes = [], [], [], []
        for entry in entries:
            member_dir = path / entry["path"]
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    str(member_dir), use_safetensors=True, trust_remote_code=trust_remote_code,
                    output_loading_info=True,
                )
            except LOAD_ERRORS as err:
                raise InputError(f"cannot load as a reward model: {first_line(err)}", file=str(member_dir)) from None
            check_complete(info, member_dir)  # a checkpoint without its head would score at random
            if model.config.num_labels != 1:
                raise InputError(f"expected a one-label model, got {model.config.num_labels} labels",
                                 file=str(member_dir))
            members.append(model)
            gains.append(float(entry.get("gain", 1.0)))
            biases.append(float(entry.get("bias", 0.0)))
            slopes.append(float(entry.get("length_slope", 0.0)))
        tok = load_rm_tokenizer(path / entries[0]["path"], trust_remote_code)
        if members[0].config.pad_token_id != tok.pad_token_id:
            raise InputError("config pad_token_id differs from the tokenizer's pad token", file=str(path))
        max_length = meta.get("max_length") or getattr(tok, "model_max_length", 512)
        rm = cls(members, tok, gains, biases, max_length=min(int(max_length), 1_000_000), meta=meta,
                 length_slopes=slopes)
        if (path / STATS_FILE).is_file():
            from safetensors.torch import load_file

            rm.feature_stats = load_file(str(path / STATS_FILE))
        return rm

    def save(self, out: str | Path) -> Path:
        """Write the layout of the module docstring into a temp dir beside ``out``, then
        rename it over ``out``: an interrupted save leaves no half-written model."""
        from rlhflab.artifacts import atomic_directory

        out = Path(out)
        with atomic_directory(out) as tmp:
            entries = []
            for i, model in enumerate(self.members):
                rel = "." if self.n_members == 1 else f"member_{i}"
                model.save_pretrained(str(tmp / rel), safe_serialization=True)
                self.tokenizer.save_pretrained(str(tmp / rel))
                entries.append({"path": rel, "gain": self.gains[i], "bias": self.biases[i],
                                **({"length_slope": self.length_slopes[i]} if self.has_length_term else {})})
            meta = {**self.meta, "format": FORMAT, "version": 1, "members": entries,
                    "max_length": self.max_length}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            if self.feature_stats is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in self.feature_stats.items()}, str(tmp / STATS_FILE))
        return out


def _read_meta(file: Path) -> dict:
    """``reward_model.json``, checked: members with a relative path inside the directory and
    finite gains and biases, a positive integer max_length."""
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid JSON ({err})", file=str(file)) from None
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", file=str(file)) from None
    if not isinstance(meta, dict):
        raise InputError("expected a JSON object", file=str(file))
    members = meta.get("members")
    if members is not None and not (isinstance(members, list) and members):
        raise InputError("expected a non-empty list of members", file=str(file), field="members")
    for i, entry in enumerate(members or []):
        name = f"members[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise InputError("expected an object with a 'path' string", file=str(file), field=name)
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"path {entry['path']!r} leaves the reward model directory", file=str(file),
                             field=f"{name}.path")
        for key in ("gain", "bias", "length_slope"):
            v = entry.get(key, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InputError(f"expected a finite number, got {v!r}", file=str(file), field=f"{name}.{key}")
    max_length = meta.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise InputError(f"expected an integer >= 1, got {max_length!r}", file=str(file), field="max_length")
    return meta


def normalization(raw: torch.Tensor) -> tuple[float, float]:
    """(gain, bias) mapping raw reference scores to mean 0, std 1 (population std)."""
    raw = raw.double()
    mean, std = raw.mean().item(), raw.std(unbiased=False).item()
    if not math.isfinite(std) or std < 1e-8:
        return 1.0, -mean  # constant scores: only shift
    return 1.0 / std, -mean / std


def length_normalization(raw: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float, float]:
    """(gain, bias, slope) that remove the linear length trend of raw reference scores.

    The least-squares line raw ~ a + b L over the reference samples,

        b = cov(L, raw) / var(L),   a = mean(raw) - b mean(L),

    leaves residuals e = raw - a - b L with mean 0; they are scaled to std 1 (population std),

        r_norm = gain (raw - b L) + bias,   gain = 1 / std(e),   bias = -a / std(e),

    so on the reference samples r_norm has mean 0, std 1 and no correlation with L. This is
    the post-hoc counterpart of a length-debiased reward model (Chen et al. 2024 "ODIN";
    Singhal et al. 2023 measure how much of RLHF's gain is length): the policy is no longer
    paid for length itself, only for what the reward model prefers at a given length.

    Raises:
        ValueError: the lengths are all equal (no slope to fit).
    """
    x, y = lengths.double(), raw.double()
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"expected two equal-length 1-D tensors of 2 or more values, got {x.numel()} and {y.numel()}")
    dx = x - x.mean()
    var = (dx * dx).mean().item()
    if var < 1e-12:
        raise ValueError(f"the reference responses all have {x[0].item():g} tokens: no length trend to fit")
    b = ((dx * (y - y.mean())).mean() / var).item()
    a = y.mean().item() - b * x.mean().item()
    std = (y - a - b * x).std(unbiased=False).item()
    if not math.isfinite(std) or std < 1e-8:
        return 1.0, -a, b  # scores exactly on the line: only shift
    return 1.0 / std, -a / std, b
