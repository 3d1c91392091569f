"""Rejection-sampling fine-tuning (ReST, Gulcehre et al. 2023; RAFT, Dong et al. 2023).

Each round ("grow" then "improve" in ReST's words):

1. the current policy samples n responses per prompt (``best_of_n.sample_candidates``,
   the engine's seeded rows);
2. the reward model keeps the best of each prompt's n, if it scores at least the
   threshold (when one is given);
3. the policy is fine-tuned on the kept (prompt, best response) pairs with the SFT loss
   (``algos/sft.py``, the ``sft`` section's optimizer settings);

and the next round samples from the fine-tuned policy. Each round's policy is measured on
the world's held-out prompts: gold utility, the proxy (the reward model's score), the
sampled KL from the SFT policy, and the reward model's distribution-shift reading.

Where this departs from the papers: a candidate cut at max_new_tokens without EOS is never
kept (a demonstration without its end would teach the policy not to stop), so a prompt
whose n candidates all ran out is dropped; ReST raises its threshold over "improve" steps
within a round, here one threshold, one fine-tuning per round (RAFT's form).
"""

from __future__ import annotations

from statistics import fmean

import numpy as np

from rlhflab.algos.best_of_n import sample_candidates


def select_best(scores: np.ndarray, ended: np.ndarray, threshold: float | None = None) -> list[int | None]:
    """Per prompt, the index of the best-scoring candidate that ended (EOS), or None when
    none ended or the best scores below ``threshold``. scores, ended: (P, n)."""
    masked = np.where(ended, scores, -np.inf)
    best = np.argmax(masked, axis=1)
    out: list[int | None] = []
    for i, j in enumerate(best):
        ok = bool(ended[i, j]) and (threshold is None or masked[i, j] >= threshold)
        out.append(int(j) if ok else None)
    return out


def grow(policy, tokenizer, rm, prompts: list[str], n: int, gen, *, seed: int,
         threshold: float | None = None) -> tuple[list[dict], dict]:
    """One round's data: the rows ``{"prompt", "completion"}`` of the kept best responses,
    and the round's counts (``rs/...``)."""
    cands = sample_candidates(policy, tokenizer, prompts, n, gen, seed)
    flat = [c for row in cands for c in row]
    raw = [p for p in prompts for _ in range(n)]
    scores = rm.score(raw, [c.text for c in flat], eos=[c.eos for c in flat]).double().numpy().reshape(-1, n)
    ended = np.array([[c.eos and bool(c.text.strip()) for c in row] for row in cands])
    best = select_best(scores, ended, threshold)
    rows = [{"prompt": p, "completion": cands[i][j].text} for i, (p, j) in enumerate(zip(prompts, best))
            if j is not None]
    kept_scores = [scores[i, j] for i, j in enumerate(best) if j is not None]
    counts = {"rs/prompts": len(prompts), "rs/kept": len(rows),
              "rs/dropped_no_eos": int((~ended.any(1)).sum()),
              "rs/dropped_threshold": sum(j is None for j in best) - int((~ended.any(1)).sum()),
              "rs/candidate_proxy_mean": float(scores.mean()),
              "rs/kept_proxy_mean": fmean(kept_scores) if kept_scores else float("nan")}
    return rows, counts


def improve(cfg_sft, policy, tokenizer, rows: list[dict], out_dir, accelerator) -> dict:
    """Fine-tune ``policy`` in place on the kept rows with the SFT loop; its summary."""
    from rlhflab.algos.sft import tokenize_rows, train_sft

    train, n_trunc = tokenize_rows(rows, tokenizer, cfg_sft.max_length)
    summary = train_sft(cfg_sft, policy, tokenizer, train, [], out_dir, accelerator)
    return {"rs/train_loss": summary["train/loss"], "rs/train_steps": summary["train/steps"],
            "rs/truncated": n_trunc}


def measure_round(policy, reference, tokenizer, rm, prompts: list, gen, *, seed: int = 0) -> dict:
    """A round's policy on held-out world prompts (``world.tasks.Prompt``): gold, proxy, KL
    from the reference (the SFT policy), the reward model's shift reading (no proxy and no
    shift reading without ``rm``)."""
    from rlhflab.instruments.distribution_shift import shift_readings
    from rlhflab.instruments.policy_eval import sampled_kl, world_sample_metrics
    from rlhflab.sampling import sample

    texts = [p.text for p in prompts]
    policy.eval()
    done = sample(policy, tokenizer, texts, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                  max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size, seed=seed)
    out = world_sample_metrics(done, prompts)
    if rm is not None:
        out["proxy/mean"] = float(rm.score(texts, [c.text for c in done], eos=[c.eos for c in done]).mean())
    out.update(sampled_kl(policy, reference, tokenizer, texts, max_new_tokens=gen.max_new_tokens,
                          batch_size=gen.batch_size, seed=seed + 1))
    if rm is not None:
        out.update(shift_readings(rm, texts, [c.text for c in done], eos=[c.eos for c in done]))
    return out
