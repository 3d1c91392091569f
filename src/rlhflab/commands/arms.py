"""Arms: policies trained from one SFT model and one reward model, side by side, and
measured against that SFT model. ``rlhflab run`` trains one per name in ``run.arms``;
``rlhflab sweep`` one per (algorithm, beta).

An arm is an online algorithm (``rlhflab.registry.ONLINE_ALGORITHMS``, trained by
``commands.rl``) or a preference loss (``rlhflab.registry.PREFERENCE_LOSSES``, trained by
``commands.dpo`` on the reward model's own comparisons, so that offline and online arms
see the same preferences). Each arm writes ``out/<arm>/``, its measurements
``out/eval/<arm>/``.

A sampling arm (``rlhflab.registry.SAMPLING_ARMS``: best-of-n) trains nothing: it samples
the SFT policy and lets the reward model choose, on the ``rl.n_eval`` held-out prompts the
online arms' gold curve is measured on, and writes ``out/bon/bon.json``
(``commands.bon.run_bon``) instead of a model, so it has no ``out/eval/<arm>/``. It has no
beta, so only ``rlhflab run`` takes it.

An AI-feedback arm (``rlhflab.registry.AI_FEEDBACK_ARMS``: rlaif) has the world's AI
labeller relabel the comparisons the human raters voted on (``rm/data/train.jsonl`` and
``eval.jsonl``: the same prompts, the same pairs) under ``run.constitution``
(``commands.rlaif.run_rlaif``, into ``out/<arm>_feedback/``), trains its own reward model
on the soft labels (``out/<arm>_rm/``) and runs its online algorithm on that reward model
from SFT (``out/<arm>/``); it is measured as the other arms, its proxy reward by its own
reward model. Only ``rlhflab run`` takes it.
"""

from __future__ import annotations

import copy
from pathlib import Path

from rlhflab.errors import InputError
from rlhflab.registry import AI_FEEDBACK_ARMS, ONLINE_ALGORITHMS, PREFERENCE_LOSSES, SAMPLING_ARMS

ONLINE = ONLINE_ALGORITHMS.names()
OFFLINE = PREFERENCE_LOSSES.names()
SAMPLING = SAMPLING_ARMS.names()
FEEDBACK = AI_FEEDBACK_ARMS.names()


def check_arms(arms: list, cfg=None, *, sampling: bool = False) -> None:
    """Known arms, each once; with ``cfg``, each online arm's resolved RL settings are
    checked too (``resolve_rl_config``, the one-process layout), before anything is written
    or trained. ``sampling``: the caller takes sampling arms (``rlhflab run`` does, a beta
    sweep does not)."""
    for arm in arms:
        if arm in SAMPLING and not sampling:
            raise InputError(f"{arm!r} trains nothing and has no beta to sweep (an arm of rlhflab run, "
                             f"or rlhflab {arm})", field="--algo")
        if arm in FEEDBACK and not sampling:
            raise InputError(f"{arm!r} relabels the run's comparisons (an arm of rlhflab run)", field="--algo")
        if arm not in ONLINE and arm not in OFFLINE and arm not in SAMPLING and arm not in FEEDBACK:
            raise InputError(f"unknown arm {arm!r} (online: {', '.join(ONLINE)}; offline: {', '.join(OFFLINE)}"
                             + (f"; sampling: {', '.join(SAMPLING)}; AI feedback: {', '.join(FEEDBACK)})"
                                if sampling else ")"), field="run.arms")
    if len(set(arms)) != len(arms):
        raise InputError("each arm may appear once", field="run.arms")
    if cfg is not None:
        from rlhflab.algos.rl_config import check_layout, resolve_rl_config

        for arm in arms:
            if arm in ONLINE or arm in FEEDBACK:
                algo = AI_FEEDBACK_ARMS.entry(arm).options["algo"] if arm in FEEDBACK else arm
                check_layout(resolve_rl_config(copy.deepcopy(cfg.rl), algo), 1)
        if any(arm in FEEDBACK for arm in arms):
            from rlhflab.constitution import load_constitution

            load_constitution(cfg.run.constitution or None).require_aspects()


def train_arm(cfg, arm: str, out: Path, sft: Path, rm: Path) -> dict:
    """Train one arm from SFT into ``out/arm`` (a private copy of the config per arm); a
    sampling arm samples instead (``sample_arm``)."""
    cfg = copy.deepcopy(cfg)
    if arm in SAMPLING:
        return sample_arm(cfg, arm, out, sft, rm)
    if arm in FEEDBACK:
        return AI_FEEDBACK_ARMS[arm](cfg, arm, out, sft, rm)
    if arm in ONLINE:
        from rlhflab.commands.rl import run_rl

        return run_rl(cfg, arm, out / arm, sft=str(sft), rm=str(rm))
    from rlhflab.commands.dpo import run_dpo

    cfg.dpo.loss = arm
    return run_dpo(cfg, out / arm, sft, data=str(rm / "data" / "train.jsonl"),
                   eval_data=str(rm / "data" / "eval.jsonl"),
                   unpaired_from_pairs=PREFERENCE_LOSSES.entry(arm).options["unpaired"])


BON_READINGS = ("bon/gold_mean", "bon/proxy_mean", "bon/win_rate", "bon/kl_analytic", "bon/kl_plugin")


