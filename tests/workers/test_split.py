import pytest

from workers.errors import InvalidPrompts
from workers.pipeline.split import SplitConfig, split_prompts


def test_shards_are_disjoint_cover_training_prompts_and_exclude_eval():
    split = split_prompts(103, SplitConfig(rounds=3, eval_fraction=0.1, seed=5))
    assert len(split.eval_indices) == 10
    shards = [set(s) for s in split.round_shards]
    assert all(not (a & b) for i, a in enumerate(shards) for b in shards[i + 1:])
    assert sorted(len(s) for s in shards) == [31, 31, 31]
    assert set().union(*shards) | set(split.eval_indices) == set(range(103))
    assert not set(split.eval_indices) & set().union(*shards)


def test_same_seed_same_split_other_seed_other_split():
    config = SplitConfig(rounds=3, eval_fraction=0.2, seed=11)
    assert split_prompts(50, config) == split_prompts(50, config)
    assert split_prompts(50, config) != split_prompts(50, SplitConfig(rounds=3, eval_fraction=0.2, seed=12))


def test_at_least_one_eval_prompt_and_reuse_gives_every_round_all_training_prompts():
    split = split_prompts(6, SplitConfig(rounds=3, eval_fraction=0.01, reuse_prompts=True))
    assert len(split.eval_indices) == 1
    assert split.round_shards[0] == split.round_shards[1] == split.round_shards[2]
    assert len(split.round_shards[0]) == 5


def test_too_few_prompts_for_disjoint_shards_is_a_domain_error():
    with pytest.raises(InvalidPrompts):
        split_prompts(3, SplitConfig(rounds=3, eval_fraction=0.3))


def test_split_round_trips_through_json():
    from workers.pipeline.split import PromptSplit

    split = split_prompts(20, SplitConfig(rounds=2, eval_fraction=0.2, seed=3))
    assert PromptSplit.from_json(split.to_json()) == split
