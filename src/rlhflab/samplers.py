"""Samplers: what decodes an online run's rollouts when it is not the project's own engine.

By default (``rl.sampler=engine``) a rollout decodes with ``rlhflab.generation`` from the
policy's own weights. At scale the decoding goes to an inference engine outside the trainer
(vLLM), which holds a copy of the weights. That copy is only as fresh as its last update, so
the interface is two calls:

- ``generate(prompt_token_ids, settings, seeds) -> Samples``: one response per prompt, as
  token ids up to and including the first EOS, with each drawn token's log-prob under the
  sampler, log softmax(z / T)[y_t] on the full vocabulary (before top-k / top-p), the same
  quantity the trainer computes (``rollout.forward_response``). ``seeds`` are the per-row
  seeds (``generation.row_seed``): an engine that takes a seed per request reproduces its
  own samples; it need not reproduce the project's.
- ``load_weights(named_tensors)``: the trainer's weights, as (name, tensor) pairs under the
  names of the model's Hugging Face checkpoint (a LoRA policy's merged, W + (alpha / r) B A:
  ``policy_weights``). ``OnlineRun`` calls it before the first rollout and before the first
  rollout after each update, so every batch is drawn from the weights it is trained on.

The trainer re-scores nothing it need not: without ``rl.tis_cap`` the sampler's log-probs
are the update's old log-probs, and the mismatch guard (``OnlineRun._mismatch_guard``) stops
the run when the trainer's first forward pass disagrees with them by more than
``rl.mismatch_tolerance`` (a stale copy, another precision, another kernel); with
``rl.tis_cap`` the trainer scores the samples itself and weights each token by
min(pi_train / pi_sampler, C) (Yao et al. 2025). The entropy, which an external engine does
not return, comes from one forward pass of the policy over the samples (the pass that
re-scores them under TIS).

``rl.sampler`` names ``engine``, ``vllm`` (``registry.SAMPLERS``) or ``module:factory``, a
callable ``factory(policy, tokenizer) -> Sampler``. ``InProcessSampler`` is such a sampler
built in this process: a second copy of the policy, updated only through ``load_weights``,
decoding with the project's engine. It is what the tests run in place of vLLM
(docs/scaling.md, "An external inference engine").
"""

from __future__ import annotations

import copy
import inspect
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from rlhflab.errors import InputError, RunError
from rlhflab.generation import (
    Generation,
    fit_prompts,
    left_pad,
    prompt_room,
    response_mask_after_eos,
)


@dataclass(frozen=True)
class SamplingSettings:
    """What a sampler must honour, from the run's ``generation`` section and tokenizer."""

    temperature: float               # softmax(z / T)
    top_k: int                       # 0 = off
    top_p: float                     # 1.0 = off
    max_new_tokens: int              # response tokens at most
    eos_token_ids: tuple[int, ...]   # a response ends at the first of these (included)
    pad_token_id: int                # never drawn: a pad inside a response reads as a hole in its mask
    batch_size: int = 64             # rows per decoding call, for a sampler that batches as the engine does


@dataclass
class Samples:
    """A sampler's answer: row i answers prompt i."""

    token_ids: list[list[int]]    # the drawn tokens, up to and including the first EOS
    logprobs: list[list[float]]   # log softmax(z / T)[y_t] of each drawn token, before top-k / top-p


@runtime_checkable
class Sampler(Protocol):
    """An inference engine that decodes an online run's rollouts (module docstring)."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], settings: SamplingSettings,
                 seeds: Sequence[int]) -> Samples: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


# ---------------------------------------------------------------------------------------
# Choosing one


def make_sampler(spec: str, policy, tokenizer) -> Sampler | None:
    """The sampler ``rl.sampler`` names (checked by ``RLConfig.cross_check`` and
    ``algos.rl_config.resolve_rl_config``), built from the (unwrapped) policy and its
    tokenizer; None for ``engine``. A factory that cannot be imported, or returns no
    ``Sampler``, is an InputError naming ``rl.sampler``."""
    from rlhflab.registry import SAMPLERS

    if spec == "engine":
        return None
    if spec in SAMPLERS:
        factory = SAMPLERS[spec]
    else:
        from rlhflab.rewards import load_callable

        factory = load_callable(spec, flag="rl.sampler", what="sampler factory")
        try:
            inspect.signature(factory).bind(policy, tokenizer)
        except TypeError:
            raise InputError(f"{spec} is not a factory(policy, tokenizer) -> Sampler", field="rl.sampler") from None
        except ValueError:  # no signature to read (a builtin): it is called as it is
            pass
    sampler = factory(policy, tokenizer)
    if not isinstance(sampler, Sampler):
        raise InputError(f"{spec} returned a {type(sampler).__name__}, not a sampler (generate and load_weights: "
                         "rlhflab.samplers.Sampler)", field="rl.sampler")
    return sampler


def policy_weights(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under its checkpoint's names, detached: a LoRA policy's merged,
    W + (alpha / r) B A (``lora.merged_state_dict``), since an engine loads the plain model."""
    from rlhflab import lora

    state = lora.merged_state_dict(policy) if lora.is_adapted(policy) else policy.state_dict()
    for name, tensor in state.items():
        yield name, tensor.detach()


