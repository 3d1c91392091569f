"""``rlhflab eval --policy DIR --base DIR [--rm DIR] --out DIR``: every instrument of a policy
against its base on the world's held-out probes; readings to ``DIR/eval.json`` (keys in
``rlhflab.instruments.world_eval``), samples to ``DIR/samples.json``, and the diagnosis to
``DIR/diagnosis.json``."""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import add_config_arguments, config_from_args


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--policy", required=True, help="policy directory (a stage's out dir or its model/)")
    p.add_argument("--base", required=True, help="base policy directory, usually the SFT run")
    p.add_argument("--rm", help="reward-model directory: adds the proxy score and RM win-rate")
    p.add_argument("--n", type=int, default=None, help="probes per family (default: world.n_eval)")
    p.add_argument("--seed", type=int, default=0)
    user = p.add_argument_group("a user's own data (instead of the world's probes)")
    user.add_argument("--prompts", help="prompt file (JSONL, JSON, Parquet, Arrow or a datasets directory): KL, "
                                        "text statistics, the RM's scores and the judge's win-rate on them")
    user.add_argument("--judge", help="who judges policy vs base on --prompts: rm:DIR (a reward model), lm:DIR (a local "
                                      "LM asked in both orders) or py:module:function (default: rm:<--rm> if --rm)")
    user.add_argument("--judge-question", help="the question an lm: judge is asked (default: which response is more "
                                               "helpful, honest and harmless)")
    user.add_argument("--mc", help="multiple-choice JSONL (question/choices/answer): capability")
    user.add_argument("--harmful", help="prompt file where refusing is right")
    user.add_argument("--benign", help="prompt file where refusing is over-refusal")
    user.add_argument("--capability", metavar="TASKS",
                      help="lm-eval tasks, comma-separated: names lm-eval registers, rlhflab's own (rlhflab_mc, "
                           "rlhflab_mc_cloze, rlhflab_gsm, rlhflab_arithmetic), task YAML files or directories; "
                           "policy and base, with the paired difference (needs pip install 'rlhflab[eval]')")
    user.add_argument("--capability-limit", type=int, metavar="N", help="the first N items of each --capability task")
    user.add_argument("--sycophancy", metavar="F", help="questions with their answer and a wrong one "
                                                        "(question/answer/wrong): asked plain and with the user's opinion")
    user.add_argument("--sycophancy-match", metavar="py:FN", help="who decides whether an answer gives a target: "
                      "py:module:function or py:file.py:function, fn(completions, answers) -> list[bool] "
                      "(default: the normalized target as whole words)")
    user.add_argument("--reward-fn", action="append", default=[], metavar="SPEC",
                      help="a reward function as training names it (gold, module:function, file.py:function), "
                           "scored on the samples of --prompts with the rows' columns; repeatable")


def evaluate_policy(cfg, policy_dir, base_dir, rm_dir=None, n: int | None = None, seed: int = 0):
    """(metrics, samples) for a saved policy against a saved base."""
    from rlhflab.instruments.world_eval import evaluate_on_world
    from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir
    from rlhflab.world import World

    policy_dir, base_dir = resolve_model_dir(policy_dir), resolve_model_dir(base_dir)
    tok = load_tokenizer(policy_dir)
    policy = load_causal_lm(policy_dir, tok)
    base = load_causal_lm(base_dir, tok)
    rm = None
    if rm_dir is not None:
        from rlhflab.reward_model import RewardModel

        rm = RewardModel.load(rm_dir)
    return evaluate_on_world(policy, base, tok, World(cfg.world), cfg.generation,
                             n_per_family=n or cfg.world.n_eval, rm=rm, seed=seed)


def evaluate_on_user_data(cfg, policy_dir, base_dir, rm_dir=None, *, prompts=None, mc=None,
                          harmful=None, benign=None, seed: int = 0, judge: str | None = None,
                          judge_question: str | None = None, capability: str | None = None,
                          capability_limit: int | None = None, sycophancy=None, sycophancy_match=None,
                          reward_fns=()):
    """(metrics, samples) on the user's files; each reading also for the base (``base/``).

    On ``prompts``: text statistics and (with ``rm_dir``) the RM's mean score for both
    models, the sampled KL(policy || base), and the judge's win-rate of the policy's answer
    over the base's on the same prompt (``win_rate/judge`` with its interval and the
    length-controlled rate; an RM judge also gives ``win_rate/rm``). Every prompt is used:
    conversational prompts go through the chat template, as in training. ``reward_fns``
    score the same samples (``instruments.held_out_rewards``); ``capability`` runs lm-eval
    tasks (``instruments.capability``), ``sycophancy`` a file of questions
    (``instruments.sycophancy``)."""
    from rlhflab.data import load_rows, prompt_text
    from rlhflab.instruments.judges import CallableJudge, load_judge, win_rate
    from rlhflab.instruments.policy_eval import sampled_kl
    from rlhflab.instruments.text_stats import text_stats
    from rlhflab.instruments.user_eval import (
        load_multiple_choice,
        multiple_choice_accuracy,
        refusal_rates,
    )
    from rlhflab.instruments.win_rate import length_controlled_win_rate
    from rlhflab.models import load_causal_lm, load_tokenizer, resolve_model_dir
    from rlhflab.sampling import sample

    g = cfg.generation
    mc_rows = load_multiple_choice(mc) if mc else None
    rows = load_rows(prompts, "prompt") if prompts else []
    raw = [r["prompt"] for r in rows]
    if reward_fns and not raw:
        from rlhflab.errors import InputError

        raise InputError("--reward-fn scores the samples of --prompts: give a prompt file", field="--reward-fn")
    if sycophancy_match and not sycophancy:
        from rlhflab.errors import InputError

        raise InputError("--sycophancy-match matches the answers of --sycophancy: give a question file",
                         field="--sycophancy-match")
    if capability_limit is not None and (not capability or capability_limit < 1):
        from rlhflab.errors import InputError

        raise InputError(f"expected N >= 1 with --capability, got {capability_limit}", field="--capability-limit")
    functions = []
    if reward_fns:
        from rlhflab.instruments.held_out_rewards import load_functions

        functions = load_functions(reward_fns)
    syco_rows, match = None, None
    if sycophancy:
        from rlhflab.instruments.sycophancy import default_matcher, load_matcher, load_sycophancy

        syco_rows = load_sycophancy(sycophancy)
        match = load_matcher(sycophancy_match) if sycophancy_match else default_matcher
    tasks = None
    if capability:
        from rlhflab.instruments.capability import prepare_tasks

        tasks = prepare_tasks(capability)  # a bad task name fails before any model loads
    if judge is None and rm_dir is not None and raw:
        judge = f"rm:{rm_dir}"
    policy_dir, base_dir = resolve_model_dir(policy_dir), resolve_model_dir(base_dir)
    tok = load_tokenizer(policy_dir, cfg.model.trust_remote_code)
    judge_obj = load_judge(judge, trust_remote_code=cfg.model.trust_remote_code, question=judge_question) \
        if judge and raw else None
    models = {"": load_causal_lm(policy_dir, tok, cfg.model.trust_remote_code),
              "base/": load_causal_lm(base_dir, tok, cfg.model.trust_remote_code)}
    rm = None
    if rm_dir is not None:
        from rlhflab.reward_model import RewardModel

        rm = RewardModel.load(rm_dir)
    texts = [prompt_text(p, tok) for p in raw]
    metrics: dict[str, float] = {}
    samples: dict[str, list] = {"prompts": texts}
    comps: dict[str, list] = {}
    for prefix, model in models.items():
        if texts:
            done = sample(model, tok, texts, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                          max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, seed=seed, rendered=True)
            comps[prefix] = done
            samples[prefix.rstrip("/") or "policy"] = [c.text for c in done]
            metrics.update({prefix + k: v for k, v in text_stats([c.text for c in done], [c.eos for c in done]).items()})
            if rm is not None:
                scores = rm.score(raw, [c.text for c in done], eos=[c.eos for c in done])
                metrics[prefix + "rm/score_mean"] = float(scores.mean())
        if mc_rows:
            metrics.update({prefix + k: v for k, v in multiple_choice_accuracy(model, tok, mc_rows).items()})
        metrics.update({prefix + k: v for k, v in refusal_rates(
            model, tok, harmful, benign, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
            seed=seed).items()})
        if syco_rows:
            from rlhflab.instruments.sycophancy import sycophancy_readings

            read, answers = sycophancy_readings(model, tok, syco_rows, match=match, max_new_tokens=g.max_new_tokens,
                                                batch_size=g.batch_size)
            metrics.update({prefix + k: v for k, v in read.items()})
            samples.setdefault("sycophancy", {})[prefix.rstrip("/") or "policy"] = answers
    if tasks is not None:
        from rlhflab.instruments.capability import evaluate_capability

        read, items = evaluate_capability(models, tok, tasks, limit=capability_limit, batch_size=g.batch_size)
        metrics.update(read)
        samples["capability"] = items
    if functions:
        from rlhflab.instruments.held_out_rewards import reward_readings

        read, drawn = reward_readings(functions, rows, texts, comps[""], comps["base/"])
        metrics.update(read)
        samples["reward_fn"] = drawn
    if texts:
        metrics.update(sampled_kl(models[""], models["base/"], tok, texts, max_new_tokens=g.max_new_tokens,
                                  batch_size=g.batch_size, seed=seed + 1))
    if judge_obj is not None:
        pol, bas = comps[""], comps["base/"]
        # a py: judge reads the rows' other columns as keywords, as a reward function does
        columns = {k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)
                   if k not in ("prompt", "eos_a", "eos_b")} if isinstance(judge_obj, CallableJudge) else {}
        verdict = judge_obj.compare(raw, [c.text for c in pol], [c.text for c in bas],
                                    eos_a=[c.eos for c in pol], eos_b=[c.eos for c in bas], **columns)
        dlen = [float(len(a.token_ids) - len(b.token_ids)) for a, b in zip(pol, bas)]
        read = verdict.readable  # an unreadable judge answer is counted (judge/unreadable), not scored
        metrics.update(verdict.readings)
        if any(read):
            w = win_rate(verdict.prob_a)
            metrics.update({"win_rate/judge": w["win_rate"], "win_rate/judge_ci_low": w["ci_low"],
                            "win_rate/judge_ci_high": w["ci_high"], "win_rate/judge_n": w["n"],
                            "win_rate/judge_length_controlled": length_controlled_win_rate(
                                [p for p, ok in zip(verdict.prob_a, read) if ok],
                                [d for d, ok in zip(dlen, read) if ok])})
        else:  # no win-rate, and so no verdict that needs one: diagnose says what is missing
            import sys

            print(f"judge {verdict.judge}: none of its {len(read)} answers could be read (neither option likelier "
                  f"than the rest of its vocabulary); no win-rate is reported", file=sys.stderr)
        if isinstance(judge, str) and judge.startswith("rm:"):
            metrics.update({k.replace("/judge", "/rm"): v for k, v in metrics.items()
                            if k.startswith("win_rate/judge")})
        samples["judge"] = {"judge": verdict.judge, "prob_policy_better": verdict.prob_a}
    return metrics, samples


