"""An external sampler (``rl.sampler``, ``rlhflab.samplers``) through the CLI on
configs/tiny.yaml: the in-process copy of the policy that learns the trainer's weights only
through ``load_weights``, synced (the engine's run, step for step), left stale (the mismatch
guard stops the run), stale under TIS (the run goes on, weighting the tokens); vllm where it
is not installed; a factory that is not one."""

from __future__ import annotations

import importlib.util
import json

import pytest

from rlhflab.cli import main
from rlhflab.samplers import InProcessSampler
from tests.component.test_rl_rollout import tiny_policy_dir
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")
# two prompts x 4 samples, two minibatches: the second optimizer step of step 1 already runs on
# weights the sampler has not seen, and step 2 samples from them
FAST = ["--set", "rl.steps=3", "--set", "rl.batch_size=8", "--set", "rl.samples_per_prompt=4",
        "--set", "generation.max_new_tokens=8", "--set", "rl.eval_every=0", "--set", "rl.lr=3e-2"]
COPY = "rlhflab.samplers:InProcessSampler"
STALE = "tests.smoke.test_cli_samplers:stale_copy"


class StaleCopy(InProcessSampler):
    """The copy with its sync switched off after the first: it keeps the weights the run
    started from, as an engine whose weight updates fail silently would."""

    def load_weights(self, named_tensors) -> None:
        if not getattr(self, "_loaded", False):
            super().load_weights(named_tensors)
            self._loaded = True


def stale_copy(policy, tokenizer):
    return StaleCopy(policy, tokenizer)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    return str(tiny_policy_dir(tmp_path_factory.getbasetemp()))


