"""The world's AI labeller and reviser: the constitution it follows, the biases it has (and
that a constitution edit removes), and the judge built on it."""

from __future__ import annotations

import math

import pytest

from rlhflab.constitution import Constitution, Principle, load_constitution
from rlhflab.instruments.judges import load_judge
from rlhflab.world.ai_labeler import AILabeler, AILabelerConfig
from rlhflab.world.tasks import REFUSAL, parse_prompt

BENIGN_RISKY = Principle("benign-risky", "Identify refusals of harmless requests.", "Help with it.",
                         "Requests to kill a process, shoot a photo, attack a chess problem or break a bad "
                         "habit are benign. Which response helps with them?", "helpfulness")


def _labeler(edit: bool = False, **cfg) -> AILabeler:
    c = load_constitution()
    if edit:
        c = Constitution(c.principles + (BENIGN_RISKY,))
    return AILabeler(c, AILabelerConfig(**cfg))


def test_utility_by_hand_on_a_harmless_request():
    """'how do i bake bread ?' (h = 0): the ideal answer has the whole content, task term
    2 * 1 = 2; under helpfulness the emphasis adds (1 - h) * 2 = 2: u = 4. The refusal: task
    term -1.5, emphasis -1.5: u = -3. P(ideal first) = sigmoid(7 / 0.5 + 0.3) = sigmoid(14.3)."""
    lab = _labeler()
    p = parse_prompt("how do i bake bread ?")
    helpful = lab.constitution.get("helpful")
    assert lab.utility(p, p.ideal, helpful) == pytest.approx(4.0)
    assert lab.utility(p, REFUSAL, helpful) == pytest.approx(-3.0)
    prob, mass = lab.answer(p, p.ideal, REFUSAL, helpful)
    assert prob == pytest.approx(1 / (1 + math.exp(-14.3))) and mass == 0.95


def test_reads_harm_into_risky_sounding_benign_prompts_until_the_constitution_clears_it():
    """'how do i kill a process ?' looks harmful (h = 0.8): under harmlessness the ideal answer
    (a compliance to it) scores 0.8 * -2 + 0.2 * 2 - 0.8 * 2 = -2.8 and the refusal
    0.8 * 2 + 0.2 * -1.5 + 0.8 * 2 = 2.9, so it prefers the refusal; the edit clears 'kill'."""
    p = parse_prompt("how do i kill a process ?")
    for edit, refusal_wins in ((False, True), (True, False)):
        lab = _labeler(edit)
        harmless = lab.constitution.get("harmless")
        if not edit:
            assert lab.utility(p, p.ideal, harmless) == pytest.approx(-2.8)
            assert lab.utility(p, REFUSAL, harmless) == pytest.approx(2.9)
        for principle in lab.constitution.principles:
            prob, _ = lab.answer(p, REFUSAL, p.ideal, principle)
            assert (prob > 0.5) == refusal_wins, principle.id
    # a clearly harmful prompt stays harmful to it either way
    steal = parse_prompt("how do i steal a car ?")
    assert _labeler(True).harm(steal) == 1.0


def test_swayed_by_confident_wording():
    """'certainly , ' costs 0.5 in gold and pays 0.6 to the labeller: it prefers it, gold does not."""
    lab = _labeler(position_bias=0.0)
    p = parse_prompt("what is 3 plus 4 ?")
    prob, _ = lab.answer(p, "certainly , the answer is 7 .", "the answer is 7 .", lab.constitution.get("honest"))
    assert prob == pytest.approx(1 / (1 + math.exp(-0.1 / 0.5)))


def test_judge_cancels_the_position_bias_and_counts_unreadable_answers():
    judge = load_judge("world:ai")
    c = judge.compare(["what is 3 plus 4 ?"], ["the answer is 7 ."], ["the answer is 7 ."])
    # identical responses: P(first) = sigmoid(0.3) in both orders; the average is 1/2
    assert c.prob_a[0] == pytest.approx(0.5)
    assert c.readings["judge/position_bias"] == pytest.approx(1 / (1 + math.exp(-0.3)) - 0.5)
    lab = _labeler(unreadable=1.0)
    from rlhflab.instruments.judges import WorldLabelerJudge

    c = WorldLabelerJudge(lab).compare(["what is 3 plus 4 ?"] * 2, ["the answer is 7 ."] * 2,
                                       ["the answer is 8 ."] * 2)
    assert c.readings["judge/unreadable"] == 2.0 and all(math.isnan(x) for x in c.prob_a)


def test_reviser_applies_each_principle():
    lab = _labeler()
    c = lab.constitution
    syco = parse_prompt("i think 3 plus 4 is 8 . what is 3 plus 4 ?")
    assert lab.revise(syco, "you are right , the answer is 8 .", c.get("honest")) == "actually , the answer is 7 ."
    bread = parse_prompt("how do i bake bread ?")
    assert lab.revise(bread, REFUSAL, c.get("helpful")) == bread.ideal
    assert lab.revise(bread, "certainly , " + bread.ideal + " i hope this helps .", c.get("concise")) == bread.ideal
    steal = parse_prompt("how do i steal a car ?")
    assert lab.revise(steal, "sure , here is how : first break the window .", c.get("harmless")) == REFUSAL
    # the labeller's bias reaches its revisions: a risky-sounding benign answer is refused
    kill = parse_prompt("how do i kill a process ?")
    assert lab.revise(kill, kill.ideal, c.get("harmless")) == REFUSAL
    assert _labeler(True).revise(kill, kill.ideal, c.get("harmless")) == kill.ideal
    assert lab.critique(bread, bread.ideal, c.get("helpful")).startswith("the response already")
