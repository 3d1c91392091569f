"""SFT, the reward model and DPO on tiny models, run by tests/component/test_sharding.py under
``torch.distributed.run`` (gloo, CPU) with ``<stage>.sharding=fsdp2``, and alone (one
process, the plain loop): each stage's training function as the CLI calls it, with
micro-batches of 4 (SFT's unpacked), its metrics.jsonl, and the whole trained model that ``distributed.gathered`` returns, saved with
``save_pretrained`` into ``OUT/<stage>/model``.

The SFT policy is a Llama (rotary frequencies, a non-persistent buffer the state dict does
not carry; its embeddings untied), the reward model and the DPO policy GPT-2 with tied
embeddings: both traps of a gathered save. Rank 0 also reloads each saved model in plain
transformers and records the largest logit difference to the gathered model (``reload.json``).
DPO's monitor, called where it decodes (on rank 0, the weights gathered every 2 steps),
records the sum of the weights it is given, so the test sees that the gathered weights
mid-run are the one-process run's. After SFT every process samples its own prompts (a
different number each) inside ``distributed.whole_weights``, and rank 0 samples them all
again with the whole model (``decode-*.json``).

    python -m torch.distributed.run --nproc_per_node 2 tests/component/fsdp_worker.py OUT fsdp2
    python tests/component/fsdp_worker.py OUT ddp

With a third argument ``rl``, online RL instead (``main_rl``, run by
tests/component/test_sharding_rl.py): GRPO and PPO, sharded or on one process, the same way;
KEY=VALUE arguments after it are more overrides (4 processes need ``rl.batch_size=16``).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(out: Path, strategy: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhflab.algos.dpo import attach_reference_logps, freeze, tokenize_pairs, train_dpo
    from rlhflab.algos.reward_model import rows_to_groups, tokenize_groups, train_reward_model
    from rlhflab.algos.sft import tokenize_rows, train_sft
    from rlhflab.config import load_config
    from rlhflab.distributed import gathered, make_accelerator, whole_weights
    from rlhflab.models import create_causal_lm, load_causal_lm, save_pretrained_atomic
    from rlhflab.reward_model import create_reward_model
    from rlhflab.sampling import sample
    from rlhflab.world import World

    acc = make_accelerator("no")
    main_process = acc.is_main_process
    steps = {f"{s}.{k}": v for s in ("sft", "rm", "dpo") for k, v in
             (("max_steps", 4), ("eval_every", 2), ("log_every", 1), ("batch_size", 16), ("sharding", strategy),
              ("micro_batch_size", 4))}  # accumulation over micro-batches: 2 per process, 4 alone
    # SFT unpacked: one process cuts passes by length, the sharded loop in fixed sizes
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in steps.items()] + ["sft.packing=false"])
    world = World(cfg.world)
    tok = world.tokenizer(cfg.model.max_positions)
    reload: dict = {}
    ids = torch.randint(4, len(tok), (3, 10), generator=torch.Generator().manual_seed(3))

    def save(stage: str, model, reader) -> None:
        reload[f"{stage}_param_types"] = sorted({type(p).__name__ for p in model.parameters()})
        if strategy == "fsdp2":  # what is not a shard after training (the test names it)
            reload[f"{stage}_plain"] = [n for n, p in model.named_parameters() if type(p).__name__ != "DTensor"]
        whole = gathered(acc, model)  # every process; the whole model on rank 0
        if main_process:
            save_pretrained_atomic(whole, tok, out / stage / "model")
            again = reader.from_pretrained(str(out / stage / "model"))
            with torch.no_grad():
                reload[stage] = (again(input_ids=ids).logits - whole(input_ids=ids).logits).abs().max().item()
        acc.wait_for_everyone()

    for stage in ("sft", "rm", "dpo"):
        (out / stage).mkdir(parents=True, exist_ok=True)

    # SFT on a Llama: rotary buffers
    llama = load_config(None, ["model.arch=llama", "model.d_model=32", "model.n_layers=2", "model.n_heads=2"])
    model = create_causal_lm(llama.model, tok, seed=0)
    train, _ = tokenize_rows(world.sft_examples(64), tok, cfg.sft.max_length)
    held, _ = tokenize_rows(world.sft_examples(24, "sft_eval"), tok, cfg.sft.max_length)
    train_sft(cfg.sft, model, tok, train, held, out / "sft", acc)
    # Decoding: each process its own prompts, as many as its rank + 3 (so a different number
    # of passes), with the weights gathered once; then rank 0 draws every process's prompts
    # from the same seeds with the whole model a save writes.
    prompts = [p.text for p in world.prompts(12, "eval")]
    shares = [prompts[3 * r:3 * r + 3 + r] for r in range(acc.num_processes)]

    def draw(policy, share):
        return [c.text for c in sample(policy, tok, share, temperature=1.0, max_new_tokens=16, batch_size=2, seed=7)]

    with whole_weights(model):
        (out / "sft" / f"decode-{acc.process_index}.json").write_text(json.dumps(draw(model, shares[acc.process_index])))
    reload["sft_after_decode"] = sorted({type(p).__name__ for p in model.parameters()})
    save("sft", model, AutoModelForCausalLM)
    whole = gathered(acc, model)
    if main_process:
        (out / "sft" / "decode-whole.json").write_text(json.dumps([draw(whole, share) for share in shares]))

    # The reward model and DPO on an untrained GPT-2 (tied embeddings), the same on every run
    backbone = out / "backbone"
    if main_process:
        save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, backbone)
    acc.wait_for_everyone()
    rm, rm_tok = create_reward_model(backbone, seed=0)
    groups, _ = rows_to_groups(world.preference_pairs(64, "pref"))
    held_groups, _ = rows_to_groups(world.preference_pairs(20, "pref_eval"))
    tokenize_groups(groups, rm_tok, cfg.rm.max_length)
    tokenize_groups(held_groups, rm_tok, cfg.rm.max_length)
    train_reward_model(cfg.rm, rm, rm_tok, groups, held_groups, out / "rm", acc)
    save("rm", rm, AutoModelForSequenceClassification)

    policy = load_causal_lm(backbone, tok)
    pairs, _ = tokenize_pairs(world.preference_pairs(64, "pref"), tok, cfg.dpo.max_length)
    held_pairs, _ = tokenize_pairs(world.preference_pairs(20, "pref_eval"), tok, cfg.dpo.max_length)
    reference = freeze(copy.deepcopy(policy))
    for examples in (pairs, held_pairs):
        attach_reference_logps(reference, examples, tok.pad_token_id, acc.device)

    def monitor(step: int, whole) -> dict:
        return {"monitor/weight_sum": sum(p.double().sum().item() for p in whole.parameters())}

    cfg.dpo.world_eval_every = 2
    train_dpo(cfg.dpo, policy, None, tok, pairs, held_pairs, out / "dpo", acc, monitor)
    save("dpo", policy, AutoModelForCausalLM)
    if main_process:
        (out / "reload.json").write_text(json.dumps({"processes": acc.num_processes, **reload}))
    acc.wait_for_everyone()


def main_rl(out: Path, strategy: str, more: list[str] | None = None) -> None:
    """GRPO and PPO through ``commands.rl.run_rl`` (the CLI's path) with ``rl.sharding`` =
    ``strategy``, from one untrained tiny GPT-2 (tied embeddings) as the SFT policy and
    reference, on the world's gold reward, 3 steps, held-out gold evaluations at steps 0, 2
    and 3 (PPO stops early after step 2's). The sharded launch also runs GRPO for 2 steps with a
    checkpoint at step 1 and resumes it to 3 steps (``OUT/grpo/resumed``). Each rollout's texts are written per process and step (``OUT/<algo>/samples/``);
    after the run, rank 0 reloads the saved model in plain transformers and records its
    largest logit difference to the weights ``distributed.gathered`` returns
    (``OUT/<algo>/reload.json``, with the parameter types of the run's models)."""
    from transformers import AutoModelForCausalLM

    from rlhflab.algos.online import OnlineRun
    from rlhflab.commands.rl import run_rl
    from rlhflab.config import load_config
    from rlhflab.distributed import gathered, make_accelerator
    from rlhflab.models import create_causal_lm, save_pretrained_atomic
    from rlhflab.world import World

    acc = make_accelerator("no")
    rank = acc.process_index
    base = load_config(ROOT / "configs" / "tiny.yaml")
    world = World(base.world)
    tok = world.tokenizer(base.model.max_positions)
    sft = out / "sft"
    if acc.is_main_process:
        save_pretrained_atomic(create_causal_lm(base.model, tok, seed=0), tok, sft)
    acc.wait_for_everyone()
    ids = torch.randint(4, len(tok), (3, 10), generator=torch.Generator().manual_seed(3))
    seen: dict = {}
    rollout, finish = OnlineRun.rollout, OnlineRun.finish

    def recorded_rollout(self, step):
        ro = rollout(self, step)
        (seen["dir"] / f"{rank}-{step}.json").write_text(json.dumps(ro.texts))
        return ro

    def checked_finish(self, extra=None):
        summary = finish(self, extra)
        seen["types"] = {name: sorted({type(p).__name__ for p in m.parameters()})
                         for name, m in (("policy", self.policy), ("reference", self.reference),
                                         ("value", self.value)) if m is not None}
        whole = gathered(self.accelerator, self.policy)  # every process; the whole policy on rank 0
        if self.is_main:
            with torch.no_grad():
                seen["logits"] = whole(input_ids=ids).logits
        return summary

    OnlineRun.rollout, OnlineRun.finish = recorded_rollout, checked_finish
    # one minibatch of all the rows (so that one process's update is the same: its minibatches
    # would hold other rows than two processes' halves), two epochs (the second at a ratio other
    # than 1, so the clip acts), micro-batches of 2 (accumulation); PPO with early stopping: the
    # untrained policy's gold is the same at every evaluation, so it stops after the evaluation
    # at step 2 and restores the best policy (step 0's, saved gathered) into its shards
    settings = {"grpo": ["rl.samples_per_prompt=4", "rl.num_minibatches=1", "rl.epochs=2"],
                "ppo": ["rl.num_minibatches=1", "rl.epochs=2", "rl.early_stop_patience=1"]}
    for algo, extra in settings.items():
        seen["dir"] = out / algo / "samples"
        seen["dir"].mkdir(parents=True, exist_ok=True)
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            "rl.steps=3", "rl.batch_size=8", "rl.micro_batch_size=2", "rl.eval_every=2", "rl.n_eval=4",
            "rl.lr=3e-3", "rl.max_grad_norm=0.5", "generation.max_new_tokens=8", f"rl.sharding={strategy}",
            *extra, *(more or [])])
        run_rl(cfg, algo, out / algo / "run", sft=str(sft), reward_fns=["gold"])
        if algo == "grpo" and strategy == "fsdp2":  # the same run cut after step 2 (a checkpoint at step 1)
            seen["dir"] = out / algo / "resumed-samples"  # and extended to 3 steps from it with --resume
            seen["dir"].mkdir(parents=True, exist_ok=True)
            cut = load_config(None, [*(f"{k}={v}" for k, v in (("rl.steps", 2), ("rl.save_every", 1)))])
            cfg.rl.steps, cfg.rl.save_every = cut.rl.steps, cut.rl.save_every
            run_rl(cfg, algo, out / algo / "resumed", sft=str(sft), reward_fns=["gold"])
            again = load_config(out / algo / "resumed" / "config.yaml", ["rl.steps=3"])
            run_rl(again, algo, out / algo / "resumed", sft=str(sft), reward_fns=["gold"], resume=True)
        if acc.is_main_process:
            again = AutoModelForCausalLM.from_pretrained(str(out / algo / "run" / "model"))
            with torch.no_grad():
                diff = (again(input_ids=ids).logits - seen["logits"]).abs().max().item()
            (out / algo / "reload.json").write_text(json.dumps({"processes": acc.num_processes, "reload": diff,
                                                                 "types": seen["types"]}))
        acc.wait_for_everyone()


if __name__ == "__main__":
    if sys.argv[3:4] == ["rl"]:  # OUT STRATEGY rl [KEY=VALUE ...]
        main_rl(Path(sys.argv[1]), sys.argv[2], sys.argv[4:])
    else:
        main(Path(sys.argv[1]), sys.argv[2])