def _run(sft, out, *extra) -> int:
    return main(["grpo", "--config", TINY, "--sft", sft, "--reward-fn", "length", "--out", str(out), *FAST, *extra])


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_synced_external_sampler_trains_as_the_engine(sft, tmp_path):
    """Synced before each rollout, the copy draws the engine's samples (the same scores and
    lengths at every step) with the engine's log-probs to float rounding, so the run is the
    engine's: every loss and reading within 1e-5 relative (measured 2e-9 to 8e-7), the guard's
    gap under 1e-5 nats (measured 9.5e-7) and the final weights within 1e-3 (measured 2.2e-4
    after 3 steps that moved them by 0.18; Adam's normalized steps magnify the rounding of
    near-zero gradients). Not bit for bit: the copy's weights sit at other addresses, and
    the CPU's matrix kernels round by alignment; the entropy comes from a forward pass of the
    policy instead of the decoding pass."""
    engine, external = tmp_path / "engine", tmp_path / "external"
    assert _run(sft, engine) == 0
    assert _run(sft, external, "--set", f"rl.sampler={COPY}") == 0
    a, b = _rows(engine), _rows(external)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["objective/scores"] == ra["objective/scores"]
        assert rb["rollout/length_mean"] == ra["rollout/length_mean"]
        assert rb["rollout/logprob_diff_max"] < 1e-5  # the guard's reading: the trainer agrees with the copy
        for key in ("loss/policy", "loss/kl", "objective/kl", "objective/entropy", "policy/ratio_mean",
                    "policy/approxkl", "policy/grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (engine, external))
    start = load_file(f"{sft}/model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 0.1  # it trained


def test_a_lora_policy_sends_its_merged_weights(sft, tmp_path):
    """With LoRA the copy is the plain model, sent W + (alpha / r) B A after each update: it
    draws the engine's samples and the guard's gap stays at float rounding (measured 4.8e-7
    nats). Sent the base weights alone it would be a stale sampler, stopped at step 2."""
    lora = ["--set", "lora.r=4"]
    engine, external = tmp_path / "engine", tmp_path / "external"
    assert _run(sft, engine, *lora) == 0
    assert _run(sft, external, *lora, "--set", f"rl.sampler={COPY}") == 0
    for ra, rb in zip(_rows(engine), _rows(external), strict=True):
        assert rb["objective/scores"] == ra["objective/scores"]
        assert rb["rollout/logprob_diff_max"] < 1e-5
        assert rb["loss/policy"] == pytest.approx(ra["loss/policy"], rel=1e-5)


def test_a_stale_sampler_is_stopped_by_the_mismatch_guard(sft, tmp_path, capsys):
    """Without the sync the copy samples step 2 from the weights of step 0: the trainer's
    log-probs disagree by far more than rl.mismatch_tolerance and the run stops at step 2 with
    one line naming the sampler, exit 1, no model written."""
    out = tmp_path / "stale"
    assert _run(sft, out, "--set", f"rl.sampler={STALE}") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    assert "step 2" in err[0] and "rl.mismatch_tolerance" in err[0] and f"rl.sampler={STALE}" in err[0], err[0]
    assert not (out / "model").exists()


def test_tis_trains_through_a_stale_sampler(sft, tmp_path):
    """With rl.tis_cap the trainer scores the stale copy's samples itself: the run goes on,
    the old log-probs are the trainer's (first-update ratio 1), and from step 2 each token is
    weighted by min(pi_train / pi_stale, C). At C = 1 every weight is at most 1, and below it
    wherever the trained policy gives a sampled token less probability than the stale copy did:
    mean 0.903 and 0.781 at steps 2 and 3 (measured), against 1 to float rounding at step 1,
    drawn from the weights it trains. (At C = 2 the mean estimates E_stale[min(ratio, 2)] <= 1
    from one batch: 0.993, 0.954, then 1.026 at a fourth step.)"""
    out = tmp_path / "tis"
    assert _run(sft, out, "--set", f"rl.sampler={STALE}", "--set", "rl.tis_cap=1") == 0
    rows = _rows(out)
    assert rows[0]["rollout/tis_weight_mean"] == pytest.approx(1, abs=1e-5)
    assert rows[0]["rollout/logprob_diff_max"] < 1e-5
    for r in rows[1:]:
        assert r["rollout/logprob_diff_max"] > 1e-2
        assert r["rollout/first_ratio_mean"] == pytest.approx(1, abs=1e-5)
        assert r["rollout/tis_weight_mean"] < 0.95
    assert (out / "model" / "model.safetensors").is_file()


class NotASampler:
    def __init__(self, policy, tokenizer) -> None:
        self.policy = policy


@pytest.mark.parametrize("sampler, extra, message", [
    ("vllm", [], "vllm is not installed"),
    ("nosuchmodule:factory", [], "cannot import 'nosuchmodule'"),
    ("tests.smoke.test_cli_samplers:NotASampler", [], "not a sampler"),
    ("rlhflab.samplers:policy_weights", [], "factory(policy, tokenizer)"),
    ("mysampler", [], "expected engine, vllm or module:factory"),
    (COPY, ["--set", "rl.sharding=fsdp2"], "rl.sharding=ddp"),
])
def test_a_sampler_that_cannot_be_had_exits_2_with_one_line(sampler, extra, message, sft, tmp_path, capsys):
    """vllm is not installed here (and cannot be beside this project's torch); a factory that
    does not import, returns no sampler or takes other arguments; a word that is none of the
    names; a sharded policy, whose whole weights nothing gathers for the sampler."""
    if sampler == "vllm" and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    out = tmp_path / "out"
    assert _run(sft, out, "--set", f"rl.sampler={sampler}", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rl.sampler" in err[0] and message in err[0], err
    assert not out.exists()


def test_online_dpo_refuses_a_sampler_it_would_not_read(sft, tmp_path, capsys):
    """`rlhflab iterate --method online-dpo` samples its pairs with the engine: rl.sampler
    there is one line, exit code 2, not a setting silently ignored."""
    out = tmp_path / "it"
    assert main(["iterate", "--config", TINY, "--sft", sft, "--method", "online-dpo", "--out", str(out),
                 "--set", f"rl.sampler={COPY}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rl.sampler" in err[0] and "online DPO" in err[0], err
    assert not out.exists()
