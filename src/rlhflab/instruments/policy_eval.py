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
