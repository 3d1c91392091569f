"""Create tiny causal LMs from transformers configs, load local checkpoints, save them.

Everything loads from local directories (nothing downloads), weights are safetensors only,
and ``trust_remote_code`` stays off unless the config asks for it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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

from rlhflab.artifacts import resolve_model_dir  # noqa: F401 (the one resolver; imported from here too)
from rlhflab.errors import InputError

ATTENTION = ("eager", "sdpa", "flash_attention_2")
"""The attention kernels ``model.attn_implementation`` names (transformers' words)."""


def attention_kwargs(attn_implementation: str | None) -> dict:
    """``{"attn_implementation": name}`` for ``from_pretrained`` or a model config, ``{}``
    for transformers' default. flash_attention_2 needs the flash-attn package (and a CUDA
    GPU, which transformers checks when the model is built): without the package, an
    InputError naming the field, before any model is loaded."""
    if attn_implementation is None:
        return {}
    if attn_implementation not in ATTENTION:
        raise InputError(f"must be one of {', '.join(ATTENTION)}, got {attn_implementation!r}",
                         field="model.attn_implementation")
    if attn_implementation == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise InputError("flash_attention_2 needs the flash-attn package (pip install flash-attn, on a CUDA "
                             "machine); use sdpa or eager here", field="model.attn_implementation")
    return {"attn_implementation": attn_implementation}


def enable_gradient_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Activations recomputed layer by layer in the backward pass, through transformers'
    public ``gradient_checkpointing_enable`` (``activation_checkpointing_enable`` from 5.24; non-reentrant ``torch.utils.checkpoint``, which
    needs no input that requires grad and keeps dropout's random draws), and the KV cache
    off in the config: a training pass builds none. Decoding passes its own cache
    (``generation.py``) and runs in eval mode, where transformers does not checkpoint.
    Works on a causal LM or a bare backbone (a critic's ``base_model``)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.24 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    return model


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether ``enable_gradient_checkpointing`` was applied: transformers' current name for
    the flag where the class has it (5.24 renamed it and warns on the old one), else the old;
    a peft wrapper is asked through its base model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(inner, flag, False))


@contextlib.contextmanager
def checkpointed_passes(*models) -> Iterator[None]:
    """Train mode inside, for the models among ``models`` that checkpoint (transformers
    checkpoints only in train mode); the mode each had is restored after. Online RL keeps
    its policy and critic in eval mode (dropout is off there, so the two modes compute the
    same function) and enters this around the update's forward and backward passes."""
    touched = [(m, m.training) for m in models if m is not None and is_checkpointing(m)]
    for m, _ in touched:
        m.train()
    try:
        yield
    finally:
        for m, was in touched:
            m.train(was)


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
    attn = attention_kwargs(getattr(cfg, "attn_implementation", None))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ARCHITECTURES[cfg.arch](cfg, len(tokenizer), {**special, **attn})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _check_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InputError(f"not a local HF {what} directory (no config.json)", file=str(path))
    return path


# What ``from_pretrained`` raises on a directory it cannot use: unreadable or inconsistent
# files (a config that is not JSON, weights whose shapes the config contradicts, a missing
# tokenizer file). The message's first line is passed on, naming the directory.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def check_tokenizer_files(path: str | Path) -> Path:
    """A directory without any tokenizer file would load as an empty default tokenizer of
    its model type (two tokens): refused, naming the directory."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"no tokenizer files (none of {', '.join(TOKENIZER_FILES[:2])}, ...)", file=str(path))
    return path


def check_config(path: str | Path, trust_remote_code: bool = False) -> None:
    """The directory's ``config.json``, if it has one, loads as a transformers config (the
    tokenizer and every later reader of the directory rely on it): else an InputError
    naming the file."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        return
    try:
        AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as err:
        raise InputError(f"not a usable model config ({first_line(err)})", file=str(path / "config.json")) from None


def check_complete(info: dict, path: str | Path) -> None:
    """A checkpoint that lacks some of its model's weights loads with those weights freshly
    initialised, silently; refused here, naming the directory and a missing weight."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise InputError(f"{len(missing)} weight(s) missing from the checkpoint (e.g. {missing[0]}); it would "
                         "load with random values in their place", file=str(path))


def check_weights(path: str | Path) -> list[Path]:
    """The directory's ``*.safetensors`` files, each one's header read (cheap: no tensor is
    loaded). A missing, empty, truncated or foreign file is an InputError naming it, before
    any model is built; pickled checkpoints are never loaded."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError("no .safetensors weights (pickled checkpoints are not loaded)", file=str(path))
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # SafetensorError, OSError: not a readable safetensors file
            raise InputError(f"not a readable safetensors file ({first_line(err)})", file=str(f)) from None
    return files


def tokenizer_from_dir(path: str | Path, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` on a local directory whose tokenizer files and
    config were checked first; a file it cannot load is an InputError naming the directory.
    The tokenizer is returned as it is (``load_tokenizer``, ``reward_model.load_rm_tokenizer``
    then settle its end and pad tokens)."""
    path = check_tokenizer_files(path)
    check_config(path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as err:  # a corrupt tokenizer.json raises the tokenizers library's bare Exception
        raise InputError(f"cannot load tokenizer: {first_line(err)}", file=str(path)) from None


def with_distinct_pad(tok):
    """``tok`` with a pad token distinct from its end token: a new ``<pad>`` where it has none
    or pads with EOS (a model's embeddings must then be resized; ``load_causal_lm`` does)."""
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        import sys

        before = "has no pad token" if tok.pad_token_id is None else f"pads with its EOS {tok.eos_token!r}"
        tok.add_special_tokens({"pad_token": "<pad>"})
        print(f"{getattr(tok, 'name_or_path', '') or 'the tokenizer'}: {before}; added '<pad>' "
              f"(id {tok.pad_token_id})", file=sys.stderr)
    return tok


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """A tokenizer from a local directory, with a pad token distinct from EOS
    (``with_distinct_pad``)."""
    path = _check_dir(path, "tokenizer")
    tok = tokenizer_from_dir(path, trust_remote_code)
    if tok.eos_token_id is None:
        raise InputError("tokenizer has no EOS token", file=str(path))
    return with_distinct_pad(tok)


def refuse_reward_model(path: str | Path) -> None:
    """A reward model is not a policy: loaded as a causal LM its backbone would sample with an
    output head of tied embeddings (or a fresh one), silently. Refused, naming the directory:
    one ``rlhflab rm`` wrote (``reward_model.json``) or whose config names only
    sequence-classification architectures."""
    import json

    path = Path(path)
    if (path / "reward_model.json").is_file():
        raise InputError("a reward model (reward_model.json), not a policy: give a causal LM (an SFT or RL run, "
                         "or its model/)", file=str(path))
    try:
        archs = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # an unreadable config is named by the loader
    if archs and all(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs):
        raise InputError(f"a reward model ({', '.join(archs)}), not a policy: give a causal LM (an SFT or RL run, "
                         "or its model/)", file=str(path))


def load_causal_lm(path: str | Path, tokenizer=None, trust_remote_code: bool = False,
                   attn_implementation: str | None = None) -> torch.nn.Module:
    """A causal LM from a local directory; safetensors weights only; with the attention
    kernel ``attn_implementation`` (``attention_kwargs``) when one is named."""
    path = _check_dir(path, "model")
    refuse_reward_model(path)
    check_weights(path)
    attn = attention_kwargs(attn_implementation)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=True, output_loading_info=True, **attn
        )
    except LOAD_ERRORS as err:
        raise InputError(f"cannot load model: {first_line(err)}", file=str(path)) from None
    check_complete(info, path)
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            import sys

            old = model.get_input_embeddings().num_embeddings
            model.resize_token_embeddings(len(tokenizer))
            print(f"{path}: embeddings resized from {old} to {len(tokenizer)} tokens (the tokenizer's added "
                  f"tokens)", file=sys.stderr)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_pretrained_atomic(model, tokenizer, out: str | Path) -> Path:
    """``save_pretrained`` (safetensors) into a temp dir beside ``out``, then rename.

    An interrupted save leaves no half-written model at ``out``; an existing ``out`` is
    replaced only once the new one is complete. A model with a non-finite weight is refused
    (``InputError``): nothing NaN is ever saved as a model. A model with LoRA adapters is
    saved merged, with its adapter in ``out/adapter`` (``lora.save``).
    """
    from rlhflab import lora
    from rlhflab.artifacts import atomic_directory, check_finite_weights

    check_finite_weights(model, "the model", out)
    with atomic_directory(out) as tmp:
        if lora.is_adapted(model):
            lora.save(model, tmp)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
