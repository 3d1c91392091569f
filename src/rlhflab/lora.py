"""Low-rank adapters (LoRA, Hu et al. 2021) through peft, on the models the stages train.

An adapted linear layer computes ``h = W x + (alpha / r) B A x`` with W frozen, A (r x d_in)
drawn at random and B (d_out x r) zero at the start, so the adapted model starts as its base
exactly. :func:`attach` injects the adapters *into the model object itself* (peft's
``get_peft_model`` on it): the training loops keep the same ``transformers`` module, its
``config``, its forward's keywords and its cache, and train whatever requires a gradient
(the adapters, and the modules named trainable, e.g. a reward model's head).

The reference policy of DPO and of online RL is the base: the same module with its adapters
disabled (:class:`AdapterDisabled`, peft's ``disable_adapter()`` around every call), so the
two share one copy of the weights, and the reference stays bit-identical to the base while
the policy trains, because the base weights never receive a gradient.

A saved adapted model (``models.save_pretrained_atomic`` calls :func:`save`) is two things:
``<dir>/`` the merged model, W + (alpha / r) B A per layer, which plain transformers loads
and every later stage reads, and ``<dir>/adapter/`` the adapter alone (peft's
``adapter_config.json`` and ``adapter_model.safetensors``), which
``PeftModel.from_pretrained(base, "<dir>/adapter")`` loads over the base it was trained
from (``base_model_name_or_path``). Merging for the save does not touch the live model.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# model -> its PeftModel (not an attribute of the model: that would make the wrapper a
# submodule of the module it wraps).
_ADAPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return (torch.nn.Linear, Conv1D)


def default_targets(model: torch.nn.Module, exclude: Iterable[torch.nn.Module] = ()) -> list[str]:
    """Every linear layer's name (the last part, as peft matches it) but the output head's
    and those of ``exclude``: q/k/v/o and the MLP's projections of Llama, Qwen2, Mistral,
    GPT-NeoX (``query_key_value``, ``dense``, ...) and GPT-2 (``c_attn``, ``c_proj``, ``c_fc``)."""
    skip = {id(m) for m in exclude}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        skip.add(id(head))
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, _linear_types()) and id(m) not in skip}
    excluded = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if id(m) in skip}
    return sorted(names - excluded)


def attach(model: torch.nn.Module, cfg, trainable: Iterable[torch.nn.Module] = ()) -> torch.nn.Module:
    """Adapters of rank ``cfg.r`` (a LoRAConfig) on ``cfg.target_modules`` (default:
    :func:`default_targets`) of ``model``, in place; every weight but the adapters' and those
    of ``trainable`` frozen. Returns ``model`` (the same object). ``cfg.r == 0``: unchanged."""
    if cfg.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    from rlhflab.errors import InputError

    trainable = list(trainable)
    targets = list(cfg.target_modules) or default_targets(model, trainable)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing or not targets:
        raise InputError(f"no module named {missing[0]!r} in {type(model).__name__} (linear layers: "
                         f"{', '.join(default_targets(model)) or 'none'})" if missing else
                         f"{type(model).__name__} has no linear layer for an adapter", field="lora.target_modules")
    from transformers.pytorch_utils import Conv1D

    conv = any(isinstance(m, Conv1D) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", fan_in_fan_out=conv)  # GPT-2's Conv1D stores W transposed
    peft_model = get_peft_model(model, config)  # injects the adapters into ``model`` and freezes the rest
    for module in trainable:
        module.requires_grad_(True)
    _ADAPTED[model] = peft_model
    return model


def is_adapted(model) -> bool:
    return model in _ADAPTED


def peft_model_of(model):
    """The PeftModel of an adapted model (``attach``), or None."""
    return _ADAPTED.get(model)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters that receive a gradient, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class AdapterDisabled(torch.nn.Module):
    """The base of an adapted model: the same module, called with its adapters disabled.

    No weight of its own: ``parameters()`` are the base's weights (shared with the policy,
    frozen; the adapters' are left out, so freezing this module cannot freeze the policy's
    adapters), attributes (``config``, ``generation_config``, ...) are the model's, the
    forward takes the model's keywords (its signature, for ``forward.forward_options``), and
    ``train``/``eval`` set the shared module's mode, as they would on a copy.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        peft_model = _ADAPTED[model]
        object.__setattr__(self, "_model", model)  # not a submodule: no second copy in state_dict

        @functools.wraps(model.forward)
        def forward(*args, **kwargs):
            with peft_model.disable_adapter():
                return model(*args, **kwargs)

        object.__setattr__(self, "forward", forward)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_model"), name)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, p in self._model.named_parameters(prefix, recurse, remove_duplicate):
            if "lora_" not in name:
                yield name, p

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    # The model's modules, so that what walks them (``forward.fuse_activations``,
    # ``training.disable_dropout``) treats the reference's passes as the policy's.
    def named_modules(self, *args, **kwargs):
        return self._model.named_modules(*args, **kwargs)

    def named_children(self):
        return self._model.named_children()

    def state_dict(self, *args, **kwargs):
        """The base's weights under the base's own names (as a saved base would have them)."""
        return {_base_name(k): v for k, v in self._model.state_dict(*args, **kwargs).items() if "lora_" not in k}

    def train(self, mode: bool = True) -> AdapterDisabled:
        self.training = mode
        self._model.train(mode)
        return self

    def to(self, *args, **kwargs) -> AdapterDisabled:
        self._model.to(*args, **kwargs)
        return self


