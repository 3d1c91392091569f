"""Text in, text out: sample responses to prompt strings through the engine
(``rlhflab.generation``), for the instruments, sample tables and comparisons.

Row i of a call with ``seed`` draws from ``row_seed(seed, "sample", i)``: the same prompts
with the same seed give the same responses whatever the batch size, as in a rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhflab.generation import Generation, generate, left_pad, row_seed

__all__ = ["Completion", "left_pad", "sample", "sample_ids"]


@dataclass
class Completion:
    """One sampled response: its text, its token ids (EOS excluded) and whether it ended."""

    prompt: str
    text: str
    token_ids: list[int]
    eos: bool


def sample_ids(model, tokenizer, prompt_ids: list[list[int]], *, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, max_new_tokens: int = 24, batch_size: int = 64, seed: int = 0,
               greedy: bool = False, record_logprobs: bool = False) -> Generation:
    """The engine on token ids, with per-row seeds derived from ``seed``."""
    seeds = None if greedy else [row_seed(seed, "sample", i) for i in range(len(prompt_ids))]
    return generate(model, prompt_ids, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    seeds=seeds, temperature=temperature, top_k=top_k, top_p=top_p,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, greedy=greedy,
                    record_logprobs=record_logprobs)


def sample(model, tokenizer, prompts: list, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, max_new_tokens: int = 24, batch_size: int = 64,
           seed: int = 0, greedy: bool = False, rendered: bool = False) -> list[Completion]:
    """Sample one response per prompt. A prompt is text or a list of messages, given to the
    model through the chat template as training gave it (``data.prompt_text``), unless
    ``rendered`` (the texts are already what the model sees). ``Completion.prompt`` is the
    text the model was given."""
    from rlhflab.data import prompt_ids, prompt_text

    if not prompts:
        return []
    prompts = list(prompts) if rendered else [prompt_text(p, tokenizer) for p in prompts]
    p_ids = [prompt_ids(p, tokenizer) for p in prompts]
    gen = sample_ids(model, tokenizer, p_ids, temperature=temperature, top_k=top_k, top_p=top_p,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                     greedy=greedy)
    drop = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    rows = [[t for t in row if t not in drop] for row in gen.response_ids.tolist()]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [Completion(p, text, ids, bool(e)) for p, text, ids, e in zip(prompts, texts, rows, gen.eos.tolist())]