def print_readings(metrics: dict, title: str = "instruments") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("reading", "policy", "base"):
        table.add_column(col)
    for key in sorted(k for k in metrics if not k.startswith("base/")):
        base = metrics.get(f"base/{key}")
        table.add_row(key, f"{metrics[key]:.3f}", "" if base is None else f"{base:.3f}")
    Console(width=100).print(table)


def run(args) -> int:
    from rlhflab.artifacts import check_out_dir, run_directory, write_json
    from rlhflab.config import save_config
    from rlhflab.diagnose import diagnose, format_findings

    cfg = config_from_args(args)
    out = check_out_dir(Path(args.out), args.overwrite)
    if args.judge and not args.prompts:
        from rlhflab.errors import InputError

        raise InputError("--judge compares answers to --prompts: give a prompt file", field="--judge")
    if args.judge:
        from rlhflab.instruments.judges import parse_judge

        parse_judge(args.judge)  # a malformed spec fails before any model loads
    from rlhflab.progress import labelled

    if args.capability:
        from rlhflab.instruments.capability import parse_tasks, require_lm_eval

        parse_tasks(args.capability)
        require_lm_eval()  # without the extra: one line saying how to install it
    if args.prompts or args.mc or args.harmful or args.benign or args.capability or args.sycophancy:
        with labelled("eval"):
            metrics, samples = evaluate_on_user_data(cfg, args.policy, args.base, args.rm, prompts=args.prompts,
                                                     mc=args.mc, harmful=args.harmful, benign=args.benign,
                                                     seed=args.seed, judge=args.judge,
                                                     judge_question=args.judge_question,
                                                     capability=args.capability,
                                                     capability_limit=args.capability_limit,
                                                     sycophancy=args.sycophancy,
                                                     sycophancy_match=args.sycophancy_match,
                                                     reward_fns=args.reward_fn)
    elif args.reward_fn or args.sycophancy_match or args.capability_limit is not None:
        from rlhflab.errors import InputError

        flag = "--reward-fn" if args.reward_fn else "--sycophancy-match" if args.sycophancy_match \
            else "--capability-limit"
        raise InputError(f"{flag} reads a file of yours: give --prompts, --sycophancy or --capability with it",
                         field=flag)
    else:
        from rlhflab.sampling import check_sample_budget
        from rlhflab.world import FAMILIES

        n = args.n or cfg.world.n_eval
        if n < 1:
            from rlhflab.errors import InputError

            raise InputError(f"must be >= 1, got {n}", field="--n")
        # the probes of every family, answered by the policy and the base (a lower bound)
        check_sample_budget(2 * n * len(FAMILIES), 1, cfg.generation.max_new_tokens, field="--n",
                            what=f"{n} probes x {len(FAMILIES)} families x 2 models", hint="lower --n")
        with labelled("eval"):
            metrics, samples = evaluate_policy(cfg, args.policy, args.base, args.rm, args.n, args.seed)
    result = diagnose(metrics)
    with run_directory(out, args.overwrite) as work:  # the earlier result stays until the new one is written
        save_config(cfg, work / "config.yaml")
        write_json(work / "eval.json", metrics)
        write_json(work / "samples.json", samples)
        write_json(work / "diagnosis.json", result)
    print_readings(metrics)
    print(format_findings(result))
    return 0
