import pytest
import torch

from workers.pipeline.pairrm import cancel_position_bias, pairwise_logits
from workers.pipeline.scalar_rm import render_for_rm
from workers.pipeline.score import RewardModelSpec, load_reward_model
from workers.tiny_models import liked_fraction

PROMPTS = [[{"role": "user", "content": "describe the quiet river ?"}],
           [{"role": "user", "content": "what the dog finds ?"}]]
CANDIDATES = [
    ["the old road moves the plain clock", "kind warm gentle friendly happy calm", "the kind old river is calm"],
    ["red book of the idea", "a sunny lovely cheerful bright dog", "the kind dog is very old"],
]


@pytest.fixture(scope="module")
def pairrm(tiny_models):
    return load_reward_model(RewardModelSpec(type="pairrm", model=tiny_models.pairrm, batch_size=8),
                             tiny_models.root)


@pytest.fixture(scope="module")
def scalar(tiny_models):
    return load_reward_model(RewardModelSpec(type="scalar", model=tiny_models.scalar_rm, batch_size=2),
                             tiny_models.root)


def test_pairrm_win_matrix_shape_complementary_and_ranks_liked_words_first(pairrm):
    result = pairrm.score_candidates(PROMPTS, CANDIDATES)
    for probs, scores, cands in zip(result.win_prob, result.scores, CANDIDATES, strict=True):
        p = torch.tensor(probs)
        assert p.shape == (3, 3)
        assert torch.allclose(p + p.T, torch.ones(3, 3), atol=1e-5)
        assert torch.allclose(torch.diagonal(p), torch.full((3,), 0.5))
        by_score = sorted(range(3), key=lambda i: -scores[i])
        by_preference = sorted(range(3), key=lambda i: -liked_fraction(cands[i]))
        assert by_score[0] == by_preference[0] and by_score[-1] == by_preference[-1]
    assert result.candidates_per_s > 0


def test_pairrm_compares_both_orders(pairrm):
    raw = pairwise_logits(pairrm.loaded, ["q"], [["kind warm calm", "old red clock"]], rows_per_forward=4)
    assert raw[0, 0, 1] != -raw[0, 1, 0]  # one order alone is position-biased ...
    d = cancel_position_bias(raw)
    assert torch.allclose(d, -d.transpose(-1, -2))  # ... the average of both is not
    forward = pairrm.compare(PROMPTS[:1], ["kind warm calm gentle"], ["old red clock road"])[0]
    backward = pairrm.compare(PROMPTS[:1], ["old red clock road"], ["kind warm calm gentle"])[0]
    assert forward > 0 and forward == pytest.approx(-backward, abs=1e-5)


def test_scalar_rm_uses_its_own_chat_template(scalar, tiny_models):
    tokenizer = scalar.loaded.tokenizer
    text = tokenizer.decode(render_for_rm(tokenizer, PROMPTS[0], "a kind answer"))
    assert text.startswith("<|user|> describe the quiet river ? <|assistant|> a kind answer")
    assert "[INST]" not in text and "im_start" not in text


def test_scalar_rm_scores_follow_the_preference_and_are_batch_independent(scalar):
    result = scalar.score_candidates(PROMPTS, CANDIDATES)
    for scores, cands in zip(result.scores, CANDIDATES, strict=True):
        assert max(range(3), key=lambda i: scores[i]) == max(range(3), key=lambda i: liked_fraction(cands[i]))
    p = torch.tensor(result.win_prob[0])
    assert torch.allclose(p + p.T, torch.ones(3, 3), atol=1e-6)
    one_by_one = [scalar.rewards([PROMPTS[0]], [c])[0] for c in CANDIDATES[0]]
    assert one_by_one == pytest.approx(result.scores[0], abs=1e-4)


def test_scalar_rm_batch_rendering_matches_one_at_a_time(scalar):
    from workers.pipeline.scalar_rm import render_for_rm_batch

    tokenizer = scalar.loaded.tokenizer
    prompts = [PROMPTS[i % 2] for i in range(6)]
    responses = [c for row in CANDIDATES for c in row]
    assert render_for_rm_batch(tokenizer, prompts, responses) == [
        render_for_rm(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]


def test_reward_models_are_loaded_once_and_frozen(tiny_models, scalar, pairrm):
    again = load_reward_model(RewardModelSpec(type="scalar", model=tiny_models.scalar_rm, batch_size=4),
                              tiny_models.root)
    assert again.loaded.model is scalar.loaded.model and again.spec.batch_size == 4
    assert not any(p.requires_grad for p in again.loaded.model.parameters())
    assert load_reward_model(RewardModelSpec(type="pairrm", model=tiny_models.pairrm, batch_size=8),
                             tiny_models.root).loaded is pairrm.loaded
