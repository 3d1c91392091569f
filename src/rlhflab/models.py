"""Create tiny causal LMs from transformers configs, load local checkpoints, save them.

Everything loads from local directories (nothing downloads), weights are safetensors only,
and ``trust_remote_code`` stays off unless the config asks for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from rlhflab.errors import InputError


def _gpt2(cfg, vocab_size: int, special: dict) -> torch.nn.Module:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_positions=cfg.max_positions, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, **special,
        )
    )


def _llama(cfg, vocab_size: int, special: dict) -> torch.nn.Module:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_positions,
            attention_dropout=cfg.dropout, tie_word_embeddings=True, **special,
        )
    )


ARCHITECTURES = {"gpt2": _gpt2, "llama": _llama}


def create_causal_lm(cfg, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised causal LM of ``cfg.arch`` sized by ``cfg`` (a ModelConfig)."""
    special = {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ARCHITECTURES[cfg.arch](cfg, len(tokenizer), special)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _check_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InputError(f"not a local HF {what} directory (no config.json)", file=str(path))
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """A tokenizer from a local directory, with a pad token distinct from EOS.

    If the tokenizer has no pad token (or pads with EOS), a new ``<pad>`` token is added;
    the model's embeddings must then be resized (``load_causal_lm`` does this).
    """
    path = _check_dir(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load tokenizer: {str(err).splitlines()[0]}", file=str(path)) from None
    if tok.eos_token_id is None:
        raise InputError("tokenizer has no EOS token", file=str(path))
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_causal_lm(path: str | Path, tokenizer=None, trust_remote_code: bool = False) -> torch.nn.Module:
    """A causal LM from a local directory; safetensors weights only."""
    path = _check_dir(path, "model")
    if not list(path.glob("*.safetensors")):
        raise InputError("no .safetensors weights (pickled checkpoints are not loaded)", file=str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load model: {str(err).splitlines()[0]}", file=str(path)) from None
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_pretrained_atomic(model, tokenizer, out: str | Path) -> Path:
    """``save_pretrained`` (safetensors) into a temp dir beside ``out``, then rename.

    An interrupted save leaves no half-written model at ``out``; an existing ``out`` is
    replaced only once the new one is complete.
    """
    from rlhflab.artifacts import atomic_directory

    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
