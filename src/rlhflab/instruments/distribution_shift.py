"""Distribution shift of a reward model: how far policy samples lie from its training data.

A reward model is trusted where it was trained. Its features are what its scalar head
reads: the last hidden state at the pooled token (the last non-pad token of a decoder, the
pooled [CLS] of an encoder), taken by a forward hook on the head, so the reading sees
exactly the representation the score is a linear function of. The training data's
features (the chosen and rejected responses of the comparisons it was trained on) give a
mean mu and a covariance Sigma, saved with the model (``feature_stats.safetensors``), and a
response x is read by its Mahalanobis distance (Lee et al. 2018, "A simple unified
framework for detecting out-of-distribution samples")

    D(x) = sqrt((h(x) - mu)^T (Sigma + lambda I)^-1 (h(x) - mu)),   lambda = shrink * tr(Sigma) / d

(the ridge keeps the inverse finite when the data are fewer than the feature dimension d).
Distances have no unit of their own, so each is read against the distances of the RM's
held-out comparisons (responses it never trained on, from the same policy): their mean and
95th percentile are saved too. Per member of an ensemble, then averaged:

- ``shift/mahalanobis_mean``: mean D over the policy's samples;
- ``shift/mahalanobis_ratio``: that mean over the held-out mean (1 = as familiar as fresh
  data from the training distribution);
- ``shift/ood_rate``: the share of samples beyond the held-out 95th percentile (0.05 in
  distribution, by construction of the percentile);
- ``shift/ensemble_std`` (ensembles only): the members' disagreement, the mean over samples
  of the std of their normalized scores (Coste et al. 2024; Eisenstein et al. 2024).
"""

from __future__ import annotations

from statistics import fmean

import torch

DEFAULT_SHRINK = 1e-2
OOD_QUANTILE = 0.95


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """D_i = sqrt((x_i - mu)^T P (x_i - mu)) for rows x_i of ``features`` (N, d); (N,) float64."""
    z = features.double() - mean.double()
    return ((z @ precision.double()) * z).sum(-1).clamp(min=0).sqrt()


def fit_gaussian(features: torch.Tensor, shrink: float = DEFAULT_SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, P): the mean and the ridge-regularized precision (Sigma + lambda I)^-1 of (N, d)
    features, Sigma the maximum-likelihood covariance, lambda = shrink * tr(Sigma) / d."""
    x = features.double()
    mu = x.mean(0)
    z = x - mu
    sigma = z.T @ z / max(1, len(x))
    d = sigma.shape[0]
    lam = shrink * float(torch.trace(sigma)) / d
    if lam <= 0:  # every feature constant: an identity ridge keeps the inverse finite
        lam = 1.0
    return mu, torch.linalg.inv(sigma + lam * torch.eye(d, dtype=torch.float64))


@torch.no_grad()
def member_features(rm, prompts: list, responses: list, eos: list[bool] | None = None, *,
                    batch_size: int = 64) -> list[torch.Tensor]:
    """Per member, the features its head reads, (N, d) float32 on the CPU."""
    from rlhflab.reward_model import collate, reward_head

    seqs = rm._encode_all(prompts, responses, eos)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for model in rm.members:
        head = reward_head(model)
        feats = torch.zeros((len(seqs), head.in_features), dtype=torch.float32)
        seen: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, args, _o, seen=seen: seen.append(args[0].detach()))
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, attn = collate([seqs[i] for i in idx], rm.tokenizer.pad_token_id)
                seen.clear()
                model(input_ids=ids.to(rm.device), attention_mask=attn.to(rm.device))
                h = seen[-1]
                if h.dim() == 3:  # a decoder scores every position and pools the last non-pad one
                    last = attn.sum(1).to(h.device) - 1
                    h = h[torch.arange(len(idx), device=h.device), last]
                feats[idx] = h.float().cpu()
        finally:
            hook.remove()
        out.append(feats)
    return out


def feature_stats(rm, train: tuple[list, list, list], held: tuple[list, list, list] | None = None,
                  shrink: float = DEFAULT_SHRINK) -> dict[str, torch.Tensor]:
    """The statistics saved with a reward model: per member m, ``mean_m`` and ``precision_m``
    from the training responses ``train`` = (prompts, responses, eos), and ``ref_mean_m``,
    ``ref_q95_m``, the mean and 95th percentile of the distances of ``held`` (held-out
    responses; without them the training responses, whose distances are in-sample and so
    a little small)."""
    ref = held if held is not None and held[0] else train
    f_train = member_features(rm, *train)
    f_ref = member_features(rm, *ref) if ref is not train else f_train
    stats: dict[str, torch.Tensor] = {"n_train": torch.tensor(len(train[0])), "n_ref": torch.tensor(len(ref[0])),
                                      "shrink": torch.tensor(shrink, dtype=torch.float64)}
    for m, (ft, fr) in enumerate(zip(f_train, f_ref)):
        mu, precision = fit_gaussian(ft, shrink)
        d = mahalanobis(fr, mu, precision)
        stats.update({f"mean_{m}": mu, f"precision_{m}": precision, f"ref_mean_{m}": d.mean(),
                      f"ref_q95_{m}": torch.quantile(d, OOD_QUANTILE)})
    return stats


class SampleReads:
    """A reward model's per-member features (``member_features``) and scores
    (``member_scores``) of one set of samples, each computed on first use and kept, so that
    the readings of one evaluation (distribution shift, early warning) share one pass."""

    def __init__(self, rm, prompts: list, responses: list, eos: list[bool] | None = None) -> None:
        self.rm, self.prompts, self.responses, self.eos = rm, prompts, responses, eos
        self._features: list[torch.Tensor] | None = None
        self._scores: torch.Tensor | None = None

    def features(self) -> list[torch.Tensor]:
        if self._features is None:
            self._features = member_features(self.rm, self.prompts, self.responses, eos=self.eos)
        return self._features

    def scores(self) -> torch.Tensor:
        if self._scores is None:
            self._scores = self.rm.member_scores(self.prompts, self.responses, eos=self.eos)
        return self._scores


def shift_readings(rm, prompts: list, responses: list, *, eos: list[bool] | None = None,
                   reads: SampleReads | None = None) -> dict[str, float]:
    """The module docstring's readings of responses (a policy's samples) under ``rm``. The
    Mahalanobis readings need ``rm.feature_stats``; the ensemble spread needs two members.
    ``reads``: the same samples' features and scores, shared with other readings."""
    out: dict[str, float] = {}
    reads = reads or SampleReads(rm, prompts, responses, eos)
    stats = getattr(rm, "feature_stats", None)
    if stats is not None and prompts:
        feats = reads.features()
        means, ratios, rates = [], [], []
        for m, f in enumerate(feats):
            d = mahalanobis(f, stats[f"mean_{m}"], stats[f"precision_{m}"])
            means.append(float(d.mean()))
            ratios.append(float(d.mean() / stats[f"ref_mean_{m}"]))
            rates.append(float((d > stats[f"ref_q95_{m}"]).double().mean()))
        out.update({"shift/mahalanobis_mean": fmean(means), "shift/mahalanobis_ratio": fmean(ratios),
                    "shift/ood_rate": fmean(rates), "shift/n": float(len(prompts))})
    if rm.n_members > 1 and prompts:
        scores = reads.scores()
        out["shift/ensemble_std"] = float(scores.std(0, unbiased=False).mean())
    return out
