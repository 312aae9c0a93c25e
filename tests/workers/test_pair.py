import pytest

from workers.pipeline.pair import PairingConfig, build_pairs, load_pair_stats, load_pairs, save_pairs, select_best

PROMPTS = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
CANDIDATES = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["j", "k", "l"]]
SCORES = [[0.1, 0.9, 0.5], [0.2, 0.2, 0.2], [1.0, 0.95, 0.97], [-1.0, 2.0, 0.0]]


def test_best_vs_worst_drops_ties_and_small_margins():
    result = build_pairs(PROMPTS, CANDIDATES, SCORES, PairingConfig(min_margin=0.1))
    assert [r["prompt_index"] for r in result.rows] == [0, 3]
    assert result.rows[0]["chosen"] == [{"role": "assistant", "content": "b"}]
    assert result.rows[0]["rejected"] == [{"role": "assistant", "content": "a"}]
    assert result.rows[1]["margin"] == pytest.approx(3.0)
    assert (result.kept, result.dropped_ties, result.dropped_below_margin) == (2, 1, 1)


def test_best_vs_random_picks_best_and_another_candidate_reproducibly():
    config = PairingConfig(strategy="best_vs_random", seed=4)
    first = build_pairs(PROMPTS, CANDIDATES, SCORES, config)
    again = build_pairs(PROMPTS, CANDIDATES, SCORES, config)
    assert first.rows == again.rows
    for row in first.rows:
        assert row["score_chosen"] > row["score_rejected"]
        assert row["chosen"] != row["rejected"]
    assert first.dropped_ties == 1  # the all-equal prompt


def test_pairs_saved_in_trl_conversational_format(tmp_path):
    result = build_pairs(PROMPTS, CANDIDATES, SCORES, PairingConfig())
    save_pairs(result, tmp_path / "pairs")
    dataset = load_pairs(tmp_path / "pairs")
    assert len(dataset) == 3
    row = dataset[0]
    assert row["prompt"] == PROMPTS[0]
    assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
    assert {"score_chosen", "score_rejected", "margin"} <= set(dataset.column_names)
    assert load_pair_stats(tmp_path / "pairs")["pairs_dropped_ties"] == 1


def test_length_penalty_picks_shorter_chosen_answers_on_the_same_candidates():
    # Longer answers score a little higher (the length bias of reward models); lengths in tokens.
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    candidates = [["short one", "a much longer answer here", "mid size answer", "tiny"]] * 3
    scores = [[1.0, 1.6, 1.25, 0.2]] * 3
    lengths = [[2, 20, 8, 1]] * 3
    plain = build_pairs(prompts, candidates, scores, PairingConfig(), lengths=lengths)
    penalised = build_pairs(prompts, candidates, scores, PairingConfig(length_penalty=0.05), lengths=lengths)
    # score - 0.05 * length: 0.9, 0.6, 0.85, 0.15 -> the 2-token answer wins, not the 20-token one
    assert plain.stats()["chosen_mean_length"] == 20
    assert penalised.stats()["chosen_mean_length"] == 2
    assert penalised.stats()["chosen_mean_length"] < plain.stats()["chosen_mean_length"]
    assert penalised.rows[0]["score_chosen"] == 1.0 and penalised.rows[0]["margin"] == pytest.approx(0.75)


def test_select_best_gives_prompt_completion_rows_for_sft():
    result = select_best(PROMPTS, CANDIDATES, SCORES, PairingConfig(length_penalty=0.0))
    assert [r["completion"][0]["content"] for r in result.rows] == ["b", "g", "k"]
    assert result.dropped_ties == 1 and result.kind == "best"
    assert result.rows[0]["prompt"] == PROMPTS[0] and result.rows[0]["score"] == 0.9


def test_loaded_pairs_live_in_memory_so_training_maps_leave_the_artifact_alone(tmp_path):
    save_pairs(build_pairs(PROMPTS, CANDIDATES, SCORES, PairingConfig()), tmp_path / "pairs")
    files = sorted(p.name for p in (tmp_path / "pairs").iterdir())
    dataset = load_pairs(tmp_path / "pairs")
    mapped = dataset.map(lambda row: {"n": len(row["chosen"][0]["content"])}).filter(lambda row: row["n"] > 0)
    assert len(mapped) == 3
    assert sorted(p.name for p in (tmp_path / "pairs").iterdir()) == files  # no cache-*.arrow written there
