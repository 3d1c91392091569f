"""The run an online RL loop drives: ``OnlineRun`` holds the models, the optimizer and
schedule, the KL controller, the prompt stream, gold evaluation with early stopping and
best-model saving, checkpoints and the summary.

The algorithms (``ppo.py``, ``reinforce.py``, ``grpo.py``) are short loops over it:

    for step in run.steps():
        ro = run.rollout(step)                                   # rlhflab.rollout.Rollout
        advantages = <the algorithm's estimator>(ro)              # pure functions, advantages.py
        batch = UpdateBatch.from_rollout(ro, advantages=advantages)
        metrics = run.update(step, batch)                        # algos.update.update_policy
        run.end_step(step, ro, metrics)                          # KL control, logs, eval, checkpoint

Elsewhere: the settings each algorithm fills in and checks (``algos.rl_config``), the
update and the batch it consumes (``algos.update``), the losses (``losses``), statistics
over processes (``distributed.BatchStats``), KL estimators, controllers and the KL status
(``kl``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhflab.algos.rl_config import check_layout
from rlhflab.algos.update import UpdateBatch, UpdateSettings, update_policy
from rlhflab.distributed import (
    BatchStats,
    all_whole_weights,
    gathered,
    mismatch_tolerance,
    shard_weights,
)
from rlhflab.errors import RunError
from rlhflab.forward import fuse_activations
from rlhflab.kl import KL_STATUS, kl_k1, kl_status, make_kl_controller, sequence_kl
from rlhflab.seeds import derive_seed


@dataclass
class HeldOut:
    """A user's held-out prompts for the curve of an RL run (``--eval-prompts``): the texts
    the policy is given, their rows (the reward functions read their columns) and an
    optional judge (``instruments.judges``); the reference's answers are sampled once."""

    texts: list[str]
    rows: list[dict]
    judge: object | None = None
    reference_texts: list[str] | None = None
    reference_eos: list[bool] | None = None