def sample_arm(cfg, arm: str, out: Path, sft: Path, rm: Path) -> dict:
    """Best-of-n of the SFT policy by the run's reward model, n in ``run.bon_n``, on the
    ``rl.n_eval`` held-out prompts the online arms' gold is measured on (seed ``run.seed``):
    ``out/<arm>/bon.json`` and ``config.yaml``. Returns the readings per n and the law's fit,
    for the run's summary."""
    from rlhflab.artifacts import prepare_out_dir, write_json
    from rlhflab.config import save_config

    record = SAMPLING_ARMS[arm](cfg, sft, rm, list(cfg.run.bon_n), n_prompts=cfg.rl.n_eval, seed=cfg.run.seed)
    d = prepare_out_dir(out / arm, overwrite=True)
    save_config(cfg, d / "config.yaml")
    write_json(d / "bon.json", record)
    return {"n_prompts": record["n_prompts"], "gold/single_mean": record.get("gold/single_mean"),
            "rows": [{"n": r["n"], **{k: r[k] for k in BON_READINGS if k in r}} for r in record["rows"]],
            **record.get("fit", {})}


def arm_reward_model(arm: str, out: Path, rm: Path) -> Path:
    """The reward model an arm trained on: its own for an AI-feedback arm, else the run's."""
    return out / f"{arm}_rm" if arm in FEEDBACK else rm


FEEDBACK_READINGS = ("rlaif/agree_gold", "rlaif/agree_gold/benign", "rlaif/agree_gold/risky_benign",
                     "rlaif/agree_gold/harmful",
                     "rlaif/agree_human", "judge/position_bias", "rlaif/ece", "rlaif/unreadable")


def feedback_arm(cfg, arm: str, out: Path, sft: Path, rm: Path) -> dict:
    """The AI-feedback arm (module docstring): the run's comparisons relabelled by the
    registry's judge under ``run.constitution``, a reward model trained on the soft labels,
    then the registry's online algorithm on it from SFT. Returns the RL summary with the
    labels' instruments (``rlaif/...``) and the reward model's held-out accuracy on them."""
    from rlhflab.commands.rl import run_rl
    from rlhflab.commands.rlaif import run_rlaif
    from rlhflab.commands.rm import run_rm

    entry = AI_FEEDBACK_ARMS.entry(arm)
    labels = out / f"{arm}_feedback"
    readings = {}
    for split in ("train", "eval"):
        r = run_rlaif(copy.deepcopy(cfg), labels / split, judge=entry.options["judge"],
                      constitution=cfg.run.constitution or None, pairs=str(rm / "data" / f"{split}.jsonl"),
                      seed=cfg.rm.seed + (split == "eval"), overwrite=True)
        if split == "train":
            readings = {k: r[k] for k in FEEDBACK_READINGS if isinstance(r.get(k), float)}
    rm_summary = run_rm(copy.deepcopy(cfg), out / f"{arm}_rm", sft=str(sft), data=str(labels / "train" / "pairs.jsonl"),
                        eval_data=str(labels / "eval" / "pairs.jsonl"), overwrite=True)
    summary = run_rl(cfg, entry.options["algo"], out / arm, sft=str(sft), rm=str(out / f"{arm}_rm"))
    return {**summary, **readings, **{f"{arm}_rm/{k}": rm_summary[k] for k in ("eval/accuracy", "data/pairs")
                                      if k in rm_summary}}


def evaluate_arm(cfg, arm: str, out: Path, sft: Path, rm: Path) -> dict:
    """Instruments, curve readings and diagnosis of one arm into ``out/eval/<arm>/``."""
    import json

    from rlhflab.artifacts import prepare_out_dir, write_json
    from rlhflab.commands.eval import evaluate_policy
    from rlhflab.diagnose import diagnose
    from rlhflab.instruments.overoptimization import curve_readings

    metrics, samples = evaluate_policy(cfg, out / arm, sft, arm_reward_model(arm, out, rm), seed=cfg.run.seed)
    curve = out / arm / "metrics.jsonl"
    rows = [json.loads(x) for x in curve.read_text().splitlines() if x.strip()] if curve.is_file() else []
    pts = [r for r in rows if "gold/mean" in r and "objective/kl" in r]
    if pts:
        metrics.update(curve_readings([r["objective/kl"] for r in pts], [r["gold/mean"] for r in pts],
                                      [r.get("objective/scores", float("nan")) for r in pts]))
    d = prepare_out_dir(out / "eval" / arm, overwrite=True)
    write_json(d / "eval.json", metrics)
    write_json(d / "samples.json", samples)
    write_json(d / "diagnosis.json", diagnose(metrics))
    return metrics


def retarget_paths(work: Path, final: Path) -> None:
    """Before a job written in ``work`` is renamed to ``final``: the paths its stages
    recorded under ``work`` (run.json's inputs, metrics, the report's title) are rewritten to
    ``final``, so resuming an arm or reading a record finds them."""
    if Path(work) == Path(final):
        return
    pairs = sorted({(str(Path(work).resolve()), str(Path(final).resolve())),
                    (str(Path(work).absolute()), str(Path(final).absolute())),
                    (str(work), str(final))}, key=lambda x: -len(x[0]))
    for path in Path(work).rglob("*"):
        if path.suffix not in (".json", ".html", ".yaml") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        new = text
        for a, b in pairs:
            new = new.replace(a, b)
        if new != text:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(new, encoding="utf-8")
            tmp.replace(path)
