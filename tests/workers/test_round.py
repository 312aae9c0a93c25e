"""run_round end to end on the tiny models: learning, resume after a crash, cancellation."""

import pytest

from app.schemas.job_spec import JobSpec
from workers.errors import JobCancelled
from workers.pipeline import artifacts
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.round import RoundContext, round_model_location, run_round
from workers.tiny_models import synthetic_prompts

PROMPTS = synthetic_prompts(48, seed=1)


def _spec(rm_type: str, rm_name: str, **overrides) -> JobSpec:
    body = dict(
        base_model="tiny-mistral", prompt_set="ps", rounds=3, samples_per_prompt=4, eval_fraction=0.34,
        reuse_prompts=True,
        reward_model={"type": rm_type, "model": rm_name, "batch_size": 32},
        generation={"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "batch_size": 16},
        training={"learning_rate": 3e-2, "epochs": 4, "batch_size": 4, "max_length": 128,
                  "max_prompt_length": 64, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                  "lora": {"r": 8, "alpha": 16}},
    )
    body.update(overrides)
    return JobSpec.model_validate(body)


def _ctx(spec, tiny_models, tmp_path, n, hooks=None, job="job-1"):
    return RoundContext(job_id=job, round_index=n, spec=spec, prompts=PROMPTS, artifact_root=tmp_path,
                        model_root=tiny_models.root, hooks=hooks or RoundHooks())


@pytest.mark.parametrize("rm_type", ["scalar", "pairrm"])
def test_three_rounds_raise_the_held_out_reward_above_the_base(rm_type, tiny_models, tmp_path):
    spec = _spec(rm_type, tiny_models.scalar_rm if rm_type == "scalar" else tiny_models.pairrm)
    progress, events = [], []
    hooks = RoundHooks(report_progress=lambda p, f: progress.append((p, f)),
                       emit_event=lambda lvl, t, m, d: events.append(t))
    results = [run_round(_ctx(spec, tiny_models, tmp_path, n, hooks)) for n in (1, 2, 3)]
    final = results[-1].metrics
    if rm_type == "scalar":  # reward = 10 x liked-word share; base ~1
        assert final["eval_mean_reward"] > final["eval_base_mean_reward"] + 1.5
    else:  # PairRM logit of the new answer against the base answer (the base scores 0)
        assert final["eval_base_mean_reward"] == 0.0 and final["eval_mean_reward"] > 2.0
    assert final["eval_win_rate"] > 0.8 and final["eval_lc_win_rate"] > 0.7
    for key in ("generate_tokens_per_s", "score_candidates_per_s", "train_samples_per_s", "pairs_kept",
                "pairs_dropped", "train_loss", "eval_mean_length", "eval_base_mean_length", "train_wall_s"):
        assert key in final
    assert all(r.is_adapter for r in results)
    location = round_model_location(tmp_path, "job-1", 3, spec, tiny_models.root)
    assert location.adapter_dir == results[-1].model_dir and (location.model_dir / "adapter_config.json").is_file()
    assert location.base_location.endswith("tiny-mistral")
    paths = artifacts.round_paths(tmp_path, "job-1", 3)
    scores = artifacts.read_jsonl(paths.scores)
    assert len(scores[0]["win_prob"]) == 4 and len(scores[0]["win_prob"][0]) == 4
    assert progress[-1] == ("evaluate", 1.0) and "stage_completed" in events
    assert artifacts.base_eval_path(tmp_path, "job-1").is_file()


def test_resume_after_a_crash_mid_stage_skips_completed_stages(tiny_models, tmp_path, monkeypatch):
    spec = _spec("scalar", tiny_models.scalar_rm, rounds=1, reuse_prompts=False)
    paths = artifacts.round_paths(tmp_path, "job-r", 1)

    import workers.pipeline.round as round_module

    real_train = round_module.train_for_algorithm

    def crash_after_partial_write(config, start, pairs, out_dir, *args, **kwargs):
        (out_dir / "adapter_model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt("simulated SIGKILL mid-train")

    monkeypatch.setattr(round_module, "train_for_algorithm", crash_after_partial_write)
    with pytest.raises(KeyboardInterrupt):
        run_round(_ctx(spec, tiny_models, tmp_path, 1, job="job-r"))
    assert paths.generations.is_file() and paths.scores.is_file() and paths.pairs.is_dir()
    assert not paths.model.exists() and not paths.metrics.exists()
    # what a real SIGKILL leaves behind: a temp dir that was never renamed
    (paths.round_dir / "model.tmp-killed").mkdir()
    (paths.round_dir / "model.tmp-killed" / "junk").write_text("x")
    generations_before = paths.generations.read_bytes()

    monkeypatch.setattr(round_module, "train_for_algorithm", real_train)
    events = []
    result = run_round(_ctx(spec, tiny_models, tmp_path, 1, RoundHooks(
        emit_event=lambda lvl, t, m, d: events.append((t, d.get("stage")))), job="job-r"))
    assert result.skipped_stages == ["generate", "score", "pair"]
    assert ("partial_output_removed", None) in events
    assert not (paths.round_dir / "model.tmp-killed").exists()
    assert paths.generations.read_bytes() == generations_before
    assert (paths.model / "adapter_model.safetensors").stat().st_size > 100 and paths.metrics.is_file()
    assert "generate_tokens_per_s" in result.metrics  # stats of skipped stages are read back
    again = run_round(_ctx(spec, tiny_models, tmp_path, 1, job="job-r"))
    assert len(again.skipped_stages) == 6 and again.metrics == result.metrics


def test_cancel_during_training_stops_the_round(tiny_models, tmp_path):
    spec = _spec("scalar", tiny_models.scalar_rm, rounds=1, reuse_prompts=False)
    state = {"phase": None, "checks_in_train": 0}

    def check():
        if state["phase"] == "train":
            state["checks_in_train"] += 1
            if state["checks_in_train"] > 2:
                raise JobCancelled()

    hooks = RoundHooks(report_progress=lambda p, f: state.update(phase=p), check_cancelled=check)
    with pytest.raises(JobCancelled):
        run_round(_ctx(spec, tiny_models, tmp_path, 1, hooks, job="job-c"))
    paths = artifacts.round_paths(tmp_path, "job-c", 1)
    assert paths.pairs.is_dir() and not paths.model.exists() and not paths.metrics.exists()
    assert not any(p.name.startswith("model.tmp-") for p in paths.round_dir.iterdir())