class OnlineRun:
    """Everything an online loop needs besides its own advantage estimator.

    Built by ``rlhflab.commands.rl``; the algorithm calls ``steps``, ``rollout``,
    ``update``, ``end_step`` and ``finish``.
    """

    def __init__(self, cfg, algo: str, accelerator, policy, reference, tokenizer, reward, prompt_pool: list[str], *,
                 value_model=None, out_dir: Path | None = None, world=None, eval_prompts=None,
                 prompt_rows: list[dict] | None = None, held_out: HeldOut | None = None) -> None:
        from rlhflab.tracking import MetricsLog
        from rlhflab.training import make_optimizer

        self.cfg, self.rl, self.algo = cfg, cfg.rl, algo
        self.accelerator = accelerator
        self.tokenizer, self.reward = tokenizer, reward
        self.prompt_pool = prompt_pool  # the texts the policy is given (chat template applied)
        if prompt_rows is not None and len(prompt_rows) != len(prompt_pool):
            raise ValueError(f"{len(prompt_rows)} prompt rows for {len(prompt_pool)} prompts")
        self.prompt_rows = prompt_rows  # the data rows they came from (rewards read their columns)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.world, self.eval_prompts = world, eval_prompts
        self.held_out = held_out  # the user's held-out prompts (world runs: eval_prompts)
        self.stats = BatchStats(accelerator)
        rl = self.rl
        check_layout(rl, accelerator.num_processes)
        self.group_size = rl.samples_per_prompt

        # GPT-2's gelu_new as torch's fused kernel in every model the run calls (policy, reference,
        # critic, reward models): the same function to float rounding, as in SFT, RM and DPO.
        reward_models = [getattr(src, "model", None) for _, src in getattr(reward, "terms", ())]
        for model in (policy, reference, value_model, *(m for rm in reward_models for m in getattr(rm, "members", ()))):
            if model is not None:
                fuse_activations(model)
        # rl.sharding=fsdp2: the policy, the critic and the reference (with LoRA, which is refused
        # sharded, it is the policy's base) each sharded per transformer block before the optimizer
        # is made; the weights are gathered in float32 (decoding stays there; the training passes
        # are autocast as without sharding); the reward models stay whole on every process.
        self.sharded = rl.sharding == "fsdp2"

        def shard(model):
            return shard_weights(model, rl, accelerator, "rl", gather_in_precision=False)

        # Reference: frozen, never prepared (no DDP, no optimizer), dropout off.
        reference.requires_grad_(False)
        reference.eval()
        self.reference = shard(reference.to(accelerator.device))
        # Dropout off in the policy and critic too, so the first-epoch ratio is exactly 1.
        policy.eval()
        policy = shard(policy)
        groups = [{"params": list(policy.parameters()), "lr": rl.lr}]
        if value_model is not None:
            value_model.eval()
            value_model = shard(value_model)
            groups.append({"params": list(value_model.parameters()), "lr": rl.value_lr or rl.lr})
        self.optimizer_raw, self.scheduler = make_optimizer(groups, rl, rl.steps)  # fused AdamW, the schedule
        if self.sharded:  # already distributed: the optimizer steps each process's shards
            self.policy, self.value, self.optimizer = policy, value_model, self.optimizer_raw
        elif value_model is not None:
            self.policy, self.value, self.optimizer = accelerator.prepare(policy, value_model, self.optimizer_raw)
        else:
            self.policy, self.optimizer = accelerator.prepare(policy, self.optimizer_raw)
            self.value = None
        self.kl_ctl = make_kl_controller(rl.kl_controller, **{
            "fixed": dict(beta=rl.beta),
            # Controllers advance by the samples of each batch (Ziegler et al.'s horizon unit).
            "linear": dict(beta_start=rl.beta, beta_end=rl.beta_end, total_steps=rl.steps * rl.batch_size),
            "adaptive": dict(init_beta=rl.beta, target=rl.kl_target, horizon=rl.kl_horizon),
            "lagrangian": dict(init_beta=rl.beta, epsilon=rl.kl_epsilon, lr=rl.kl_dual_lr),
        }[rl.kl_controller])
        self.state = {"step": 0, "best_eval": None, "best_step": None, "bad_evals": 0, "stopped_early": False,
                      "kl_status_steps": {s: 0 for s in KL_STATUS}, "time_rollout": 0.0, "time_update": 0.0,
                      "last_status": "ok", "evals": [],
                      # the early warning (instruments.early_warning): evaluations checked, the step it
                      # first fired at and by which readings, the last attack's exploit gain
                      "warn_evals": 0, "warn_fired": None, "warn_fired_by": [], "warn_exploit": None,
                      # rl.stop_on_warning: the step of the policy kept in before_warning/, and the step
                      # the run stopped at
                      "warn_kept_step": None, "stopped_on_warning": None,
                      # per step, the metrics the training curve's warning readings read
                      # (early_warning.CURVE_KEYS); None after resuming a checkpoint without them
                      "curve": []}
        self.is_main = accelerator.is_main_process
        self.log = MetricsLog(self.out_dir / "metrics.jsonl" if self.out_dir else None, enabled=self.is_main,
                              accelerator=accelerator)
        self.last_metrics: dict = {}
        self._bar = None
        self._perm_cache: tuple[int, list[int]] | None = None
        self._attacked_rm = self._attack_target() if rl.attack_every else None
        self._warn_ref: dict | None = None  # the SFT policy's reference readings, drawn on first use
        self._warn_shown: dict[str, float] = {}  # the last warning readings, for the progress line
        # rl.sampler: an external sampler (rlhflab.samplers) decodes the rollouts from a copy of the
        # weights, sent before the first rollout and before the first rollout after each update
        from rlhflab.samplers import make_sampler

        self.sampler = make_sampler(rl.sampler, self.policy_module, tokenizer)
        self._sampler_stale = True

    # -- modules -----------------------------------------------------------------------

    @property
    def policy_module(self):
        return self.accelerator.unwrap_model(self.policy)

    @property
    def value_module(self):
        return None if self.value is None else self.accelerator.unwrap_model(self.value)

    # -- prompts and rollout -----------------------------------------------------------

    def _prompt_index_at(self, j: int) -> int:
        """Index in the pool of the j-th prompt of an endless stream of seeded permutations."""
        N = len(self.prompt_pool)
        epoch = j // N
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.rl.seed, "prompts", epoch))
            self._perm_cache = (epoch, torch.randperm(N, generator=gen).tolist())
        return self._perm_cache[1][j % N]

    def local_rows_of(self, step: int) -> tuple[list[str], list[int], list[dict] | None]:
        """This process's prompts (each repeated G times), per-row seeds and, when the prompts
        came from a file, their data rows, for ``step``."""
        from rlhflab.generation import row_seed

        G, W, r = self.group_size, self.accelerator.num_processes, self.accelerator.process_index
        n_prompts = self.rl.batch_size // G
        per = n_prompts // W
        prompts, seeds, rows = [], [], []
        for i in range(r * per, (r + 1) * per):
            k = self._prompt_index_at((step - 1) * n_prompts + i)
            for g in range(G):
                prompts.append(self.prompt_pool[k])
                seeds.append(row_seed(self.rl.seed, step, i * G + g))
                if self.prompt_rows is not None:
                    rows.append(self.prompt_rows[k])
        return prompts, seeds, rows if self.prompt_rows is not None else None

    def _minibatch_shuffle(self, step: int, n_rows: int) -> tuple[torch.Generator, torch.Tensor]:
        """The generator of this step's minibatch shuffles and the first epoch's permutation."""
        gen = torch.Generator().manual_seed(derive_seed(self.rl.seed, "minibatches", step,
                                                      self.accelerator.process_index))
        return gen, torch.randperm(n_rows, generator=gen)

    def rollout(self, step: int):
        """This process's rows of ``step``, sampled, scored and on the device; the wall time
        it took is ``seconds`` on the Rollout."""
        from rlhflab.rollout import collect_rollout

        t = time.perf_counter()
        prompts, seeds, rows = self.local_rows_of(step)
        if self.sampler is not None and self._sampler_stale:
            from rlhflab.samplers import policy_weights

            self.sampler.load_weights(policy_weights(self.policy_module))
            self._sampler_stale = False
        # sharded: every model's whole weights gathered once for the rollout (processes decode
        # different numbers of passes, so they cannot all-gather in step); unsharded: nothing
        with all_whole_weights(self.policy, self.reference, self.value):
            ro = collect_rollout(self.policy_module, self.reference, self.tokenizer, prompts, seeds, self.reward,
                                 generation=self.cfg.generation, group_size=self.group_size,
                                 value_model=self.value_module, no_eos_penalty=self.rl.no_eos_penalty,
                                 forward_batch_size=self.rl.micro_batch_size, rescore=self.rl.tis_cap is not None,
                                 rows=rows, sampler=self.sampler)
        ro = ro.to(self.accelerator.device)
        return dataclasses.replace(ro, seconds=time.perf_counter() - t)

    # -- update ------------------------------------------------------------------------

    def settings(self) -> UpdateSettings:
        rl = self.rl
        return UpdateSettings(
            epochs=rl.epochs, num_minibatches=rl.num_minibatches, micro_batch_size=rl.micro_batch_size,
            clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high, loss_agg=rl.loss_agg,
            max_len=self.cfg.generation.max_new_tokens,
            kl_coef=self.kl_ctl.value if rl.kl_in == "loss" else 0.0, kl_estimator=rl.kl_estimator,
            kl_clip=rl.kl_clip, dual_clip=rl.dual_clip, entropy_coef=rl.entropy_coef, vf_coef=rl.vf_coef,
            value_clip_eps=rl.value_clip_eps,
            target_kl=rl.target_kl)

    def _forward(self, with_values: bool):
        """forward(rows) for ``update_policy``: the policy's log-probs (and entropy when it
        is in the loss) and the critic's values of the rows' response tokens."""
        from rlhflab.rollout import forward_response, forward_values

        T = self.cfg.generation.temperature
        with_entropy = self.rl.entropy_coef > 0
        # sharded: each pass all-gathers every block, so every process runs one pass per
        # micro-batch (not one per run of similar lengths, whose number differs between them)
        grouped = False if self.sharded else None

        def forward(rows: UpdateBatch):
            args = (rows.prompt_ids, rows.prompt_mask, rows.response_ids, rows.mask)
            with self.accelerator.autocast():  # rl.mixed_precision; the loss is then taken in float32
                lp, ent = forward_response(self.policy, *args, temperature=T, with_entropy=with_entropy,
                                           grouped=grouped)
                v = forward_values(self.value, *args, grouped=grouped) if with_values else None
            return lp, ent, (v.float() if v is not None else None)

        return forward

    def _optimizer_step(self, step: int) -> float:
        from rlhflab.artifacts import is_staging
        from rlhflab.training import (
            clip_gradients,
            grad_norm_of,
            sharded_grad_norm,
            stop_if_non_finite,
        )

        params = [p for g in self.optimizer_raw.param_groups for p in g["params"]]
        norm = float("nan")
        if self.rl.max_grad_norm > 0:  # sharded gradients: the norm reduced over processes first
            norm = float(clip_gradients(self.accelerator, params, self.rl.max_grad_norm))
        if self.accelerator.scaler is None:  # fp16's loss scaler expects (and skips) overflows
            # A non-finite loss, advantage or reward shows here: stop before the weights take it.
            ckpt = self.out_dir / "checkpoint" if self.out_dir is not None else None
            stop_if_non_finite(self.algo, step, lr=self.rl.lr, lr_field="rl.lr",
                               grad_norm=norm if self.rl.max_grad_norm > 0 else
                               float(sharded_grad_norm(params) if self.sharded else grad_norm_of(params)),
                               kept=str(ckpt) if ckpt is not None and ckpt.is_dir() and not is_staging(ckpt.parent)
                               else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def _no_sync(self):
        with contextlib.ExitStack() as stack:
            for m in (self.policy, self.value):
                if m is not None:
                    stack.enter_context(self.accelerator.no_sync(m))
            yield

    def _mismatch_guard(self, step: int):
        """Stops the run when the trainer's log-probs of the sampled tokens are not the
        sampler's (``update_policy``'s first-minibatch readings). Without TIS both come from
        the same weights in this process and agree to float precision (at most 4.3e-6 nats in
        float32 on the demo model), so a larger gap means the two compute different models."""
        rl = self.rl

        def guard(readings: dict) -> None:
            gap = readings.get("rollout/logprob_diff_max", 0.0)
            tolerance = mismatch_tolerance(rl.mismatch_tolerance, rl.mixed_precision)  # bf16: a wider floor
            if rl.tis_cap is not None or not gap > tolerance:
                return
            precision = "" if rl.mixed_precision == "no" else f" under {rl.mixed_precision}"
            if rl.sampler != "engine":  # an external sampler: its copy of the weights is the first suspect
                precision += (f"; the sampler is rl.sampler={rl.sampler}: weights it did not load (a sync that "
                              "failed or was skipped) or kernels of its own")
            raise RunError(
                f"step {step}: the sampler's log-probs are not the trainer's: max |log pi_train - log pi_sampler| = "
                f"{gap:.3g} nats (mean {readings.get('rollout/logprob_diff_mean', float('nan')):.3g}, first-update "
                f"ratio {readings.get('rollout/first_ratio_mean', float('nan')):.4g}) above rl.mismatch_tolerance = "
                f"{tolerance:g}{precision}; the decoding loop and the training forward disagree (a KV cache, mask "
                f"or position ids the installed transformers handles differently, or a sampler in another "
                f"precision: then set rl.tis_cap)")

        return guard

    def update(self, step: int, batch: UpdateBatch) -> dict[str, float]:
        """``update_policy`` on this process's rows of ``step`` (``UpdateBatch.from_rollout``,
        or any selection of its rows), with truncated importance weights when
        ``rl.tis_cap`` is set; returns the update's metrics."""
        from rlhflab.losses import truncated_importance_weights

        t = time.perf_counter()
        extra: dict[str, float] = {}
        if self.rl.tis_cap is not None and batch.sampler_logprobs is not None:
            w = truncated_importance_weights(batch.old_logprobs, batch.sampler_logprobs, cap=self.rl.tis_cap)
            batch = dataclasses.replace(batch, is_weights=w)
            m = batch.mask.bool()
            extra = {"rollout/tis_weight_mean": self.stats.masked_mean(w, batch.mask).item(),
                     "rollout/tis_clipfrac": self.stats.masked_mean((w >= self.rl.tis_cap).float() * m,
                                                                    batch.mask).item()}
        gen, perm = self._minibatch_shuffle(step, batch.batch_size)
        from rlhflab.models import checkpointed_passes

        with checkpointed_passes(self.policy_module, getattr(self.value_module, "backbone", None)):
            metrics = update_policy(batch, self._forward(with_values=batch.returns is not None),
                                    functools.partial(self._optimizer_step, step), self.settings(), self.stats, gen,
                                    backward=self.accelerator.backward, no_sync=self._no_sync, first_perm=perm,
                                    mismatch_guard=self._mismatch_guard(step))
        self._sampler_stale = True  # the optimizer stepped: the sampler's copy is a step behind
        metrics.update(extra)
        self.state["time_update"] += time.perf_counter() - t
        return metrics

    # -- the step loop ---------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        from rlhflab.progress import progress_bar

        start = self.state["step"] + 1
        with progress_bar(self.rl.steps, self.algo, enabled=self.is_main) as bar:
            self._bar = bar
            if start > 1:
                bar.update(advance=start - 1)
            if start == 1 and self.rl.eval_every:
                out = self._held_out_eval(0)
                if self.rl.stop_on_warning:
                    self._stop_on_warning(0, out)
            for step in range(start, self.rl.steps + 1):
                if self.state["stopped_early"]:
                    break
                yield step
        self._bar = None

    def rollout_metrics(self, ro, beta: float) -> dict[str, float]:
        """objective/*, rollout/* over the global batch."""
        k1 = sequence_kl(kl_k1(ro.logprobs, ro.ref_logprobs), ro.mask)        # (B,)
        ent = (ro.entropy * ro.mask).sum(-1)                                   # (B,)
        local = torch.stack([torch.tensor(float(ro.batch_size)), ro.scores.sum().cpu(), k1.sum().cpu(),
                             ent.sum().cpu(), ro.lengths.sum().cpu(), ro.eos.float().sum().cpu(),
                             (ro.scores.cpu() - beta * k1.cpu()).sum()]).double()
        n, score, kl, ent_s, length, eos, rlhf = self.stats.sum(local).tolist()
        return {"objective/kl": kl / n, "objective/scores": score / n, "objective/rlhf_reward": rlhf / n,
                "objective/non_score_reward": -beta * kl / n, "objective/entropy": ent_s / n,
                "rollout/length_mean": length / n, "rollout/eos_rate": eos / n, "kl/beta": beta}

    def end_step(self, step: int, ro, update_metrics: dict[str, float], extra: dict | None = None) -> None:
        rl = self.rl
        beta = self.kl_ctl.value
        metrics = self.rollout_metrics(ro, beta)
        metrics.update(update_metrics)
        metrics.update(extra or {})
        self.kl_ctl.update(metrics["objective/kl"], rl.batch_size)
        self.scheduler.step()
        status = kl_status(metrics["objective/kl"], rl.kl_caution, rl.kl_warning)
        self.state["kl_status_steps"][status] += 1
        if status != self.state["last_status"] and self.is_main:
            print(f"[{self.algo}] step {step}: KL {metrics['objective/kl']:.2f} nats -> {status} "
                  f"(caution > {rl.kl_caution:g}, warning > {rl.kl_warning:g})", file=sys.stderr)
        self.state["last_status"] = status
        self.state["time_rollout"] += ro.seconds
        metrics.update({"kl/status": float(KL_STATUS.index(status)), "lr": self.scheduler.get_last_lr()[0],
                        "time/rollout": ro.seconds})
        self.state["step"] = step
        if self.state["curve"] is not None and rl.early_warning:
            from rlhflab.instruments.early_warning import CURVE_KEYS

            self.state["curve"].append({k: metrics[k] for k in CURVE_KEYS.values() if k in metrics})
        evaluated = bool(rl.eval_every) and (step % rl.eval_every == 0 or step == rl.steps)
        if evaluated:
            metrics.update(self._held_out_eval(step))
        if rl.attack_every and step % rl.attack_every == 0 and self.is_main:
            metrics.update(self._attack(step, ro))
            if "rm_attack/top_gain_ci_low" in metrics:
                self.state["warn_exploit"] = metrics["rm_attack/top_gain_ci_low"]
        if evaluated and self.is_main:
            metrics.update(self._warn_check(step, metrics))
        if evaluated and rl.stop_on_warning:
            self._stop_on_warning(step, metrics)
        if step % rl.log_every == 0 or step == rl.steps or any(k.startswith(("gold/", "rm_attack/", "warn/"))
                                                                for k in metrics):
            self.log.log(metrics, step=step)
        self.last_metrics = metrics
        if self._bar is not None:
            self._bar.update(reward=metrics["objective/scores"], kl=metrics["objective/kl"], beta=beta,
                             kl_status=status, **({"gold": metrics["gold/mean"]} if "gold/mean" in metrics else {}),
                             **self._warn_shown)
        if rl.save_every and step % rl.save_every == 0 and step < rl.steps and not self.state["stopped_early"]:
            self.save_checkpoint()

    # -- held-out evaluation and early stopping ----------------------------------------

    def _measure_world(self, step: int) -> tuple[dict[str, float], float]:
        """Gold utility of fresh samples on held-out world prompts, and the proxy's score of
        the same samples (proxy-vs-gold); selected on gold."""
        from rlhflab.instruments.policy_eval import measure_policy_on_world
        from rlhflab.rewards import score_responses

        measured, completions = measure_policy_on_world(
            self.policy_module, self.tokenizer, self.world, self.eval_prompts, self.cfg.generation,
            seed=derive_seed(self.rl.seed, "eval"))
        proxy = score_responses(self.reward, [p.text for p in self.eval_prompts],
                                [c.text for c in completions], [c.eos for c in completions])
        out = {k: v for k, v in measured.items() if k.startswith(("gold/mean", "samples/"))}
        out["eval/proxy_mean"] = float(proxy.float().mean())
        out["eval/proxy_minus_gold"] = out["eval/proxy_mean"] - out["gold/mean"]
        prompts = [p.text for p in self.eval_prompts]
        reads = self._reads(prompts, completions)
        out.update(self._shift(prompts, completions, reads))
        out.update(self._warn_features(prompts, prompts, completions, rendered=False, reads=reads))
        self.state["evals"].append({"step": step, "gold/mean": out["gold/mean"],
                                    "eval/proxy_mean": out["eval/proxy_mean"],
                                    **{k: v for k, v in out.items() if k.startswith("shift/")}})
        return out, out["gold/mean"]

    def _measure_user(self, step: int) -> tuple[dict[str, float], float]:
        """On the user's held-out prompts (``HeldOut``): the run's reward of fresh samples
        (``eval/proxy_mean``), the sampled KL from the reference (``eval/kl``) and, with a
        judge, its win-rate of the policy's answer over the reference's (``eval/win_rate``,
        with its interval); selected on the win-rate when a judge is given, else on the reward."""
        from rlhflab.instruments.judges import win_rate
        from rlhflab.instruments.policy_eval import sampled_kl
        from rlhflab.rewards import score_responses
        from rlhflab.sampling import sample

        h, g = self.held_out, self.cfg.generation
        kw = dict(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, max_new_tokens=g.max_new_tokens,
                  batch_size=g.batch_size, seed=derive_seed(self.rl.seed, "eval"), rendered=True)
        done = sample(self.policy_module, self.tokenizer, h.texts, **kw)
        texts, eos = [c.text for c in done], [c.eos for c in done]
        proxy = score_responses(self.reward, list(h.texts), texts, eos, rows=h.rows)
        rm_prompts = [r["prompt"] for r in h.rows] if h.rows else list(h.texts)
        reads = self._reads(rm_prompts, done)
        out = {"eval/proxy_mean": float(proxy.float().mean()),
               "eval/kl": sampled_kl(self.policy_module, self.reference, self.tokenizer, list(h.texts),
                                     max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                                     seed=derive_seed(self.rl.seed, "eval_kl"))["kl/sequence_mean"],
               "eval/length_mean": sum(len(c.token_ids) for c in done) / len(done),
               **self._shift(rm_prompts, done, reads),
               **self._warn_features(list(h.texts), rm_prompts, done, rendered=True, reads=reads)}
        if h.judge is not None:
            if h.reference_texts is None:  # the reference's answers: sampled once, the same every evaluation
                ref = sample(self.reference, self.tokenizer, h.texts, **kw)
                h.reference_texts, h.reference_eos = [c.text for c in ref], [c.eos for c in ref]
            verdict = h.judge.compare([r["prompt"] for r in h.rows], texts, h.reference_texts,
                                      eos_a=eos, eos_b=h.reference_eos)
            w = win_rate(verdict.prob_a)
            out.update({"eval/win_rate": w["win_rate"], "eval/win_rate_ci_low": w["ci_low"],
                        "eval/win_rate_ci_high": w["ci_high"]})
        entry = {"step": step, **{k: v for k, v in out.items()
                                  if k in ("eval/proxy_mean", "eval/kl", "eval/win_rate", "eval/win_rate_ci_high")
                                  or k.startswith("shift/")}}
        self.state["evals"].append(entry)
        if self.rl.early_warning:
            from rlhflab.instruments.early_warning import proxy_judge_readings

            out.update(proxy_judge_readings(self.state["evals"]))
        return out, out["eval/win_rate"] if h.judge is not None else out["eval/proxy_mean"]

    def _reads(self, prompts: list, completions) -> dict:
        """Per reward model of the run (by id), its features and member scores of these held-out
        samples, computed once for the readings that use them (``SampleReads``)."""
        from rlhflab.instruments.distribution_shift import SampleReads

        texts, eos = [c.text for c in completions], [c.eos for c in completions]
        return {id(m): SampleReads(m, prompts, texts, eos) for _, source in getattr(self.reward, "terms", ())
                if (m := getattr(source, "model", None)) is not None}

    def _shift(self, prompts: list, completions, reads: dict) -> dict[str, float]:
        """The distribution-shift readings (``instruments.distribution_shift``) of held-out
        samples under the first of the run's reward models that carries its training data's
        feature statistics (``rlhflab rm`` saves them); {} when none does."""
        from rlhflab.instruments.distribution_shift import shift_readings

        for _, source in getattr(self.reward, "terms", ()):
            model = getattr(source, "model", None)
            if model is not None and getattr(model, "feature_stats", None) is not None:
                return shift_readings(model, prompts, [c.text for c in completions],
                                      eos=[c.eos for c in completions], reads=reads.get(id(model)))
        return {}

    def _warn_model(self):
        """The reward model the early warning reads: the first of the run's reward sources that
        is one; None with reward functions only."""
        for _, source in getattr(self.reward, "terms", ()):
            model = getattr(source, "model", None)
            if model is not None:
                return model
        return None

    def _warn_reference(self, texts: list, rm_prompts: list, rendered: bool) -> dict:
        """The SFT policy's (the frozen reference's) two draws on the held-out prompts, with
        seeds of their own, read by the reward model once: per-member references
        (``early_warning.fit_reference``: draw A fits, draw B cuts) and the ensemble's spread
        on draw A. Drawn again after a resume (the same seeds, the same samples)."""
        if self._warn_ref is None:
            from rlhflab.instruments.distribution_shift import member_features
            from rlhflab.instruments.early_warning import ensemble_spread, fit_reference
            from rlhflab.sampling import sample

            rm, g = self._warn_model(), self.cfg.generation
            draws = []
            for k in (0, 1):
                done = sample(self.reference, self.tokenizer, list(texts), temperature=g.temperature, top_k=g.top_k,
                              top_p=g.top_p, max_new_tokens=g.max_new_tokens, batch_size=g.batch_size,
                              seed=derive_seed(self.rl.seed, "warn_reference", k), rendered=rendered)
                draws.append(([c.text for c in done], [c.eos for c in done]))
            fa, fb = (member_features(rm, rm_prompts, r, eos=e) for r, e in draws)
            spread = (ensemble_spread(rm.member_scores(rm_prompts, draws[0][0], eos=draws[0][1]))
                      if rm.n_members > 1 else None)
            self._warn_ref = {"refs": [fit_reference(a, b) for a, b in zip(fa, fb)], "spread": spread}
        return self._warn_ref

    def _warn_features(self, texts: list, rm_prompts: list, completions, rendered: bool,
                       reads: dict) -> dict[str, float]:
        """The early warning's reward-model readings of held-out samples
        (``instruments.early_warning``): the outlier rate and the shift of the samples' features
        against the SFT policy's, and an ensemble's disagreement against its own on the SFT
        policy's samples; {} without a reward model or with ``rl.early_warning`` off."""
        rm = self._warn_model()
        if rm is None or not completions or not self.rl.early_warning:
            return {}
        from rlhflab.instruments.early_warning import ensemble_spread, feature_readings

        ref = self._warn_reference(texts, rm_prompts, rendered)
        sample_reads = reads[id(rm)]
        out = feature_readings(sample_reads.features(), ref["refs"])
        if ref["spread"] is not None:
            spread = ensemble_spread(sample_reads.scores())
            out["warn/ensemble_std"] = spread
            if ref["spread"] > 0:
                out["warn/ensemble_ratio"] = spread / ref["spread"]
        return out

    def _warn_check(self, step: int, readings: dict) -> dict[str, float]:
        """The early-warning rule (``early_warning.triggers``) on an evaluation's readings and
        the last attack's exploit gain: ``warn/evals``, and at the first evaluation where a
        reading is past its bar ``warn/fired`` (the step) with ``warn/fired_<reading>``; {}
        when the run has none of the readings or ``rl.early_warning`` is off."""
        if not self.rl.early_warning:
            return {}
        from rlhflab.instruments.early_warning import curve_readings, triggers

        st = self.state
        r = {k: v for k, v in readings.items() if k.startswith("warn/")}
        if st["warn_exploit"] is not None:
            r["warn/exploit_gain"] = st["warn_exploit"]
        curve = curve_readings(st["curve"], self.rl.eval_every) if st["curve"] is not None else {}
        r.update(curve)
        if not r:
            return {}
        st["warn_evals"] += 1
        out = {"warn/evals": float(st["warn_evals"]), **curve}
        if "warn/exploit_gain" in r:
            out["warn/exploit_gain"] = r["warn/exploit_gain"]
        fired = triggers(r)
        if fired and st["warn_fired"] is None:
            st["warn_fired"], st["warn_fired_by"] = step, fired
            out["warn/fired"] = float(step)
            out.update({f"warn/fired_{name}": float(step) for name in fired})
            print(f"[{self.algo}] step {step}: early warning: " + ", ".join(
                f"{name} {r[f'warn/{name}']:.3g}" for name in fired) + " (instruments.early_warning)", file=sys.stderr)
        shown = {"shift": "warn/feature_shift_ratio", "ood": "warn/outlier_rate", "ens": "warn/ensemble_ratio"}
        self._warn_shown = {k: float(r[key]) for k, key in shown.items() if key in r}
        if st["warn_fired"] is not None:
            self._warn_shown["warned_at"] = st["warn_fired"]
        return out

    def _stop_on_warning(self, step: int, metrics: dict) -> None:
        """``rl.stop_on_warning``: at an evaluation where the warning did not fire, keep the
        policy in ``before_warning/``; at the one where it first fires, stop the run, and
        ``finish`` restores the kept policy (the same decision on every process)."""
        from accelerate.utils import broadcast

        flag = torch.tensor([float(self.is_main and "warn/fired" in metrics)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = broadcast(flag)
        if flag.item() == 0:
            if self.out_dir is not None:
                self._save_policy(self.out_dir / "before_warning")
            self.state["warn_kept_step"] = step
            return
        self.state.update(stopped_early=True, stopped_on_warning=step)
        if self.is_main:
            print(f"[{self.algo}] step {step}: stopping on the early warning (rl.stop_on_warning); keeping the "
                  f"policy of step {self.state['warn_kept_step']}", file=sys.stderr)

    def _attack_target(self):
        """(reward model, reduce, k) that ``rl.attack_every`` attacks: the first of the run's
        reward sources that is one (``rewards.ModelReward``), its members combined as it
        combines them."""
        from rlhflab.errors import InputError

        for _, source in getattr(self.reward, "terms", ()):
            model = getattr(source, "model", None)
            if model is not None:  # with the members combined as the run combines them (rl.rm_reduce)
                k = getattr(source, "k", None)
                return model, getattr(source, "reduce", "mean"), 1.0 if k is None else k
        raise InputError("rl.attack_every attacks the run's reward model, and this run has none (reward functions "
                         "only): set it to 0 or give --rm", field="rl.attack_every")

    def _attack(self, step: int, ro) -> dict:
        """The cheap reward-model attack (``instruments.rm_attack.CHEAP``) on this step's samples:
        the first sample of each of the first prompts is searched, the samples of the other
        prompts are the held-out responses its patterns are inserted into; the
        ``rm_attack/...`` readings (the top pattern's text included: text stays in
        metrics.jsonl, trackers get the numbers) and the time it took."""
        from rlhflab.instruments.rm_attack import CHEAP, Response, attack_reward_model

        t = time.perf_counter()
        rows = self.local_rows_of(step)[2]
        prompts = [r["prompt"] for r in rows] if rows is not None else list(ro.prompts)
        samples = [Response(p, text, bool(e)) for p, text, e in zip(prompts, ro.texts, ro.eos.tolist())]
        G = self.group_size
        n_prompts = len(samples) // G
        n_starts = min(CHEAP.starts, max(1, n_prompts // 2))
        starts = samples[: n_starts * G: G]
        held_out = samples[n_starts * G:][: CHEAP.held_out]
        settings = dataclasses.replace(CHEAP, seed=derive_seed(self.rl.seed, "attack", step))
        rm, reduce, k = self._attacked_rm
        record = attack_reward_model(rm, starts, held_out, settings, world=self.world, reduce=reduce, k=k)
        out = {k: v for k, v in record.items() if k.startswith("rm_attack/")}
        out["time/attack"] = time.perf_counter() - t
        return out

    @property
    def selection_key(self) -> str | None:
        """What early stopping and the best model select on: gold on the world, the judge's
        win-rate or else the run's reward on the user's held-out prompts, None without either."""
        if self.world is not None and self.eval_prompts:
            return "gold/mean"
        if self.held_out is not None:
            return "eval/win_rate" if self.held_out.judge is not None else "eval/proxy_mean"
        return None

    def _held_out_eval(self, step: int) -> dict[str, float]:
        """The held-out readings of ``step`` (world or user prompts), then early stopping:
        after ``rl.early_stop_patience`` evaluations without a new best the run stops, and
        ``finish`` restores the best policy."""
        key = self.selection_key
        if key is None:
            return {}
        from accelerate.utils import broadcast

        out: dict[str, float] = {}
        flag = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)  # stop, -, improved
        # sharded: every process gathers the policy and the reference, the main one decodes
        with all_whole_weights(self.policy, self.reference):
            if self.is_main:
                out, value = self._measure_world(step) if key == "gold/mean" else self._measure_user(step)
                improved = self.state["best_eval"] is None or value > self.state["best_eval"]
                if improved:
                    self.state.update(best_eval=value, best_step=step, bad_evals=0)
                else:
                    self.state["bad_evals"] += 1
                stop = bool(self.rl.early_stop_patience) and self.state["bad_evals"] >= self.rl.early_stop_patience
                flag[0], flag[1], flag[2] = float(stop), 1.0, float(improved)
                if step == 0:
                    out.update(self._warn_check(0, out))
                    self.log.log(out, step=0)
        if self.accelerator.num_processes > 1:
            flag = broadcast(flag)
        if flag[2].item() > 0 and self.rl.early_stop_patience and self.out_dir is not None:
            self._save_policy(self.out_dir / "best")
        if flag[0].item() > 0:
            self.state["stopped_early"] = True
            if self.is_main:
                print(f"[{self.algo}] step {step}: {key} has not improved for {self.rl.early_stop_patience} "
                      f"evaluations; stopping (best at step {self.state['best_step']})", file=sys.stderr)
        return out

    def _save_policy(self, path: Path) -> None:
        """The policy, whole, saved in ``path`` by the main process (``save_pretrained``);
        every process must call it: a sharded policy is gathered (``distributed.gathered``)."""
        from rlhflab.models import save_pretrained_atomic

        whole = gathered(self.accelerator, self.policy)
        if self.is_main:
            save_pretrained_atomic(whole, self.tokenizer, path)
        self.accelerator.wait_for_everyone()

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint_state(self) -> dict:
        return {**self.state, "kl_controller": self.kl_ctl.state_dict(), "algo": self.algo}

    def save_checkpoint(self) -> None:
        from rlhflab.checkpoint import save_checkpoint, whole_optimizer_state

        self.accelerator.wait_for_everyone()
        if self.out_dir is None:
            return
        # sharded: the weights and AdamW's moments gathered whole (every process takes part), so
        # the checkpoint is the one an unsharded run writes
        policy = gathered(self.accelerator, self.policy)
        value = gathered(self.accelerator, self.value) if self.value is not None else None
        optimizer_state = whole_optimizer_state(self.optimizer_raw) if self.sharded else None
        if self.is_main:
            save_checkpoint(self.out_dir / "checkpoint", policy=policy, value=value, optimizer=self.optimizer_raw,
                            optimizer_state=optimizer_state, scheduler=self.scheduler, state=self.checkpoint_state())
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        from rlhflab.checkpoint import load_checkpoint

        state = load_checkpoint(path, policy=self.policy_module, value=self.value_module,
                                optimizer=self.optimizer_raw, scheduler=self.scheduler)
        self.kl_ctl.load_state_dict(state.pop("kl_controller"))
        if "best_gold" in state:  # checkpoints written before held-out evaluation on user data
            state["best_eval"] = state.pop("best_gold")
        state.pop("algo", None)
        state.setdefault("curve", None)  # written before the curve readings: none after the resume
        self.state.update(state)

    # -- the end -----------------------------------------------------------------------

    def finish(self, extra: dict | None = None) -> dict:
        """Restore the best policy (early stopping), save model/ (and value/), summarise."""
        from rlhflab.artifacts import write_json
        from rlhflab.models import save_pretrained_atomic

        self.log.close()
        restored = False
        best = self.out_dir / "best" if self.out_dir is not None else None
        if self.state.get("stopped_on_warning") is not None and best is not None:
            best = self.out_dir / "before_warning"  # the policy of the evaluation before the warning
        if self.state["stopped_early"] and best is not None:  # the same decision on every process
            self.accelerator.wait_for_everyone()
            if (best / "model.safetensors").is_file() and self.sharded:  # each process keeps its shards
                from safetensors.torch import load_file

                from rlhflab.distributed import load_whole_state

                load_whole_state(self.policy, load_file(str(best / "model.safetensors")))
                restored = True
            elif (best / "model.safetensors").is_file():
                from safetensors.torch import load_model

                load_model(self.policy_module, str(best / "model.safetensors"), strict=False)
                restored = True
        st = self.state
        total = st["time_rollout"] + st["time_update"]
        summary = {
            "algo": self.algo, "steps": st["step"], "processes": self.accelerator.num_processes,
            **{k: v for k, v in self.last_metrics.items() if k.startswith(("objective/", "rollout/", "kl/"))},
            "gold/initial": st["evals"][0].get("gold/mean") if st["evals"] else None,
            "gold/final": st["evals"][-1].get("gold/mean") if st["evals"] else None,
            "gold/best": st["best_eval"] if self.selection_key == "gold/mean" else None,
            "gold/best_step": st["best_step"] if self.selection_key == "gold/mean" else None,
            "eval/selected_on": self.selection_key,
            "eval/best": st["best_eval"], "eval/best_step": st["best_step"],
            "eval/proxy_initial": st["evals"][0]["eval/proxy_mean"] if st["evals"] else None,
            "eval/proxy_final": st["evals"][-1]["eval/proxy_mean"] if st["evals"] else None,
            "eval/win_rate_initial": st["evals"][0].get("eval/win_rate") if st["evals"] else None,
            "eval/win_rate_final": st["evals"][-1].get("eval/win_rate") if st["evals"] else None,
            "early_stop/stopped": st["stopped_early"], "early_stop/restored_best": restored,
            **({"warn/stopped_at": float(st["stopped_on_warning"]), "warn/kept_step": st["warn_kept_step"]}
               if st.get("stopped_on_warning") is not None else {}),
            **({"warn/evals": float(st["warn_evals"])} if st["warn_evals"] else {}),
            **({"warn/fired": float(st["warn_fired"]),
                **{f"warn/fired_{name}": float(st["warn_fired"]) for name in st["warn_fired_by"]}}
               if st["warn_fired"] is not None else {}),
            "kl/status_steps": st["kl_status_steps"], "evals": st["evals"],
            "time/rollout": st["time_rollout"], "time/update": st["time_update"],
            "time/rollout_share": st["time_rollout"] / total if total else None,
            **(extra or {}),
        }
        # the whole models on the main process (sharded: gathered from every process)
        policy = gathered(self.accelerator, self.policy) if self.out_dir is not None else None
        value = gathered(self.accelerator, self.value) if self.out_dir is not None and self.value is not None else None
        if self.is_main and self.out_dir is not None:
            save_pretrained_atomic(policy, self.tokenizer, self.out_dir / "model")
            if value is not None:
                from safetensors.torch import save_model

                from rlhflab.artifacts import check_finite_weights

                check_finite_weights(value, "the value model", self.out_dir / "value.safetensors")
                save_model(value, str(self.out_dir / "value.safetensors"))
            write_json(self.out_dir / "metrics.json", summary)
        self.accelerator.wait_for_everyone()
        return summary
