import pytest

from workers.pipeline.evaluate import length_controlled_win_rate, scalar_outcome, summarize


def test_lc_win_rate_discounts_wins_explained_by_length():
    # The new model wins exactly when it is longer: length explains the wins, LC sits near 50%.
    diffs = [10, 12, 8, 15, -10, -12, -8, -15] * 3
    outcomes = [1.0 if d > 0 else 0.0 for d in diffs]
    lc = length_controlled_win_rate(outcomes, [100 + d for d in diffs], [100] * len(diffs))
    assert sum(outcomes) / len(outcomes) == 0.5
    assert 0.4 < lc < 0.6


def test_lc_win_rate_keeps_wins_at_equal_length():
    outcomes = [1.0, 1.0, 1.0, 0.0] * 5
    lc = length_controlled_win_rate(outcomes, [50] * 20, [50] * 20)
    assert lc == pytest.approx(0.75, abs=0.02)


def test_lc_win_rate_below_raw_when_new_model_is_longer_and_length_drives_wins():
    diffs = [5, 10, 20, 30, 2, 1, -1, -3]
    outcomes = [1, 1, 1, 1, 1, 0, 0, 0]
    lc = length_controlled_win_rate(outcomes, [40 + d for d in diffs], [40] * 8)
    assert lc < sum(outcomes) / len(outcomes)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_degenerate_all_losses_or_all_wins_stay_finite(value):
    lc = length_controlled_win_rate([value] * 6, [10, 20, 30, 40, 50, 60], [30] * 6)
    assert 0.0 < lc < 1.0
    assert (lc > 0.9) if value else (lc < 0.1)


def test_single_prompt_and_zero_length_variance():
    assert 0.5 < length_controlled_win_rate([1.0], [3], [3]) < 1.0


def test_scalar_outcomes_count_ties_half_and_summary_means():
    outcomes = [scalar_outcome(2.0, 1.0), scalar_outcome(1.0, 1.0), scalar_outcome(0.0, 1.0)]
    assert outcomes == [1.0, 0.5, 0.0]
    result = summarize(outcomes, [2.0, 1.0, 0.0], [1.0, 1.0, 1.0], [4, 6, 8], [5, 5, 5])
    assert result.win_rate == pytest.approx(0.5)
    assert result.mean_reward == pytest.approx(1.0) and result.base_mean_reward == pytest.approx(1.0)
    assert result.mean_length == pytest.approx(6.0) and result.base_mean_length == pytest.approx(5.0)
    assert set(result.as_metrics()) >= {"eval_win_rate", "eval_lc_win_rate", "eval_mean_reward"}