def reference_of(model: torch.nn.Module) -> torch.nn.Module:
    """The reference policy of an adapted policy: :class:`AdapterDisabled` (no copy)."""
    return AdapterDisabled(model)


def _base_name(key: str) -> str:
    return key.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the merged model, W + (alpha / r) B A for every adapted layer (peft's
    ``get_delta_weight``, the delta its ``merge`` adds), under the base's names; the live
    model is untouched (one layer's delta at a time, no second copy of the model)."""
    from peft.tuners.lora import LoraLayer

    state = {}
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter)
                deltas[f"{name}.base_layer.weight"] = deltas.get(f"{name}.base_layer.weight", 0) + delta
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        if key in deltas:
            value = value + deltas.pop(key).to(value.dtype)
        state[_base_name(key)] = value
    return state


def save(model: torch.nn.Module, out: Path) -> None:
    """Write an adapted model to directory ``out`` (existing, empty): the merged model there
    and the adapter in ``out/adapter`` (see the module docstring)."""
    peft_model = _ADAPTED[model]
    peft_model.save_pretrained(str(out / "adapter"), safe_serialization=True)
    state = merged_state_dict(model)
    with _without_adapters(model):
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)


@contextlib.contextmanager
def _without_adapters(model: torch.nn.Module) -> Iterator[None]:
    """Inside, ``model`` reads as a plain transformers model to ``save_pretrained`` (peft
    marks the config of a model it adapted; the merged weights need no peft to load)."""
    keep = getattr(model, "_hf_peft_config_loaded", None)
    if keep is not None:
        model._hf_peft_config_loaded = False
    try:
        yield
    finally:
        if keep is not None:
            model._hf_peft_config_loaded = keep


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """The adapters folded into the weights for good (peft's ``merge_and_unload``): the
    plain model, for a stage that has finished training it (the reward model's members)."""
    peft_model = _ADAPTED.pop(model, None)
    if peft_model is None:
        return model
    return peft_model.merge_and_unload()


def adapt_online(policy: torch.nn.Module, value_model, cfg) -> torch.nn.Module:
    """Online RL with adapters: on the policy and on the critic's backbone (its value head
    trains in full, outside the backbone). Returns the reference: the policy's base
    (:func:`reference_of`), in place of a second copy of the SFT model."""
    attach(policy, cfg)
    if value_model is not None:
        attach(value_model.backbone, cfg)
    return reference_of(policy)
