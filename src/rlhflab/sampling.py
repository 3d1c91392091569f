"""Text in, text out: sample responses to prompt strings through the engine
(``rlhflab.generation``), for the instruments, sample tables and comparisons.

Row i of a call with ``seed`` draws from ``row_seed(seed, "sample", i)``: the same prompts
with the same seed give the same responses whatever the batch size, as in a rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhflab.generation import Generation, generate, left_pad, row_seed

__all__ = ["Completion", "check_sample_budget", "left_pad", "sample", "sample_ids"]

# Memory a sampled response holds until its caller is done with it, in bytes: per prompt and
# per response token (the left-padded id and mask tensors, the ids as Python ints, the
# decoded text) and per sample. Measured: 2.8 kB a sample for 20 000 samples of the tiny
# preset's policy (about 12 prompt and 19 response tokens; peak RSS growth of ``sample``),
# against 52 x 12 + 120 x 20 + 500 = 3.5 kB here: an estimate on the safe side.
BYTES_PER_PROMPT_TOKEN, BYTES_PER_NEW_TOKEN, BYTES_PER_SAMPLE = 52, 120, 500


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


def available_memory() -> int | None:
    """Bytes of memory available to this process now (``MemAvailable`` of /proc/meminfo, else
    the physical memory), or None where neither can be read."""
    import os

    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def check_sample_budget(n_samples: int, prompt_tokens: float, new_tokens: int, *, what: str, field: str,
                        hint: str) -> None:
    """Refuse, before any decoding, ``n_samples`` responses that cannot fit in memory: an
    InputError naming ``field`` with the numbers (the samples, the estimate per sample from
    ``prompt_tokens`` and ``new_tokens``, the memory available) and ``hint`` (what to lower).
    ``what`` says what the samples are ("8 prompts x 100000 candidates")."""
    available = available_memory()
    each = BYTES_PER_PROMPT_TOKEN * prompt_tokens + BYTES_PER_NEW_TOKEN * new_tokens + BYTES_PER_SAMPLE
    need = n_samples * each
    if available is not None and need > available:
        from rlhflab.errors import InputError

        raise InputError(f"{n_samples:,} samples ({what}) need about {_bytes(need)} of memory (about {_bytes(each)} "
                         f"each: {prompt_tokens:.0f} prompt and {new_tokens} new tokens), and {_bytes(available)} "
                         f"are available: {hint}", field=field)
