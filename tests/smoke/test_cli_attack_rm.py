"""``rlhflab attack-rm`` on configs/tiny.yaml and on a user's data: it finds a token planted in
a preference file (and not when the token is not planted), writes adversarial pairs that
``rlhflab rm --adversarial`` trains on, runs periodically in RL (``rl.attack_every``), and
refuses bad input in one line with exit code 2."""

from __future__ import annotations

import json
import random

import pytest

from rlhflab.cli import main
from rlhflab.config import load_config
from rlhflab.data import load_rows
from rlhflab.models import create_causal_lm, save_pretrained_atomic
from rlhflab.world import World
from tests.user_models import CORPUS, bpe_tokenizer, tiny_causal_lm

FAST_RM = ["--set", "rm.max_steps=4", "--set", "rm.batch_size=8", "--set", "rm.n_prompts=24",
           "--set", "rm.n_eval_prompts=8", "--set", "rm.n_reference=16"]
TINY_ATTACK = ["--starts", "3", "--budget", "3", "--candidates", "16", "--held-out", "8", "--patterns", "4"]


@pytest.fixture(scope="module")
def world_runs(tmp_path_factory, tiny_config_path):
    """A tiny untrained policy laid out as `rlhflab sft` writes it, a reward model on it, and an
    attack on that reward model (the commands, not the models' quality, are under test)."""
    cfg = load_config(tiny_config_path)
    tok = World(cfg.world).tokenizer(cfg.model.max_positions)
    d = tmp_path_factory.mktemp("attack_cli")
    save_pretrained_atomic(create_causal_lm(cfg.model, tok, seed=0), tok, d / "sft" / "model")
    assert main(["rm", "--config", str(tiny_config_path), "--sft", str(d / "sft"), "--out", str(d / "rm"),
                 *FAST_RM]) == 0
    assert main(["attack-rm", "--config", str(tiny_config_path), "--rm", str(d / "rm"), "--policy", str(d / "sft"),
                 "--out", str(d / "attack"), *TINY_ATTACK]) == 0
    return d


