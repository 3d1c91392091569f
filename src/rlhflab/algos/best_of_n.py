"""Best-of-n sampling: n responses per prompt from the policy, the reward model keeps its best.

No training: the policy is pi_ref, and best-of-n is the policy "draw n, keep the argmax of
the proxy". Each prompt is sampled N = max(ns) times once, through the engine
(``sampling.sample``, row i of the repeated prompt list seeded by ``row_seed(seed,
"sample", i)``); the best of n is the proxy's argmax over the first n candidates, so the
curves for different n are nested (the best of 8 is never worse by the proxy than the
best of 4 on the same prompt).

KL from the policy, two readings per n:

- ``bon/kl_analytic`` = log n - (n - 1)/n (Gao et al. 2022, appendix), the KL when no two
  responses tie. Beirami et al. 2024 ("Theoretical guarantees on the best-of-n alignment
  policy") prove it an upper bound; it is loose where the policy repeats itself, which a
  small, peaked policy does.
- ``bon/kl_plugin``: the plug-in estimate. Per prompt, the N candidates' empirical law
  (distinct responses as atoms, their counts / N as probabilities, the proxy's scores as
  rewards) stands in for pi_ref, and the KL of the exact best-of-n law on it
  (``optimal.best_of_n_policy``) is computed in closed form; then averaged over prompts.
  It sees what the formula cannot (repeated responses, tied scores), from the very draws
  the curves use, with no extra forward pass. Its bias: an atom the N draws missed does
  not exist for it, so with N distinct candidates it is the KL of best-of-n over N equal
  atoms, a little below the formula (2.456 against 2.497 nats at n = N = 32);
  ``bon/kl_plugin_ceiling`` is that all-distinct value, so a reading at the ceiling says
  the candidates never repeated and the formula is as good an estimate.

Per n the readings are the proxy (``bon/proxy_mean``), the gold utility on the world
(``bon/gold_mean``), and the win-rate of the best of n against an independent single
sample of the same policy on the same prompt (the policy as it is): by gold on the world
(``bon/win_rate``, with its Wilson interval), or by a judge on a user's prompts
(``bon/win_rate_judge``). With the reward model that selected as the judge, that win-rate
measures the proxy, not the human: a user's prompts without another judge cannot tell
over-optimization from improvement.
"""

from __future__ import annotations

from collections import Counter
from statistics import fmean

import numpy as np

from rlhflab.optimal import best_of_n_kl_bound, best_of_n_policy, kl_divergence
from rlhflab.sampling import Completion, sample


def sample_candidates(model, tokenizer, texts: list[str], n_max: int, gen, seed: int) -> list[list[Completion]]:
    """``n_max`` completions per rendered prompt: candidate j of prompt i is row i * n_max + j."""
    rows = [t for t in texts for _ in range(n_max)]
    done = sample(model, tokenizer, rows, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                  max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, seed=seed, rendered=True)
    return [done[i * n_max:(i + 1) * n_max] for i in range(len(texts))]


def best_indices(scores: np.ndarray, n: int) -> np.ndarray:
    """Per prompt, the index of the proxy's best among the first n candidates (the first on
    a tie: the draws are exchangeable, so that is a uniformly random tied draw).  (P, N) -> (P,)"""
    return np.argmax(scores[:, :n], axis=1)


def plugin_kl(responses: list, scores: list[float], n: int) -> float:
    """KL of best-of-n over the empirical law of one prompt's candidates (module docstring);
    ``responses`` are hashable (a response's text and whether it ended)."""
    count = Counter(responses)
    atoms = list(count)
    p = np.array([count[a] / len(responses) for a in atoms])
    score = dict(zip(responses, scores))  # one response, one score (the RM is deterministic)
    r = np.array([score[a] for a in atoms])
    return float(kl_divergence(best_of_n_policy(p, r, n), p))


def best_of_n(model, tokenizer, rm, prompts: list, texts: list[str], ns: list[int], gen, *, seed: int = 0,
              gold=None, judge=None) -> dict:
    """Best-of-n for each n in ``ns`` on ``prompts`` (raw, as the RM reads them) and
    ``texts`` (as the policy sees them). ``gold(i, completion) -> float`` gives the world's
    gold utility of a completion of prompt i; ``judge`` (``instruments.judges``) is used
    where there is no gold. Returns ``{"rows": [one dict per n], "n_max", "n_prompts"}``."""
    from rlhflab.instruments.judges import win_rate as judge_win_rate
    from rlhflab.instruments.win_rate import gold_win_rate

    n_max = max(ns)
    cands = sample_candidates(model, tokenizer, texts, n_max, gen, seed)
    flat = [c for row in cands for c in row]
    raw = [p for p in prompts for _ in range(n_max)]
    scores = rm.score(raw, [c.text for c in flat], eos=[c.eos for c in flat]).double().numpy().reshape(-1, n_max)
    # the policy as it is: one more sample per prompt, from a stream the candidates do not use
    single = sample(model, tokenizer, texts, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                    max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, seed=seed + 1, rendered=True)
    single_gold = [gold(i, c) for i, c in enumerate(single)] if gold is not None else None
    cand_gold = np.array([[gold(i, c) for c in row] for i, row in enumerate(cands)]) if gold is not None else None
    rows = []
    for n in ns:
        best = best_indices(scores, n)
        chosen = [cands[i][j] for i, j in enumerate(best)]
        row = {"n": n, "bon/proxy_mean": float(scores[np.arange(len(best)), best].mean()),
               "bon/kl_analytic": best_of_n_kl_bound(n),
               "bon/kl_plugin": fmean(plugin_kl([(c.text, c.eos) for c in cands[i]], scores[i].tolist(), n)
                                      for i in range(len(cands))),
               "bon/kl_plugin_ceiling": float(kl_divergence(best_of_n_policy(np.full(n_max, 1 / n_max),
                                                                              np.arange(n_max), n),
                                                            np.full(n_max, 1 / n_max))),
               "bon/length_mean": fmean(len(c.token_ids) for c in chosen),
               "bon/eos_rate": fmean(c.eos for c in chosen)}
        if cand_gold is not None:
            golds = cand_gold[np.arange(len(best)), best]
            w = gold_win_rate(golds.tolist(), single_gold)
            row.update({"bon/gold_mean": float(golds.mean()), "bon/win_rate": w["win_rate"],
                        "bon/win_rate_ci_low": w["ci_low"], "bon/win_rate_ci_high": w["ci_high"]})
        if judge is not None:
            verdict = judge.compare(prompts, [c.text for c in chosen], [c.text for c in single],
                                    eos_a=[c.eos for c in chosen], eos_b=[c.eos for c in single])
            w = judge_win_rate(verdict.prob_a)
            row.update({"bon/win_rate_judge": w["win_rate"], "bon/win_rate_judge_ci_low": w["ci_low"],
                        "bon/win_rate_judge_ci_high": w["ci_high"]})
        rows.append(row)
    out = {"n_max": n_max, "n_prompts": len(texts), "rows": rows}
    if cand_gold is not None:
        out["gold/single_mean"] = fmean(single_gold)
    return out