# ---------------------------------------------------------------------------------------
# A sampler's answer as the engine's


def sample_with(sampler: Sampler, model, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int],
                settings: SamplingSettings) -> Generation:
    """``sampler``'s responses to ``prompt_ids`` laid out as ``generation.generate`` lays out
    its own (left-padded prompts, responses padded after the first EOS), log-probs recorded,
    entropy None. Prompts longer than ``model``'s positions leave beside the responses are cut
    from their start first, as the engine cuts them. A sampler that breaks the contract (a
    row count, a log-prob count, an empty or over-long response, the pad token drawn) stops the
    run naming the row: its samples would be trained on as they are."""
    prompt_ids = fit_prompts(prompt_ids, prompt_room(model, settings.max_new_tokens), settings.max_new_tokens)
    out = sampler.generate(prompt_ids, settings, list(seeds))
    what = type(sampler).__name__
    if len(out.token_ids) != len(prompt_ids) or len(out.logprobs) != len(prompt_ids):
        raise RunError(f"the sampler {what} answered {len(out.token_ids)} rows with {len(out.logprobs)} log-prob "
                       f"rows for {len(prompt_ids)} prompts")
    for i, (ids, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        problem = (f"{len(ids)} tokens and {len(lps)} log-probs" if len(ids) != len(lps)
                   else "no token" if not ids
                   else f"{len(ids)} tokens, over max_new_tokens = {settings.max_new_tokens}"
                   if len(ids) > settings.max_new_tokens
                   else f"the pad token ({settings.pad_token_id})" if settings.pad_token_id in ids else None)
        if problem:
            raise RunError(f"the sampler {what} returned {problem} for row {i}")
    p_ids, p_mask = left_pad(prompt_ids, settings.pad_token_id)
    R = max(len(ids) for ids in out.token_ids)
    response = torch.full((len(prompt_ids), R), settings.pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(len(prompt_ids), R)
    for i, (ids, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        response[i, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        logprobs[i, :len(lps)] = torch.as_tensor([float(x) for x in lps])
    eos = torch.tensor(list(settings.eos_token_ids))
    mask, ended = response_mask_after_eos(response, eos, settings.pad_token_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, settings.pad_token_id))
    return Generation(prompt_ids=p_ids, prompt_mask=p_mask, response_ids=response, response_mask=mask, eos=ended,
                      logprobs=torch.where(mask.bool(), logprobs, torch.zeros(())), entropy=None)


# ---------------------------------------------------------------------------------------
# A second copy of the policy in this process


class InProcessSampler:
    """An external sampler built in this process: a frozen copy of the policy that learns the
    trainer's weights only through ``load_weights`` and decodes with the project's engine
    (``generation.generate``, the same per-row seeds). With its weights synced it draws what
    ``rl.sampler=engine`` draws; left stale, it is the sampler the mismatch guard exists for.
    A LoRA policy's copy is the plain model, loaded with the merged weights."""

    def __init__(self, policy, tokenizer) -> None:
        from rlhflab import lora
        from rlhflab.forward import fuse_activations

        if lora.is_adapted(policy):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(policy.config)
            model.load_state_dict(dict(policy_weights(policy)), strict=True)
            model.to(next(policy.parameters()).device)
        else:
            model = copy.deepcopy(policy)
        fuse_activations(model)  # as the run's policy: the same function, the same float rounding
        self.model = model.requires_grad_(False).eval()
        self._names = set(self.model.state_dict())

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = self.model.state_dict()
        seen = set()
        for name, tensor in named_tensors:
            if name not in state:
                raise RunError(f"the sampler's model has no weight {name!r}")
            state[name].copy_(tensor)
            seen.add(name)
        missing = self._names - seen
        if missing:
            raise RunError(f"the sampler was sent {len(seen)} of its {len(self._names)} weights (missing "
                           f"{sorted(missing)[0]!r})")

    def generate(self, prompt_token_ids, settings: SamplingSettings, seeds) -> Samples:
        from rlhflab.generation import generate

        g = generate(self.model, prompt_token_ids, pad_token_id=settings.pad_token_id,
                     eos_token_id=list(settings.eos_token_ids), seeds=seeds, temperature=settings.temperature,
                     top_k=settings.top_k, top_p=settings.top_p, max_new_tokens=settings.max_new_tokens,
                     batch_size=settings.batch_size, record_logprobs=True)
        lengths = g.lengths.tolist()
        return Samples(token_ids=[row[:n] for row, n in zip(g.response_ids.tolist(), lengths)],
                       logprobs=[row[:n] for row, n in zip(g.logprobs.tolist(), lengths)])


# ---------------------------------------------------------------------------------------
# vLLM


class VLLMSampler:
    """vLLM's offline engine as the sampler (Kwon et al. 2023). Written against vLLM 0.10.2 and
    later (the V1 engine; ``logprobs_mode`` appeared in 0.10.2) and untested here: this
    project's environment has no GPU and no vLLM (docs/scaling.md).

    - The engine starts from the policy as it is, saved to a temporary directory (merged for
      LoRA) with its tokenizer: ``LLM(model=dir, logprobs_mode="processed_logprobs")``.
      Processed log-probs are taken after the temperature (vLLM's default, raw, is before it);
      they are also after top-k / top-p, so with those filters on they are the log-probs of
      the truncated, renormalized distribution the tokens were drawn from, not the trainer's:
      set ``rl.tis_cap`` (the weight pi_train / pi_sampler is then the truncation's own
      correction) or leave generation.top_k = 0 and top_p = 1.
    - ``generate``: one request per row, ``SamplingParams(temperature, top_k, top_p,
      max_tokens, seed=row seed, logprobs=0, stop_token_ids=EOS, ignore_eos=True)``: the
      rollout's EOS ids end a response, the model's generation config's do not (the engine
      ends at the tokenizer's, as the trainer's mask does); the pad token pushed out by a
      logit bias of -100; ``outputs[0].token_ids`` and each position's ``logprobs[t][token]
      .logprob`` are the answer.
    - ``load_weights``: ``LLM.collective_rpc`` runs ``model_runner.model.load_weights`` (the
      loader that reads Hugging Face names) on every worker, then ``reset_prefix_cache``: a
      prompt's cached KV blocks were computed with the old weights.
    - ``dtype`` defaults to bfloat16: the trainer's float32 log-probs differ from it by more
      than the guard's 1e-3, so a run needs ``rl.tis_cap`` (or ``dtype="float32"`` where the
      attention backend takes it). Memory: ``gpu_memory_utilization`` is the engine's share of
      the GPU it shares with the trainer.

    Arguments other than the policy and tokenizer are vLLM's; a factory of one's own
    (``rl.sampler=mymodule:make``) passes others: ``VLLMSampler(policy, tokenizer, **kwargs)``.
    """

    def __init__(self, policy, tokenizer, *, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.3,
                 enable_prefix_caching: bool = True, **llm_kwargs) -> None:
        try:
            from vllm import LLM
        except ImportError as err:
            raise InputError(f"vllm cannot be imported ({err})", field="rl.sampler") from None
        from rlhflab import lora

        self._dir = tempfile.TemporaryDirectory(prefix="rlhflab-vllm-")
        where = Path(self._dir.name)
        if lora.is_adapted(policy):
            lora.save(policy, where)  # the merged model there, the adapter in where/adapter
        else:
            policy.save_pretrained(str(where), safe_serialization=True)
        tokenizer.save_pretrained(str(where))
        self.llm = LLM(model=str(where), tokenizer=str(where), dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                       logprobs_mode="processed_logprobs", **llm_kwargs)

    def generate(self, prompt_token_ids, settings: SamplingSettings, seeds) -> Samples:
        from vllm import SamplingParams

        params = [SamplingParams(n=1, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                 max_tokens=settings.max_new_tokens, seed=int(seed), logprobs=0,
                                 stop_token_ids=list(settings.eos_token_ids), ignore_eos=True,
                                 logit_bias={settings.pad_token_id: -100.0}, detokenize=False)
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_token_ids], params,
                                    use_tqdm=False)
        token_ids, logprobs = [], []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            token_ids.append(ids)
            logprobs.append([step[tok].logprob for tok, step in zip(ids, c.logprobs)])
        return Samples(token_ids=token_ids, logprobs=logprobs)

    def load_weights(self, named_tensors) -> None:
        weights = list(named_tensors)
        self.llm.collective_rpc(_load_into_worker, args=(weights,))
        self.llm.reset_prefix_cache()


def _load_into_worker(worker, weights) -> None:
    """Run on each vLLM worker by ``LLM.collective_rpc``: the weights into its model."""
    worker.model_runner.model.load_weights(weights=weights)