def test_attack_json_holds_exploits_patterns_probes_truth_and_readings(world_runs, capsys):
    capsys.readouterr()
    record = json.loads((world_runs / "attack" / "attack.json").read_text())
    assert record["starts_from"].startswith("samples of") and record["cost"]["starts_searched"] == 3
    assert record["settings"]["steps"] == 3 and record["cost"]["sequences_scored"] > 0
    assert len(record["held_out"]) == 8 and 0 < len(record["patterns"]) <= 4
    for e in record["exploits"]:  # every found response carries the truth on world prompts
        assert {"gold_start", "gold_found", "rater_start", "rater_found"} <= set(e)
        assert e["reward_found"] - e["reward_start"] == pytest.approx(e["gain"])
        assert e["search_reward"] == pytest.approx(e["reward_found"], abs=1e-4)  # ids scored = text served
    ranked = [p["ci_low"] for p in record["patterns"]]
    assert ranked == sorted(ranked, reverse=True)
    assert all("gold_gain" in p and p["ci_low"] <= p["gain"] <= p["ci_high"] for p in record["patterns"])
    assert {"length", "keyword/certainly", "agreement", "refusal", "repetition"} <= set(record["probes"])
    assert record["rm_attack/top_pattern"] == record["patterns"][0]["text"]
    assert record["rm_attack/gold_gain"] == record["patterns"][0]["gold_gain"]
    # diagnose reads the attack's directory: the rule is measured, not listed as missing
    assert main(["diagnose", str(world_runs / "attack"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "reward_exploit" not in result["not_measured"]
    # and its report
    assert main(["report", str(world_runs / "attack"), "--out", str(world_runs / "attack.html")]) == 0
    html = (world_runs / "attack.html").read_text()
    assert "What the reward model" in html and "probe: keyword/certainly" in html


def test_the_search_scores_what_a_length_residualized_reward_model_serves(world_runs, tiny_config_path):
    """With rm.length_residual the served reward subtracts a length term: the search's exact
    scores of token ids must still be the served reward of the found text."""
    rm, out = world_runs / "rm_len", world_runs / "attack_len"
    assert main(["rm", "--config", str(tiny_config_path), "--sft", str(world_runs / "sft"), "--out", str(rm),
                 "--set", "rm.length_residual=true", *FAST_RM]) == 0
    assert main(["attack-rm", "--config", str(tiny_config_path), "--rm", str(rm), "--out", str(out),
                 *TINY_ATTACK]) == 0
    record = json.loads((out / "attack.json").read_text())
    assert any(e["mode"] == "suffix" for e in record["exploits"])  # the length changes there
    for e in record["exploits"]:
        assert e["search_reward"] == pytest.approx(e["reward_found"], abs=1e-4)


def test_adversarial_pairs_in_trls_format_and_rm_trains_on_them(world_runs, tiny_config_path, capsys):
    pairs = [json.loads(line) for line in (world_runs / "attack" / "adversarial.jsonl").read_text().splitlines()]
    assert pairs and all(p["adversarial"] is True and {"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
    out = world_runs / "rm_adv"
    assert main(["rm", "--config", str(tiny_config_path), "--sft", str(world_runs / "sft"), "--out", str(out),
                 "--adversarial", str(world_runs / "attack"), *FAST_RM]) == 0
    m = json.loads((out / "metrics.json").read_text())
    labelled = load_rows(out / "data" / "adversarial.jsonl", "preference")
    assert m["adversarial/pairs_in"] == len(pairs) and m["data/source/adversarial"] == len(labelled) > 0
    assert m["adversarial/rater_labelled"] == len(pairs)  # world prompts: the raters label them
    assert all(len(r["votes"]) == 3 and sum(r["votes"]) >= 2 for r in labelled)
    assert m["data/pairs"] == m["data/pairs_in"] and m["data/pairs_in"] > len(labelled)  # appended to the rest
    assert 0.0 <= m["adversarial/accuracy"] <= 1.0
    assert m["adversarial/patterns"][0]["text"] == json.loads((world_runs / "attack" / "attack.json").read_text())[
        "patterns"][0]["text"] and "gain_after" in m["adversarial/patterns"][0]
    # rows someone labelled already (their votes) are taken as they are, world prompts too
    own = world_runs / "labelled.jsonl"
    own.write_text(json.dumps({**pairs[0], "chosen": pairs[0]["rejected"], "rejected": pairs[0]["chosen"],
                               "votes": [1, 1, 0]}) + "\n")
    assert main(["rm", "--config", str(tiny_config_path), "--sft", str(world_runs / "sft"), "--out",
                 str(world_runs / "rm_own"), "--adversarial", str(own), *FAST_RM]) == 0
    kept = load_rows(world_runs / "rm_own" / "data" / "adversarial.jsonl", "preference")
    assert [(r["chosen"], r["votes"]) for r in kept] == [(pairs[0]["rejected"], [1, 1, 0])]


def test_rl_attack_every_logs_the_readings(world_runs, tiny_config_path, capsys):
    out = world_runs / "ppo"
    assert main(["ppo", "--config", str(tiny_config_path), "--sft", str(world_runs / "sft"), "--rm",
                 str(world_runs / "rm"), "--out", str(out), "--set", "rl.steps=2", "--set", "rl.attack_every=2",
                 "--set", "rl.batch_size=8", "--set", "rl.eval_every=0"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    attacked = [r for r in rows if "rm_attack/top_gain" in r]
    assert [r["step"] for r in attacked] == [2] and isinstance(attacked[0]["rm_attack/top_pattern"], str)
    capsys.readouterr()
    assert main(["diagnose", str(out), "--json"]) == 0
    assert "reward_exploit" not in json.loads(capsys.readouterr().out)["not_measured"]


def test_rl_attack_every_without_a_reward_model_is_refused(world_runs, tiny_config_path, capsys):
    code = main(["ppo", "--config", str(tiny_config_path), "--sft", str(world_runs / "sft"), "--reward-fn", "gold",
                 "--out", str(world_runs / "ppo_fn"), "--set", "rl.steps=1", "--set", "rl.attack_every=1",
                 "--set", "rl.batch_size=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "rl.attack_every" in err[0]


# ---------------------------------------------------------- a token planted in a user's data

PLANT = " zebra"
SENTENCES = ["the sky is blue today", "i like to read books", "water boils at one hundred degrees",
             "cats sleep most of the day", "the train leaves at noon", "bread is made from flour",
             "music helps me focus", "the river runs to the sea", "my friend plays the piano",
             "the garden needs more water", "we walked along the beach", "the lamp is on the desk"]
QUESTIONS = ["tell me something", "what do you think?", "say a fact", "describe your day", "any news?", "talk to me"]


def _user_files(d, p_chosen: float, p_rejected: float, seed: int = 0):
    """A tiny Qwen2 with a BPE tokenizer (" zebra" one token of it) and 240 preference rows of
    two random sentences each, " zebra" appended to the chosen one with probability
    ``p_chosen`` and to the rejected one with ``p_rejected``; a prompt file whose
    ``completion`` column (the sentences, no zebra) gives the references."""
    rng = random.Random(seed)
    tok = bpe_tokenizer(corpus=CORPUS + SENTENCES + ["a zebra runs", "the zebra is here"] * 3)
    assert tok.tokenize(PLANT) == ["\u0120zebra"]
    tiny_causal_lm(tok, "qwen2").save_pretrained(str(d / "base"))
    tok.save_pretrained(str(d / "base"))
    rows = []
    for _ in range(240):
        a, b = rng.sample(SENTENCES, 2)
        rows.append({"prompt": rng.choice(QUESTIONS), "chosen": a + PLANT * (rng.random() < p_chosen),
                     "rejected": b + PLANT * (rng.random() < p_rejected)})
    (d / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": rng.choice(QUESTIONS), "completion": s}) + "\n"
                                             for s in SENTENCES * 2))


def _top_patterns(d, tiny_config_path, k: int = 3) -> list[dict]:
    assert main(["rm", "--config", str(tiny_config_path), "--data", str(d / "prefs.jsonl"), "--backbone",
                 str(d / "base"), "--out", str(d / "rm"), "--set", "rm.max_length=64", "--set", "rm.epochs=2"]) == 0
    assert main(["attack-rm", "--config", str(tiny_config_path), "--rm", str(d / "rm"), "--prompts",
                 str(d / "prompts.jsonl"), "--out", str(d / "attack"), "--starts", "4", "--budget", "4",
                 "--held-out", "16", "--patterns", "6"]) == 0
    return json.loads((d / "attack" / "attack.json").read_text())["patterns"][:k]


def test_a_token_planted_in_a_users_preferences_is_found_and_not_invented(tmp_path, tiny_config_path, capsys):
    """" zebra" on 90% of the chosen responses and 10% of the rejected ones: the reward model
    learns it, and the search puts it among the first 3 patterns with the interval's low end
    above ``reward_exploit_gain`` (0.5). The control, " zebra" on 50% of both sides, teaches
    nothing: no zebra among its first 3. Measured on data seeds 0 / 1 / 2 (seed 0 is tested):
    planted, a zebra pattern ranks first each time, the low end of its interval 2.89 / 1.77 /
    1.88; control, no zebra among any of the patterns measured, whose first-ranked low ends
    are 0.53 / 0.96 / 0.51 (other BPE pieces the reward model happens to pay for)."""
    from rlhflab.diagnose import Thresholds

    bar = Thresholds().reward_exploit_gain
    planted, control = tmp_path / "planted", tmp_path / "control"
    for d, pc, pr in ((planted, 0.9, 0.1), (control, 0.5, 0.5)):
        d.mkdir()
        _user_files(d, pc, pr)
    found = [p for p in _top_patterns(planted, tiny_config_path) if "zebra" in p["text"]]
    assert found and found[0]["ci_low"] >= bar
    assert found[0]["exploit"] is None  # paid for; no gold or judge on a user's prompts to say more
    assert not [p for p in _top_patterns(control, tiny_config_path) if "zebra" in p["text"]]


# --------------------------------------------------------------------------- bad input


def _one_line_exit_2(argv, capsys, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_bad_input_is_one_line_and_exit_2(world_runs, tiny_config_path, tmp_path, capsys):
    cfg = ["--config", str(tiny_config_path)]
    _one_line_exit_2(["attack-rm", *cfg, "--rm", str(world_runs / "sft"), "--out", str(tmp_path / "a")], capsys,
                     "missing from the checkpoint")  # a policy given as --rm
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_exit_2(["attack-rm", *cfg, "--rm", str(world_runs / "rm"), "--prompts", str(empty), "--out",
                      str(tmp_path / "b")], capsys, "empty.jsonl", "no rows")
    _one_line_exit_2(["attack-rm", *cfg, "--rm", str(world_runs / "rm"), "--budget", "0", "--out",
                      str(tmp_path / "c")], capsys, "--budget", ">= 1")
    no_refs = tmp_path / "prompts.jsonl"
    no_refs.write_text('{"prompt": "what is 2 plus 3 ?"}\n{"prompt": "what is 1 plus 1 ?"}\n')
    _one_line_exit_2(["attack-rm", *cfg, "--rm", str(world_runs / "rm"), "--prompts", str(no_refs), "--out",
                      str(tmp_path / "d")], capsys, "--policy", "completion")
    _one_line_exit_2(["rm", *cfg, "--sft", str(world_runs / "sft"), "--adversarial", str(tmp_path), "--out",
                      str(tmp_path / "e")], capsys, "adversarial.jsonl")
    assert not any((tmp_path / x).exists() for x in "abcde")
