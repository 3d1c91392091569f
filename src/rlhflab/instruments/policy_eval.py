"""Policy measurements on the world: gold utility and well-formedness of samples."""

from __future__ import annotations

from statistics import fmean

from rlhflab.sampling import Completion, sample
from rlhflab.world import is_well_formed
from rlhflab.world.demonstrator import demonstrate
from rlhflab.world.gold import gold_utility
from rlhflab.world.tasks import Prompt


def world_sample_metrics(completions: list[Completion], prompts: list[Prompt]) -> dict[str, float]:
    """Gold utility, well-formed rate, EOS rate and mean length of sampled responses."""
    golds = [gold_utility(p, c.text, c.eos) for p, c in zip(prompts, completions)]
    return {
        "gold/mean": fmean(golds),
        "samples/well_formed_rate": fmean(is_well_formed(c.text, c.eos) for c in completions),
        "samples/eos_rate": fmean(c.eos for c in completions),
        "samples/length_mean": fmean(len(c.text.split()) for c in completions),
    }


def reference_levels(world, prompts: list[Prompt]) -> dict[str, float]:
    """Gold utility of the ideal responses (the ceiling) and of fresh demonstrations."""
    rng = world.rng("demos/reference")
    return {
        "gold/ideal_mean": fmean(gold_utility(p, p.ideal) for p in prompts),
        "gold/demonstrator_mean": fmean(
            gold_utility(p, demonstrate(p, rng, world.cfg.demonstrator)) for p in prompts
        ),
    }


def measure_policy_on_world(model, tokenizer, world, prompts: list[Prompt], gen, seed: int = 0):
    """Sample each prompt once; returns (metrics, completions)."""
    completions = sample(
        model, tokenizer, [p.text for p in prompts], temperature=gen.temperature, top_k=gen.top_k,
        top_p=gen.top_p, max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, seed=seed,
    )
    metrics = world_sample_metrics(completions, prompts)
    metrics.update(reference_levels(world, prompts))
    metrics["gold/headroom"] = metrics["gold/ideal_mean"] - metrics["gold/mean"]
    return metrics, completions


def _sequence_logps(model, ids, attn, response_start: int, response_mask, temperature: float = 1.0):
    """Sum of response-token log-probs per row: ids (B, P+R), response tokens from column P.

    Prompts are left-padded, so positions are counted over attended tokens only, as
    ``generate`` counts them: with the default 0..T-1 a padded row would be scored by a
    position-shifted model, not the one that sampled it, and the KL estimate would be biased
    (even negative).
    """
    import torch

    from rlhflab.logprobs import token_logprobs

    position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits
    lp = token_logprobs(logits, ids, temperature)[:, response_start:]
    return (lp * response_mask).sum(-1)


def sampled_kl(policy, reference, tokenizer, prompts: list[str], *, max_new_tokens: int = 24,
               batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Sequence-level KL(pi || ref) on held-out prompts (texts as the model sees them:
    ``data.prompt_text``), sampled from the policy at T = 1:

        KL ~= mean_i [log pi(y_i | x_i) - log ref(y_i | x_i)],  y_i ~ pi(. | x_i)

    (the k1 estimator summed over tokens: unbiased), with its standard error.
    """
    import math

    import torch

    from rlhflab.data import prompt_ids
    from rlhflab.sampling import sample_ids

    was = policy.training, reference.training
    policy.eval()
    reference.eval()
    encoded = [prompt_ids(p, tokenizer) for p in prompts]
    gen = sample_ids(policy, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    attn = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    P, mask = gen.prompt_ids.shape[1], gen.response_mask
    values: list[float] = []
    for s in range(0, len(prompts), batch_size):
        rows = slice(s, s + batch_size)
        diff = (_sequence_logps(policy, ids[rows], attn[rows], P, mask[rows])
                - _sequence_logps(reference, ids[rows], attn[rows], P, mask[rows]))
        values += diff.tolist()
    policy.train(was[0])
    reference.train(was[1])
    n = len(values)
    mean = fmean(values)
    var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
    return {"kl/sequence_mean": mean, "kl/sequence_stderr": math.sqrt(var / max(1, n))}
