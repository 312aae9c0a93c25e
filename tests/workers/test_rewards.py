"""The new reward kinds on their own: rules, a judge behind a local fake endpoint, the implicit
log-ratio reward, and rules added to a model reward with weights."""

from __future__ import annotations

import pytest

from app.core.endpoints import endpoint_allowed
from app.schemas.job_spec import RewardModelConfig
from tests.workers.fake_judge import fake_judge
from workers.errors import JudgeEndpointNotAllowed, JudgeUnavailable
from workers.pipeline.judge import JUDGE_LOGIT, parse_verdict, render_judge_prompt
from workers.pipeline.rules import RuleScorer, RuleSet
from workers.pipeline.score import load_reward_model, reward_model_spec

PROMPT = [{"role": "user", "content": "how should i invest my savings ?"}]


def _reward(tiny_models, allowlist=(), **config):
    return load_reward_model(reward_model_spec(RewardModelConfig.model_validate(config)), tiny_models.root,
                             judge_allowlist=allowlist)


def test_rules_reward_counts_violations_and_words_outside_the_range():
    scorer = RuleScorer(RuleSet(must_match=(r"(?i)\bconsult\b",), must_not_match=(r"(?i)\b(buy|sell)\b",),
                                min_words=3, max_words=8, violation_penalty=1.0, length_penalty=0.5))
    good = scorer.check("Please consult a licensed adviser first.")
    assert good.satisfied and good.reward == 0.0
    bad = scorer.check("Buy.")  # no "consult", says "buy", 1 word: 2 violations + 2 words short
    assert (bad.violations, bad.words_outside, bad.reward) == (2, 2, -3.0)
    long = scorer.check("consult " + "word " * 10)  # 11 words: 3 over
    assert long.reward == -1.5 and not long.satisfied
    assert scorer.satisfaction_rate(["consult an adviser now", "buy now", "sell everything today"]) == 1 / 3


def test_rules_alone_score_candidates_and_compare(tiny_models):
    reward = _reward(tiny_models, type="rules", rules={"must_not_match": ["(?i)stocks"]})
    result = reward.score_candidates([PROMPT], [["buy stocks now", "talk to an adviser"]])
    assert result.scores == [[-1.0, 0.0]]
    assert result.win_prob[0][1][0] == pytest.approx(1 / (1 + 2.718281828459045 ** -1.0))
    assert reward.compare([PROMPT], ["talk to an adviser"], ["buy stocks"]) == [1.0]
    assert reward.rewards([PROMPT], ["stocks"]) == [-1.0]


def test_rules_are_added_to_a_scalar_reward_with_weights(tiny_models):
    plain = _reward(tiny_models, type="scalar", model=tiny_models.scalar_rm)
    mixed = _reward(tiny_models, type="scalar", model=tiny_models.scalar_rm,
                    rules={"must_not_match": ["clock"]}, weights={"model": 0.5, "rules": 3.0})
    answers = ["kind warm happy", "the old clock"]
    base = plain.rewards([PROMPT] * 2, answers)
    assert mixed.rewards([PROMPT] * 2, answers) == pytest.approx([0.5 * base[0], 0.5 * base[1] - 3.0])
    scores = mixed.score_candidates([PROMPT], [answers]).scores[0]
    assert scores == pytest.approx([0.5 * base[0], 0.5 * base[1] - 3.0], abs=1e-5)


def test_implicit_reward_is_the_log_ratio_of_two_models(tiny_models):
    reward = _reward(tiny_models, type="implicit", model=tiny_models.policy_liked,
                     reference_model=tiny_models.policy)
    liked, plain = reward.rewards([PROMPT] * 2, ["kind warm happy gentle", "the old red clock"])
    assert liked > 0 > plain  # the "instruct" model moved towards liked words, away from the rest
    same = _reward(tiny_models, type="implicit", model=tiny_models.policy, reference_model=tiny_models.policy)
    assert same.rewards([PROMPT], ["kind warm"]) == [0.0]
    normalised = _reward(tiny_models, type="implicit", model=tiny_models.policy_liked,
                         reference_model=tiny_models.policy, length_normalize=True)
    short, longer = normalised.rewards([PROMPT] * 2, ["kind warm", "kind warm kind warm kind warm"])
    summed = reward.rewards([PROMPT] * 2, ["kind warm", "kind warm kind warm kind warm"])
    assert summed[1] > 2 * summed[0] and longer < 2 * short  # per token, repeating no longer pays triple


def test_judge_asks_both_orders_and_cancels_position_bias(tiny_models):
    with fake_judge() as (url, judge):
        reward = _reward(tiny_models, allowlist=[url], type="judge", model="judge-1", judge={"endpoint": url})
        result = reward.score_candidates([PROMPT], [["kind warm happy", "the old clock", "the red lamp"]])
    d = result.logits[0]
    assert len(judge.requests) == 6 and {r["model"] for r in judge.requests} == {"judge-1"}
    assert d[0][1] == JUDGE_LOGIT and d[1][0] == -JUDGE_LOGIT
    # "the old clock" vs "the red lamp": equal, the fake judge picks whichever comes first -> cancels
    assert d[1][2] == 0.0 and result.win_prob[0][1][2] == 0.5
    assert result.scores[0][0] == pytest.approx(JUDGE_LOGIT)


def test_judge_endpoint_must_be_allowlisted_and_failures_are_domain_errors(tiny_models):
    assert endpoint_allowed("http://judge:8000/v1", ["http://judge:8000/v1/"])
    assert endpoint_allowed("http://judge:8000/v1/x", ["http://judge:8000/v1"])
    assert not endpoint_allowed("http://judge:8000/v1-evil", ["http://judge:8000/v1"])
    assert not endpoint_allowed("http://judge:8000.evil.com/v1", ["http://judge:8000"])
    assert not endpoint_allowed("http://judge:8000/v1", [])
    with pytest.raises(JudgeEndpointNotAllowed):
        _reward(tiny_models, type="judge", model="j", judge={"endpoint": "http://127.0.0.1:9/v1"})
    with fake_judge() as (url, _):
        broken = _reward(tiny_models, allowlist=[url + "/wrong"], type="judge", model="j",
                         judge={"endpoint": url + "/wrong"})
        with pytest.raises(JudgeUnavailable):
            broken.score_candidates([PROMPT], [["a", "b"]])


def test_judge_prompt_is_filled_without_format_and_verdicts_parse():
    template = "{prompt} | A: {answer_a} | B: {answer_b} | {other.__class__}"
    text = render_judge_prompt(template, PROMPT, "says {answer_b}", "b")
    assert text == "how should i invest my savings ? | A: says {answer_b} | B: b | {other.__class__}"
    assert parse_verdict("A") == 1 and parse_verdict(" b.") == -1 and parse_verdict("Answer B is better") == -1
    assert parse_verdict("neither") == 0 and parse_verdict("") == 0
