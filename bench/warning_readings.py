"""The early warning's feature readings on finished policies whose gold is known: the final
PPO policies of ``bench/rm_fixes.py --size small`` (runs/rm_fixes), each read by its own
reward model as an online run reads its samples (``rlhflab.instruments.early_warning``).

    .venv/bin/python bench/warning_readings.py [--work runs/rm_fixes] [--out bench/results/warning_readings.json]

The SFT policy (runs/rm_fixes/sft) is sampled three times on the world's 200 held-out prompts
(the demo preset's generation settings): draw A fits the reference, draw B cuts and sets the
noise floor (``fit_reference``), draw C is a fresh SFT draw read like a policy (what "nothing
moved" reads) and gives the SFT gold. Per policy (one draw): gold, ``warn/outlier_rate``,
``warn/feature_shift_ratio``, for an ensemble the members' spread over their spread on
draw A, and the outlier rate against draw A's own (in-sample) 99th percentile at ridges 0.01
and 0.1, of the policy and of draw C. A final policy is not a curve: this says whether a reading separates policies that
gold calls hacked from the others, not how early it would fire.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "rm_fixes")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "warning_readings.json")
    args = ap.parse_args()

    import torch

    from rlhflab.config import load_config
    from rlhflab.instruments.distribution_shift import fit_gaussian, mahalanobis, member_features
    from rlhflab.instruments.early_warning import ensemble_spread, feature_readings, fit_reference
    from rlhflab.models import load_causal_lm, load_tokenizer
    from rlhflab.reward_model import RewardModel
    from rlhflab.sampling import sample
    from rlhflab.world import World
    from rlhflab.world.gold import gold_utility

    t0 = time.perf_counter()
    sft = args.work / "sft" / "model"
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    prompts = World(cfg.world).prompts(200, "eval")
    texts = [p.text for p in prompts]
    tok = load_tokenizer(sft)
    g = cfg.generation

    def draw(model_dir, seed):
        model = load_causal_lm(model_dir, tok)
        return sample(model, tok, texts, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                      max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=seed)

    def gold(done):
        return sum(gold_utility(p, c.text, c.eos) for p, c in zip(prompts, done)) / len(done)

    a, b, c = draw(sft, 101), draw(sft, 102), draw(sft, 103)
    rows = []
    for policy in sorted((args.work / "small").glob("*/s*/ppo_*/model")):
        run = policy.parent
        rm_dir = run.parent / f"rm_{run.name[len('ppo_'):]}" / "model"
        if not rm_dir.is_dir() or not (policy / "model.safetensors").is_file():
            continue
        rm = RewardModel.load(rm_dir)

        def feats(done, rm=rm):
            return member_features(rm, texts, [x.text for x in done], eos=[x.eos for x in done])

        fa_, fb_ = feats(a), feats(b)
        refs = [fit_reference(fa, fb) for fa, fb in zip(fa_, fb_)]
        pol = draw(policy, 104)
        fp_, fc_ = feats(pol), feats(c)
        read, fresh = feature_readings(fp_, refs), feature_readings(fc_, refs)
        # The cut taken in sample (draw A's own 99th percentile), as InfoRM's reading would be
        # without a second draw: the share of the policy's and of a fresh SFT draw's samples beyond it.
        in_sample = {}
        for shrink in (0.01, 0.1):
            pr, fr = [], []
            for fa, fp, fc in zip(fa_, fp_, fc_):
                mu, prec = fit_gaussian(fa, shrink)
                cut = torch.quantile(mahalanobis(fa, mu, prec), 0.99)
                pr.append(float((mahalanobis(fp, mu, prec) > cut).double().mean()))
                fr.append(float((mahalanobis(fc, mu, prec) > cut).double().mean()))
            in_sample[f"in_sample_outlier_rate_shrink{shrink:g}"] = sum(pr) / len(pr)
            in_sample[f"sft_fresh_in_sample_outlier_rate_shrink{shrink:g}"] = sum(fr) / len(fr)
        row = {"run": str(run.relative_to(args.work)), "gold_sft": gold(c), "gold": gold(pol),
               "outlier_rate": read["warn/outlier_rate"], "feature_shift_ratio": read["warn/feature_shift_ratio"],
               "sft_fresh_outlier_rate": fresh["warn/outlier_rate"],
               "sft_fresh_feature_shift_ratio": fresh["warn/feature_shift_ratio"], **in_sample,
               "members": rm.n_members}
        if rm.n_members > 1:
            def spread(done, rm=rm):
                return ensemble_spread(rm.member_scores(texts, [x.text for x in done], eos=[x.eos for x in done]))

            row["ensemble_ratio"] = spread(pol) / spread(a)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    record = {"command": shlex.join(["python", "bench/warning_readings.py", *sys.argv[1:]]),
              "seconds": time.perf_counter() - t0, "prompts": len(texts), "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
