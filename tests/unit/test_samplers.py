"""The sampler interface without a model: a sampler's answer laid out as the engine's, its
contract enforced row by row, and ``VLLMSampler`` driven through a stand-in ``vllm`` module
that records what it is given (vLLM is not installed here: this checks our side of the
calls, not vLLM)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
import torch

from rlhflab.errors import RunError
from rlhflab.samplers import Samples, SamplingSettings, VLLMSampler, sample_with

PAD, EOS = 0, 1
SETTINGS = SamplingSettings(temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=4, eos_token_ids=(EOS,),
                            pad_token_id=PAD)


class Fixed:
    """A sampler that answers what it was built with."""

    def __init__(self, token_ids, logprobs) -> None:
        self.answer = Samples(token_ids, logprobs)
        self.asked = None

    def generate(self, prompt_token_ids, settings, seeds):
        self.asked = (prompt_token_ids, settings, seeds)
        return self.answer

    def load_weights(self, named_tensors) -> None:
        pass


def test_an_answer_is_laid_out_as_the_engine_lays_out_its_own():
    """Prompts left-padded; responses padded after their first EOS (a token after it is
    padding, as the engine's mask makes it); log-probs 0 on padding; eos per row."""
    s = Fixed([[5, 6, EOS], [7, EOS, 8], [9, 9, 9, 9]],
              [[-0.5, -0.25, -1.0], [-2.0, -0.125, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    g = sample_with(s, object(), [[3, 4], [4], [2, 3, 4]], [11, 12, 13], SETTINGS)
    assert s.asked[2] == [11, 12, 13] and s.asked[1] is SETTINGS
    assert g.prompt_ids.tolist() == [[PAD, 3, 4], [PAD, PAD, 4], [2, 3, 4]]
    assert g.prompt_mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    assert g.response_ids.tolist() == [[5, 6, EOS, PAD], [7, EOS, PAD, PAD], [9, 9, 9, 9]]
    assert g.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert g.eos.tolist() == [True, True, False]
    assert g.logprobs.tolist() == [[-0.5, -0.25, -1.0, 0.0], [-2.0, -0.125, 0.0, 0.0], [-1.0] * 4]
    assert g.entropy is None


@pytest.mark.parametrize("token_ids, logprobs, message", [
    ([[5, EOS]], [[-1.0, -1.0]], "1 rows with 1 log-prob rows for 2 prompts"),
    ([[5, EOS], [6]], [[-1.0, -1.0], [-1.0, -2.0]], "1 tokens and 2 log-probs for row 1"),
    ([[5, EOS], []], [[-1.0, -1.0], []], "no token for row 1"),
    ([[5, 5, 5, 5, 5], [6]], [[-1.0] * 5, [-1.0]], "5 tokens, over max_new_tokens = 4 for row 0"),
    ([[5, PAD, EOS], [6]], [[-1.0] * 3, [-1.0]], "the pad token (0) for row 0"),
])
def test_an_answer_that_breaks_the_contract_stops_the_run_naming_the_row(token_ids, logprobs, message):
    with pytest.raises(RunError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample_with(Fixed(token_ids, logprobs), object(), [[3], [4]], [1, 2], SETTINGS)


# ---------------------------------------------------------------------------------------
# VLLMSampler against a stand-in vllm


@dataclass
class _Logprob:
    logprob: float


class _LLM:
    made: list = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.calls = kwargs, []
        _LLM.made.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(("generate", prompts, params))
        outs = []
        for p in prompts:
            ids = [p["prompt_token_ids"][-1] + 10, EOS]
            c = types.SimpleNamespace(token_ids=ids, logprobs=[{t: _Logprob(-0.5 * (k + 1)), 99: _Logprob(-9.0)}
                                                               for k, t in enumerate(ids)])
            outs.append(types.SimpleNamespace(outputs=[c]))
        return outs

    def collective_rpc(self, method, args=()):
        worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=types.SimpleNamespace(
            load_weights=lambda weights: self.calls.append(("load_weights", list(weights))))))
        self.calls.append(("collective_rpc",))
        return [method(worker, *args)]

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache",))


class _SamplingParams:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


class _Tokenizer:
    def save_pretrained(self, where) -> None:
        pass


class _Policy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    def save_pretrained(self, where, safe_serialization=True) -> None:
        pass


def test_vllm_sampler_asks_for_what_the_trainer_computes_and_loads_the_weights(monkeypatch):
    """Processed log-probs (after the temperature), one request per row with its seed, the
    tokenizer's EOS as the only stop token, the pad pushed out, no detokenizing; each drawn token's own log-prob read
    back; the weights into the worker's model, then the prefix cache reset."""
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=_LLM, SamplingParams=_SamplingParams))
    _LLM.made.clear()
    s = VLLMSampler(_Policy(), _Tokenizer())
    llm = _LLM.made[-1]
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs" and llm.kwargs["dtype"] == "bfloat16"
    out = s.generate([[3, 4], [5]], SETTINGS, [7, 8])
    _, prompts, params = llm.calls[-1]
    assert prompts == [{"prompt_token_ids": [3, 4]}, {"prompt_token_ids": [5]}]
    p = params[1].kwargs
    assert (p["seed"], p["temperature"], p["top_k"], p["top_p"], p["max_tokens"], p["logprobs"]) == (
        8, 0.7, 0, 1.0, 4, 0)
    assert p["stop_token_ids"] == [EOS] and p["ignore_eos"] is True  # the tokenizer's EOS, not the model's
    assert p["logit_bias"] == {PAD: -100.0} and p["detokenize"] is False
    assert out.token_ids == [[14, EOS], [15, EOS]] and out.logprobs == [[-0.5, -1.0], [-0.5, -1.0]]
    s.load_weights([("w", torch.zeros(2))])
    assert [c[0] for c in llm.calls[-3:]] == ["collective_rpc", "load_weights", "reset_prefix_cache"]
    assert llm.calls[-2][1][0][0] == "w"
